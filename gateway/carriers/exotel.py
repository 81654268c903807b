"""Exotel: the Voicebot applet (AgentStream), a bidirectional JSON media stream with Basic auth.

Exotel has no XML answer webhook. The Voicebot applet in an App Bazaar flow takes either a fixed `wss://`
URL or an HTTPS endpoint that returns one; `/exotel/voice` is that endpoint. Point the applet's URL at
`https://<api_key>:<token>@<public host>/exotel/voice` (Exotel turns credentials in a URL into an
`Authorization: Basic` header); it answers `{"url": "wss://<api_key>:<token>@<public host>/exotel/media?
sample-rate=24000&token=<per-call token>"}`, so the stream carries the same credentials and the call's
single-use token (the query string is one of the applet's "up to 3 custom parameters", max 256 chars).

Config: `[exotel]` with `api_key` (the user name in those URLs) and the password in the environment
variable named by `api_token_env` (default EXOTEL_API_TOKEN); with it set, both the endpoint and every
stream upgrade must carry those Basic credentials (constant-time compare). `sample_rate` (24000, 16000 or
8000) picks the stream's rate: 24 kHz 16-bit PCM is the model's own rate, so nothing is resampled. With a
fixed `wss://` URL in the applet instead, no token comes with the stream: give the agent
`allow_unprepared_streams = true` (the Basic credentials still vouch for the stream).

Transfer: Exotel has no API that moves a live Voicebot leg. The stream auto-closes and the flow goes on
with the applet after the Voicebot (e.g. Connect to the human's number), so configure that next applet;
`transfer` makes no request and the gateway's escalation ends the stream after its grace period.

GUESSes (not in Exotel's docs): the dynamic endpoint is requested with GET and the Connect/Passthru
applets' query parameters (CallSid, CallFrom/From, CallTo/To) and must answer JSON `{"url": ...}`; the
CallSid it names is the stream's `start.call_sid`; credentials in the endpoint's URL reach us as Basic auth;
Exotel plays back 80 ms chunks (at 24 kHz, 3840 bytes; at 8/16 kHz below the documented 3.2 KB minimum,
but multiples of 320 bytes); pending marks come back at once on `clear`, as on Twilio, whose dialect
Exotel's mirrors; `start.custom_parameters` is a flat object of strings.

Size: the protocol both ways (the gateway's dialect and the simulated Exotel that the conformance suite and
`duplexgate call` drive it with) and the voicebot URL's credentials live in one file, as in twilio.py.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import httpx
import orjson

from gateway.call.events import (
    CallerAudio,
    CallEvent,
    CallStarted,
    CallStopped,
    DtmfPressed,
    MalformedMessage,
    MarkPlayed,
    MediaFormat,
    StreamConnected,
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
)
from gateway.carriers.wire import (
    answer_text,
    b64,
    compact,
    dtmf_digit,
    guarded,
    media_payload,
    optional_text,
    section,
    sent_event,
    sent_mark,
    sent_object,
    sent_payload,
    text,
    text_object,
    timestamp_ms,
)

log = logging.getLogger(__name__)

RATE_PARAMETER = "sample-rate"  # Exotel reads the stream's rate from this query parameter
RATES = (8000, 16000, 24000)
OUTBOUND_UNIT = 320  # Exotel plays outbound audio in multiples of this many bytes, else with gaps
MAX_OUTBOUND_BYTES = 100_000
# Identifiers become log fields and store keys: only plain ones pass.
SID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENCODINGS = {"audio/x-raw": "l16", "audio/x-mulaw": "mulaw"}  # mu-law: the extension guide's Beta option


@dataclass(frozen=True)
class ExotelSettings(CarrierSettings):
    api_key: str = ""  # the user name of the applet URL's Basic credentials ("": any name is accepted)
    api_token_env: str = "EXOTEL_API_TOKEN"
    api_token: str | None = field(default=None, repr=False)  # from the environment, never the file
    sample_rate: Literal[8000, 16000, 24000] = 24000  # asked for with ?sample-rate= on the stream URL
    secrets: ClassVar[Mapping[str, str]] = {"api_token": "api_token_env"}


# --- the gateway's side ---------------------------------------------------------------------------


class ExotelStream(CarrierStream):
    """Exotel's Voicebot messages, both ways; the upgrade's query (our token) joins the start's parameters."""

    sample_bytes = 2  # bytes per sample of the stream's encoding (16-bit PCM unless start says mu-law)

    def parse(self, message: str | bytes) -> CallEvent:
        return guarded(self._parse, message)

    def _parse(self, message: str | bytes) -> CallEvent:
        data = text_object(message, "Exotel streams")
        event = data.get("event")
        if event == "media":  # first: ten of these a second per call
            return _parse_media(data, self.sample_bytes)
        if event == "start":
            started = self._parse_start(data)
            self.stream_id = started.stream_id
            self.sample_bytes = 1 if started.media_format.encoding == "mulaw" else 2
            return started
        if event == "mark":
            return MarkPlayed(name=text(section(data, "mark"), "mark.name", "name"))
        if event == "dtmf":
            digit = text(section(data, "dtmf"), "dtmf.digit", "digit")
            return DtmfPressed(digit=dtmf_digit(digit, "dtmf.digit", clip=8))
        if event == "stop":
            return CallStopped(reason="stop")
        if event == "connected":
            return StreamConnected()
        raise MalformedMessage(f"unknown event {str(event)[:40]!r}")

    def _parse_start(self, data: dict[str, Any]) -> CallStarted:
        start = section(data, "start")
        call_id = text(start, "start.call_sid", "call_sid")
        if not SID.fullmatch(call_id):
            raise MalformedMessage(f"start.call_sid {call_id[:40]!r} is not a call SID")
        stream_id = start.get("stream_sid", data.get("stream_sid"))
        if not isinstance(stream_id, str) or not SID.fullmatch(stream_id):
            raise MalformedMessage(f"start without a usable stream_sid ({str(stream_id)[:40]!r})")
        account = start.get("account_sid")
        if account is not None and not (isinstance(account, str) and SID.fullmatch(account)):
            raise MalformedMessage(f"start.account_sid {str(account)[:40]!r} is not an account SID")
        params = start.get("custom_parameters") or {}
        if not isinstance(params, dict) or not all(isinstance(v, str | int | float) for v in params.values()):
            raise MalformedMessage("start.custom_parameters is not a flat object")
        # The URL's query is what we wrote into it (the token): it wins over a same-named custom parameter.
        merged = {str(k): str(v) for k, v in params.items()}
        merged.update((k, v) for k, v in self.query.items() if k != RATE_PARAMETER)
        return CallStarted(
            call_id=call_id,
            stream_id=stream_id,
            caller=optional_text(start, "from", limit=64),
            called=optional_text(start, "to", limit=64),
            custom_parameters=merged,
            media_format=self._media_format(start.get("media_format")),
            account_id=account or None,
        )

    def _media_format(self, fmt: Any) -> MediaFormat:
        asked = self.query.get(RATE_PARAMETER, "8000")  # what Exotel streams when start does not say
        if fmt is None:
            fmt = {}
        if not isinstance(fmt, dict):
            raise MalformedMessage("start.media_format is not an object")
        encoding = fmt.get("encoding", "audio/x-raw")
        if encoding not in _ENCODINGS:
            raise MalformedMessage(
                f"start.media_format.encoding {str(encoding)[:40]!r} is not {list(_ENCODINGS)}"
            )
        try:
            rate = int(fmt.get("sample_rate", asked))  # a string on the wire ("8000")
        except (TypeError, ValueError):
            raise MalformedMessage(f"start.media_format.sample_rate {fmt.get('sample_rate')!r:.40}") from None
        if rate not in RATES:
            raise MalformedMessage(f"start.media_format.sample_rate {rate} is not one of {RATES}")
        bits = str(fmt.get("bit_rate", "16"))
        if _ENCODINGS[encoding] == "l16" and bits != "16":
            raise MalformedMessage(f"start.media_format.bit_rate {bits[:8]!r}: only 16-bit PCM is supported")
        return MediaFormat(encoding=_ENCODINGS[encoding], sample_rate=rate)

    def audio(self, payload: bytes) -> Sequence[str]:
        # 80 ms of 16-bit PCM at 8/16/24 kHz is 4, 8 or 12 times Exotel's 320-byte unit: sent as it comes.
        return [compact({"event": "media", "stream_sid": self.stream_id, "media": {"payload": b64(payload)}})]

    def mark(self, name: str) -> Sequence[str]:
        return [compact({"event": "mark", "stream_sid": self.stream_id, "mark": {"name": name}})]

    def clear(self) -> Sequence[str]:
        return [compact({"event": "clear", "stream_sid": self.stream_id})]


class ExotelCarrier(Carrier):
    """Exotel's Voicebot endpoint (JSON with the stream URL), Basic-auth streams, flow-driven transfer."""

    name: ClassVar[str] = "exotel"
    settings_type = ExotelSettings
    voice_methods: ClassVar[tuple[str, ...]] = ("GET", "POST")
    transfer_ends_stream: ClassVar[bool] = True  # the flow's next applet takes the call on
    console = (
        "App Bazaar > your flow > Voicebot applet > URL: https://<api_key>:<token>@<public>/exotel/voice"
    )

    settings: ExotelSettings

    @property
    def secret(self) -> str | None:
        return self.settings.api_token or None

    @property
    def authenticates(self) -> bool:
        return self.secret is not None

    def check_credentials(self, headers: Mapping[str, str]) -> bool:
        """The request's Basic credentials are the configured ones (always true with no token set)."""
        if self.secret is None:
            return True
        given = basic_credentials(headers) or ("", "")
        user_ok = not self.settings.api_key or hmac.compare_digest(
            given[0].encode(), self.settings.api_key.encode()
        )
        token_ok = hmac.compare_digest(given[1].encode(), self.secret.encode())
        return user_ok & token_ok  # both compared either way: the time says nothing

    # --- answer webhook ------------------------------------------------------------------------------

    def read_answer(
        self, method: str, path: str, query: str, body: bytes, headers: Mapping[str, str]
    ) -> Answering:
        if not self.check_credentials(headers):
            raise WebhookRefused(403, "bad or missing Basic credentials", auth_failed=True)
        fields = dict(parse_qsl(query, keep_blank_values=True))
        if method == "POST":  # a form body, should Exotel POST: its fields join the query's
            fields.update(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))
        call_id = fields.get("CallSid", "")
        if not SID.fullmatch(call_id):
            raise WebhookRefused(400, "voicebot URL request without a usable CallSid")
        caller = fields.get("CallFrom") or fields.get("From") or None
        called = fields.get("CallTo") or fields.get("To") or None
        return Answering(call_id, caller=caller, called=called, fields=fields)

    def answer(self, call: Answering, stream_url: str, token: str) -> tuple[str, str]:
        parts = urlsplit(stream_url)
        netloc = parts.netloc
        if self.secret is not None:  # Exotel turns credentials in the URL into the upgrade's Basic auth
            netloc = f"{quote(self.settings.api_key, safe='')}:{quote(self.secret, safe='')}@{netloc}"
        query = urlencode({RATE_PARAMETER: str(self.settings.sample_rate), TOKEN_PARAMETER: token})
        url = urlunsplit((parts.scheme, netloc, parts.path, query, ""))
        return compact({"url": url}), "application/json"

    def overflow(self, call: Answering, message: str, transfer_to: str | None) -> None:
        # The Voicebot applet's URL can answer only a stream URL ({"url": ...}): no verb speaks or dials.
        # The webhook answers 503 instead and the flow decides (what Exotel does when the applet's URL
        # fails is undocumented; configure the flow's next applet for it).
        return None

    # --- media stream --------------------------------------------------------------------------------

    def verify_upgrade(self, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> bool:
        return self.check_credentials(headers)

    def open_stream(self, query: Mapping[str, str], headers: Mapping[str, str]) -> ExotelStream:
        return ExotelStream(query, headers)

    # --- call control --------------------------------------------------------------------------------

    async def transfer(self, call: CallStarted, target: str) -> None:
        """No API moves a live Voicebot leg: the flow's next applet takes the call once the stream ends
        (the escalation ends it after its grace period). `target` is for that applet's configuration."""
        log.info(
            "call %s: Exotel hands the call to the flow's next applet when the stream ends (asked for %s)",
            call.call_id,
            target,
        )


def _parse_media(data: dict[str, Any], sample_bytes: int) -> CallerAudio:
    media = section(data, "media")  # only ever called for a "media" event, so the event needs no cut
    payload = media_payload(media)
    if len(payload) % sample_bytes:
        raise MalformedMessage(f"media.payload of {len(payload)} bytes is not whole 16-bit samples")
    return CallerAudio(payload=payload, timestamp_ms=timestamp_ms(media, clip=20))


# --- the carrier's side, for the simulator ----------------------------------------------------------

CONFORMANCE_KEY = "duplexgate-conformance"
CONFORMANCE_TOKEN = "conformance-exotel-token-0123456789"
_OUTBOUND_KEYS = {
    "media": {"event", "stream_sid", "media"},
    "mark": {"event", "stream_sid", "mark"},
    "clear": {"event", "stream_sid"},
}


class ExotelPeer(CarrierPeer):
    """Exotel running a Voicebot applet: GETs the endpoint (Basic auth), upgrades with the URL's credentials,
    `connected` + `start`, 100 ms 16-bit PCM `media` at the URL's sample rate, exact outbound shapes.

    `secret` is "KEY:TOKEN" as written in the applet's URL (a bare token: an empty key)."""

    wire: MediaFormat = MediaFormat("l16", 24000)
    chunk_s: ClassVar[float] = 0.1
    echoes_marks_on_clear: ClassVar[bool] = True  # GUESS, as Twilio does
    transfers_over_rest: ClassVar[bool] = False

    def __init__(self, call_id: str | None, caller: str, called: str, secret: Any = None) -> None:
        super().__init__(call_id, caller, called, secret)
        self.stream_id = secrets.token_hex(16)
        self.account_sid = "duplexgate-sim"
        self.seq = 0
        self.url_credentials: tuple[str, str] | None = None  # from the endpoint's answer, when it had any

    @staticmethod
    def new_call_id() -> str:
        return secrets.token_hex(16)

    def credentials(self) -> tuple[str, str] | None:
        if self.url_credentials is not None:
            return self.url_credentials
        if not self.secret:
            return None
        key, sep, token = str(self.secret).partition(":")
        return (key, token) if sep else ("", key)

    async def answer(self, client: httpx.AsyncClient, webhook: str) -> StreamTarget:
        query = {
            "CallSid": self.call_id,
            "CallFrom": self.caller,
            "CallTo": self.called,
            "From": self.caller,
            "To": self.called,
            "Direction": "incoming",
        }
        credentials = self.credentials()
        headers = {"Authorization": basic_header(*credentials)} if credentials else {}
        response = await client.get(webhook, params=query, headers=headers)
        text = answer_text(response, f"voicebot URL {webhook}")
        try:
            url = orjson.loads(text)["url"]
            parts = urlsplit(url)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise RuntimeError(f"voicebot URL {webhook}: no JSON {{'url': ...}}: {text[:300]}") from None
        if parts.scheme not in ("ws", "wss"):
            raise RuntimeError(
                f"voicebot URL {webhook} answered a stream URL that is not ws(s)://: {url[:200]}"
            )
        if parts.username is not None:  # Exotel sends these as the upgrade's Basic auth
            self.url_credentials = (unquote(parts.username), unquote(parts.password or ""))
        bare = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
        return StreamTarget(bare, {}, dict(parse_qsl(parts.query, keep_blank_values=True)))

    def target(self, url: str, parameters: Mapping[str, str]) -> StreamTarget:
        """The applet's URL with its query parameters; its sample-rate decides the wire format."""
        params = dict(parameters)
        rate = params.get(RATE_PARAMETER) or dict(parse_qsl(urlsplit(url).query)).get(RATE_PARAMETER)
        if rate and rate.isdigit() and int(rate) in RATES:
            self.wire = MediaFormat("l16", int(rate))  # this call's format
        if params:
            url += ("&" if urlsplit(url).query else "?") + urlencode(params)
        return StreamTarget(url, {}, params)

    def upgrade_headers(self, target: StreamTarget) -> dict[str, str]:
        credentials = self.credentials()
        return {"Authorization": basic_header(*credentials)} if credentials else {}

    def _event(self, message: dict[str, Any]) -> str:
        self.seq += 1
        return compact({"event": message.pop("event"), "sequence_number": str(self.seq), **message})

    def opening(self, target: StreamTarget) -> list[str | bytes]:
        custom = {k: v for k, v in target.parameters.items() if k != RATE_PARAMETER}
        start = {
            "stream_sid": self.stream_id,
            "call_sid": self.call_id,
            "account_sid": self.account_sid,
            "from": self.caller,
            "to": self.called,
            "custom_parameters": custom,
            "media_format": {
                "encoding": "audio/x-raw",
                "sample_rate": str(self.wire.sample_rate),
                "bit_rate": "16",
            },
        }
        return [
            compact({"event": "connected"}),
            self._event({"event": "start", "stream_sid": self.stream_id, "start": start}),
        ]

    def media(self, payload: bytes, n: int) -> str:
        media = {
            "chunk": str(n + 1),
            "timestamp": str(round(n * self.chunk_s * 1000)),
            "payload": b64(payload),
        }
        return self._event({"event": "media", "stream_sid": self.stream_id, "media": media})

    def dtmf(self, digit: str) -> str:
        return self._event(
            {"event": "dtmf", "stream_sid": self.stream_id, "dtmf": {"digit": digit, "duration": "100"}}
        )

    def stop(self) -> str:
        stop = {"call_sid": self.call_id, "account_sid": self.account_sid, "reason": "callended"}
        return self._event({"event": "stop", "stream_sid": self.stream_id, "stop": stop})

    def played(self, name: str) -> str:
        return self._event({"event": "mark", "stream_sid": self.stream_id, "mark": {"name": name}})

    def read(self, message: str | bytes) -> Outbound:
        return check_outbound(message, self.stream_id)

    @classmethod
    def conformance_setup(cls, api_base: str) -> tuple[dict[str, Any], dict[str, str], Any]:
        # No REST API is used (transfer is the flow's): api_base has nothing to point at.
        return (
            {"api_key": CONFORMANCE_KEY},
            {"EXOTEL_API_TOKEN": CONFORMANCE_TOKEN},
            f"{CONFORMANCE_KEY}:{CONFORMANCE_TOKEN}",
        )

    @classmethod
    def forged_secret(cls) -> Any:
        return f"{CONFORMANCE_KEY}:forged-exotel-token-0123456789"

    def check_transfer(self, request: Mapping[str, Any], target: str) -> list[str]:
        return [f"Exotel makes no REST transfer, yet {request['method']} {request['path']} was requested"]


def check_outbound(message: str | bytes, stream_sid: str) -> Outbound:
    """Validate one gateway -> Exotel message as Exotel would."""
    data = sent_object(message, "Exotel takes JSON text")
    event = sent_event(data, _OUTBOUND_KEYS, "stream_sid", stream_sid)
    if event == "media":
        payload = sent_payload(data)
        if not payload or len(payload) % OUTBOUND_UNIT or len(payload) > MAX_OUTBOUND_BYTES:
            raise Violation(f"media: {len(payload)} bytes is not a multiple of {OUTBOUND_UNIT} up to 100 KB")
        if payload[:4] == b"RIFF":
            raise Violation("media: payload has a wav header (it would play as noise)")
        return Outbound("media", payload=payload)
    if event == "mark":
        return sent_mark(data)
    return Outbound("clear")


ExotelCarrier.peer = ExotelPeer
