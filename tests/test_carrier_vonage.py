"""Vonage as documented: the WebSocket dialect both ways (binary L16, `websocket:*` events, notify/clear
actions), the NCCO answer, signed-webhook JWTs, the transfer over REST with an application JWT (against a
loopback stand-in), and one whole call placed by `duplexgate call --carrier vonage` on a real gateway."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import jwt
import numpy as np
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
from gateway.carriers.vonage import (
    VonageCarrier,
    VonagePeer,
    VonageSettings,
    VonageStream,
    _conformance_key,
    signed_webhook_jwt,
)

SECRET = "vonage-signature-secret-0123456789abcdef"
CALL = "63f61863-4a51-4f6b-86e1-46edebcf9356"
PUBLIC = "https://gw.example.com"
TOKEN = "ab" * 24


def connected(rate: int = 24000, **headers: str) -> str:
    headers = {"token": TOKEN, "call_uuid": CALL, **headers}
    return json.dumps({"event": "websocket:connected", "content-type": f"audio/l16;rate={rate}", **headers})


def started_stream(rate: int = 24000) -> tuple[VonageStream, CallStarted]:
    stream = VonageStream({}, {})
    started = stream.parse(connected(rate))
    assert isinstance(started, CallStarted)
    return stream, started


def test_the_connected_message_starts_the_call_with_the_ncco_headers() -> None:
    stream, started = started_stream(16000)
    assert started.call_id == CALL and stream.stream_id == CALL
    assert dict(started.custom_parameters) == {"token": TOKEN, "call_uuid": CALL}
    assert started.media_format == MediaFormat(encoding="l16", sample_rate=16000)


def test_inbound_events_become_call_events() -> None:
    stream, _ = started_stream()
    pcm = np.arange(480, dtype="<i2").tobytes()  # 20 ms at 24 kHz
    assert stream.parse(pcm) == CallerAudio(payload=pcm)
    notify = {"event": "websocket:notify", "payload": {"mark": "agent-3"}}
    assert stream.parse(json.dumps(notify)) == MarkPlayed("agent-3")
    assert stream.parse('{"event":"websocket:cleared"}') is None
    assert stream.parse('{"event":"websocket:dtmf","digit":"5","duration":260}') == DtmfPressed("5")
    assert stream.parse('{"event":"websocket:dtmf","dtmf":{"digit":"#","duration":100}}') == DtmfPressed("#")


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"\x00\x01" * 10, "audio before websocket:connected"),
        ("{", "not JSON"),
        ("[]", "not an object"),
        ('{"event": 7}', "unknown event"),
        ('{"event":"websocket:notify","payload":{}}', "payload.mark"),
        ('{"event":"websocket:dtmf","digit":"x"}', "not a DTMF key"),
        (
            '{"event":"websocket:connected","content-type":"audio/pcmu","call_uuid":"' + CALL + '"}',
            "content-type",
        ),
        ('{"event":"websocket:connected","content-type":"audio/l16;rate=44100"}', "content-type"),
        ('{"event":"websocket:connected","content-type":"audio/l16;rate=16000"}', "call_uuid"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(message: str | bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        VonageStream({}, {}).parse(message)


@pytest.mark.parametrize("frame", [b"", b"\xff" * 3])
def test_an_audio_frame_of_no_whole_samples_is_malformed(frame: bytes) -> None:
    stream, _ = started_stream()
    with pytest.raises(MalformedMessage, match="16-bit samples"):
        stream.parse(frame)


@pytest.mark.parametrize("rate", [8000, 16000, 24000])
def test_agent_audio_goes_out_as_four_binary_20ms_frames(rate: int) -> None:
    stream, _ = started_stream(rate)
    payload = np.arange(rate * 80 // 1000, dtype="<i2").tobytes()  # one 80 ms agent frame
    frames = stream.audio(payload)
    assert len(frames) == 4 and all(isinstance(f, bytes) and len(f) == rate // 50 * 2 for f in frames)
    assert b"".join(frames) == payload


def test_marks_and_clears_are_vonage_actions() -> None:
    stream, _ = started_stream()
    assert [orjson.loads(m) for m in stream.mark("agent-7")] == [
        {"action": "notify", "payload": {"mark": "agent-7"}}
    ]
    assert [orjson.loads(m) for m in stream.clear()] == [{"action": "clear"}]


@pytest.mark.parametrize("rate", [24000, 8000])
def test_the_answer_is_an_ncco_connecting_the_websocket_with_the_token(rate: int) -> None:
    carrier = VonageCarrier(VonageSettings(sample_rate=rate), PUBLIC)  # type: ignore[arg-type]
    body, media_type = carrier.answer(Answering(CALL), "wss://gw.example.com/vonage/media", TOKEN)
    assert media_type == "application/json"
    assert orjson.loads(body) == [
        {
            "action": "connect",
            "endpoint": [
                {
                    "type": "websocket",
                    "uri": "wss://gw.example.com/vonage/media",
                    "content-type": f"audio/l16;rate={rate}",
                    "headers": {"token": TOKEN, "call_uuid": CALL},
                }
            ],
        }
    ]


def signed_carrier() -> VonageCarrier:
    return VonageCarrier(VonageSettings(signature_secret=SECRET), PUBLIC)


QUERY = f"uuid={CALL}&conversation_uuid=CON-1&from=447700900001&to=447700900000"


def test_a_signed_get_webhook_is_accepted_and_read() -> None:
    headers = {"authorization": f"Bearer {signed_webhook_jwt(SECRET)}"}
    answering = signed_carrier().read_answer("GET", "/vonage/voice", QUERY, b"", headers)
    assert (answering.call_id, answering.caller, answering.called) == (CALL, "+447700900001", "+447700900000")


def test_a_signed_post_webhook_is_accepted_when_its_body_matches_the_hash() -> None:
    body = json.dumps({"uuid": CALL, "from": "447700900001", "to": "447700900000"}).encode()
    headers = {"authorization": f"Bearer {signed_webhook_jwt(SECRET, body)}"}
    assert signed_carrier().read_answer("POST", "/vonage/voice", "", body, headers).call_id == CALL


def _claims(**changes: object) -> dict[str, object]:
    return {"iat": int(time.time()), "jti": "j", "payload_hash": hashlib.sha256(b"").hexdigest(), **changes}


@pytest.mark.parametrize(
    ("authorization", "body"),
    [
        (None, b""),  # unsigned
        ("Basic dXNlcjpwYXNz", b""),
        (f"Bearer {jwt.encode(_claims(), 'another-secret-0123456789abcdef0123', algorithm='HS256')}", b""),
        (f"Bearer {signed_webhook_jwt(SECRET)[:-3]}abc", b""),  # tampered signature
        (
            f"Bearer {signed_webhook_jwt(SECRET)}",
            b'{"uuid":"' + CALL.encode() + b'"}',
        ),  # body not the hashed one
        (
            f"Bearer {jwt.encode(_claims(iat=int(time.time()) - 3600), SECRET, algorithm='HS256')}",
            b"",
        ),  # stale
        (f"Bearer {jwt.encode({'jti': 'j'}, SECRET, algorithm='HS256')}", b""),  # no iat
        (f"Bearer {jwt.encode(_claims(), None, algorithm='none')}", b""),  # an unsigned JWT
    ],
)
def test_unsigned_forged_tampered_or_stale_webhooks_are_refused(
    authorization: str | None, body: bytes
) -> None:
    headers = {"authorization": authorization} if authorization else {}
    with pytest.raises(WebhookRefused) as refused:
        signed_carrier().read_answer("POST" if body else "GET", "/vonage/voice", QUERY, body, headers)
    assert refused.value.status == 403 and refused.value.auth_failed


def test_without_a_secret_webhooks_are_not_checked_but_need_a_call_uuid() -> None:
    carrier = VonageCarrier(VonageSettings(), PUBLIC)
    assert not carrier.authenticates
    assert carrier.read_answer("GET", "/vonage/voice", QUERY, b"", {}).call_id == CALL
    with pytest.raises(WebhookRefused, match="uuid"):
        carrier.read_answer("GET", "/vonage/voice", "uuid=nope", b"", {})


def test_settings_problems_name_a_missing_application_or_a_bad_key() -> None:
    pem = _conformance_key()[0]
    assert VonageSettings(private_key=pem, application_id="app").problems("") == []
    assert "application_id" in VonageSettings(private_key=pem).problems("")[0]
    assert "not an RSA private key" in VonageSettings(private_key="junk", application_id="a").problems("")[0]


@pytest.mark.parametrize(
    ("target", "endpoint"),
    [
        ("+15557654321", {"type": "phone", "number": "15557654321"}),
        ("sip:desk@pbx.example.com", {"type": "sip", "uri": "sip:desk@pbx.example.com"}),
    ],
)
async def test_a_transfer_puts_a_connect_ncco_with_an_application_jwt(target: str, endpoint: dict) -> None:
    api = CarrierApi()
    try:
        pem, public = _conformance_key()
        settings = VonageSettings(private_key=pem, application_id="app-1", api_base=api.url)
        await VonageCarrier(settings, PUBLIC).transfer(CallStarted(call_id=CALL, stream_id=CALL), target)
    finally:
        api.close()
    [request] = api.requests
    assert (request["method"], request["path"]) == ("PUT", f"/v1/calls/{CALL}")
    assert request["headers"]["content-type"] == "application/json"
    token = request["headers"]["authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, public, algorithms=["RS256"], options={"require": ["iat", "exp", "jti"]})
    assert claims["application_id"] == "app-1" and claims["exp"] > time.time()
    assert orjson.loads(request["body"]) == {
        "action": "transfer",
        "destination": {"type": "ncco", "ncco": [{"action": "connect", "endpoint": [endpoint]}]},
    }
    assert VonagePeer(CALL, "+1", "+2").check_transfer(request, target) != []  # another app's JWT


def test_duplexgate_call_as_vonage_hears_the_agent(start_gateway, tmp_path: Path) -> None:
    helper = {"voice": "demo", "prompt": "You are a helpful assistant."}
    tables = {"vonage": {}, "agents": {"helper": helper}, "numbers": {"default": "helper"}}
    live = start_gateway(EchoEngine(), tables=tables, env={"VONAGE_SIGNATURE_SECRET": SECRET})
    source, heard = write_wav(tmp_path / "in.wav", sine(1.5, 6000)), tmp_path / "out.wav"
    options = ["--webhook", f"{live.base_url}/vonage/voice", "--auth-token", SECRET]
    summary = placed_call("vonage", *options, "--input", str(source), "--output", str(heard))
    assert summary["handshake_status"] == 101
    assert summary["audio_received_s"] >= 0.8 * 1.5
    assert loud_seconds(heard) >= 0.8 * 1.5  # the caller heard the agent for most of what it said
