"""Vonage: Voice API answer webhook -> NCCO `connect` to a WebSocket, raw L16 audio, JWT-signed webhooks.

Console (dashboard.nexmo.com > Applications > your application > Voice): Answer URL
`<public_url>/vonage/voice` (HTTP GET), signed callbacks on; link your number to the application. Set
`VONAGE_SIGNATURE_SECRET` (account settings: the signature secret), `VONAGE_PRIVATE_KEY` (the application's
private key, PEM text) and `[vonage] application_id` for call control (transfer).

The NCCO connects the call to our media stream at native 24 kHz (`sample_rate` 8000/16000/24000). Vonage
signs nothing on the WebSocket upgrade: the NCCO's endpoint `headers` carry the call's single-use token and
uuid, and come back flattened into the first text message, `websocket:connected`; that token alone vouches
for the stream. Caller audio arrives as binary frames of little-endian 16-bit PCM, agent audio goes back the
same way in 20 ms frames; marks are `notify` actions echoed as `websocket:notify` once the audio before them
has played. When no agent is free the NCCO `talk`s the message, then `connect`s to the overflow number as a
transfer does, or ends (the call ends with its NCCO).

GUESSES (not confirmed by Vonage's reference): the headers arrive flattened at the top level of
`websocket:connected` (third-party code says so); Vonage wants 20 ms outbound frames (its tutorial sends
them, larger ones may play too); a `notify` echo comes only for audio that played, none for audio dropped by
a `clear`; a signed GET webhook's `payload_hash`, when present, is over the empty body; signed-webhook JWTs
carry `iat` and are honoured for `MAX_JWT_AGE_S`; numbers come without a leading `+` (E.164 digits), and a
transfer's phone endpoint takes them that way.

Size: like twilio.py, the protocol both ways (the gateway's side and the simulated carrier's, which the
conformance suite and `duplexgate call` speak) and the two JWT schemes live beside each other, so that one
file says all Vonage does; the carrier's side is the last ~150 lines.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl

import httpx
import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

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
    AnsweredWithoutStream,
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
from gateway.carriers.wire import answer_text, compact, dtmf_digit, json_object, overflow_words, sent_json

CALL_HEADER = "call_uuid"  # the NCCO header naming the call (Vonage's connected message need not say it)
FRAME_S = 0.02  # Vonage's audio frame both ways
MAX_JWT_AGE_S = 300  # a signed webhook older (or further in the future) than this is a replay or a bad clock
APP_JWT_TTL_S = 300  # lifetime of the application JWT our REST calls carry
CALL_UUID = re.compile(r"[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12}")
CONTENT_TYPE = re.compile(r"audio/l16;\s*rate=(\d+)")
RATES = (8000, 16000, 24000)


@dataclass(frozen=True)
class VonageSettings(CarrierSettings):
    signature_secret_env: str = "VONAGE_SIGNATURE_SECRET"
    signature_secret: str | None = field(default=None, repr=False)  # from the environment
    private_key_env: str = "VONAGE_PRIVATE_KEY"  # the application's private key, PEM text
    private_key: str | None = field(default=None, repr=False)  # from the environment
    application_id: str = ""  # for call control (transfer)
    sample_rate: Literal[8000, 16000, 24000] = 24000  # the stream's L16 rate; 24000 is the model's own
    api_base: str = "https://api.nexmo.com"
    secrets: ClassVar[Mapping[str, str]] = {
        "signature_secret": "signature_secret_env",
        "private_key": "private_key_env",
    }

    def signing_variables(self) -> list[str]:
        return [self.signature_secret_env]

    def problems(self, public_url: str) -> list[str]:
        if not self.private_key:
            return []
        if not self.application_id:
            return [f"application_id is required when {self.private_key_env} is set (call control)"]
        try:
            load_private_key(self.private_key)
        except (ValueError, TypeError) as exc:
            return [f"{self.private_key_env} is not an RSA private key in PEM ({exc})"]
        return []


# --- the gateway's side ---------------------------------------------------------------------------


class VonageStream(CarrierStream):
    """Vonage's WebSocket: binary L16 audio both ways, JSON text events and actions."""

    def __init__(self, query: Mapping[str, str], headers: Mapping[str, str]) -> None:
        super().__init__(query, headers)
        self.frame_bytes = 0  # 20 ms of L16 at the stream's rate, known from `websocket:connected`

    def parse(self, message: str | bytes) -> CallEvent | None:
        if isinstance(message, bytes):  # first: 50 of these a second per call
            if not self.frame_bytes:
                raise MalformedMessage("audio before websocket:connected")
            if not message or len(message) % 2:
                raise MalformedMessage(f"a {len(message)}-byte audio frame (16-bit samples come in pairs)")
            return CallerAudio(payload=message)
        data = json_object(message)
        event = data.get("event")
        if event == "websocket:notify":
            payload = data.get("payload")
            name = payload.get("mark") if isinstance(payload, dict) else None
            if not isinstance(name, str):
                raise MalformedMessage("websocket:notify without a payload.mark string")
            return MarkPlayed(name=name)
        if event == "websocket:cleared":
            return None  # the acknowledgement of our clear: the call already dropped its marks
        if event == "websocket:dtmf":
            nested = data.get("dtmf")
            digit = data.get("digit", nested.get("digit") if isinstance(nested, dict) else None)
            return DtmfPressed(digit=dtmf_digit(digit, "websocket:dtmf digit"))
        if event == "websocket:connected":
            return self._connected(data)
        raise MalformedMessage(f"unknown event {str(event)[:40]!r}")

    def _connected(self, data: dict[str, Any]) -> CallStarted:
        content_type = data.get("content-type")
        match = CONTENT_TYPE.fullmatch(content_type) if isinstance(content_type, str) else None
        if match is None or int(match.group(1)) not in RATES:
            raise MalformedMessage(
                f"websocket:connected content-type {content_type!r} is not audio/l16;rate=N"
            )
        headers = {k: v for k, v in data.items() if k not in ("event", "content-type") and isinstance(v, str)}
        call_id = headers.get(CALL_HEADER, "")
        if not CALL_UUID.fullmatch(call_id):
            raise MalformedMessage(f"websocket:connected {CALL_HEADER} {call_id[:40]!r} is not a call uuid")
        rate = int(match.group(1))
        self.frame_bytes, self.stream_id = round(rate * FRAME_S) * 2, call_id
        return CallStarted(
            call_id=call_id,
            stream_id=call_id,  # Vonage names no stream: one socket is one call leg
            custom_parameters=headers,
            media_format=MediaFormat(encoding="l16", sample_rate=rate),
        )

    def audio(self, payload: bytes) -> Sequence[bytes]:
        size = self.frame_bytes or len(payload)
        return [payload[i : i + size] for i in range(0, len(payload), size)]

    def mark(self, name: str) -> Sequence[str]:
        return [compact({"action": "notify", "payload": {"mark": name}})]

    def clear(self) -> Sequence[str]:
        return [compact({"action": "clear"})]


class VonageCarrier(Carrier):
    """Vonage's answer webhook (NCCO), token-vouched media streams and call transfers."""

    name: ClassVar[str] = "vonage"
    settings_type = VonageSettings
    voice_methods: ClassVar[tuple[str, ...]] = ("GET", "POST")  # GET by default; POST sends JSON
    console = "Applications > your app > Voice > Answer URL: <public_url>/vonage/voice, HTTP GET"

    settings: VonageSettings

    @property
    def authenticates(self) -> bool:
        return bool(self.settings.signature_secret)

    def read_answer(
        self, method: str, path: str, query: str, body: bytes, headers: Mapping[str, str]
    ) -> Answering:
        if self.settings.signature_secret:
            problem = check_webhook_jwt(
                self.settings.signature_secret,
                headers.get("authorization"),
                body,
                self.settings.application_id,
            )
            if problem:
                raise WebhookRefused(403, f"bad or missing signed-webhook JWT: {problem}", auth_failed=True)
        fields = dict(parse_qsl(query, keep_blank_values=True))
        if method == "POST" and body:
            try:
                sent = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise WebhookRefused(400, "POSTed answer webhook is not JSON") from None
            if not isinstance(sent, dict):
                raise WebhookRefused(400, "POSTed answer webhook is not a JSON object")
            fields.update({k: v if isinstance(v, str) else compact(v) for k, v in sent.items()})
        call_id = fields.get("uuid", "")
        if not CALL_UUID.fullmatch(call_id):
            raise WebhookRefused(400, "answer webhook without a call uuid")
        return Answering(call_id, _e164(fields.get("from")), _e164(fields.get("to")), fields)

    def answer(self, call: Answering, stream_url: str, token: str) -> tuple[str, str]:
        endpoint = {
            "type": "websocket",
            "uri": stream_url,
            "content-type": f"audio/l16;rate={self.settings.sample_rate}",
            "headers": {TOKEN_PARAMETER: token, CALL_HEADER: call.call_id},
        }
        return compact([{"action": "connect", "endpoint": [endpoint]}]), "application/json"

    def overflow(self, call: Answering, message: str, transfer_to: str | None) -> tuple[str, str] | None:
        """`talk` the message, then `connect` to the transfer as a REST transfer would; the call ends
        with its NCCO. An NCCO needs an action: with nothing to say and nowhere to go, None."""
        ncco = [{"action": "talk", "text": message.strip()}] if message.strip() else []
        if transfer_to:
            ncco.append(connect_action(transfer_to))
        return (compact(ncco), "application/json") if ncco else None

    def verify_upgrade(self, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> bool:
        return True  # Vonage signs no upgrade; the edge demands the call token when signatures are on

    def open_stream(self, query: Mapping[str, str], headers: Mapping[str, str]) -> VonageStream:
        return VonageStream(query, headers)

    async def transfer(self, call: CallStarted, target: str) -> None:
        """Replace the call's NCCO with a `connect` to the target; that ends our WebSocket leg."""
        settings = self.settings
        if not settings.private_key or not settings.application_id:
            raise RuntimeError(
                f"{self.name} call control needs [vonage] application_id and {settings.private_key_env}"
            )
        uuid_ = call.control_id or call.call_id
        await rest_request(
            "PUT",
            f"{settings.api_base.rstrip('/')}/v1/calls/{uuid_}",
            what=f"{self.name} transfer of {uuid_}",
            content=compact(transfer_body(target)),
            headers={
                "Authorization": f"Bearer {application_jwt(settings.application_id, settings.private_key)}",
                "Content-Type": "application/json",
            },
        )


# --- signatures, tokens, NCCO -----------------------------------------------------------------------


def check_webhook_jwt(secret: str, authorization: str | None, body: bytes, application_id: str = "") -> str:
    """Why a signed webhook's `Authorization: Bearer <JWT>` is not good ("" when it is): HS256 with the
    signature secret, recent, for our application, and matching the body when it carries `payload_hash`."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "no Authorization: Bearer header"
    try:
        claims = jwt.decode(
            token.strip(), secret, algorithms=["HS256"], options={"require": ["iat"]}, leeway=MAX_JWT_AGE_S
        )  # the leeway lets the age check below, both ways, decide on clock skew
    except jwt.InvalidTokenError as exc:
        return f"{type(exc).__name__}: {exc}"
    iat = claims["iat"]
    if not isinstance(iat, int | float) or abs(time.time() - iat) > MAX_JWT_AGE_S:
        return f"issued at {iat!r}, not within {MAX_JWT_AGE_S} s of now"
    claimed_app = claims.get("application_id")
    if application_id and claimed_app and claimed_app != application_id:
        return f"for application {claimed_app!r}"
    if "payload_hash" in claims:
        digest = hashlib.sha256(body).hexdigest()
        if not hmac.compare_digest(str(claims["payload_hash"]).lower().encode(), digest.encode()):
            return "payload_hash does not match the body"
    return ""


@cache
def load_private_key(pem: str) -> rsa.RSAPrivateKey:
    """The application's key; a PEM pasted into one environment line with literal \\n is accepted."""
    if "\\n" in pem and "\n" not in pem.strip():
        pem = pem.replace("\\n", "\n")
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"a {type(key).__name__}, not an RSA key")
    return key


def application_jwt(application_id: str, private_key: str) -> str:
    """The RS256 application JWT Vonage's REST API authenticates with."""
    now = int(time.time())
    claims = {
        "application_id": application_id,
        "iat": now,
        "exp": now + APP_JWT_TTL_S,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, load_private_key(private_key), algorithm="RS256")


def transfer_body(target: str) -> dict[str, Any]:
    """The call update that connects the caller to `target` (a number, or a sip: URI)."""
    return {"action": "transfer", "destination": {"type": "ncco", "ncco": [connect_action(target)]}}


def connect_action(target: str) -> dict[str, Any]:
    """The NCCO action that connects the caller to `target` (a number, or a sip: URI)."""
    if target.lower().startswith(("sip:", "sips:")):
        endpoint = {"type": "sip", "uri": target}
    else:
        endpoint = {"type": "phone", "number": target.removeprefix("+")}  # Vonage writes E.164 bare
    return {"action": "connect", "endpoint": [endpoint]}


def _e164(number: str | None) -> str | None:
    """Vonage's bare E.164 digits as +E.164, as numbers are written everywhere else in the gateway."""
    return f"+{number}" if number and number.isdigit() else number


# --- the carrier's side, for the simulator ----------------------------------------------------------


@cache
def _conformance_key() -> tuple[str, rsa.RSAPublicKey]:
    """One application key pair per process for the conformance runs: (private PEM, public key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return pem, key.public_key()


CONFORMANCE_APPLICATION = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"


class VonagePeer(CarrierPeer):
    """Vonage placing a call: JWT-signed GET answer webhook, NCCO read, `websocket:connected` with the
    NCCO's headers, 20 ms binary L16, notify echoed when played, `websocket:cleared` after a clear."""

    wire: MediaFormat = MediaFormat(encoding="l16", sample_rate=24000)
    echoes_marks_on_clear: ClassVar[bool] = False

    @staticmethod
    def new_call_id() -> str:
        return str(uuid.uuid4())

    def _frame_bytes(self) -> int:
        return round(self.wire.sample_rate * FRAME_S) * 2

    async def answer(self, client: httpx.AsyncClient, webhook: str) -> StreamTarget:
        params = {
            "from": self.caller.removeprefix("+"),
            "to": self.called.removeprefix("+"),
            "uuid": self.call_id,
            "conversation_uuid": "CON-" + str(uuid.uuid4()),
        }
        headers = {"Authorization": f"Bearer {signed_webhook_jwt(self.secret)}"} if self.secret else {}
        response = await client.get(webhook, params=params, headers=headers)
        text = answer_text(response, f"answer webhook {webhook}")
        try:
            ncco = orjson.loads(text)
        except orjson.JSONDecodeError:
            ncco = None
        described = ncco_overflow(ncco)
        if described:
            raise AnsweredWithoutStream(described)
        try:
            endpoint = next(a for a in ncco if a.get("action") == "connect")["endpoint"][0]
            rate = int(CONTENT_TYPE.fullmatch(endpoint["content-type"]).group(1))  # type: ignore[union-attr]
            url, headers = str(endpoint["uri"]), dict(endpoint.get("headers", {}))
        except (StopIteration, LookupError, TypeError, AttributeError, ValueError):
            raise RuntimeError(f"answer webhook {webhook}: no websocket connect in {text[:300]}") from None
        self.wire = MediaFormat(encoding="l16", sample_rate=rate)  # what the NCCO asked
        return StreamTarget(url, {}, {str(k): str(v) for k, v in headers.items()})

    def target(self, url: str, parameters: Mapping[str, str]) -> StreamTarget:
        # An NCCO written by hand still names the call, or the gateway could not control it.
        return StreamTarget(url, {}, {CALL_HEADER: self.call_id, **parameters})

    def opening(self, target: StreamTarget) -> list[str | bytes]:
        connected = {
            "event": "websocket:connected",
            "content-type": f"audio/l16;rate={self.wire.sample_rate}",
        }
        return [compact({**connected, **target.parameters})]

    def media(self, payload: bytes, n: int) -> bytes:
        return payload

    def dtmf(self, digit: str) -> str:
        return compact({"event": "websocket:dtmf", "digit": digit, "duration": 260})

    def read(self, message: str | bytes) -> Outbound:
        if isinstance(message, bytes):
            if len(message) != self._frame_bytes():
                raise Violation(f"a {len(message)}-byte audio frame; 20 ms is {self._frame_bytes()} bytes")
            if message[:4] == b"RIFF":
                raise Violation("audio frame with a wav header (it would play as noise)")
            return Outbound("media", payload=message)
        data = sent_json(message)
        if data == {"action": "clear"}:
            return Outbound("clear")
        if isinstance(data, dict) and set(data) == {"action", "payload"} and data["action"] == "notify":
            payload = data["payload"]
            if isinstance(payload, dict) and set(payload) == {"mark"} and isinstance(payload["mark"], str):
                return Outbound("mark", name=payload["mark"])
        raise Violation(f"not a Vonage action: {message[:120]!r}")

    def played(self, name: str) -> str:
        return compact({"event": "websocket:notify", "payload": {"mark": name}})

    def cleared(self) -> str:
        return compact({"event": "websocket:cleared"})

    @classmethod
    def conformance_setup(cls, api_base: str) -> tuple[dict[str, Any], dict[str, str], Any]:
        secret = "conformance-signature-secret-" + "5" * 32
        env = {"VONAGE_SIGNATURE_SECRET": secret, "VONAGE_PRIVATE_KEY": _conformance_key()[0]}
        return {"api_base": api_base, "application_id": CONFORMANCE_APPLICATION}, env, secret

    @classmethod
    def forged_secret(cls) -> str:
        return "forged-signature-secret-" + secrets.token_hex(20)

    def check_transfer(self, request: Mapping[str, Any], target: str) -> list[str]:
        problems = []
        path = f"/v1/calls/{self.call_id}"
        if (request["method"], request["path"]) != ("PUT", path):
            problems.append(f"{request['method']} {request['path']} is not PUT {path}")
        headers = request["headers"]
        if not str(headers.get("content-type", "")).startswith("application/json"):
            problems.append(f"content-type {headers.get('content-type')!r} is not application/json")
        scheme, _, token = str(headers.get("authorization", "")).partition(" ")
        try:
            claims = jwt.decode(
                token, _conformance_key()[1], algorithms=["RS256"], options={"require": ["exp", "iat", "jti"]}
            )
            if scheme != "Bearer" or claims.get("application_id") != CONFORMANCE_APPLICATION:
                problems.append(f"not a Bearer JWT for application {CONFORMANCE_APPLICATION}: {claims}")
        except jwt.InvalidTokenError as exc:
            problems.append(f"no valid RS256 application JWT ({exc})")
        try:
            body = orjson.loads(request["body"])
        except orjson.JSONDecodeError:
            return [*problems, f"body {request['body'][:80]!r} is not JSON"]
        sip = target.startswith("sip:")
        endpoint = {"type": "sip", "uri": target} if sip else {"type": "phone", "number": target.lstrip("+")}
        ncco = [{"action": "connect", "endpoint": [endpoint]}]
        if body != {"action": "transfer", "destination": {"type": "ncco", "ncco": ncco}}:
            problems.append(f"body {body} does not transfer to {target}")
        return problems


def ncco_overflow(ncco: Any) -> str | None:
    """What an NCCO that connects no WebSocket does with the call, in words (it talks, then connects to a
    phone or SIP endpoint or ends); None for any other NCCO."""
    if not isinstance(ncco, list) or not ncco or not all(isinstance(action, dict) for action in ncco):
        return None
    if any(action.get("action") not in ("talk", "connect") for action in ncco):
        return None
    endpoints: list[Any] = []
    for action in ncco:
        if action["action"] == "connect":
            listed = action.get("endpoint")
            endpoints += listed if isinstance(listed, list) else [listed]
    if not all(isinstance(e, dict) and e.get("type") in ("phone", "sip") for e in endpoints):
        return None  # a websocket (the stream), or an endpoint no overflow answer names
    said = " ".join(str(action.get("text", "")) for action in ncco if action["action"] == "talk")
    return overflow_words(said, [str(e.get("number") or e.get("uri")) for e in endpoints])


def signed_webhook_jwt(secret: str, body: bytes = b"") -> str:
    """A signed-callback JWT as Vonage makes one: HS256 with the signature secret, over `body`."""
    claims = {
        "iat": int(time.time()),
        "jti": str(uuid.uuid4()),
        "iss": "Vonage",
        "payload_hash": hashlib.sha256(body).hexdigest(),
    }
    return jwt.encode(claims, secret, algorithm="HS256")


VonageCarrier.peer = VonagePeer
