"""Twilio Media Streams (bidirectional `<Connect><Stream>`): messages, request signatures and TwiML.

Wire shapes follow Twilio's WebSocket message reference: inbound sequence numbers, chunks and timestamps
are strings; outbound messages carry exactly the documented fields, because Twilio drops a message with a
missing or extra field without telling the call (only a once-per-stream Debugger warning).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit
from xml.etree import ElementTree

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
from gateway.edge.transports.base import CarrierDialect

SIGNATURE_HEADER = "x-twilio-signature"
MEDIA_PATH = "/twilio/media"
VOICE_PATH = "/twilio/voice"
_ENCODINGS = {"audio/x-mulaw": "mulaw"}  # the only encoding Twilio streams
_DTMF_DIGITS = frozenset("0123456789*#ABCD")
_DEFAULT_PORTS = {"https": 443, "wss": 443, "http": 80, "ws": 80}
_MAX_PARAMETER_CHARS = 500  # Twilio: name + value of one <Parameter> must stay under this
# Identifiers from the wire become log fields, store keys and REST paths: only their documented shapes pass.
CALL_SID = re.compile(r"CA[0-9a-f]{32}")
ACCOUNT_SID = re.compile(r"AC[0-9a-f]{32}")
STREAM_SID = re.compile(r"[A-Za-z0-9-]{1,64}")  # MZ + 32 hex; early streams carried a UUID


class TwilioDialect(CarrierDialect):
    """Twilio's media-stream dialect; checks `X-Twilio-Signature` when an auth token is configured."""

    name: ClassVar[str] = "twilio"

    def __init__(self, auth_token: str | None = None, public_url: str | None = None) -> None:
        self.auth_token = auth_token or None
        self.public_url = public_url.rstrip("/") if public_url else None
        if self.auth_token and not self.public_url:
            # Signed URLs must come from configuration: Host and X-Forwarded-* are attacker-controlled.
            raise ValueError("a Twilio auth token needs a public URL to check signatures against")

    @property
    def authenticates(self) -> bool:
        return self.auth_token is not None

    # --- inbound ------------------------------------------------------------------------------------

    def parse(self, message: str | bytes) -> CallEvent:
        try:
            return self._parse(message)
        except MalformedMessage:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a shape no check above foresaw:
            raise MalformedMessage(
                f"unreadable message ({type(exc).__name__}: {exc})"
            ) from None  # still junk

    def _parse(self, message: str | bytes) -> CallEvent:
        if not isinstance(message, str):
            raise MalformedMessage("binary frame (Twilio media streams are JSON text only)")
        try:
            data = orjson.loads(message)
        except orjson.JSONDecodeError as exc:
            raise MalformedMessage(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise MalformedMessage("JSON is not an object")
        event = data.get("event")
        if event == "media":  # first: ~50 of these a second per call
            return _parse_media(data)
        if event == "start":
            return _parse_start(data)
        if event == "mark":
            return MarkPlayed(name=_text(_section(data, "mark"), "mark.name", "name"))
        if event == "dtmf":
            digit = _text(_section(data, "dtmf"), "dtmf.digit", "digit")
            if digit not in _DTMF_DIGITS:
                raise MalformedMessage(f"dtmf.digit {digit!r} is not a DTMF key")
            return DtmfPressed(digit=digit)
        if event == "stop":
            return CallStopped(reason="stop")
        if event == "connected":
            return StreamConnected(str(data.get("protocol", "")), str(data.get("version", "")))
        raise MalformedMessage(f"unknown event {event!r}")

    # --- outbound -----------------------------------------------------------------------------------

    def audio_message(self, stream_id: str, payload: bytes) -> str:
        b64 = base64.b64encode(payload).decode("ascii")
        return _compact({"event": "media", "streamSid": stream_id, "media": {"payload": b64}})

    def mark_message(self, stream_id: str, name: str) -> str:
        return _compact({"event": "mark", "streamSid": stream_id, "mark": {"name": name}})

    def clear_message(self, stream_id: str) -> str:
        return _compact({"event": "clear", "streamSid": stream_id})

    # --- authentication -----------------------------------------------------------------------------

    def verify_upgrade(self, path: str, headers: Mapping[str, str]) -> bool:
        """Check the upgrade's signature over the `wss://` URL as written in our TwiML (no params)."""
        if self.auth_token is None:
            return True
        return self._verify(self.stream_url(path), (), headers.get(SIGNATURE_HEADER))

    def verify_webhook(
        self, path: str, query: str, form: Iterable[tuple[str, str]], headers: Mapping[str, str]
    ) -> bool:
        """Check a POSTed webhook's signature over the public URL, query string and form fields."""
        if self.auth_token is None:
            return True
        url = self.public_url + path + (f"?{query}" if query else "")  # type: ignore[operator]
        return self._verify(url, form, headers.get(SIGNATURE_HEADER))

    def stream_url(self, path: str = MEDIA_PATH, request_base: str | None = None) -> str:
        """The media-stream URL for TwiML: the public base with https -> wss (http -> ws, for tests).

        `request_base` is used only when no public URL is configured (and so no signatures are checked).
        """
        base = self.public_url or (request_base or "").rstrip("/")
        if not base:
            raise ValueError("no public URL configured and none given from the request")
        scheme, rest = base.split("://", 1)
        ws_scheme = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}.get(scheme.lower())
        if ws_scheme is None:
            raise ValueError(f"public URL {base!r} must start with https:// or http://")
        return f"{ws_scheme}://{rest}{path}"

    def _verify(self, url: str, params: Iterable[tuple[str, str]], signature: str | None) -> bool:
        if not signature:
            return False
        params = list(params)
        expected = signature.encode()
        found = False
        for candidate in signed_url_variants(url):
            computed = compute_signature(self.auth_token or "", candidate, params).encode()
            # Compare every variant so the time taken does not say which one matched.
            found |= hmac.compare_digest(computed, expected)
        return found


# --- signatures -------------------------------------------------------------------------------------


def compute_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]] = ()) -> str:
    """Twilio's request signature: base64 HMAC-SHA1 of the URL followed by the sorted name+value pairs."""
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


# --- TwiML ------------------------------------------------------------------------------------------


def connect_stream_twiml(stream_url: str, parameters: Mapping[str, str] | None = None) -> str:
    """TwiML that bridges the call to our media stream: `<Connect><Stream url><Parameter/>...`.

    Twilio rejects or strips a query string on the stream URL, so per-call data goes in <Parameter>s
    (they arrive in `start.customParameters`).
    """
    if urlsplit(stream_url).query:
        raise ValueError(f"stream URL {stream_url!r} has a query string; pass values as parameters")
    response = ElementTree.Element("Response")
    connect = ElementTree.SubElement(response, "Connect")
    stream = ElementTree.SubElement(connect, "Stream", url=stream_url)
    for name, value in (parameters or {}).items():
        if len(name) + len(value) >= _MAX_PARAMETER_CHARS:
            raise ValueError(f"stream parameter {name!r} is too long for Twilio (name + value < 500 chars)")
        ElementTree.SubElement(stream, "Parameter", name=name, value=value)
    return '<?xml version="1.0" encoding="UTF-8"?>' + ElementTree.tostring(response, encoding="unicode")


def dial_twiml(target: str) -> str:
    """TwiML that hands the call to a person: `<Dial><Number>` for a number, `<Dial><Sip>` for a SIP URI."""
    response = ElementTree.Element("Response")
    dial = ElementTree.SubElement(response, "Dial")
    kind = "Sip" if target.lower().startswith(("sip:", "sips:")) else "Number"
    ElementTree.SubElement(dial, kind).text = target
    return '<?xml version="1.0" encoding="UTF-8"?>' + ElementTree.tostring(response, encoding="unicode")


class TwilioCallControl:
    """Changes a live call through Twilio's REST API (update the call resource): transfer with new TwiML,
    or hang up. Updating the call ends its `<Connect><Stream>`, so Twilio stops the media stream itself."""

    def __init__(
        self,
        auth_token: str | None,
        account_sid: str | None = None,
        api_base: str = "https://api.twilio.com",
        timeout_s: float = 5.0,
    ) -> None:
        self.auth_token, self.account_sid = auth_token, account_sid
        self.api_base, self.timeout_s = api_base.rstrip("/"), timeout_s

    async def transfer(self, call_sid: str, target: str, account_sid: str | None = None) -> None:
        await self._update(call_sid, {"Twiml": dial_twiml(target)}, account_sid)

    async def hangup(self, call_sid: str, account_sid: str | None = None) -> None:
        await self._update(call_sid, {"Status": "completed"}, account_sid)

    async def _update(self, call_sid: str, form: dict[str, str], account_sid: str | None) -> None:
        import httpx

        account = self.account_sid or account_sid  # the configured account wins over what a stream said
        if not account or not self.auth_token:
            raise RuntimeError("Twilio call control needs the account SID and auth token ([twilio] settings)")
        url = f"{self.api_base}/2010-04-01/Accounts/{account}/Calls/{call_sid}.json"
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            reply = await client.post(url, data=form, auth=(account, self.auth_token))
        if reply.status_code >= 300:
            raise RuntimeError(
                f"Twilio refused the call update for {call_sid}: HTTP {reply.status_code} {reply.text[:200]}"
            )


# --- parsing helpers --------------------------------------------------------------------------------


def _compact(message: dict[str, Any]) -> str:
    # orjson: about a fifth of the per-message cost of the codec path (bench/codec.py)
    return orjson.dumps(message).decode()


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    section = data.get(key)
    if not isinstance(section, dict):
        raise MalformedMessage(f"{data.get('event')} message without a '{key}' object")
    return section


def _text(section: dict[str, Any], where: str, key: str) -> str:
    value = section.get(key)
    if not isinstance(value, str):
        raise MalformedMessage(f"{where} missing or not a string")
    return value


def _parse_media(data: dict[str, Any]) -> CallerAudio:
    media = _section(data, "media")
    track = media.get("track", "inbound")
    if track != "inbound":
        raise MalformedMessage(f"media.track {track!r} on a bidirectional stream (only 'inbound' is sent)")
    try:
        payload = base64.b64decode(_text(media, "media.payload", "payload"), validate=True)
    except binascii.Error as exc:
        raise MalformedMessage(f"media.payload is not base64: {exc}") from None
    timestamp = media.get("timestamp")
    try:
        timestamp_ms = int(timestamp) if timestamp is not None else None
    except (TypeError, ValueError):
        raise MalformedMessage(f"media.timestamp {timestamp!r} is not a number") from None
    return CallerAudio(payload=payload, timestamp_ms=timestamp_ms)


def _parse_start(data: dict[str, Any]) -> CallStarted:
    start = _section(data, "start")
    call_id = _text(start, "start.callSid", "callSid")
    if not CALL_SID.fullmatch(call_id):
        raise MalformedMessage(
            f"start.callSid {call_id[:40]!r} is not a Twilio call SID (CA + 32 hex digits)"
        )
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
    encoding = fmt.get("encoding", "audio/x-mulaw")
    if not isinstance(encoding, str) or encoding not in _ENCODINGS:
        raise MalformedMessage(f"start.mediaFormat.encoding {encoding!r} is not audio/x-mulaw")
    rate, channels = fmt.get("sampleRate", 8000), fmt.get("channels", 1)
    if not isinstance(rate, int) or not isinstance(channels, int) or rate <= 0 or channels != 1:
        raise MalformedMessage(f"start.mediaFormat sampleRate={rate!r} channels={channels!r} unsupported")
    account = start.get("accountSid")
    if account is not None and not (isinstance(account, str) and ACCOUNT_SID.fullmatch(account)):
        raise MalformedMessage(f"start.accountSid {str(account)[:40]!r} is not a Twilio account SID")
    return CallStarted(
        call_id=call_id,
        stream_id=stream_id,
        account_id=account if isinstance(account, str) and account else None,
        custom_parameters=dict(params),
        media_format=MediaFormat(encoding=_ENCODINGS[encoding], sample_rate=rate, channels=channels),
    )
