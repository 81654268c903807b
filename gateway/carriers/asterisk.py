"""Asterisk `chan_websocket`: the PBX dials the gateway; binary frames carry raw media, text frames JSON
control (Asterisk 20.18+, 22.8+, 23.2+).

There is no answer webhook (`/asterisk/voice` answers 404): the dialplan dials a WebSocket channel whose
client in websocket_client.conf points at `wss://<public host>/asterisk/media`, and the upgrade's
credentials alone vouch for the stream (`prepares_calls = False`):

    ; websocket_client.conf
    [duplexgate]
    type = websocket_client
    connection_type = per_call_config
    uri = wss://gw.example.com/asterisk/media
    protocols = media
    username = asterisk
    password = <ASTERISK_WS_PASSWORD>

    ; extensions.conf: who is calling travels as inherited channel variables (MEDIA_START reports them)
    exten => _X.,1,Set(__DUPLEXGATE_CALLER=${CALLERID(num)})
     same => n,Set(__DUPLEXGATE_CALLED=${EXTEN})
     same => n,Set(__DUPLEXGATE_CHANNEL=${UNIQUEID})
     same => n,Dial(WebSocket/duplexgate/c(slin16)f(json),,g)   ; g: go on here when the stream ends
     same => n,Set(T=${GLOBAL(DUPLEXGATE_TRANSFER_${FILTER(0-9A-Za-z,${UNIQUEID})})})
     same => n,Set(GLOBAL(DUPLEXGATE_TRANSFER_${FILTER(0-9A-Za-z,${UNIQUEID})})=)
     same => n,GotoIf($["${T}" = ""]?done)
     same => n,Dial(PJSIP/${T}@trunk)                            ; a number, or PJSIP/trunk/${T} for sip:
     same => n(done),Hangup()

Config: `[asterisk]`; the upgrade must carry HTTP Basic with the password from `password_env` (default
ASTERISK_WS_PASSWORD; any user name), compared in constant time; without it set every stream is taken.
`c(ulaw)`, `c(slin16)` and `c(slin24)` are understood; slin16 is the documented wide-band choice.

Transfer: ARI's `POST /channels/{id}/redirect` works only on a channel in a Stasis application (409
otherwise) and to an endpoint of the channel's own technology (422): neither holds for a dialled WebSocket
channel nor for the caller's channel sitting in Dial(). So with `ari_url`, `ari_user` and the password
from `ari_password_env` set, a transfer sets the global variable DUPLEXGATE_TRANSFER_<caller's uniqueid,
letters and digits only> to the target (`POST /ari/asterisk/variable`, which needs no Stasis); the stream
then ends, Dial() returns (option g) and the dialplan above dials the target.

GUESSes: `slin24` is 24 kHz signed linear (only slin16 is shown in the docs); slin frames are
little-endian (Asterisk's host order on x86/ARM); `__`-inherited variables appear in MEDIA_START's
`channel_variables` (their names stripped of underscores here either way); closing the socket hangs up
the WebSocket channel; marks pending at FLUSH_MEDIA are flushed with the media and never reported.

Size: the dialplan the transfer relies on is spelled out above, and the simulated Asterisk (for the
conformance suite and `duplexgate call`) lives beside the dialect it must mirror, as in twilio.py.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import orjson

from gateway.call.events import (
    CallerAudio,
    CallEvent,
    CallStarted,
    DtmfPressed,
    MalformedMessage,
    MarkPlayed,
    MediaFormat,
)
from gateway.carriers.base import (
    TOKEN_PARAMETER,
    Answering,
    Carrier,
    CarrierPeer,
    CarrierSettings,
    CarrierStream,
    Outbound,
    StreamTarget,
    Violation,
    WebhookRefused,
    basic_credentials,
    basic_header,
    rest_request,
)
from gateway.carriers.wire import compact, dtmf_digit, guarded

log = logging.getLogger(__name__)

FORMATS = {
    "ulaw": MediaFormat("mulaw", 8000),
    "slin": MediaFormat("l16", 8000),
    "slin16": MediaFormat("l16", 16000),
    "slin24": MediaFormat("l16", 24000),  # GUESS: not shown in chan_websocket's docs
}
MAX_MEDIA_BYTES = 65_500  # a bigger message makes Asterisk close the socket and hang up
QUIET_EVENTS = frozenset({"MEDIA_XON", "STATUS", "QUEUE_DRAINED", "MEDIA_BUFFERING_COMPLETED"})
CALLER_VARIABLE = "DUPLEXGATE_CALLER"  # inherited channel variables the dialplan sets before Dial()
CALLED_VARIABLE = "DUPLEXGATE_CALLED"
CHANNEL_VARIABLE = "DUPLEXGATE_CHANNEL"  # the caller channel's ${UNIQUEID}: the call's control_id
TRANSFER_VARIABLE = "DUPLEXGATE_TRANSFER_"  # + the caller channel's uniqueid, letters and digits only
CHANNEL_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}")  # uniqueids such as "pbx1-1700000000.42"


@dataclass(frozen=True)
class AsteriskSettings(CarrierSettings):
    password_env: str = "ASTERISK_WS_PASSWORD"  # websocket_client.conf's password (Basic auth)
    password: str | None = field(default=None, repr=False)  # from the environment, never the file
    ari_url: str = ""  # e.g. http://127.0.0.1:8088 (ARI, for transfers); "" = no transfers
    ari_user: str = ""  # an ari.conf user
    ari_password_env: str = "ASTERISK_ARI_PASSWORD"
    ari_password: str | None = field(default=None, repr=False)
    secrets: ClassVar[Mapping[str, str]] = {"password": "password_env", "ari_password": "ari_password_env"}

    def signing_variables(self) -> list[str]:
        return [self.password_env]

    def problems(self, public_url: str) -> list[str]:
        if not self.ari_url:
            return []
        found = []
        if urlsplit(self.ari_url).scheme not in ("http", "https"):
            found.append(f"ari_url = {self.ari_url!r} should be Asterisk's http(s):// base")
        if not self.ari_user or not self.ari_password:
            found.append(f"ari_url is set: it needs ari_user and {self.ari_password_env} in the environment")
        return found


def transfer_variable(control_id: str) -> str:
    """The global variable the dialplan reads after Dial(): FILTER(0-9A-Za-z,${UNIQUEID}) matches it."""
    return TRANSFER_VARIABLE + re.sub(r"[^0-9A-Za-z]", "", control_id)


# --- the gateway's side ---------------------------------------------------------------------------


class AsteriskStream(CarrierStream):
    """chan_websocket's frames: binary media both ways, JSON control events in, JSON commands out."""

    def __init__(self, query: Mapping[str, str], headers: Mapping[str, str]) -> None:
        super().__init__(query, headers)
        self.optimal_frame_size = 0
        self._warned_xoff = False

    def parse(self, message: str | bytes) -> CallEvent | None:
        return guarded(self._parse, message)

    def _parse(self, message: str | bytes) -> CallEvent | None:
        if isinstance(message, bytes):  # first: fifty of these a second per call
            if not message:
                raise MalformedMessage("empty media frame")
            return CallerAudio(payload=message)
        try:
            data = orjson.loads(message)
        except orjson.JSONDecodeError:
            word = message[:24].split(" ", 1)[0]
            raise MalformedMessage(
                f"not JSON ({word!r:.30}...): dial with f(json) for JSON control"
            ) from None
        if not isinstance(data, dict):
            raise MalformedMessage("JSON is not an object")
        event = data.get("event")
        if event == "MEDIA_MARK_PROCESSED":
            name = data.get("correlation_id")
            if not isinstance(name, str) or not name:
                raise MalformedMessage("MEDIA_MARK_PROCESSED without a correlation_id")
            return MarkPlayed(name=name)
        if event == "DTMF_END":
            return DtmfPressed(digit=dtmf_digit(data.get("digit"), "DTMF_END digit", clip=8))
        if event == "MEDIA_START":
            return self._parse_start(data)
        if event == "MEDIA_XOFF":
            if not self._warned_xoff:  # the gateway keeps ~0.2 s queued: a full queue means trouble
                log.warning("Asterisk stream %s: MEDIA_XOFF, its media queue is full", self.stream_id)
                self._warned_xoff = True
            return None
        if event in QUIET_EVENTS:
            return None
        raise MalformedMessage(f"unknown event {str(event)[:40]!r}")

    def _parse_start(self, data: dict[str, Any]) -> CallStarted:
        channel_id = data.get("channel_id")
        if not isinstance(channel_id, str) or not CHANNEL_ID.fullmatch(channel_id):
            raise MalformedMessage(f"MEDIA_START channel_id {str(channel_id)[:40]!r} is not a channel id")
        fmt = data.get("format")
        if fmt not in FORMATS:
            raise MalformedMessage(f"MEDIA_START format {str(fmt)[:20]!r} is not one of {sorted(FORMATS)}")
        size = data.get("optimal_frame_size", 0)
        if not isinstance(size, int) or size < 0:
            raise MalformedMessage(f"MEDIA_START optimal_frame_size {size!r:.20} is not a byte count")
        raw = data.get("channel_variables") or {}
        if not isinstance(raw, dict):
            raise MalformedMessage("MEDIA_START channel_variables is not an object")
        # `__NAME` inherits to every channel Dial() makes; the name may or may not keep its underscores.
        variables = {str(k).lstrip("_"): v for k, v in raw.items() if isinstance(v, str)}
        connection = data.get("connection_id")
        self.stream_id = connection if isinstance(connection, str) and connection else channel_id
        self.optimal_frame_size = size
        control = variables.get(CHANNEL_VARIABLE, "")
        return CallStarted(
            call_id=channel_id,
            stream_id=self.stream_id,
            caller=variables.get(CALLER_VARIABLE, "")[:64] or None,
            called=variables.get(CALLED_VARIABLE, "")[:64] or None,
            # v(...) in the dial string adds URI parameters (per-call limits); no call token exists here
            custom_parameters={k: v for k, v in self.query.items() if k != TOKEN_PARAMETER},
            media_format=FORMATS[fmt],
            control_id=control if CHANNEL_ID.fullmatch(control) else None,
        )

    def audio(self, payload: bytes) -> Sequence[bytes]:
        # 80 ms is four 20 ms frames of any codec here: whole multiples of optimal_frame_size, re-timed
        # by Asterisk itself.
        return [payload]

    def mark(self, name: str) -> Sequence[str]:
        return [compact({"command": "MARK_MEDIA", "correlation_id": name})]

    def clear(self) -> Sequence[str]:
        return [compact({"command": "FLUSH_MEDIA"})]

    def end(self, reason: str) -> Sequence[str]:
        return [compact({"command": "HANGUP"})]


class AsteriskCarrier(Carrier):
    """Asterisk dialling the gateway over chan_websocket; transfers through ARI and the dialplan."""

    name: ClassVar[str] = "asterisk"
    settings_type = AsteriskSettings
    prepares_calls: ClassVar[bool] = False
    transfer_ends_stream: ClassVar[bool] = True  # Dial(...,g) returns and the dialplan dials the target
    console = "websocket_client.conf: uri = wss://<public>/asterisk/media, then Dial(WebSocket/<client>/...)"

    settings: AsteriskSettings

    @property
    def authenticates(self) -> bool:
        return bool(self.settings.password)

    def read_answer(
        self, method: str, path: str, query: str, body: bytes, headers: Mapping[str, str]
    ) -> Answering:
        raise WebhookRefused(404, "Asterisk has no answer webhook: Dial(WebSocket/...) to /asterisk/media")

    def answer(self, call: Answering, stream_url: str, token: str) -> tuple[str, str]:
        raise RuntimeError("Asterisk has no answer webhook")  # read_answer refuses every request first

    def verify_upgrade(self, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> bool:
        if not self.settings.password:
            return True
        _, password = basic_credentials(headers) or ("", "")
        return hmac_equal(password, self.settings.password)

    def open_stream(self, query: Mapping[str, str], headers: Mapping[str, str]) -> AsteriskStream:
        return AsteriskStream(query, headers)

    async def transfer(self, call: CallStarted, target: str) -> None:
        """Tell the dialplan where to go (a global variable, over ARI); the stream's end does the rest."""
        settings = self.settings
        if not (settings.ari_url and settings.ari_user and settings.ari_password):
            raise RuntimeError(f"asterisk transfers need ari_url, ari_user and {settings.ari_password_env}")
        if not call.control_id:
            raise RuntimeError(
                f"call {call.call_id}: the dialplan set no {CHANNEL_VARIABLE} (the caller's uniqueid)"
            )
        await rest_request(
            "POST",
            f"{settings.ari_url.rstrip('/')}/ari/asterisk/variable",
            what=f"asterisk transfer of {call.call_id}",
            params={"variable": transfer_variable(call.control_id), "value": target},
            auth=(settings.ari_user, settings.ari_password),
        )


def hmac_equal(given: str, expected: str) -> bool:
    return secrets.compare_digest(given.encode(), expected.encode())


# --- the carrier's side, for the simulator ----------------------------------------------------------

CONFORMANCE_PASSWORD = "conformance-asterisk-password-0123"
CONFORMANCE_ARI_USER, CONFORMANCE_ARI_PASSWORD = "duplexgate", "conformance-ari-password-4567"
_COMMAND_KEYS = {
    "MARK_MEDIA": {"command", "correlation_id"},
    "FLUSH_MEDIA": {"command"},
    "HANGUP": {"command"},
}
_OTHER_COMMANDS = {"ANSWER", "GET_STATUS", "REPORT_QUEUE_DRAINED", "PAUSE_MEDIA", "CONTINUE_MEDIA"}


class AsteriskPeer(CarrierPeer):
    """Asterisk dialling WebSocket/<client>/c(slin16)f(json): Basic-auth upgrade, MEDIA_START, 20 ms slin16
    binary frames, DTMF_END, MEDIA_MARK_PROCESSED when a mark's audio has played. `secret`: the password."""

    wire: MediaFormat = FORMATS["slin16"]
    chunk_s: ClassVar[float] = 0.02
    echoes_marks_on_clear: ClassVar[bool] = False  # GUESS: FLUSH_MEDIA drops pending marks unreported
    has_webhook: ClassVar[bool] = False
    user: ClassVar[str] = "asterisk"

    def __init__(self, call_id: str | None, caller: str, called: str, secret: Any = None) -> None:
        super().__init__(call_id, caller, called, secret)
        self.stream_id = str(uuid.uuid4())
        self.caller_channel = self.new_call_id()  # the PJSIP channel that ran Dial()
        self.frame_size = self.wire.bytes_per_second // 50  # 20 ms

    @staticmethod
    def new_call_id() -> str:
        return f"pbx1-{int(time.time())}.{secrets.randbelow(10**6)}"

    async def answer(self, client: httpx.AsyncClient, webhook: str) -> StreamTarget:
        raise RuntimeError("Asterisk has no answer webhook: give the stream URL (--url)")

    def target(self, url: str, parameters: Mapping[str, str]) -> StreamTarget:
        """Dial's v(k=v,...) adds URI parameters."""
        if parameters:
            url += ("&" if urlsplit(url).query else "?") + urlencode(dict(parameters))
        return StreamTarget(url, {}, dict(parameters))

    def upgrade_headers(self, target: StreamTarget) -> dict[str, str]:
        return {"Authorization": basic_header(self.user, str(self.secret))} if self.secret else {}

    def opening(self, target: StreamTarget) -> list[str | bytes]:
        start = {
            "event": "MEDIA_START",
            "connection_id": self.stream_id,
            "channel": f"WebSocket/duplexgate/0x{secrets.token_hex(4)}",
            "channel_id": self.call_id,
            "format": "slin16",
            "optimal_frame_size": self.frame_size,
            "ptime": 20,
            "channel_variables": {
                f"__{CALLER_VARIABLE}": self.caller,
                f"__{CALLED_VARIABLE}": self.called,
                f"__{CHANNEL_VARIABLE}": self.caller_channel,
                "MEDIA_WEBSOCKET_CONNECTION_ID": self.stream_id,
            },
        }
        return [compact(start)]

    def media(self, payload: bytes, n: int) -> bytes:
        return payload

    def dtmf(self, digit: str) -> str:
        return compact({"event": "DTMF_END", "channel_id": self.call_id, "digit": digit})

    def played(self, name: str) -> str:
        return compact({"event": "MEDIA_MARK_PROCESSED", "channel_id": self.call_id, "correlation_id": name})

    def read(self, message: str | bytes) -> Outbound:
        if isinstance(message, bytes):
            if not message or len(message) > MAX_MEDIA_BYTES:
                raise Violation(f"media frame of {len(message)} bytes (1 to {MAX_MEDIA_BYTES})")
            if len(message) % self.frame_size:
                raise Violation(
                    f"media frame of {len(message)} bytes: not whole {self.frame_size}-byte frames"
                )
            return Outbound("media", payload=message)
        try:
            data = orjson.loads(message)
        except orjson.JSONDecodeError:
            raise Violation(f"not a JSON command: {message[:80]!r}") from None
        command = data.get("command") if isinstance(data, dict) else None
        if command in _OTHER_COMMANDS:
            return Outbound("other")
        keys = _COMMAND_KEYS.get(command)  # type: ignore[arg-type]
        if keys is None or set(data) != keys:
            raise Violation(f"unknown command or fields: {message[:80]!r}")
        if command == "MARK_MEDIA":
            if not isinstance(data["correlation_id"], str):
                raise Violation("MARK_MEDIA correlation_id is not a string")
            return Outbound("mark", name=data["correlation_id"])
        return Outbound("clear") if command == "FLUSH_MEDIA" else Outbound("other")

    @classmethod
    def conformance_setup(cls, api_base: str) -> tuple[dict[str, Any], dict[str, str], Any]:
        table = {"ari_url": api_base, "ari_user": CONFORMANCE_ARI_USER}
        env = {
            "ASTERISK_WS_PASSWORD": CONFORMANCE_PASSWORD,
            "ASTERISK_ARI_PASSWORD": CONFORMANCE_ARI_PASSWORD,
        }
        return table, env, CONFORMANCE_PASSWORD

    @classmethod
    def forged_secret(cls) -> Any:
        return "forged-asterisk-password-0123"

    def check_transfer(self, request: Mapping[str, Any], target: str) -> list[str]:
        problems = []
        path, _, query = str(request["path"]).partition("?")
        if (request["method"], path) != ("POST", "/ari/asterisk/variable"):
            problems.append(f"{request['method']} {path} is not POST /ari/asterisk/variable")
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        expected = {"variable": transfer_variable(self.caller_channel), "value": target}
        if params != expected:
            problems.append(f"query {params} is not {expected}")
        if request["headers"].get("authorization") != basic_header(
            CONFORMANCE_ARI_USER, CONFORMANCE_ARI_PASSWORD
        ):
            problems.append("not the ARI user's HTTP Basic auth")
        return problems


AsteriskCarrier.peer = AsteriskPeer
