"""Plivo as documented: the audio-stream dialect both ways (camelCase JSON, base64 audio, checkpoints,
clearAudio), the `<Stream>` answer XML, V3 webhook signatures (checked against base strings written out by
hand from plivo-python's rules), the A-leg transfer over REST (against a loopback stand-in) with its
one-time `<Dial>` URL, and one whole call placed by `duplexgate call --carrier plivo` on a real gateway."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from urllib.parse import parse_qs
from xml.etree import ElementTree

import orjson
import pytest
from carrier_api import CarrierApi
from carrier_cli import loud_seconds, placed_call, sine, write_wav

from engine.echo import EchoEngine
from gateway.call.events import (
    CallerAudio,
    CallStarted,
    DtmfPressed,
    MalformedMessage,
    MarkPlayed,
    MediaFormat,
)
from gateway.carriers.base import Answering, WebhookRefused
from gateway.carriers.plivo import (
    MAX_PENDING_TRANSFERS,
    PlivoCarrier,
    PlivoSettings,
    PlivoStream,
    v3_base,
)

TOKEN = "plivoAuthToken0123456789abcdefABCDEFGHIJ"
AUTH_ID = "MAABCDEFGHIJKLMNOPQR"
CALL = "1a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d"
STREAM = "b7a8c9d0-1e2f-4a3b-9c4d-5e6f7a8b9c0d"
PUBLIC = "https://gw.example.com"
CALL_TOKEN = "cd" * 24


def start_message(encoding: str = "audio/x-mulaw", rate: int = 8000, extra: object = None) -> str:
    start = {
        "callId": CALL,
        "streamId": STREAM,
        "accountId": AUTH_ID,
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": encoding, "sampleRate": rate},
    }
    extra = f"token={CALL_TOKEN};userId=12345" if extra is None else extra
    return json.dumps({"event": "start", "sequenceNumber": 1, "start": start, "extra_headers": extra})


def started_stream(encoding: str = "audio/x-mulaw", rate: int = 8000) -> tuple[PlivoStream, CallStarted]:
    stream = PlivoStream({}, {})
    started = stream.parse(start_message(encoding, rate))
    assert isinstance(started, CallStarted)
    return stream, started


def test_the_start_message_starts_the_call_with_its_extra_headers() -> None:
    stream, started = started_stream("audio/x-l16", 16000)
    assert (started.call_id, started.stream_id, stream.stream_id) == (CALL, STREAM, STREAM)
    assert dict(started.custom_parameters) == {"token": CALL_TOKEN, "userId": "12345"}
    assert started.media_format == MediaFormat(encoding="l16", sample_rate=16000)
    assert started.account_id == AUTH_ID


def test_inbound_events_become_call_events() -> None:
    stream, _ = started_stream()
    audio = bytes(range(160))
    media = {
        "track": "inbound",
        "timestamp": "1705312200000",
        "chunk": 41,
        "payload": base64.b64encode(audio).decode(),
    }
    assert stream.parse(json.dumps({"event": "media", "streamId": STREAM, "media": media})) == CallerAudio(
        audio
    )
    assert stream.parse(
        json.dumps({"event": "dtmf", "streamId": STREAM, "dtmf": {"digit": "7"}})
    ) == DtmfPressed("7")
    played = {"event": "playedStream", "streamId": STREAM, "name": "agent-2"}
    assert stream.parse(json.dumps(played)) == MarkPlayed("agent-2")
    assert stream.parse(json.dumps({"event": "clearedAudio", "streamId": STREAM})) is None


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"\x00\x01", "binary frame"),
        ("{", "not JSON"),
        ("[]", "not an object"),
        ('{"event": 7}', "unknown event"),
        ('{"event": "media"}', "without a 'media' object"),
        ('{"event": "media", "media": {"payload": "***"}}', "not base64"),
        ('{"event": "dtmf", "dtmf": {"digit": "x"}}', "not a DTMF key"),
        ('{"event": "playedStream", "streamId": "s"}', "without a name"),
        (start_message().replace(CALL, "not-a-uuid"), "start.callId"),
        (start_message().replace(STREAM, ""), "start.streamId"),
        (start_message("audio/x-alaw"), "mediaFormat"),
        (start_message("audio/x-l16", 24000), "mediaFormat"),
        (start_message(extra=7), "extra_headers"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(message: str | bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        PlivoStream({}, {}).parse(message)


@pytest.mark.parametrize(
    ("encoding", "rate", "wire"),
    [("audio/x-mulaw", 8000, "audio/x-mulaw"), ("audio/x-l16", 16000, "audio/x-l16")],
)
def test_outbound_messages_have_plivos_exact_shapes(encoding: str, rate: int, wire: str) -> None:
    stream, _ = started_stream(encoding, rate)
    payload = bytes(range(200))
    [audio] = stream.audio(payload)
    assert orjson.loads(audio) == {
        "event": "playAudio",
        "media": {"contentType": wire, "sampleRate": rate, "payload": base64.b64encode(payload).decode()},
    }
    assert [orjson.loads(m) for m in stream.mark("agent-9")] == [
        {"event": "checkpoint", "streamId": STREAM, "name": "agent-9"}
    ]
    assert [orjson.loads(m) for m in stream.clear()] == [{"event": "clearAudio", "streamId": STREAM}]


@pytest.mark.parametrize("content_type", ["audio/x-mulaw;rate=8000", "audio/x-l16;rate=16000"])
def test_the_answer_is_a_bidirectional_stream_carrying_the_token(content_type: str) -> None:
    carrier = PlivoCarrier(PlivoSettings(content_type=content_type), PUBLIC)  # type: ignore[arg-type]
    body, media_type = carrier.answer(Answering(CALL), "wss://gw.example.com/plivo/media", CALL_TOKEN)
    assert media_type == "application/xml"
    root = ElementTree.fromstring(body)
    [stream] = list(root)
    assert (root.tag, stream.tag, stream.text) == ("Response", "Stream", "wss://gw.example.com/plivo/media")
    assert stream.attrib == {
        "bidirectional": "true",
        "keepCallAlive": "true",
        "contentType": content_type,
        "extraHeaders": f"token={CALL_TOKEN}",
    }


# --- V3 signatures ------------------------------------------------------------------------------------


def sign(base: str, nonce: str, token: str = TOKEN) -> str:
    return base64.b64encode(
        hmac.new(token.encode(), f"{base}.{nonce}".encode(), hashlib.sha256).digest()
    ).decode()


FORM = {"CallUUID": [CALL], "From": ["14155550100"], "To": ["14155550199"]}
BODY = f"To=14155550199&CallUUID={CALL}&From=14155550100".encode()


def test_the_signed_base_strings_follow_plivos_rules() -> None:
    url = f"{PUBLIC}/plivo/voice"
    assert v3_base("POST", url, FORM) == f"{url}?CallUUID{CALL}From14155550100To14155550199"
    assert (
        v3_base("POST", url + "?b=2&a=1", FORM) == f"{url}?a=1&b=2.CallUUID{CALL}From14155550100To14155550199"
    )
    assert v3_base("POST", url + "?b=2&a=1", {}) == f"{url}?a=1&b=2"
    assert v3_base("GET", url + "?b=2&a=1&a=0", {}) == f"{url}?a=0&a=1&b=2"
    assert v3_base("POST", url, {}) == url


def signed_carrier() -> PlivoCarrier:
    return PlivoCarrier(PlivoSettings(auth_token=TOKEN, auth_id=AUTH_ID), PUBLIC)


def signature_headers(signature: str, nonce: str = "12345678901234567890") -> dict[str, str]:
    return {"x-plivo-signature-v3": signature, "x-plivo-signature-v3-nonce": nonce}


def test_a_signed_webhook_is_accepted_and_read() -> None:
    base = f"{PUBLIC}/plivo/voice?CallUUID{CALL}From14155550100To14155550199"
    headers = signature_headers(sign(base, "12345678901234567890"))
    answering = signed_carrier().read_answer("POST", "/plivo/voice", "", BODY, headers)
    assert (answering.call_id, answering.caller, answering.called) == (CALL, "+14155550100", "+14155550199")
    # one signature per active auth token: ours need not be the first
    rotated = signature_headers(
        f"{sign(base, '12345678901234567890', 'old-token')},{headers['x-plivo-signature-v3']}"
    )
    assert signed_carrier().read_answer("POST", "/plivo/voice", "", BODY, rotated).call_id == CALL


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (BODY, {}),  # unsigned
        (
            BODY,
            signature_headers(
                sign(f"{PUBLIC}/plivo/voice?CallUUID{CALL}From14155550100To14155550199", "1", "wrong"), "1"
            ),
        ),
        (
            BODY.replace(b"0100", b"0666"),
            signature_headers(
                sign(f"{PUBLIC}/plivo/voice?CallUUID{CALL}From14155550100To14155550199", "1"), "1"
            ),
        ),
        (
            BODY,
            signature_headers(
                sign(f"https://evil.example.com/plivo/voice?CallUUID{CALL}From14155550100To14155550199", "1"),
                "1",
            ),
        ),
        (
            BODY,
            signature_headers(
                sign(f"{PUBLIC}/plivo/voice?CallUUID{CALL}From14155550100To14155550199", "1"), "2"
            ),
        ),
    ],
    ids=["unsigned", "wrong-token", "tampered-form", "other-host", "other-nonce"],
)
def test_unsigned_forged_or_tampered_webhooks_are_refused(body: bytes, headers: dict[str, str]) -> None:
    with pytest.raises(WebhookRefused) as refused:
        signed_carrier().read_answer("POST", "/plivo/voice", "", body, headers)
    assert refused.value.status == 403 and refused.value.auth_failed


def test_a_signing_secret_needs_a_public_url() -> None:
    with pytest.raises(ValueError, match="public URL"):
        PlivoCarrier(PlivoSettings(auth_token=TOKEN), None)
    assert (
        PlivoSettings(auth_token=TOKEN).problems("") != []
        and PlivoSettings(auth_token=TOKEN).problems(PUBLIC) == []
    )


# --- transfer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "dialled"),
    [
        ("+15557654321", ("Number", "15557654321")),
        ("sip:desk@pbx.example.com", ("User", "sip:desk@pbx.example.com")),
    ],
)
async def test_a_transfer_points_the_a_leg_at_a_one_time_dial(target: str, dialled: tuple[str, str]) -> None:
    api = CarrierApi()
    try:
        carrier = PlivoCarrier(PlivoSettings(auth_token=TOKEN, auth_id=AUTH_ID, api_base=api.url), PUBLIC)
        await carrier.transfer(CallStarted(call_id=CALL, stream_id=STREAM), target)
    finally:
        api.close()
    [request] = api.requests
    assert (request["method"], request["path"]) == ("POST", f"/v1/Account/{AUTH_ID}/Call/{CALL}/")
    assert (
        request["headers"]["authorization"]
        == "Basic " + base64.b64encode(f"{AUTH_ID}:{TOKEN}".encode()).decode()
    )
    form = {k: v[0] for k, v in parse_qs(request["body"].decode()).items()}
    assert form.keys() == {"legs", "aleg_url", "aleg_method"} and (form["legs"], form["aleg_method"]) == (
        "aleg",
        "POST",
    )
    assert form["aleg_url"].startswith(f"{PUBLIC}/plivo/transfer/")
    path = form["aleg_url"].removeprefix(PUBLIC)
    [route] = carrier.routes()
    base = f"{form['aleg_url']}?CallUUID{CALL}"
    body = f"CallUUID={CALL}".encode()
    with pytest.raises(WebhookRefused) as forged:
        await route.handle("POST", path, "", body, signature_headers(sign(base, "9", "wrong"), "9"))
    assert forged.value.status == 403 and forged.value.auth_failed  # counted against the sender
    status, xml, media_type = await route.handle(
        "POST", path, "", body, signature_headers(sign(base, "9"), "9")
    )
    assert (status, media_type) == (200, "application/xml")
    [element] = ElementTree.fromstring(xml).find("Dial")  # type: ignore[union-attr]
    assert (element.tag, element.text) == dialled
    assert (await route.handle("POST", path, "", body, signature_headers(sign(base, "9"), "9")))[
        0
    ] == 404  # once


async def test_pending_transfers_expire_and_stay_bounded() -> None:
    api = CarrierApi()
    try:
        carrier = PlivoCarrier(PlivoSettings(auth_id=AUTH_ID, auth_token=TOKEN, api_base=api.url), PUBLIC)
        later = time.monotonic() + 60
        carrier.pending.update({f"{i:032x}": ("+1555", later) for i in range(MAX_PENDING_TRANSFERS)})
        await carrier.transfer(CallStarted(call_id=CALL, stream_id=STREAM), "+15557654321")
    finally:
        api.close()
    assert len(carrier.pending) == MAX_PENDING_TRANSFERS and f"{0:032x}" not in carrier.pending  # oldest out
    newest = next(reversed(carrier.pending))
    carrier.pending[newest] = ("+15557654321", time.monotonic() - 1)  # Plivo never came for it in time
    path = f"/plivo/transfer/{newest}"
    status, _, _ = await carrier.routes()[0].handle(
        "POST", path, "", b"", signature_headers(sign(PUBLIC + path, "9"), "9")
    )
    assert status == 404


# --- a whole call ------------------------------------------------------------------------------------


def test_duplexgate_call_as_plivo_hears_the_agent(start_gateway, tmp_path: Path) -> None:
    # L16 16 kHz here; the conformance run places its whole call in the default mu-law 8 kHz
    content_type = "audio/x-l16;rate=16000"
    helper = {"voice": "demo", "prompt": "You are a helpful assistant."}
    tables = {
        "plivo": {"content_type": content_type},
        "agents": {"helper": helper},
        "numbers": {"default": "helper"},
    }
    live = start_gateway(
        EchoEngine(), tables=tables, env={"PLIVO_AUTH_TOKEN": TOKEN, "PLIVO_AUTH_ID": AUTH_ID}
    )
    source, heard = write_wav(tmp_path / "in.wav", sine(1.5, 6000)), tmp_path / "out.wav"
    options = ["--webhook", f"{live.base_url}/plivo/voice", "--auth-token", TOKEN]
    summary = placed_call("plivo", *options, "--input", str(source), "--output", str(heard))
    assert summary["handshake_status"] == 101
    assert summary["audio_received_s"] >= 0.8 * 1.5
    assert loud_seconds(heard) >= 0.8 * 1.5  # the caller heard the agent for most of what it said
