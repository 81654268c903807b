"""SignalWire: the Compatibility API (cXML, Twilio-compatible) with native 24 kHz linear PCM media streams.

cXML is TwiML under another name, so everything here subclasses twilio.py and overrides only what differs:
the ids (call and project ids are UUIDs, not CA/AC + hex), the signature header and key (a per-project
Signing Key, sent as `X-SignalWire-Signature`; `X-Twilio-Signature` is accepted too), the REST base (your
Space), and the codec: `<Connect><Stream codec="L16@24000h">` gets the model's own rate both ways, with no
mu-law and no resampling (`codec` may also be PCMU@8000h or L16@16000h). The answer when no agent is free
(`<Say>`, then `<Hangup/>` or `<Dial>`) is Twilio's, inherited.

Console: Phone Numbers > your number > Voice settings: handle calls with "LaML Webhooks" (cXML), "When a
call comes in": `https://<public_url>/signalwire/voice`, POST. Environment: SIGNALWIRE_SIGNING_KEY (API >
Signing Key: turns the signature checks on), SIGNALWIRE_PROJECT_ID and SIGNALWIRE_API_TOKEN (API: for
transfers), and `space = "<your space>"` in `[signalwire]` (https://<space>.signalwire.com).

GUESS (not confirmed by SignalWire's docs; verify on a live call):
- L16 on the WebSocket is little-endian like the rest of the audio path (the docs give no byte order).
- A stream upgrade carries the Twilio-style signature over the stream URL. It need not: the answer's
  `<Stream authBearerToken>` is accepted on its own (documented: sent as `Authorization: Bearer ...`).
- Events arrive as Twilio's flat JSON; the docs also show them wrapped in `{"rawEvent": {...}}`, which is
  unwrapped if it ever comes.
- The console menu names above, the `PSK_` shape of signing keys (the simulated carrier's only).
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qs

import httpx
import orjson

from gateway.call.events import CallEvent, CallStarted, MalformedMessage, MediaFormat
from gateway.carriers.base import StreamTarget, basic_header
from gateway.carriers.twilio import (
    TwilioCarrier,
    TwilioPeer,
    TwilioSettings,
    TwilioStream,
    answered_stream,
    compute_signature,
)
from gateway.carriers.wire import compact

SIGNATURE_HEADERS = ("x-signalwire-signature", "x-twilio-signature")  # lower-case, as headers arrive
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_SPACE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # one DNS label: <space>.signalwire.com
Codec = Literal["PCMU@8000h", "L16@16000h", "L16@24000h"]
# L16 is taken as little-endian (the audio path's "l16"): SignalWire documents no byte order for its
# WebSocket payloads, so this is unverified until a live call sounds right.
CODECS: Mapping[str, MediaFormat] = {
    "PCMU@8000h": MediaFormat("mulaw", 8000),
    "L16@16000h": MediaFormat("l16", 16000),
    "L16@24000h": MediaFormat("l16", 24000),
}
ENCODINGS: Mapping[str, str] = {"audio/x-mulaw": "mulaw", "audio/x-L16": "l16"}  # start.mediaFormat spelling
WIRE_NAMES: Mapping[str, str] = {wire: name for name, wire in ENCODINGS.items()}


@dataclass(frozen=True)
class SignalWireSettings(TwilioSettings):
    # The inherited names keep their Twilio meaning: account_sid is the Project ID, auth_token the API token
    # (REST only). Webhooks and streams are signed with the separate Signing Key.
    auth_token_env: str = "SIGNALWIRE_API_TOKEN"
    account_sid_env: str = "SIGNALWIRE_PROJECT_ID"
    signing_key_env: str = "SIGNALWIRE_SIGNING_KEY"
    signing_key: str | None = field(default=None, repr=False)  # from the environment, never the file
    space: str = ""  # "example" for https://example.signalwire.com, the REST API of your calls
    api_base: str = ""  # replaces https://<space>.signalwire.com (a proxy, the tests' stand-in)
    codec: Codec = "L16@24000h"  # both ways; L16@24000h is the engine's own rate
    secrets: ClassVar[Mapping[str, str]] = {
        "auth_token": "auth_token_env",
        "account_sid": "account_sid_env",
        "signing_key": "signing_key_env",
    }

    def signing_variables(self) -> list[str]:
        return [self.signing_key_env]

    def problems(self, public_url: str) -> list[str]:
        found = []
        if self.signing_key and not public_url:
            found.append(
                f"[server] public_url is required when {self.signing_key_env} is set (SignalWire signs "
                "the public URL, e.g. https://gw.example.com)"
            )
        if self.space and not _SPACE.fullmatch(self.space):
            found.append(
                f"space = {self.space!r} is not a Space name (the 'example' of example.signalwire.com)"
            )
        if self.auth_token and not (self.space or self.api_base):
            found.append(f"{self.auth_token_env} is set but space is not: transfers need your Space's API")
        return found

    @property
    def rest_base(self) -> str:
        return (self.api_base or (f"https://{self.space}.signalwire.com" if self.space else "")).rstrip("/")


# --- the gateway's side ---------------------------------------------------------------------------


class SignalWireStream(TwilioStream):
    """Twilio's dialect with UUID ids and L16 audio (`audio/x-L16` at 8, 16 or 24 kHz)."""

    def _parse(self, message: str | bytes) -> CallEvent:
        if isinstance(message, str) and '"rawEvent"' in message:
            message = _unwrapped(message)
        return super()._parse(message)

    call_id_pattern: ClassVar[re.Pattern[str]] = _UUID
    call_id_shape: ClassVar[str] = "a SignalWire call id (a UUID)"
    account_pattern: ClassVar[re.Pattern[str]] = _UUID
    account_shape: ClassVar[str] = "a project id (a UUID)"

    def media_format(self, fmt: dict[str, Any]) -> MediaFormat:
        encoding = ENCODINGS.get(fmt.get("encoding", "audio/x-mulaw"))  # type: ignore[arg-type]
        try:
            media = MediaFormat(str(encoding), fmt.get("sampleRate", 8000), fmt.get("channels", 1))
        except ValueError:
            media = None
        if media not in CODECS.values():  # anything else would fail in the audio path, not here
            raise MalformedMessage(f"start.mediaFormat {fmt!r:.120} is none of {sorted(CODECS)}")
        return media


def _unwrapped(message: str) -> str:
    """The Twilio-shaped event inside `{"rawEvent": {...}}`; anything else as it came (parse judges it)."""
    try:
        data = orjson.loads(message)
    except orjson.JSONDecodeError:
        return message
    if isinstance(data, dict) and "event" not in data and isinstance(data.get("rawEvent"), dict):
        return compact(data["rawEvent"])
    return message


class SignalWireCarrier(TwilioCarrier):
    """SignalWire's cXML webhook, signed (or bearer-token) streams at the configured codec, REST transfer."""

    name: ClassVar[str] = "signalwire"
    settings_type = SignalWireSettings
    stream_type: ClassVar[type[TwilioStream]] = SignalWireStream
    signature_headers: ClassVar[tuple[str, ...]] = SIGNATURE_HEADERS
    console = "Phone Numbers > your number > LaML Webhooks: When a call comes in, POST"

    settings: SignalWireSettings

    @property
    def secret(self) -> str | None:
        return self.settings.signing_key or None

    def stream_attributes(self) -> dict[str, str]:
        attributes = {"codec": self.settings.codec}
        if self.secret is not None:
            attributes["authBearerToken"] = self.stream_bearer()
        return attributes

    def stream_bearer(self) -> str:
        """The upgrade's bearer token: bound to the key and the stream URL, and not the key itself (it is
        written into markup). Like Twilio's signed upgrade it is constant, so replayable; the single-use
        call token in the start message is what vouches for one call."""
        assert self.secret is not None
        signed = hmac.new(self.secret.encode(), f"duplexgate stream {self.stream_url()}".encode(), "sha256")
        return base64.urlsafe_b64encode(signed.digest()).decode("ascii").rstrip("=")

    def verify_upgrade(self, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> bool:
        if self.secret is None:
            return True
        bearer = headers.get("authorization", "")
        if hmac.compare_digest(bearer.encode(), f"Bearer {self.stream_bearer()}".encode()):
            return True
        return self._signed(self.stream_url(), [], headers)

    def rest_credentials(self, call: CallStarted) -> tuple[str, str]:
        project, token = self.settings.account_sid or call.account_id, self.settings.auth_token
        if not project or not token or not self.settings.rest_base:
            raise RuntimeError(
                f"signalwire call control needs the project id, API token and space "
                f"({self.settings.account_sid_env}, {self.settings.auth_token_env}, [signalwire] space)"
            )
        return project, token

    def calls_url(self, account: str) -> str:
        return f"{self.settings.rest_base}/api/laml/2010-04-01/Accounts/{account}/Calls"


# --- the carrier's side, for the simulator ----------------------------------------------------------

CONFORMANCE_PROJECT = "7d2c1f3e-5a4b-4c6d-8e9f-0a1b2c3d4e5f"
CONFORMANCE_API_TOKEN = "PT" + "5" * 48
CONFORMANCE_SIGNING_KEY = "PSK_conformance0123456789abcdef"


class SignalWirePeer(TwilioPeer):
    """SignalWire placing a call: cXML webhook signed with the Signing Key, the upgrade with the markup's
    bearer token (and the signature), `start` in the codec the markup asked for, 20 ms chunks."""

    wire: MediaFormat = CODECS["L16@24000h"]  # the default settings' codec; the markup decides
    encoding_name: ClassVar[str] = "audio/x-L16"
    user_agent: ClassVar[str] = "SignalWire-LaML"  # GUESS

    def __init__(self, call_id: str | None, caller: str, called: str, secret: Any = None) -> None:
        super().__init__(call_id, caller, called, secret)
        self.stream_id = str(uuid.uuid4())
        self.account_sid = CONFORMANCE_PROJECT

    @staticmethod
    def new_call_id() -> str:
        return str(uuid.uuid4())

    async def answer(self, client: httpx.AsyncClient, webhook: str) -> StreamTarget:
        form = self.form()
        headers = {"User-Agent": self.user_agent}
        if self.secret:
            headers["X-SignalWire-Signature"] = compute_signature(self.secret, webhook, form.items())
        stream = answered_stream(await client.post(webhook, data=form, headers=headers), webhook)
        codec = stream.get("codec", "PCMU@8000h")  # SignalWire's default when the markup names none
        if codec not in CODECS:
            raise RuntimeError(
                f"voice webhook {webhook}: <Stream codec={codec!r}> is none of {sorted(CODECS)}"
            )
        self.wire = CODECS[codec]  # per call: what this call's markup asked for
        self.encoding_name = WIRE_NAMES[self.wire.encoding]
        bearer = stream.get("authBearerToken")
        params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
        return StreamTarget(
            stream.get("url", ""), {"Authorization": f"Bearer {bearer}"} if bearer else {}, params
        )

    def upgrade_headers(self, target: StreamTarget) -> dict[str, str]:
        headers = dict(target.headers)
        if self.secret:
            headers["X-SignalWire-Signature"] = compute_signature(self.secret, target.url)
        return headers

    @classmethod
    def conformance_setup(cls, api_base: str) -> tuple[dict[str, Any], dict[str, str], Any]:
        env = {
            "SIGNALWIRE_SIGNING_KEY": CONFORMANCE_SIGNING_KEY,
            "SIGNALWIRE_API_TOKEN": CONFORMANCE_API_TOKEN,
            "SIGNALWIRE_PROJECT_ID": CONFORMANCE_PROJECT,
        }
        return {"api_base": api_base}, env, CONFORMANCE_SIGNING_KEY

    @classmethod
    def forged_secret(cls) -> Any:
        return "PSK_" + secrets.token_hex(13)

    def check_transfer(self, request: Mapping[str, Any], target: str) -> list[str]:
        problems = []
        path = f"/api/laml/2010-04-01/Accounts/{CONFORMANCE_PROJECT}/Calls/{self.call_id}.json"
        if (request["method"], request["path"]) != ("POST", path):
            problems.append(f"{request['method']} {request['path']} is not POST {path}")
        basic = basic_header(CONFORMANCE_PROJECT, CONFORMANCE_API_TOKEN)
        if request["headers"].get("authorization") != basic:
            problems.append("not HTTP Basic auth with the project id and API token")
        cxml = parse_qs(request["body"].decode()).get("Twiml", [""])[0]
        if f">{target}</" not in cxml or "<Dial>" not in cxml:
            problems.append(f"Twiml {cxml[:120]!r} does not <Dial> {target}")
        return problems


SignalWireCarrier.peer = SignalWirePeer
