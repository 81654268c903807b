"""SignalWire's carrier on its own: its dialect both ways (UUID ids, 24 kHz L16), its cXML answer, its
signatures (X-SignalWire-Signature or X-Twilio-Signature, the stream's bearer token), and one call placed
with `python -m gateway.cli call --carrier signalwire` against a real gateway on loopback."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import orjson
import pytest
from carrier_api import CarrierApi
from carrier_cli import placed_call, sine, voiced_seconds, write_wav

from engine.echo import EchoEngine
from gateway.call.events import (
    CallerAudio,
    CallStarted,
    CallStopped,
    DtmfPressed,
    MalformedMessage,
    MarkPlayed,
    MediaFormat,
    StreamConnected,
)
from gateway.carriers.base import Answering, WebhookRefused
from gateway.carriers.signalwire import SignalWireCarrier, SignalWirePeer, SignalWireSettings
from gateway.carriers.twilio import compute_signature

PUBLIC = "https://gw.example.com"
KEY = "PSK_test0123456789abcdef"
CALL = "0f8fad5b-d9cb-469f-a165-70867728950e"
PROJECT = "7d2c1f3e-5a4b-4c6d-8e9f-0a1b2c3d4e5f"
STREAM = "b7e6a1c2-0d3e-4f5a-9b8c-7d6e5f4a3b2c"


def carrier(**settings: Any) -> SignalWireCarrier:
    return SignalWireCarrier(SignalWireSettings(signing_key=KEY, **settings), PUBLIC)


def start_message(encoding: str = "audio/x-L16", rate: int = 24000, **start: Any) -> str:
    body = {
        "streamSid": STREAM,
        "accountSid": PROJECT,
        "callSid": CALL,
        "tracks": ["inbound"],
        "customParameters": {"token": "t0k"},
        "mediaFormat": {"encoding": encoding, "sampleRate": rate, "channels": 1},
        **start,
    }
    return json.dumps({"event": "start", "sequenceNumber": "1", "start": body, "streamSid": STREAM})


def started_stream() -> Any:
    stream = carrier().open_stream({}, {})
    stream.parse(start_message())
    return stream


# --- the dialect --------------------------------------------------------------------------------------


def test_a_24k_l16_start_becomes_call_started() -> None:
    stream = carrier().open_stream({}, {})
    event = stream.parse(start_message())
    assert isinstance(event, CallStarted)
    assert (event.call_id, event.stream_id, event.account_id) == (CALL, STREAM, PROJECT)
    assert event.media_format == MediaFormat("l16", 24000, 1)
    assert dict(event.custom_parameters) == {"token": "t0k"} and stream.stream_id == STREAM


@pytest.mark.parametrize(
    ("encoding", "rate", "expected"),
    [("audio/x-mulaw", 8000, MediaFormat("mulaw", 8000)), ("audio/x-L16", 16000, MediaFormat("l16", 16000))],
)
def test_the_other_codecs_start_too(encoding: str, rate: int, expected: MediaFormat) -> None:
    event = carrier().open_stream({}, {}).parse(start_message(encoding, rate))
    assert isinstance(event, CallStarted) and event.media_format == expected


def test_a_start_wrapped_in_raw_event_is_unwrapped() -> None:
    raw = json.loads(start_message())
    wrapped = {
        "timestamp": "1",
        "direction": "inbound",
        "eventType": "start",
        "streamSid": STREAM,
        "rawEvent": raw,
    }
    event = carrier().open_stream({}, {}).parse(json.dumps(wrapped))
    assert isinstance(event, CallStarted) and event.call_id == CALL


def test_inbound_events_as_documented() -> None:
    stream = started_stream()
    pcm = np.arange(480, dtype="<i2").tobytes()  # 20 ms at 24 kHz
    media = {"track": "inbound", "chunk": "2", "timestamp": "20", "payload": base64.b64encode(pcm).decode()}
    assert stream.parse(json.dumps({"event": "media", "streamSid": STREAM, "media": media})) == CallerAudio(
        pcm, 20
    )
    dtmf = {"event": "dtmf", "streamSid": STREAM, "dtmf": {"digit": "5", "duration": 200}}
    assert stream.parse(json.dumps(dtmf)) == DtmfPressed("5")
    mark = {"event": "mark", "streamSid": STREAM, "mark": {"name": "agent-3"}}
    assert stream.parse(json.dumps(mark)) == MarkPlayed("agent-3")
    assert stream.parse(json.dumps({"event": "stop", "streamSid": STREAM})) == CallStopped("stop")
    connected = stream.parse(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
    assert connected == StreamConnected("Call", "1.0.0")


def test_outbound_messages_have_exactly_the_documented_shape() -> None:
    stream = started_stream()
    payload = b"\x01\x02" * 960
    assert [orjson.loads(m) for m in stream.audio(payload)] == [
        {"event": "media", "streamSid": STREAM, "media": {"payload": base64.b64encode(payload).decode()}}
    ]
    assert [orjson.loads(m) for m in stream.mark("agent-1")] == [
        {"event": "mark", "streamSid": STREAM, "mark": {"name": "agent-1"}}
    ]
    assert [orjson.loads(m) for m in stream.clear()] == [{"event": "clear", "streamSid": STREAM}]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (start_message(callSid="CA" + "0" * 32), "not a SignalWire call id"),
        (start_message(accountSid="AC" + "0" * 32), "not a project id"),
        (start_message("audio/x-L16", 44100), "none of"),
        (start_message("audio/x-mulaw", 24000), "none of"),
        (start_message("audio/ogg", 8000), "none of"),
        (start_message(customParameters={"token": 5}), "customParameters"),
        (start_message(streamSid="../../x"), "streamSid"),
        (b"\x00\x01", "binary frame"),
        ("{", "not JSON"),
        ("[]", "not an object"),
        ('{"event": "media"}', "without a 'media' object"),
        ('{"event": "media", "media": {"payload": "***"}}', "not base64"),
        ('{"event": "dtmf", "dtmf": {"digit": "x"}}', "not a DTMF key"),
        ('{"event": "surprise"}', "unknown event"),
    ],
)
def test_malformed_messages_raise_with_a_reason(message: str | bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        carrier().open_stream({}, {}).parse(message)


# --- the answer and the signatures ---------------------------------------------------------------------


def answer_stream(sw: SignalWireCarrier) -> ElementTree.Element:
    body, media_type = sw.answer(Answering(CALL), sw.stream_url(), "tok123")
    assert media_type == "application/xml"
    stream = ElementTree.fromstring(body).find("./Connect/Stream")
    assert stream is not None
    return stream


def test_the_answer_connects_a_24k_stream_with_the_token_and_a_bearer() -> None:
    sw = carrier()
    stream = answer_stream(sw)
    assert stream.get("url") == "wss://gw.example.com/signalwire/media"
    assert stream.get("codec") == "L16@24000h"
    assert stream.get("authBearerToken") == sw.stream_bearer() and KEY not in stream.get(
        "authBearerToken", ""
    )
    assert [(p.get("name"), p.get("value")) for p in stream.findall("Parameter")] == [("token", "tok123")]


def test_the_codec_is_a_setting_and_unsigned_answers_carry_no_bearer() -> None:
    sw = SignalWireCarrier(SignalWireSettings(codec="PCMU@8000h"), None)
    body, _ = sw.answer(Answering(CALL), "ws://127.0.0.1:9/signalwire/media", "tok")
    stream = ElementTree.fromstring(body).find("./Connect/Stream")
    assert (
        stream is not None and stream.get("codec") == "PCMU@8000h" and stream.get("authBearerToken") is None
    )


def signed_headers(header: str, key: str, url: str, form: dict[str, str]) -> dict[str, str]:
    return {header: compute_signature(key, url, form.items())}


FORM = {"CallSid": CALL, "AccountSid": PROJECT, "From": "+15550001111", "To": "+15550002222"}
BODY = "&".join(f"{k}={v}".replace("+", "%2B") for k, v in FORM.items()).encode()


@pytest.mark.parametrize("header", ["x-signalwire-signature", "x-twilio-signature"])
def test_a_signed_webhook_is_answered(header: str) -> None:
    headers = signed_headers(header, KEY, PUBLIC + "/signalwire/voice", FORM)
    answering = carrier().read_answer("POST", "/signalwire/voice", "", BODY, headers)
    assert (answering.call_id, answering.caller, answering.called) == (CALL, "+15550001111", "+15550002222")


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (BODY.replace(b"2222", b"3333"), KEY),  # tampered body
        (BODY, "PSK_another-key-0123456789"),  # wrong key
    ],
)
def test_a_tampered_or_wrongly_signed_webhook_is_refused(body: bytes, key: str) -> None:
    headers = signed_headers("x-signalwire-signature", key, PUBLIC + "/signalwire/voice", FORM)
    with pytest.raises(WebhookRefused) as refused:
        carrier().read_answer("POST", "/signalwire/voice", "", body, headers)
    assert refused.value.status == 403 and refused.value.auth_failed


def test_a_webhook_with_a_twilio_call_sid_is_refused() -> None:
    form = {**FORM, "CallSid": "CA" + "1" * 32}
    headers = signed_headers("x-signalwire-signature", KEY, PUBLIC + "/signalwire/voice", form)
    body = "&".join(f"{k}={v}".replace("+", "%2B") for k, v in form.items()).encode()
    with pytest.raises(WebhookRefused) as refused:
        carrier().read_answer("POST", "/signalwire/voice", "", body, headers)
    assert refused.value.status == 400


def test_the_upgrade_needs_the_bearer_or_a_signature() -> None:
    sw = carrier()
    path, url = "/signalwire/media", "wss://gw.example.com/signalwire/media"
    assert sw.verify_upgrade(path, {}, {"authorization": f"Bearer {sw.stream_bearer()}"})
    assert sw.verify_upgrade(path, {}, {"x-signalwire-signature": compute_signature(KEY, url)})
    assert sw.verify_upgrade(path, {}, {"x-twilio-signature": compute_signature(KEY, url)})
    assert not sw.verify_upgrade(path, {}, {})
    assert not sw.verify_upgrade(path, {}, {"authorization": "Bearer " + sw.stream_bearer()[:-1] + "x"})
    assert not sw.verify_upgrade(path, {}, {"x-signalwire-signature": compute_signature("PSK_other", url)})
    assert carrier(codec="L16@16000h").stream_bearer() == sw.stream_bearer()  # bound to key and URL only


def test_settings_name_the_space_api_and_say_what_is_missing() -> None:
    settings = SignalWireSettings(space="example", account_sid=PROJECT)
    assert SignalWireCarrier(settings, PUBLIC).calls_url(PROJECT) == (
        f"https://example.signalwire.com/api/laml/2010-04-01/Accounts/{PROJECT}/Calls"
    )
    assert settings.signing_variables() == ["SIGNALWIRE_SIGNING_KEY"]
    assert any("public_url" in p for p in SignalWireSettings(signing_key=KEY).problems(""))
    assert any("space" in p for p in SignalWireSettings(auth_token="PT1").problems(PUBLIC))
    assert any("Space name" in p for p in SignalWireSettings(space="evil.com/x").problems(PUBLIC))


# --- a whole call through the CLI ----------------------------------------------------------------------


def test_the_cli_places_a_signed_24k_call_and_hears_the_agent(start_gateway, tmp_path: Path) -> None:
    api = CarrierApi()
    try:
        table, env, secret = SignalWirePeer.conformance_setup(api.url)
        tables = {
            "signalwire": table,
            "agents": {"helper": {"voice": "demo", "prompt": "You are a helpful assistant."}},
            "numbers": {"default": "helper"},
        }
        live = start_gateway(EchoEngine(), tables=tables, env=env)
        seconds = 2.0
        caller = write_wav(tmp_path / "in.wav", sine(seconds, 8000))
        out = tmp_path / "out.wav"
        options = ["--webhook", live.base_url + "/signalwire/voice", "--auth-token", secret]
        options += ["--input", str(caller), "--output", str(out), "--tail", "0.5"]
        summary = placed_call("signalwire", *options)
    finally:
        api.close()
    assert summary["handshake_status"] == 101
    assert summary["audio_received_s"] >= 0.8 * seconds
    rate, voiced_s = voiced_seconds(out)
    assert rate == 24000 and voiced_s >= 0.8 * seconds, voiced_s
    assert uuid.UUID(summary["call_sid"])  # a SignalWire call id
