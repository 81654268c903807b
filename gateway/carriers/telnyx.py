"""Telnyx: TeXML `<Connect><Stream bidirectionalMode="rtp">` media streams, Ed25519-signed webhooks,
call transfer over the Call Control API.

Console: Voice > TeXML Applications > your application: Voice Method POST, Webhook URL
`https://<public_url>/telnyx/voice`; assign your number to that application. Environment: TELNYX_PUBLIC_KEY
(Keys & Credentials > Public Key, base64: turns the signature checks on) and TELNYX_API_KEY (API Keys: for
transfers). `[telnyx] codec` picks the one codec used both ways: PCMU@8000 (default), L16@16000, L16@24000.

How a call runs: the voice webhook (form-encoded, `telnyx-signature-ed25519` over `"{telnyx-timestamp}|{raw
body}"`, at most 300 s old) is answered with TeXML whose `<Stream>` is bidirectional in `rtp` mode (the
default, `mp3`, would drop the gateway's audio) and carries two `<Parameter>`s back in the stream's
`start.custom_parameters`: the single-use call token, and the webhook's CallSid. That CallSid keys the
prepared call (CallStarted.call_id) in case it is not the stream's `start.call_control_id`, which is kept
as CallStarted.control_id for `POST /v2/calls/{call_control_id}/actions/transfer`. TeXML signs no stream
upgrade, so the token alone vouches for a stream. TeXML takes TwiML's verbs unchanged, so the answer when no
agent is free is twilio.py's: `<Say>`, then `<Hangup/>` or `<Dial><Number>`.

GUESS (not confirmed by Telnyx's docs; verify on a live call):
- The voice webhook carries the fields of Telnyx's TeXML callbacks: CallSid (call id), From, To.
- `start.media_format` names the codec of both directions ("PCMU" / "L16", sample_rate an integer); a start
  whose format is not the one asked for both ways is refused, as the gateway uses one codec both ways.
- L16 works bidirectionally at 16/24 kHz, little-endian (Telnyx's own SDK enum lacks L16). PCMU is safe.
- Call Control's transfer accepts a TeXML call's call_control_id.
- The `v<n>:` shape of call ids, the console menu names, the `error` event's shape (it is only logged).

Size: one wire format both ways, the gateway's side and the simulated carrier's (its signed webhook, its
stream, and the checks Telnyx applies to what the gateway sends), kept together so they change together.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, urlencode
from xml.etree import ElementTree

import httpx
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

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
    rest_request,
)
from gateway.carriers.twilio import answered_stream, overflow_twiml
from gateway.carriers.wire import (
    b64,
    compact,
    dtmf_digit,
    guarded,
    media_payload,
    optional_text,
    section,
    sent_mark,
    sent_payload,
    sent_text,
    text,
    text_object,
    timestamp_ms,
    xml_document,
)

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "telnyx-signature-ed25519"
TIMESTAMP_HEADER = "telnyx-timestamp"
CALL_PARAMETER = "call_id"  # our <Parameter> carrying the webhook's CallSid into the stream's start
# Identifiers from the wire become log fields, store keys and REST paths: nothing that could leave a path.
CALL_ID = re.compile(r"(?:v\d{1,3}:)?[A-Za-z0-9_-]{8,256}")  # v3:<base64url>; a bare UUID also passes
STREAM_ID = re.compile(r"[A-Za-z0-9-]{1,64}")  # a UUID
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
Codec = Literal["PCMU@8000", "L16@16000", "L16@24000"]
CODECS: Mapping[str, MediaFormat] = {
    "PCMU@8000": MediaFormat("mulaw", 8000),
    "L16@16000": MediaFormat("l16", 16000),
    "L16@24000": MediaFormat("l16", 24000),
}
ENCODINGS: Mapping[str, str] = {"PCMU": "mulaw", "L16": "l16"}  # Telnyx's codec names -> ours
CODEC_NAMES: Mapping[str, str] = {ours: theirs for theirs, ours in ENCODINGS.items()}


@dataclass(frozen=True)
class TelnyxSettings(CarrierSettings):
    public_key_env: str = "TELNYX_PUBLIC_KEY"  # the account's Ed25519 public key, base64
    public_key: str | None = field(default=None, repr=False)  # from the environment, never the file
    api_key_env: str = "TELNYX_API_KEY"  # for call control (transfer)
    api_key: str | None = field(default=None, repr=False)
    api_base: str = "https://api.telnyx.com"
    codec: Codec = "PCMU@8000"  # both ways; the L16 ones are unverified (module docstring)
    signature_tolerance_s: int = 300  # a webhook signed longer ago than this (or ahead) is a replay
    secrets: ClassVar[Mapping[str, str]] = {"public_key": "public_key_env", "api_key": "api_key_env"}

    def signing_variables(self) -> list[str]:
        return [self.public_key_env]

    def problems(self, public_url: str) -> list[str]:
        found = []
        if self.public_key:
            try:
                load_public_key(self.public_key)
            except ValueError as exc:
                found.append(f"{self.public_key_env}: {exc}")
        if self.signature_tolerance_s <= 0:
            found.append(f"signature_tolerance_s = {self.signature_tolerance_s} must be a positive number")
        return found


def load_public_key(text: str) -> Ed25519PublicKey:
    """The account's public key as Telnyx shows it: base64 of the 32 raw key bytes."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raise ValueError("not base64 (copy the Public Key from Keys & Credentials)") from None
    if len(raw) != 32:
        raise ValueError(f"{len(raw)} bytes, not an Ed25519 public key (32 bytes, base64)")
    return Ed25519PublicKey.from_public_bytes(raw)


def signature_base(timestamp: str, body: bytes) -> bytes:
    """What Telnyx signs: the timestamp header, a bar, the raw body."""
    return timestamp.encode("ascii") + b"|" + body


# --- the gateway's side ---------------------------------------------------------------------------


class TelnyxStream(CarrierStream):
    """Telnyx's media-stream messages, both ways: snake_case JSON text, base64 RTP payloads."""

    def __init__(self, query: Mapping[str, str], headers: Mapping[str, str], wire: MediaFormat) -> None:
        super().__init__(query, headers)
        self.wire = wire  # the codec the answer asked for, both ways

    def parse(self, message: str | bytes) -> CallEvent | None:
        return guarded(self._parse, message)

    def _parse(self, message: str | bytes) -> CallEvent | None:
        data = text_object(message, "Telnyx media streams")
        event = data.get("event")
        if event == "media":  # first: ~50 of these a second per call
            return _parse_media(data)
        if event == "start":
            started = self._parse_start(data)
            self.stream_id = started.stream_id
            return started
        if event == "mark":
            return MarkPlayed(name=text(section(data, "mark"), "mark.name", "name"))
        if event == "dtmf":
            digit = text(section(data, "dtmf"), "dtmf.digit", "digit")
            return DtmfPressed(digit=dtmf_digit(digit, "dtmf.digit"))
        if event == "stop":
            return CallStopped(reason="stop")
        if event == "connected":
            return StreamConnected("", str(data.get("version", "")))
        if event == "error":  # Telnyx refused something we sent; the call goes on
            log.warning("telnyx stream %s reported an error: %.300s", self.stream_id, message)
            return None
        raise MalformedMessage(f"unknown event {event!r}")

    def _parse_start(self, data: dict[str, Any]) -> CallStarted:
        start = section(data, "start")
        control_id = text(start, "start.call_control_id", "call_control_id")
        if not CALL_ID.fullmatch(control_id):
            raise MalformedMessage(f"start.call_control_id {control_id[:40]!r} is not a call control id")
        stream_id = data.get("stream_id")
        if not isinstance(stream_id, str) or not STREAM_ID.fullmatch(stream_id):
            raise MalformedMessage(f"stream_id {str(stream_id)[:40]!r} missing or not a stream id")
        params = start.get("custom_parameters") or {}
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            raise MalformedMessage("start.custom_parameters is not a flat string-to-string object")
        call_id = params.get(CALL_PARAMETER, control_id)  # the webhook's CallSid, when our answer set it
        if not CALL_ID.fullmatch(call_id):
            raise MalformedMessage(
                f"start.custom_parameters.{CALL_PARAMETER} {call_id[:40]!r} is not a call id"
            )
        fmt = section(start, "media_format", "start")
        try:
            media = MediaFormat(
                str(ENCODINGS.get(fmt.get("encoding"))), fmt.get("sample_rate"), fmt.get("channels", 1)
            )
        except ValueError:
            media = None  # a format the audio path cannot take: refused below with what was asked for
        if media != self.wire:
            raise MalformedMessage(
                f"start.media_format {fmt!r:.100} is not the {CODEC_NAMES[self.wire.encoding]}@"
                f"{self.wire.sample_rate} mono asked for (one codec both ways)"
            )
        user = start.get("user_id")
        return CallStarted(
            call_id=call_id,
            stream_id=stream_id,
            caller=optional_text(start, "from"),
            called=optional_text(start, "to"),
            custom_parameters=dict(params),
            media_format=media,
            account_id=user if isinstance(user, str) and user else None,
            control_id=control_id,
        )

    def audio(self, payload: bytes) -> Sequence[str]:
        # In rtp mode a payload is raw codec bytes, 20 ms to 30 s of them; the gateway sends 80 ms.
        return [compact({"event": "media", "media": {"payload": b64(payload)}})]

    def mark(self, name: str) -> Sequence[str]:
        return [compact({"event": "mark", "stream_id": self.stream_id, "mark": {"name": name}})]

    def clear(self) -> Sequence[str]:
        return [compact({"event": "clear"})]


class TelnyxCarrier(Carrier):
    """Telnyx's TeXML voice webhook (Ed25519), bidirectional rtp streams and Call Control transfers."""

    name: ClassVar[str] = "telnyx"
    settings_type = TelnyxSettings
    console = "Voice > TeXML Applications > your app: Voice Method POST, Webhook URL"

    settings: TelnyxSettings

    def __init__(self, settings: TelnyxSettings, public_url: str | None) -> None:
        super().__init__(settings, public_url)
        self.public_key = load_public_key(settings.public_key) if settings.public_key else None

    @property
    def authenticates(self) -> bool:
        return self.public_key is not None

    @property
    def wire(self) -> MediaFormat:
        return CODECS[self.settings.codec]

    # --- answer webhook ------------------------------------------------------------------------------

    def read_answer(
        self, method: str, path: str, query: str, body: bytes, headers: Mapping[str, str]
    ) -> Answering:
        if not self.verify_webhook(body, headers):
            raise WebhookRefused(403, f"bad, stale or missing {SIGNATURE_HEADER}", auth_failed=True)
        fields = dict(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))
        call_id = fields.get("CallSid", "")
        if not CALL_ID.fullmatch(call_id):
            raise WebhookRefused(400, "voice webhook without a CallSid")
        return Answering(call_id, caller=fields.get("From"), called=fields.get("To"), fields=fields)

    def verify_webhook(self, body: bytes, headers: Mapping[str, str], now: float | None = None) -> bool:
        """The Ed25519 signature over `timestamp|body`, made within the tolerance of `now`."""
        if self.public_key is None:
            return True
        signature, timestamp = headers.get(SIGNATURE_HEADER, ""), headers.get(TIMESTAMP_HEADER, "")
        if not _TIMESTAMP.fullmatch(timestamp):
            return False
        now = time.time() if now is None else now
        if abs(now - int(timestamp)) > self.settings.signature_tolerance_s:
            return False
        try:
            self.public_key.verify(
                base64.b64decode(signature, validate=True), signature_base(timestamp, body)
            )
        except (binascii.Error, InvalidSignature, ValueError):
            return False
        return True

    def answer(self, call: Answering, stream_url: str, token: str) -> tuple[str, str]:
        parameters = {TOKEN_PARAMETER: token, CALL_PARAMETER: call.call_id}
        return connect_stream_texml(stream_url, self.wire, parameters), "application/xml"

    def overflow(self, call: Answering, message: str, transfer_to: str | None) -> tuple[str, str]:
        return overflow_twiml(message, transfer_to), "application/xml"  # TeXML takes TwiML's verbs

    # --- media stream --------------------------------------------------------------------------------

    def verify_upgrade(self, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> bool:
        return True  # TeXML has no stream credential; the call token in `start` is checked instead

    def open_stream(self, query: Mapping[str, str], headers: Mapping[str, str]) -> TelnyxStream:
        return TelnyxStream(query, headers, self.wire)

    # --- call control --------------------------------------------------------------------------------

    async def transfer(self, call: CallStarted, target: str) -> None:
        """Call Control's transfer; the carrier then ends the media stream itself."""
        if not self.settings.api_key:
            raise RuntimeError(f"telnyx call control needs an API key ({self.settings.api_key_env})")
        control_id = call.control_id or call.call_id
        await rest_request(
            "POST",
            f"{self.settings.api_base.rstrip('/')}/v2/calls/{control_id}/actions/transfer",
            what=f"telnyx transfer of {call.call_id}",
            json={"to": target},
            headers={"Authorization": f"Bearer {self.settings.api_key}"},
        )


def connect_stream_texml(stream_url: str, wire: MediaFormat, parameters: Mapping[str, str]) -> str:
    """TeXML bridging the call to our stream, bidirectional in rtp mode at `wire`, with `parameters`."""
    response = ElementTree.Element("Response")
    connect = ElementTree.SubElement(response, "Connect")
    attributes = {
        "url": stream_url,
        "bidirectionalMode": "rtp",
        "bidirectionalCodec": CODEC_NAMES[wire.encoding],
        "bidirectionalSamplingRate": str(wire.sample_rate),
    }
    if wire.encoding == "mulaw":
        attributes["codec"] = "PCMU"  # the caller's direction too (Telnyx transcodes only PCMA <-> PCMU)
    stream = ElementTree.SubElement(connect, "Stream", attributes)
    for name, value in parameters.items():
        ElementTree.SubElement(stream, "Parameter", name=name, value=value)
    return xml_document(response)


def _parse_media(data: dict[str, Any]) -> CallerAudio:
    media = section(data, "media")
    track = media.get("track", "inbound")
    if track not in ("inbound", "inbound_track"):  # our own audio coming back would be heard as the caller
        raise MalformedMessage(f"media.track {track!r} is not the caller's (inbound)")
    return CallerAudio(payload=media_payload(media), timestamp_ms=timestamp_ms(media))


# --- the carrier's side, for the simulator ----------------------------------------------------------

CONFORMANCE_API_KEY = "KEY0123456789ABCDEF_conformance"
_OUTBOUND_KEYS = {
    "media": ({"event", "media"}, {"stream_id"}),  # (required, optional)
    "mark": ({"event", "stream_id", "mark"}, set()),
    "clear": ({"event"}, {"stream_id"}),
}


def private_key_text(key: Ed25519PrivateKey) -> str:
    """A private key as the peer's secret (and `duplexgate call --auth-token`): base64 of its 32 bytes."""
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode("ascii")


def public_key_text(key: Ed25519PrivateKey) -> str:
    """The matching public key as Telnyx's portal shows it (base64 of its 32 bytes)."""
    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode("ascii")


def sign(secret: str | Ed25519PrivateKey, timestamp: str, body: bytes) -> str:
    """Telnyx's webhook signature: base64 Ed25519 over `timestamp|body`."""
    key = secret if isinstance(secret, Ed25519PrivateKey) else _private_key(secret)
    return base64.b64encode(key.sign(signature_base(timestamp, body))).decode("ascii")


def _private_key(text: str) -> Ed25519PrivateKey:
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 32:  # RuntimeError: `duplexgate call` prints it as its one line
        raise RuntimeError("a telnyx secret is an Ed25519 private key: base64 of its 32 raw bytes")
    return Ed25519PrivateKey.from_private_bytes(raw)


class TelnyxPeer(CarrierPeer):
    """Telnyx placing a TeXML call: signed form webhook, the stream in the codec its TeXML asked for,
    `connected` + `start`, 20 ms `media`, marks echoed when played (pending ones at once on `clear`).
    Its CallSid and call_control_id differ, so the gateway must key the call by the one the webhook gave."""

    wire: MediaFormat = CODECS["PCMU@8000"]  # the default settings' codec; the TeXML decides
    user_agent: ClassVar[str] = "Telnyx-Webhooks"  # GUESS

    def __init__(self, call_id: str | None, caller: str, called: str, secret: Any = None) -> None:
        super().__init__(call_id, caller, called, secret)
        self.stream_id = str(uuid.uuid4())
        self.call_control_id = self.new_call_id()
        self.user_id = str(uuid.uuid4())
        self.seq = 0

    @staticmethod
    def new_call_id() -> str:
        return "v3:" + secrets.token_urlsafe(33)

    def form(self) -> dict[str, str]:
        return {
            "AccountSid": self.user_id,
            "CallSid": self.call_id,
            "CallSessionId": str(uuid.uuid5(uuid.NAMESPACE_URL, self.call_id)),
            "CallStatus": "ringing",
            "ConnectionId": "1234567890",
            "Direction": "inbound",
            "From": self.caller,
            "To": self.called,
        }

    async def answer(self, client: httpx.AsyncClient, webhook: str) -> StreamTarget:
        body = urlencode(self.form()).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": self.user_agent}
        if self.secret:
            timestamp = str(int(time.time()))
            headers |= {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(self.secret, timestamp, body)}
        stream = answered_stream(await client.post(webhook, content=body, headers=headers), webhook)
        if stream.get("bidirectionalMode") != "rtp":  # Telnyx's default, mp3, drops streamed audio
            raise RuntimeError(f"voice webhook {webhook}: <Stream> is not bidirectionalMode='rtp'")
        codec = (
            f"{stream.get('bidirectionalCodec', 'PCMU')}@{stream.get('bidirectionalSamplingRate', '8000')}"
        )
        if codec not in CODECS:
            raise RuntimeError(f"voice webhook {webhook}: <Stream> codec {codec} is not {sorted(CODECS)}")
        self.wire = CODECS[codec]  # per call: what this call's TeXML asked for
        params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
        return StreamTarget(stream.get("url", ""), {}, params)

    def _event(self, event: str, **fields: Any) -> str:
        self.seq += 1
        return compact(
            {"event": event, "sequence_number": str(self.seq), "stream_id": self.stream_id, **fields}
        )

    def opening(self, target: StreamTarget) -> list[str | bytes]:
        start = {
            "user_id": self.user_id,
            "call_control_id": self.call_control_id,
            "call_session_id": str(uuid.uuid5(uuid.NAMESPACE_URL, self.call_id)),
            "from": self.caller,
            "to": self.called,
            "tags": [],
            "client_state": "",
            "custom_parameters": dict(target.parameters),
            "media_format": {
                "encoding": CODEC_NAMES[self.wire.encoding],
                "sample_rate": self.wire.sample_rate,
                "channels": 1,
            },
        }
        return [compact({"event": "connected", "version": "1.0.0"}), self._event("start", start=start)]

    def media(self, payload: bytes, n: int) -> str:
        media = {
            "track": "inbound",
            "chunk": str(n + 1),
            "timestamp": str(round(n * self.chunk_s * 1000)),
            "payload": b64(payload),
        }
        return self._event("media", media=media)

    def dtmf(self, digit: str) -> str:
        return self._event("dtmf", dtmf={"digit": digit})

    def stop(self) -> str:
        return self._event("stop", stop={"user_id": self.user_id, "call_control_id": self.call_control_id})

    def played(self, name: str) -> str:
        return self._event("mark", mark={"name": name})

    def read(self, message: str | bytes) -> Outbound:
        return check_outbound(message, self.stream_id, self.wire)

    @classmethod
    def conformance_setup(cls, api_base: str) -> tuple[dict[str, Any], dict[str, str], Any]:
        key = Ed25519PrivateKey.generate()
        env = {"TELNYX_PUBLIC_KEY": public_key_text(key), "TELNYX_API_KEY": CONFORMANCE_API_KEY}
        return {"api_base": api_base}, env, private_key_text(key)

    @classmethod
    def forged_secret(cls) -> Any:
        return private_key_text(Ed25519PrivateKey.generate())

    def check_transfer(self, request: Mapping[str, Any], target: str) -> list[str]:
        problems = []
        path = f"/v2/calls/{self.call_control_id}/actions/transfer"
        if (request["method"], request["path"]) != ("POST", path):
            problems.append(f"{request['method']} {request['path']} is not POST {path}")
        if request["headers"].get("authorization") != f"Bearer {CONFORMANCE_API_KEY}":
            problems.append("not Bearer auth with the API key")
        if not str(request["headers"].get("content-type", "")).startswith("application/json"):
            problems.append("body is not JSON")
        try:
            body = orjson.loads(request["body"])
        except orjson.JSONDecodeError:
            body = None
        if body != {"to": target}:
            problems.append(f"body {request['body'][:120]!r} is not {{'to': {target!r}}}")
        return problems


def check_outbound(message: str | bytes, stream_id: str, wire: MediaFormat) -> Outbound:
    """Validate one gateway -> Telnyx message as Telnyx would in rtp mode."""
    data = sent_text(message, "Telnyx takes JSON text")
    if not isinstance(data, dict) or data.get("event") not in _OUTBOUND_KEYS:
        raise Violation(f"not a Telnyx command: {message[:80]!r}")
    event = data["event"]
    required, optional = _OUTBOUND_KEYS[event]
    if not required <= set(data) <= required | optional:
        raise Violation(f"{event}: fields {sorted(data)}, expected {sorted(required)} (+ {sorted(optional)})")
    if "stream_id" in data and data["stream_id"] != stream_id:
        raise Violation(f"{event}: wrong stream_id {data['stream_id']!r}")
    if event == "media":
        payload = sent_payload(data)
        if len(payload) < wire.bytes_per_second * 0.02 or len(payload) > wire.bytes_per_second * 30:
            raise Violation(f"media: {len(payload)} bytes is not 20 ms to 30 s of {wire}")
        if wire.encoding == "l16" and len(payload) % 2:
            raise Violation("media: L16 payload of an odd number of bytes")
        return Outbound("media", payload=payload)
    if event == "mark":
        return sent_mark(data)
    return Outbound("clear")


TelnyxCarrier.peer = TelnyxPeer
