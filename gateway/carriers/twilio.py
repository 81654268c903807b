"""Twilio: TwiML `<Connect><Stream>` media streams, `X-Twilio-Signature`, call updates over REST.

Wire shapes follow Twilio's WebSocket message reference: inbound sequence numbers, chunks and timestamps
are strings; outbound messages carry exactly the documented fields, because Twilio drops a message with a
missing or extra field without telling the call (only a once-per-stream Debugger warning). The per-call
token rides in a `<Parameter>` (Twilio strips query strings from stream URLs) and comes back in
`start.customParameters`.

Size: Twilio's dialect is also SignalWire's (signalwire.py subclasses it), so the hooks it overrides live
here beside the protocol both ways (the gateway's side and the simulated carrier's) and the signing rules.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qs, parse_qsl, urlsplit, urlunsplit
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
from gateway.carriers.wire import (
    answer_text,
    b64,
    compact,
    dtmf_digit,
    guarded,
    hangup_markup,
    media_payload,
    raise_on_overflow,
    section,
    sent_event,
    sent_mark,
    sent_object,
    sent_payload,
    spoken,
    text,
    text_object,
    timestamp_ms,
    xml_document,
)

SIGNATURE_HEADER = "x-twilio-signature"
_DEFAULT_PORTS = {"https": 443, "wss": 443, "http": 80, "ws": 80}
_MAX_PARAMETER_CHARS = 500  # Twilio: name + value of one <Parameter> must stay under this
# Identifiers from the wire become log fields, store keys and REST paths: only their documented shapes pass.
CALL_SID = re.compile(r"CA[0-9a-f]{32}")
ACCOUNT_SID = re.compile(r"AC[0-9a-f]{32}")
STREAM_SID = re.compile(r"[A-Za-z0-9-]{1,64}")  # MZ + 32 hex; early streams carried a UUID


@dataclass(frozen=True)
class TwilioSettings(CarrierSettings):
    auth_token_env: str = "TWILIO_AUTH_TOKEN"
    auth_token: str | None = field(default=None, repr=False)  # from the environment, never the file
    account_sid_env: str = "TWILIO_ACCOUNT_SID"  # for call control (transfer)
    account_sid: str | None = field(default=None, repr=False)  # resolved from the environment
    api_base: str = "https://api.twilio.com"  # Twilio's REST API (call transfer and hang-up)
    secrets: ClassVar[Mapping[str, str]] = {"auth_token": "auth_token_env", "account_sid": "account_sid_env"}

    def signing_variables(self) -> list[str]:
        return [self.auth_token_env]

    def problems(self, public_url: str) -> list[str]:
        if self.auth_token and not public_url:
            return [
                f"[server] public_url is required when {self.auth_token_env} is set (the carrier signs "
                "the public URL, e.g. https://gw.example.com)"
            ]
        return []


# --- the gateway's side ---------------------------------------------------------------------------


class TwilioStream(CarrierStream):
    """Twilio's media-stream messages, both ways."""

    encodings: ClassVar[Mapping[str, str]] = {"audio/x-mulaw": "mulaw"}  # the only encoding Twilio streams
    # Identifiers from the wire become log fields, store keys and REST paths: only their shapes pass.
    call_id_pattern: ClassVar[re.Pattern[str]] = CALL_SID
    call_id_shape: ClassVar[str] = "a Twilio call SID (CA + 32 hex digits)"
    account_pattern: ClassVar[re.Pattern[str]] = ACCOUNT_SID
    account_shape: ClassVar[str] = "an account SID"

    def parse(self, message: str | bytes) -> CallEvent:
        return guarded(self._parse, message)

    def _parse(self, message: str | bytes) -> CallEvent:
        data = text_object(message, "Twilio media streams")
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
            return StreamConnected(str(data.get("protocol", "")), str(data.get("version", "")))
        raise MalformedMessage(f"unknown event {event!r}")

    def _parse_start(self, data: dict[str, Any]) -> CallStarted:
        start = section(data, "start")
        call_id = text(start, "start.callSid", "callSid")
        if not self.call_id_pattern.fullmatch(call_id):
            raise MalformedMessage(f"start.callSid {call_id[:40]!r} is not {self.call_id_shape}")
        stream_id = start.get("streamSid", data.get("streamSid"))
        if not isinstance(stream_id, str) or not stream_id:
            raise MalformedMessage("start without a streamSid")
        if not STREAM_SID.fullmatch(stream_id):
            raise MalformedMessage(f"start.streamSid {stream_id[:40]!r} is not a stream SID")
        params = start.get("customParameters", {})
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            raise MalformedMessage("start.customParameters is not a flat string-to-string object")
        fmt = start.get("mediaFormat", {})
        if not isinstance(fmt, dict):
            raise MalformedMessage("start.mediaFormat is not an object")
        media = self.media_format(fmt)
        account = start.get("accountSid")
        if account is not None and not (isinstance(account, str) and self.account_pattern.fullmatch(account)):
            raise MalformedMessage(f"start.accountSid {str(account)[:40]!r} is not {self.account_shape}")
        return CallStarted(
            call_id=call_id,
            stream_id=stream_id,
            account_id=account if isinstance(account, str) and account else None,
            custom_parameters=dict(params),
            media_format=media,
        )

    def media_format(self, fmt: dict[str, Any]) -> MediaFormat:
        """The start message's `mediaFormat`, or MalformedMessage saying what this carrier does not send."""
        encoding = fmt.get("encoding", "audio/x-mulaw")
        if not isinstance(encoding, str) or encoding not in self.encodings:
            raise MalformedMessage(f"start.mediaFormat.encoding {encoding!r} is not {sorted(self.encodings)}")
        rate, channels = fmt.get("sampleRate", 8000), fmt.get("channels", 1)
        if not isinstance(rate, int) or not isinstance(channels, int) or rate <= 0 or channels != 1:
            raise MalformedMessage(f"start.mediaFormat sampleRate={rate!r} channels={channels!r} unsupported")
        try:
            return MediaFormat(encoding=self.encodings[encoding], sample_rate=rate, channels=channels)
        except ValueError as exc:
            raise MalformedMessage(f"start.mediaFormat: {exc}") from None

    def audio(self, payload: bytes) -> Sequence[str]:
        return [compact({"event": "media", "streamSid": self.stream_id, "media": {"payload": b64(payload)}})]

    def mark(self, name: str) -> Sequence[str]:
        return [compact({"event": "mark", "streamSid": self.stream_id, "mark": {"name": name}})]

    def clear(self) -> Sequence[str]:
        return [compact({"event": "clear", "streamSid": self.stream_id})]


class TwilioCarrier(Carrier):
    """Twilio's voice webhook (TwiML), signed media streams and call updates."""

    name: ClassVar[str] = "twilio"
    settings_type = TwilioSettings
    stream_type: ClassVar[type[TwilioStream]] = TwilioStream
    signature_headers: ClassVar[tuple[str, ...]] = (SIGNATURE_HEADER,)
    console = "Phone Numbers > your number > A call comes in: Webhook, HTTP POST"

    settings: TwilioSettings

    def __init__(self, settings: TwilioSettings, public_url: str | None) -> None:
        super().__init__(settings, public_url)
        if self.secret and not self.public_url:
            # Signed URLs must come from configuration: Host and X-Forwarded-* are attacker-controlled.
            raise ValueError(f"a {self.name} signing secret needs a public URL to check signatures against")

    @property
    def secret(self) -> str | None:
        """The key requests are signed with."""
        return self.settings.auth_token or None

    @property
    def authenticates(self) -> bool:
        return self.secret is not None

    # --- answer webhook ------------------------------------------------------------------------------

    def read_answer(
        self, method: str, path: str, query: str, body: bytes, headers: Mapping[str, str]
    ) -> Answering:
        form = parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)  # exact: signed
        if not self.verify_webhook(path, query, form, headers):
            raise WebhookRefused(403, f"bad or missing {self.signature_headers[0]}", auth_failed=True)
        fields = dict(form)
        call_id = fields.get("CallSid", "")
        if not self.stream_type.call_id_pattern.fullmatch(call_id):
            raise WebhookRefused(400, f"voice webhook without a CallSid ({self.stream_type.call_id_shape})")
        return Answering(call_id, caller=fields.get("From"), called=fields.get("To"), fields=fields)

    def answer(self, call: Answering, stream_url: str, token: str) -> tuple[str, str]:
        twiml = connect_stream_twiml(stream_url, {TOKEN_PARAMETER: token}, self.stream_attributes())
        return twiml, "application/xml"

    def overflow(self, call: Answering, message: str, transfer_to: str | None) -> tuple[str, str]:
        return overflow_twiml(message, transfer_to), "application/xml"

    def stream_attributes(self) -> dict[str, str]:
        """Attributes of the answer's `<Stream>` besides its url."""
        return {}

    def verify_webhook(
        self, path: str, query: str, form: Iterable[tuple[str, str]], headers: Mapping[str, str]
    ) -> bool:
        """Check a POSTed webhook's signature over the public URL, query string and form fields."""
        if self.secret is None:
            return True
        url = f"{self.public_url}{path}" + (f"?{query}" if query else "")
        return self._signed(url, list(form), headers)

    # --- media stream --------------------------------------------------------------------------------

    def verify_upgrade(self, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> bool:
        """The upgrade's signature over the `wss://` URL as written in our TwiML (no params)."""
        if self.secret is None:
            return True
        return self._signed(self.stream_url(), [], headers)

    def open_stream(self, query: Mapping[str, str], headers: Mapping[str, str]) -> TwilioStream:
        return self.stream_type(query, headers)

    def _signed(self, url: str, form: list[tuple[str, str]], headers: Mapping[str, str]) -> bool:
        """A valid signature of `url` and `form` in any of this carrier's signature headers."""
        return any(self._verify(url, form, headers.get(name)) for name in self.signature_headers)

    def _verify(self, url: str, params: Iterable[tuple[str, str]], signature: str | None) -> bool:
        if not signature or self.secret is None:
            return False
        params = list(params)
        expected, found = signature.encode(), False
        for candidate in signed_url_variants(url):
            computed = compute_signature(self.secret, candidate, params).encode()
            found |= hmac.compare_digest(computed, expected)  # every variant: the time says nothing
        return found

    # --- call control --------------------------------------------------------------------------------

    async def transfer(self, call: CallStarted, target: str) -> None:
        """Update the call with `<Dial>` TwiML; that ends its `<Connect><Stream>`, so the carrier stops the
        media stream itself. The configured account wins over the one the stream named."""
        account, token = self.rest_credentials(call)
        await rest_request(
            "POST",
            f"{self.calls_url(account)}/{call.call_id}.json",
            what=f"{self.name} transfer of {call.call_id}",
            data={"Twiml": dial_twiml(target)},
            auth=(account, token),
        )

    def rest_credentials(self, call: CallStarted) -> tuple[str, str]:
        """(account, token) for the REST API's Basic auth; RuntimeError naming what is missing."""
        account, token = self.settings.account_sid or call.account_id, self.settings.auth_token
        if not account or not token:
            raise RuntimeError(
                f"{self.name} call control needs the account SID and auth token "
                f"({self.settings.account_sid_env}, {self.settings.auth_token_env})"
            )
        return account, token

    def calls_url(self, account: str) -> str:
        return f"{self.settings.api_base.rstrip('/')}/2010-04-01/Accounts/{account}/Calls"


# --- signatures and TwiML ---------------------------------------------------------------------------


def compute_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]] = ()) -> str:
    """Twilio's request signature: base64 HMAC-SHA1 of the URL followed by the sorted name+value pairs
    (every value of a repeated name, in order, as twilio-python's RequestValidator signs them)."""
    signed = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def signed_url_variants(url: str) -> list[str]:
    """The URLs Twilio may have signed for `url`: with and without the default port, and (Twilio's advice
    for WebSocket handshakes) with and without a trailing slash on the path."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    default_port = _DEFAULT_PORTS.get(parts.scheme)
    netlocs = [parts.netloc.rsplit("@", 1)[-1]]  # credentials in the URL are not signed
    if parts.port is None and default_port is not None:
        netlocs.append(f"{host}:{default_port}")
    elif parts.port is not None and parts.port == default_port:
        netlocs.append(host)
    path = parts.path or "/"
    paths = [path, path[:-1] if path.endswith("/") else path + "/"]
    variants: list[str] = []
    for netloc in netlocs:
        for p in paths:
            variant = urlunsplit((parts.scheme, netloc, p, parts.query, ""))
            if variant not in variants:
                variants.append(variant)
    return variants


def connect_stream_twiml(
    stream_url: str, parameters: Mapping[str, str] | None = None, attributes: Mapping[str, str] | None = None
) -> str:
    """TwiML that bridges the call to our media stream: `<Connect><Stream url><Parameter/>...`.

    Twilio rejects or strips a query string on the stream URL, so per-call data goes in <Parameter>s
    (they arrive in `start.customParameters`).
    """
    if urlsplit(stream_url).query:
        raise ValueError(f"stream URL {stream_url!r} has a query string; pass values as parameters")
    response = ElementTree.Element("Response")
    connect = ElementTree.SubElement(response, "Connect")
    stream = ElementTree.SubElement(connect, "Stream", url=stream_url, **dict(attributes or {}))
    for name, value in (parameters or {}).items():
        if len(name) + len(value) >= _MAX_PARAMETER_CHARS:
            raise ValueError(f"stream parameter {name!r} is too long (name + value < 500 chars)")
        ElementTree.SubElement(stream, "Parameter", name=name, value=value)
    return xml_document(response)


def dial_twiml(target: str, message: str = "") -> str:
    """TwiML that hands the call to a person, after `<Say>`ing `message` when there is one: `<Dial><Number>`
    for a number, `<Dial><Sip>` for a SIP URI."""
    response = spoken(message, "Say")
    dial = ElementTree.SubElement(response, "Dial")
    kind = "Sip" if target.lower().startswith(("sip:", "sips:")) else "Number"
    ElementTree.SubElement(dial, kind).text = target
    return xml_document(response)


def overflow_twiml(message: str, transfer_to: str | None) -> str:
    """The answer when no agent is free: `<Say>` the message, then `<Dial>` the transfer or `<Hangup/>`
    (TwiML's verbs, which cXML and TeXML take unchanged)."""
    return dial_twiml(transfer_to, message) if transfer_to else hangup_markup(message, "Say")


def _parse_media(data: dict[str, Any]) -> CallerAudio:
    media = section(data, "media")
    track = media.get("track", "inbound")
    if track != "inbound":
        raise MalformedMessage(f"media.track {track!r} on a bidirectional stream (only 'inbound' is sent)")
    return CallerAudio(payload=media_payload(media), timestamp_ms=timestamp_ms(media))


# --- the carrier's side, for the simulator ----------------------------------------------------------

CONFORMANCE_TOKEN = "conformance-auth-token-0123456789"
CONFORMANCE_ACCOUNT = "AC" + "7" * 32
_OUTBOUND_KEYS = {
    "media": {"event", "streamSid", "media"},
    "mark": {"event", "streamSid", "mark"},
    "clear": {"event", "streamSid"},
}


class TwilioPeer(CarrierPeer):
    """Twilio placing a call: signed webhook and upgrade, `connected` + `start`, 20 ms mu-law `media`,
    exact outbound shapes enforced, marks echoed when played (pending ones at once on `clear`)."""

    user_agent: ClassVar[str] = "TwilioProxy/1.1"
    ws_user_agent: ClassVar[str] = "Twilio.TmeWs/1.0"
    encoding_name: ClassVar[str] = "audio/x-mulaw"

    def __init__(self, call_id: str | None, caller: str, called: str, secret: Any = None) -> None:
        super().__init__(call_id, caller, called, secret)
        self.stream_id = "MZ" + secrets.token_hex(16)
        self.account_sid = "AC" + "0" * 32
        self.seq = 0

    @staticmethod
    def new_call_id() -> str:
        return "CA" + secrets.token_hex(16)

    def form(self) -> dict[str, str]:
        return {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": self.call_id,
            "CallStatus": "ringing",
            "Called": self.called,
            "Caller": self.caller,
            "Direction": "inbound",
            "From": self.caller,
            "To": self.called,
        }

    async def answer(self, client: httpx.AsyncClient, webhook: str) -> StreamTarget:
        url, params = await post_answer(client, webhook, self.form(), self.secret, self.user_agent)
        return StreamTarget(url, {}, params)

    def upgrade_headers(self, target: StreamTarget) -> dict[str, str]:
        if not self.secret:
            return {}
        return {SIGNATURE_HEADER: compute_signature(self.secret, target.url)}

    def _event(self, message: dict[str, Any]) -> str:
        self.seq += 1
        message["sequenceNumber"] = str(self.seq)
        return compact(message)

    def opening(self, target: StreamTarget) -> list[str | bytes]:
        start = {
            "accountSid": self.account_sid,
            "streamSid": self.stream_id,
            "callSid": self.call_id,
            "tracks": ["inbound"],
            "customParameters": dict(target.parameters),
            "mediaFormat": {
                "encoding": self.encoding_name,
                "sampleRate": self.wire.sample_rate,
                "channels": 1,
            },
        }
        return [
            compact({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
            self._event({"event": "start", "start": start, "streamSid": self.stream_id}),
        ]

    def media(self, payload: bytes, n: int) -> str:
        media = {
            "track": "inbound",
            "chunk": str(n + 1),
            "timestamp": str(round(n * self.chunk_s * 1000)),
            "payload": b64(payload),
        }
        return self._event({"event": "media", "media": media, "streamSid": self.stream_id})

    def dtmf(self, digit: str) -> str:
        dtmf = {"track": "inbound_track", "digit": digit}
        return self._event({"event": "dtmf", "streamSid": self.stream_id, "dtmf": dtmf})

    def stop(self) -> str:
        stop = {"accountSid": self.account_sid, "callSid": self.call_id}
        return self._event({"event": "stop", "stop": stop, "streamSid": self.stream_id})

    def played(self, name: str) -> str:
        return self._event({"event": "mark", "streamSid": self.stream_id, "mark": {"name": name}})

    def read(self, message: str | bytes) -> Outbound:
        return check_outbound(message, self.stream_id)

    @classmethod
    def conformance_setup(cls, api_base: str) -> tuple[dict[str, Any], dict[str, str], Any]:
        env = {"TWILIO_AUTH_TOKEN": CONFORMANCE_TOKEN, "TWILIO_ACCOUNT_SID": CONFORMANCE_ACCOUNT}
        return {"api_base": api_base}, env, CONFORMANCE_TOKEN

    def check_transfer(self, request: Mapping[str, Any], target: str) -> list[str]:
        problems = []
        path = f"/2010-04-01/Accounts/{CONFORMANCE_ACCOUNT}/Calls/{self.call_id}.json"
        if (request["method"], request["path"]) != ("POST", path):
            problems.append(f"{request['method']} {request['path']} is not POST {path}")
        if not str(request["headers"].get("authorization", "")).startswith("Basic "):
            problems.append("no HTTP Basic auth")
        twiml = parse_qs(request["body"].decode()).get("Twiml", [""])[0]
        if f">{target}</" not in twiml or "<Dial>" not in twiml:
            problems.append(f"Twiml {twiml[:120]!r} does not <Dial> {target}")
        return problems


async def post_answer(
    client: httpx.AsyncClient, webhook: str, form: Mapping[str, str], secret: str | None, user_agent: str
) -> tuple[str, dict[str, str]]:
    """POST the voice webhook as Twilio does; the `<Stream>` url and its `<Parameter>`s."""
    headers = {"User-Agent": user_agent}
    if secret:
        headers[SIGNATURE_HEADER] = compute_signature(secret, webhook, form.items())
    stream = answered_stream(await client.post(webhook, data=dict(form), headers=headers), webhook)
    return stream.get("url", ""), {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}


def answered_stream(response: httpx.Response, webhook: str) -> ElementTree.Element:
    """The `<Connect><Stream url>` of a voice webhook's TwiML (or cXML, or TeXML); AnsweredWithoutStream
    for an answer that says and hangs up or dials instead, or a 503; RuntimeError for anything else."""
    text = answer_text(response, f"voice webhook {webhook}")
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise RuntimeError(f"voice webhook {webhook}: not XML ({exc}): {text[:300]}") from None
    stream = root.find("./Connect/Stream")
    if stream is None or not stream.get("url"):
        raise_on_overflow(root, "Say")
        raise RuntimeError(f"voice webhook {webhook}: no <Connect><Stream url>: {text[:300]}")
    return stream


async def fetch_twiml(
    webhook: str, form: Mapping[str, str], auth_token: str | None, timeout_s: float = 5.0
) -> tuple[str, dict[str, str]]:
    """POST the voice webhook as Twilio does and return the <Stream> url and its <Parameter>s."""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        return await post_answer(client, webhook, form, auth_token, TwilioPeer.user_agent)


def check_outbound(message: str | bytes, stream_sid: str) -> Outbound:
    """Validate one gateway -> Twilio message as Twilio would."""
    data = sent_object(message, "Twilio error 31950")
    event = sent_event(data, _OUTBOUND_KEYS, "streamSid", stream_sid)
    if event == "media":
        payload = sent_payload(data)
        if not payload:
            raise Violation("media: empty payload")
        if payload[:4] in (b"RIFF", b".snd"):
            raise Violation("media: payload has a file header (it would play as noise)")
        return Outbound("media", payload=payload)
    if event == "mark":
        return sent_mark(data)
    return Outbound("clear")


TwilioCarrier.peer = TwilioPeer
