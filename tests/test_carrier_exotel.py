"""Exotel's Voicebot dialect (start/media/dtmf/mark/stop in, exact media/mark/clear out, junk refused with a
reason), its Basic-auth checks on the voicebot URL and the stream upgrade, and whole calls over loopback:
`duplexgate call --carrier exotel` against a real gateway on the echo engine."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import orjson
import pytest
from callaudio import speech_like
from carrier_cli import placed_call
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

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
from gateway.carriers.base import WebhookRefused, basic_header
from gateway.carriers.exotel import ExotelCarrier, ExotelSettings, ExotelStream
from gateway.simulator.call import simulate_call

KEY, TOKEN = "bot-key", "exotel-token-0123456789abcdef"
RIGHT = {"authorization": basic_header(KEY, TOKEN)}
AGENTS = {"agents": {"helper": {"voice": "demo", "prompt": "You help."}}, "numbers": {"default": "helper"}}


def carrier(**settings: Any) -> ExotelCarrier:
    return ExotelCarrier(ExotelSettings(api_key=KEY, api_token=TOKEN, **settings), "https://gw.example.com")


def start_message(**start: Any) -> str:
    body = {
        "stream_sid": "MZ" + "1" * 32,
        "call_sid": "c0ffee" * 5,
        "account_sid": "acme1",
        "from": "09876543210",
        "to": "08047491899",
        "custom_parameters": {"key1": "value1"},
        "media_format": {"encoding": "audio/x-raw", "sample_rate": "24000", "bit_rate": "16"},
        **start,
    }
    return json.dumps(
        {"event": "start", "sequence_number": "1", "stream_sid": body["stream_sid"], "start": body}
    )


def started_stream(query: dict[str, str] | None = None) -> ExotelStream:
    stream = ExotelStream(query or {}, {})
    assert isinstance(stream.parse(start_message()), CallStarted)
    return stream


# --- the dialect -----------------------------------------------------------------------------------


def test_start_names_the_call_its_format_and_carries_the_urls_token() -> None:
    stream = ExotelStream({"sample-rate": "24000", "token": "abc123"}, {})
    started = stream.parse(start_message())
    assert started == CallStarted(
        call_id="c0ffee" * 5,
        stream_id="MZ" + "1" * 32,
        caller="09876543210",
        called="08047491899",
        custom_parameters={"key1": "value1", "token": "abc123"},
        media_format=MediaFormat("l16", 24000),
        account_id="acme1",
    )
    assert stream.stream_id == "MZ" + "1" * 32


def test_a_start_without_media_format_takes_the_rate_the_url_asked_for() -> None:
    started = ExotelStream({"sample-rate": "16000"}, {}).parse(start_message(media_format=None))
    assert isinstance(started, CallStarted) and started.media_format == MediaFormat("l16", 16000)


def test_inbound_events_become_call_events() -> None:
    stream = started_stream()
    pcm = bytes(range(256)) * 15
    media = {"chunk": "2", "timestamp": "200", "payload": base64.b64encode(pcm).decode()}
    assert stream.parse(json.dumps({"event": "media", "stream_sid": "s", "media": media})) == CallerAudio(
        pcm, 200
    )
    dtmf = {"event": "dtmf", "stream_sid": "s", "dtmf": {"digit": "5", "duration": "100"}}
    assert stream.parse(json.dumps(dtmf)) == DtmfPressed("5")
    assert stream.parse('{"event": "mark", "stream_sid": "s", "mark": {"name": "agent-3"}}') == MarkPlayed(
        "agent-3"
    )
    assert stream.parse('{"event": "stop", "stream_sid": "s", "stop": {}}') == CallStopped("stop")
    assert stream.parse('{"event": "connected"}') == StreamConnected()


def test_a_mu_law_stream_takes_odd_sized_payloads() -> None:
    stream = ExotelStream({}, {})
    started = stream.parse(start_message(media_format={"encoding": "audio/x-mulaw", "sample_rate": "8000"}))
    assert isinstance(started, CallStarted) and started.media_format == MediaFormat("mulaw", 8000)
    assert stream.parse('{"event": "media", "media": {"payload": "AAEC"}}') == CallerAudio(b"\x00\x01\x02")


def test_outbound_messages_have_exactly_exotels_shapes() -> None:
    stream = started_stream()
    sid = "MZ" + "1" * 32
    payload = b"\x01\x02" * 1920  # 80 ms at 24 kHz: 12 x 320 bytes
    assert [orjson.loads(m) for m in stream.audio(payload)] == [
        {"event": "media", "stream_sid": sid, "media": {"payload": base64.b64encode(payload).decode()}}
    ]
    assert [orjson.loads(m) for m in stream.mark("agent-7")] == [
        {"event": "mark", "stream_sid": sid, "mark": {"name": "agent-7"}}
    ]
    assert [orjson.loads(m) for m in stream.clear()] == [{"event": "clear", "stream_sid": sid}]
    assert stream.end("done") == ()


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"\x00\x01", "binary frame"),
        ("{", "not JSON"),
        ("[1]", "not an object"),
        ('{"event": "hello"}', "unknown event"),
        ('{"event": "media"}', "without a 'media' object"),
        ('{"event": "media", "media": {"payload": "@@@"}}', "not base64"),
        ('{"event": "media", "media": {"payload": "AAEC"}}', "whole 16-bit samples"),
        ('{"event": "media", "media": {"payload": "AAA=", "timestamp": "x"}}', "not a number"),
        ('{"event": "dtmf", "dtmf": {"digit": "55"}}', "not a DTMF key"),
        ('{"event": "mark", "mark": {}}', "mark.name"),
        (start_message(call_sid="bad sid!"), "not a call SID"),
        (start_message(stream_sid=7), "stream_sid"),
        (start_message(custom_parameters=[1]), "custom_parameters"),
        (start_message(media_format={"encoding": "audio/ogg"}), "encoding"),
        (start_message(media_format={"sample_rate": "44100"}), "sample_rate 44100"),
        (start_message(media_format={"sample_rate": "fast"}), "sample_rate"),
        (start_message(media_format={"bit_rate": "8"}), "16-bit"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(message: str | bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        ExotelStream({}, {}).parse(message)


# --- authentication and the voicebot URL ----------------------------------------------------------


def test_the_voicebot_url_answers_json_with_the_stream_url_credentials_rate_and_token() -> None:
    exotel = carrier(sample_rate=8000)
    call = exotel.read_answer("GET", "/exotel/voice", "CallSid=abc123&CallFrom=0981&CallTo=0804", b"", RIGHT)
    assert (call.call_id, call.caller, call.called) == ("abc123", "0981", "0804")
    body, media_type = exotel.answer(call, exotel.stream_url(), "f00d")
    url = urlsplit(json.loads(body)["url"])
    assert media_type == "application/json"
    assert (url.scheme, url.hostname, url.path) == ("wss", "gw.example.com", "/exotel/media")
    assert (url.username, url.password) == (KEY, TOKEN)
    assert dict(parse_qsl(url.query)) == {"sample-rate": "8000", "token": "f00d"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": basic_header(KEY, "wrong-token")},
        {"authorization": basic_header("someone-else", TOKEN)},
        {"authorization": "Bearer " + TOKEN},
        {"authorization": "Basic !!!"},
    ],
)
def test_wrong_or_missing_credentials_are_refused(headers: dict[str, str]) -> None:
    exotel = carrier()
    with pytest.raises(WebhookRefused) as refused:
        exotel.read_answer("GET", "/exotel/voice", "CallSid=abc123", b"", headers)
    assert refused.value.status == 403 and refused.value.auth_failed
    assert not exotel.verify_upgrade("/exotel/media", {}, headers)


def test_the_right_credentials_pass_and_no_token_configured_checks_nothing() -> None:
    assert carrier().verify_upgrade("/exotel/media", {}, RIGHT)
    open_door = ExotelCarrier(ExotelSettings(), None)
    assert not open_door.authenticates and open_door.verify_upgrade("/exotel/media", {}, {})
    with pytest.raises(WebhookRefused, match="CallSid"):
        carrier().read_answer("GET", "/exotel/voice", "From=1", b"", RIGHT)


@pytest.fixture
def exotel_gateway(start_gateway):
    def start(**table: Any):
        tables = {"exotel": {"api_key": KEY, **table}, **AGENTS}
        return start_gateway(EchoEngine(), tables=tables, env={"EXOTEL_API_TOKEN": TOKEN})

    return start


async def test_the_live_gateway_checks_credentials_before_answering_or_accepting(exotel_gateway) -> None:
    live = exotel_gateway()
    voice = live.base_url + "/exotel/voice"
    media = live.base_url.replace("http://", "ws://") + "/exotel/media"
    async with httpx.AsyncClient() as client:
        good = await client.get(voice, params={"CallSid": "abc123"}, auth=(KEY, TOKEN))
        bad = await client.get(voice, params={"CallSid": "abc123"}, auth=(KEY, "nope"))
    assert good.status_code == 200 and json.loads(good.text)["url"].startswith("ws://")
    assert bad.status_code == 403
    for headers in ({}, {"Authorization": basic_header(KEY, "nope")}):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(media, additional_headers=headers, open_timeout=3):
                pass
        assert refused.value.response.status_code == 403
    assert live.engine.opened == 1  # only the answered call primed a session


async def test_a_16_khz_setting_reaches_the_wire_and_the_call_runs(exotel_gateway) -> None:
    live = exotel_gateway(sample_rate=16000)
    summary = await simulate_call(
        None,
        speech_like(1.0),
        carrier="exotel",
        webhook=live.base_url + "/exotel/voice",
        auth_token=f"{KEY}:{TOKEN}",
    )
    assert summary.peer is not None and summary.peer.wire == MediaFormat("l16", 16000)
    assert summary.violations == [] and summary.closed_by == "carrier"
    assert summary.audio_received_s >= 0.8 * 1.0


def test_duplexgate_call_as_exotel_hears_its_input_back(exotel_gateway, tone_wav, tmp_path: Path) -> None:
    live = exotel_gateway()
    heard = tmp_path / "heard.wav"
    options = ["--webhook", live.base_url + "/exotel/voice", "--auth-token", f"{KEY}:{TOKEN}"]
    options += ["--input", str(tone_wav(440, 1.2, rate=8000)), "--output", str(heard), "--tail", "0.3"]
    summary = placed_call("exotel", *options)
    assert summary["closed_by"] == "carrier"
    assert summary["audio_received_s"] >= 0.8 * 1.2
    assert heard.stat().st_size > 44
