"""Plivo: answer XML `<Stream bidirectional>` audio streams, `X-Plivo-Signature-V3`, transfers over REST.

Console (console.plivo.com > Voice > Applications > your application): Answer URL
`<public_url>/plivo/voice`, method POST; assign your number to the application. Set `PLIVO_AUTH_ID` and
`PLIVO_AUTH_TOKEN` (the account's, from the console overview): the token checks Plivo's V3 signatures on
every webhook, both sign the REST calls. `[plivo] content_type` picks the stream's audio: mu-law 8 kHz
(default) or `audio/x-l16;rate=16000` (Plivo streams at most 16 kHz).

The per-call token rides in the `<Stream>`'s `extraHeaders` (Plivo allows only [A-Za-z0-9] in values; the
token is hex) and comes back in the start message's `extra_headers`. A transfer points the call's A leg at
`<public_url>/plivo/transfer/<one-time id>`, which this carrier serves once with the `<Dial>` XML. When no
agent is free the answer `<Speak>`s the configured message, then `<Dial>`s the overflow number the same way
or `<Hangup/>`s.

GUESSES (not confirmed by Plivo's reference): Plivo signs nothing on the WebSocket upgrade (the token
vouches for the stream); `extra_headers` comes back as "k=v;k2=v2" (",", a separator in the XML attribute,
is accepted too); no `stop` message: the stream ends when the socket closes; a `checkpoint` whose audio a
`clearAudio` dropped is never echoed; `playAudio` needs no `streamId`; `audio/x-l16` is little-endian; numbers
arrive as bare E.164 digits (and `<Number>` takes them that way); Plivo fetches a transfer's `aleg_url`
within `TRANSFER_TTL_S`, once, from the gateway process that asked for the transfer, and signs that
fetch with V3 as it signs its other callbacks.

Size: like twilio.py, the protocol both ways (the gateway's side and the simulated carrier's, which the
conformance suite and `duplexgate call` speak), the V3 signing rules and the transfer's XML route live in
one file that says all Plivo does; the carrier's side is the last ~160 lines.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qs, urlsplit, urlunsplit
from xml.etree import ElementTree

import httpx

from gateway.call.events import (
    CallerAudio,
    CallEvent,
    CallStarted,
    CallStopped,
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
    CarrierRoute,
    CarrierSettings,
    CarrierStream,
    Outbound,
    StreamTarget,
    Violation,
    WebhookRefused,
    basic_header,
    rest_request,
)
from gateway.carriers.wire import (
    answer_text,
    b64,
    compact,
    dtmf_digit,
    hangup_markup,
    raise_on_overflow,
    section,
    sent_text,
    spoken,
    text_object,
    xml_document,
)

SIGNATURE_HEADER = "x-plivo-signature-v3"
NONCE_HEADER = "x-plivo-signature-v3-nonce"
ENCODINGS = {"audio/x-mulaw": "mulaw", "audio/x-l16": "l16"}
TRANSFER_TTL_S = 120.0  # a transfer's XML waits this long for Plivo to fetch it
MAX_PENDING_TRANSFERS = 256  # the oldest is forgotten beyond this: the dict cannot grow without bound
CALL_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
STREAM_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
TRANSFER_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class PlivoSettings(CarrierSettings):
    auth_id_env: str = "PLIVO_AUTH_ID"
    auth_id: str | None = field(default=None, repr=False)  # from the environment
    auth_token_env: str = "PLIVO_AUTH_TOKEN"
    auth_token: str | None = field(default=None, repr=False)  # from the environment
    content_type: Literal["audio/x-mulaw;rate=8000", "audio/x-l16;rate=8000", "audio/x-l16;rate=16000"] = (
        "audio/x-mulaw;rate=8000"
    )
    api_base: str = "https://api.plivo.com"
    secrets: ClassVar[Mapping[str, str]] = {"auth_id": "auth_id_env", "auth_token": "auth_token_env"}

    def signing_variables(self) -> list[str]:
        return [self.auth_token_env]

    def problems(self, public_url: str) -> list[str]:
        if self.auth_token and not public_url:
            return [f"[server] public_url is required when {self.auth_token_env} is set (Plivo signs it)"]
        return []


# --- the gateway's side ---------------------------------------------------------------------------


class PlivoStream(CarrierStream):
    """Plivo's audio-stream messages, both ways (JSON text, camelCase, base64 audio)."""

    def __init__(self, query: Mapping[str, str], headers: Mapping[str, str]) -> None:
        super().__init__(query, headers)
        self.media_format = MediaFormat()

    def parse(self, message: str | bytes) -> CallEvent | None:
        data = text_object(message, "Plivo audio streams")
        event = data.get("event")
        if event == "media":  # first: 50 of these a second per call
            payload = section(data, "media").get("payload")
            try:
                return CallerAudio(payload=base64.b64decode(payload, validate=True))  # type: ignore[arg-type]
            except (binascii.Error, TypeError, ValueError):
                raise MalformedMessage("media.payload missing or not base64") from None
        if event in ("playedStream", "played"):  # a support article calls it "played"
            name = data.get("name")
            if not isinstance(name, str):
                raise MalformedMessage(f"{event} without a name")
            return MarkPlayed(name=name)
        if event == "clearedAudio":
            return None  # the acknowledgement of our clear: the call already dropped its marks
        if event == "dtmf":
            return DtmfPressed(digit=dtmf_digit(section(data, "dtmf").get("digit"), "dtmf.digit"))
        if event == "start":
            return self._start(data)
        if event == "stop":  # not documented; harmless to honour
            return CallStopped(reason="stop")
        raise MalformedMessage(f"unknown event {str(event)[:40]!r}")

    def _start(self, data: dict[str, Any]) -> CallStarted:
        start = section(data, "start")
        call_id, stream_id = start.get("callId"), start.get("streamId")
        if not isinstance(call_id, str) or not CALL_UUID.fullmatch(call_id):
            raise MalformedMessage(f"start.callId {str(call_id)[:40]!r} is not a call UUID")
        if not isinstance(stream_id, str) or not STREAM_ID.fullmatch(stream_id):
            raise MalformedMessage(f"start.streamId {str(stream_id)[:40]!r} is not a stream id")
        fmt = start.get("mediaFormat")
        if not isinstance(fmt, dict):
            raise MalformedMessage("start.mediaFormat is not an object")
        encoding, rate = str(fmt.get("encoding", "")).partition(";")[0].strip(), fmt.get("sampleRate")
        if (
            encoding not in ENCODINGS
            or rate not in (8000, 16000)
            or (encoding, rate) == ("audio/x-mulaw", 16000)
        ):
            raise MalformedMessage(f"start.mediaFormat {fmt!r:.80} is not mu-law 8 kHz or L16 8/16 kHz")
        params = parse_extra_headers(data.get("extra_headers", start.get("extra_headers", "")))
        account = start.get("accountId")
        self.stream_id = stream_id
        self.media_format = MediaFormat(encoding=ENCODINGS[encoding], sample_rate=int(rate))
        return CallStarted(
            call_id=call_id,
            stream_id=stream_id,
            account_id=account if isinstance(account, str) and account else None,
            custom_parameters=params,
            media_format=self.media_format,
        )

    def audio(self, payload: bytes) -> Sequence[str]:
        content_type = "audio/x-mulaw" if self.media_format.encoding == "mulaw" else "audio/x-l16"
        media = {
            "contentType": content_type,
            "sampleRate": self.media_format.sample_rate,
            "payload": b64(payload),
        }
        return [compact({"event": "playAudio", "media": media})]

    def mark(self, name: str) -> Sequence[str]:
        return [compact({"event": "checkpoint", "streamId": self.stream_id, "name": name})]

    def clear(self) -> Sequence[str]:
        return [compact({"event": "clearAudio", "streamId": self.stream_id})]


class PlivoCarrier(Carrier):
    """Plivo's answer webhook (XML), token-vouched audio streams and A-leg transfers."""

    name: ClassVar[str] = "plivo"
    settings_type = PlivoSettings
    console = "Voice > Applications > your app > Answer URL: <public_url>/plivo/voice, method POST"

    settings: PlivoSettings

    def __init__(self, settings: PlivoSettings, public_url: str | None) -> None:
        super().__init__(settings, public_url)
        if settings.auth_token and not self.public_url:
            # Signed URLs must come from configuration: Host and X-Forwarded-* are attacker-controlled.
            raise ValueError(f"a {self.name} auth token needs a public URL to check signatures against")
        self.pending: OrderedDict[str, tuple[str, float]] = OrderedDict()  # transfer id -> (target, expiry)

    @property
    def authenticates(self) -> bool:
        return bool(self.settings.auth_token)

    def verify_webhook(
        self, method: str, path: str, query: str, body: bytes, headers: Mapping[str, str]
    ) -> bool:
        """Plivo's V3 signature over the configured public URL, the query and the POSTed form."""
        token = self.settings.auth_token
        if not token:
            return True
        url = f"{self.public_url}{path}" + (f"?{query}" if query else "")
        form = (
            parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
            if method == "POST"
            else {}
        )
        return check_v3(token, method, url, form, headers.get(NONCE_HEADER), headers.get(SIGNATURE_HEADER))

    def read_answer(
        self, method: str, path: str, query: str, body: bytes, headers: Mapping[str, str]
    ) -> Answering:
        if not self.verify_webhook(method, path, query, body, headers):
            raise WebhookRefused(403, f"bad or missing {SIGNATURE_HEADER}", auth_failed=True)
        fields = {
            k: v[-1]
            for k, v in parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True).items()
        }
        call_id = fields.get("CallUUID", "")
        if not CALL_UUID.fullmatch(call_id):
            raise WebhookRefused(400, "answer webhook without a CallUUID")
        return Answering(call_id, _e164(fields.get("From")), _e164(fields.get("To")), fields)

    def answer(self, call: Answering, stream_url: str, token: str) -> tuple[str, str]:
        attributes = {
            "bidirectional": "true",
            "keepCallAlive": "true",  # the stream runs alone; the call ends when it does
            "contentType": self.settings.content_type,
            "extraHeaders": f"{TOKEN_PARAMETER}={token}",
        }
        response = ElementTree.Element("Response")
        ElementTree.SubElement(response, "Stream", attributes).text = stream_url
        return xml_document(response), "application/xml"

    def overflow(self, call: Answering, message: str, transfer_to: str | None) -> tuple[str, str]:
        """`<Speak>` the message, then `<Dial>` the transfer (as a REST transfer would) or `<Hangup/>`."""
        xml = dial_xml(transfer_to, message) if transfer_to else hangup_markup(message, "Speak")
        return xml, "application/xml"

    def verify_upgrade(self, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> bool:
        return True  # nothing documented signs it; the edge demands the call token when signatures are on

    def open_stream(self, query: Mapping[str, str], headers: Mapping[str, str]) -> PlivoStream:
        return PlivoStream(query, headers)

    def routes(self) -> Sequence[CarrierRoute]:
        return [CarrierRoute("transfer/{transfer_id}", ("POST", "GET"), self._serve_transfer)]

    async def _serve_transfer(
        self, method: str, path: str, query: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, str, str]:
        """The `<Dial>` XML of one pending transfer, once, to a request signed by Plivo."""
        if not self.verify_webhook(method, path, query, body, headers):
            raise WebhookRefused(403, f"bad or missing {SIGNATURE_HEADER}", auth_failed=True)
        now = time.monotonic()
        transfer_id = path.rstrip("/").rpartition("/")[2]
        target, expires = self.pending.pop(transfer_id, ("", 0.0))
        if not target or expires < now:
            return 404, "no such transfer (unknown, expired or already fetched)", "text/plain"
        return 200, dial_xml(target), "application/xml"

    async def transfer(self, call: CallStarted, target: str) -> None:
        """Point the call's A leg at a one-time URL of ours serving `<Dial>`; that ends the stream."""
        auth_id, token = self.settings.auth_id, self.settings.auth_token
        if not auth_id or not token or not self.public_url:
            raise RuntimeError(
                f"{self.name} call control needs {self.settings.auth_id_env}, {self.settings.auth_token_env} "
                "and [server] public_url (Plivo fetches the transfer's XML from it)"
            )
        now = time.monotonic()
        for stale in [key for key, (_, expires) in self.pending.items() if expires < now]:
            del self.pending[stale]
        while len(self.pending) >= MAX_PENDING_TRANSFERS:
            self.pending.popitem(last=False)
        transfer_id = secrets.token_hex(16)
        self.pending[transfer_id] = (target, now + TRANSFER_TTL_S)
        call_uuid = call.control_id or call.call_id
        await rest_request(
            "POST",
            f"{self.settings.api_base.rstrip('/')}/v1/Account/{auth_id}/Call/{call_uuid}/",
            what=f"{self.name} transfer of {call_uuid}",
            data={
                "legs": "aleg",
                "aleg_url": f"{self.public_url}/{self.name}/transfer/{transfer_id}",
                "aleg_method": "POST",
            },
            auth=(auth_id, token),
        )


# --- signatures and XML -----------------------------------------------------------------------------


def v3_base(method: str, url: str, form: Mapping[str, Sequence[str]]) -> str:
    """What Plivo's V3 signature covers (as plivo-python builds it): for a GET the URL with its query
    sorted as k=v&...; for a POST the URL, `?` and its sorted query, `.` between query and form when both
    are present, then the form's sorted names each followed by its (sorted) values."""
    parts = urlsplit(url)
    base = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    query = parse_qs(parts.query, keep_blank_values=True)
    if method.upper() == "GET":
        query_string = _sorted_query({**form, **query})
        return base + (f"?{query_string}" if query_string else "")
    query_string = _sorted_query(query)
    if query_string or form:
        base += f"?{query_string}"
    if query_string and form:
        base += "."
    return base + "".join(name + value for name in sorted(form) for value in sorted(form[name]))


def v3_signature(
    auth_token: str, method: str, url: str, form: Mapping[str, Sequence[str]], nonce: str
) -> str:
    base = f"{v3_base(method, url, form)}.{nonce}"
    return base64.b64encode(hmac.new(auth_token.encode(), base.encode(), hashlib.sha256).digest()).decode()


def check_v3(
    auth_token: str,
    method: str,
    url: str,
    form: Mapping[str, Sequence[str]],
    nonce: str | None,
    header: str | None,
) -> bool:
    """Whether any signature in the header (one per active auth token, comma-separated) is ours."""
    if not nonce or not header:
        return False
    expected, found = v3_signature(auth_token, method, url, form, nonce).encode(), False
    for candidate in header.split(","):
        found |= hmac.compare_digest(candidate.strip().encode(), expected)  # every one: the time says nothing
    return found


def _sorted_query(params: Mapping[str, Sequence[str]]) -> str:
    return "&".join(f"{name}={value}" for name in sorted(params) for value in sorted(params[name]))


def parse_extra_headers(raw: object) -> dict[str, str]:
    """`extra_headers` ("k=v;k2=v2", or a JSON object) as the call's parameters."""
    if isinstance(raw, dict):
        return {str(k): v for k, v in raw.items() if isinstance(v, str)}
    if not isinstance(raw, str):
        raise MalformedMessage("extra_headers is neither text nor an object")
    pairs = (item.partition("=") for item in re.split(r"[;,]", raw) if item.strip())
    return {name.strip(): value.strip() for name, _, value in pairs}


def dial_xml(target: str, message: str = "") -> str:
    """The XML that hands the call to a person, after `<Speak>`ing `message` when there is one:
    `<Dial><Number>`, or `<Dial><User>` for a SIP URI."""
    response = spoken(message, "Speak")
    dial = ElementTree.SubElement(response, "Dial")
    kind = "User" if target.lower().startswith(("sip:", "sips:")) else "Number"
    ElementTree.SubElement(dial, kind).text = target.removeprefix("+") if kind == "Number" else target
    return xml_document(response)


def _e164(number: str | None) -> str | None:
    """Plivo's bare E.164 digits as +E.164, as numbers are written everywhere else in the gateway."""
    return f"+{number}" if number and number.isdigit() else number


# --- the carrier's side, for the simulator ----------------------------------------------------------

CONFORMANCE_AUTH_ID = "MA" + "Z" * 18
CONFORMANCE_TOKEN = "conformanceAuthToken0123456789abcdefABCD"


class PlivoPeer(CarrierPeer):
    """Plivo placing a call: V3-signed answer webhook, `<Stream>` read, `start` with `extra_headers`,
    20 ms base64 `media`, `checkpoint` echoed as `playedStream` when played, `clearedAudio` after a clear."""

    echoes_marks_on_clear: ClassVar[bool] = False

    def __init__(self, call_id: str | None, caller: str, called: str, secret: Any = None) -> None:
        super().__init__(call_id, caller, called, secret)
        self.stream_id = str(uuid.uuid4())
        self.seq = 0

    @staticmethod
    def new_call_id() -> str:
        return str(uuid.uuid4())

    def signed_post(self, url: str, form: Mapping[str, str]) -> dict[str, str]:
        """The headers of a POST of `form` to `url` as Plivo signs it."""
        if not self.secret:
            return {}
        nonce = str(secrets.randbelow(10**20))
        signature = v3_signature(self.secret, "POST", url, {k: [v] for k, v in form.items()}, nonce)
        return {"X-Plivo-Signature-V3": signature, "X-Plivo-Signature-V3-Nonce": nonce}

    async def answer(self, client: httpx.AsyncClient, webhook: str) -> StreamTarget:
        form = {
            "CallUUID": self.call_id,
            "From": self.caller.removeprefix("+"),
            "To": self.called.removeprefix("+"),
            "Direction": "inbound",
            "CallStatus": "ringing",
            "Event": "StartApp",
        }
        response = await client.post(webhook, data=form, headers=self.signed_post(webhook, form))
        text = answer_text(response, f"answer webhook {webhook}")
        try:
            root = ElementTree.fromstring(text)
        except ElementTree.ParseError:
            root = None
        stream = root.find("Stream") if root is not None else None
        if stream is None or not (stream.text or "").strip():
            if root is not None:
                raise_on_overflow(root, "Speak")
            raise RuntimeError(f"answer webhook {webhook}: no <Stream> url in {text[:300]}")
        encoding, _, rate = stream.get("contentType", "audio/x-l16;rate=8000").partition(";rate=")
        self.wire = MediaFormat(encoding=ENCODINGS[encoding], sample_rate=int(rate))
        return StreamTarget(stream.text.strip(), {}, parse_extra_headers(stream.get("extraHeaders", "")))

    def _event(self, message: dict[str, Any]) -> str:
        self.seq += 1
        return compact({**message, "sequenceNumber": self.seq})

    def opening(self, target: StreamTarget) -> list[str | bytes]:
        encoding = "audio/x-mulaw" if self.wire.encoding == "mulaw" else "audio/x-l16"
        start = {
            "callId": self.call_id,
            "streamId": self.stream_id,
            "accountId": CONFORMANCE_AUTH_ID,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": encoding, "sampleRate": self.wire.sample_rate},
        }
        extra = ";".join(f"{k}={v}" for k, v in target.parameters.items())
        return [self._event({"event": "start", "start": start, "extra_headers": extra})]

    def media(self, payload: bytes, n: int) -> str:
        media = {
            "track": "inbound",
            "timestamp": str(round(n * self.chunk_s * 1000)),
            "chunk": n + 1,
            "payload": b64(payload),
        }
        return self._event({"event": "media", "streamId": self.stream_id, "media": media})

    def dtmf(self, digit: str) -> str:
        return self._event(
            {"event": "dtmf", "streamId": self.stream_id, "dtmf": {"digit": digit, "track": "inbound"}}
        )

    def played(self, name: str) -> str:
        return self._event({"event": "playedStream", "streamId": self.stream_id, "name": name})

    def cleared(self) -> str:
        return self._event({"event": "clearedAudio", "streamId": self.stream_id})

    def read(self, message: str | bytes) -> Outbound:
        data = sent_text(message, "Plivo takes JSON text only")
        event = data.get("event") if isinstance(data, dict) else None
        if event == "playAudio" and set(data) == {"event", "media"}:
            media = data["media"]
            encoding = "audio/x-mulaw" if self.wire.encoding == "mulaw" else "audio/x-l16"
            wanted = {"contentType": encoding, "sampleRate": self.wire.sample_rate}
            if (
                not isinstance(media, dict)
                or {k: media.get(k) for k in wanted} != wanted
                or set(media) != {*wanted, "payload"}
            ):
                raise Violation(f"playAudio media {str(media)[:120]} is not {wanted} + payload")
            try:
                payload = base64.b64decode(media["payload"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise Violation("playAudio: payload is not base64") from None
            if not payload or payload[:4] == b"RIFF":
                raise Violation("playAudio: empty payload or one with a wav header")
            return Outbound("media", payload=payload)
        if isinstance(data, dict) and data.get("streamId") != self.stream_id:
            raise Violation(f"{event}: streamId {data.get('streamId')!r} is not this stream's")
        if (
            event == "checkpoint"
            and set(data) == {"event", "streamId", "name"}
            and isinstance(data["name"], str)
        ):
            return Outbound("mark", name=data["name"])
        if event == "clearAudio" and set(data) == {"event", "streamId"}:
            return Outbound("clear")
        raise Violation(f"not a Plivo stream message: {message[:120]!r}")

    @classmethod
    def conformance_setup(cls, api_base: str) -> tuple[dict[str, Any], dict[str, str], Any]:
        env = {"PLIVO_AUTH_ID": CONFORMANCE_AUTH_ID, "PLIVO_AUTH_TOKEN": CONFORMANCE_TOKEN}
        return {"api_base": api_base}, env, CONFORMANCE_TOKEN

    @classmethod
    def forged_secret(cls) -> str:
        return "forgedAuthToken" + secrets.token_hex(12)

    def check_transfer(self, request: Mapping[str, Any], target: str) -> list[str]:
        """The REST request as Plivo judges it, then the transfer XML fetched as Plivo would fetch it."""
        problems = []
        path = f"/v1/Account/{CONFORMANCE_AUTH_ID}/Call/{self.call_id}/"
        if (request["method"], request["path"]) != ("POST", path):
            problems.append(f"{request['method']} {request['path']} is not POST {path}")
        if request["headers"].get("authorization") != basic_header(CONFORMANCE_AUTH_ID, CONFORMANCE_TOKEN):
            problems.append("no HTTP Basic auth with the auth id and token")
        form = {k: v[-1] for k, v in parse_qs(request["body"].decode()).items()}
        if form.get("legs") != "aleg" or form.get("aleg_method") != "POST" or not form.get("aleg_url"):
            return [*problems, f"form {form} is not legs=aleg, aleg_url, aleg_method=POST"]
        fetch = {"CallUUID": self.call_id, "From": self.caller.removeprefix("+"), "To": self.called}
        reply = httpx.post(
            form["aleg_url"], data=fetch, headers=self.signed_post(form["aleg_url"], fetch), timeout=5
        )
        dial = ElementTree.fromstring(reply.text).find("Dial") if reply.status_code == 200 else None
        numbers = [el.text for el in dial] if dial is not None else []
        if numbers != [target.removeprefix("+") if not target.startswith("sip:") else target]:
            problems.append(
                f"aleg_url answered {reply.status_code} {reply.text[:200]!r}, no <Dial> of {target}"
            )
        return problems


PlivoCarrier.peer = PlivoPeer
