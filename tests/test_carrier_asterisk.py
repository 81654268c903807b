"""Asterisk chan_websocket's dialect (MEDIA_START/binary media/DTMF_END/MEDIA_MARK_PROCESSED in, binary
media and MARK_MEDIA/FLUSH_MEDIA/HANGUP out, junk refused with a reason), its Basic-auth upgrade check, the
ARI transfer against a loopback stand-in, and a whole call: `duplexgate call --carrier asterisk` against a
real gateway on the echo engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import orjson
import pytest
from carrier_api import CarrierApi
from carrier_cli import placed_call
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from engine.echo import EchoEngine
from gateway.call.events import (
    CallerAudio,
    CallStarted,
    DtmfPressed,
    MalformedMessage,
    MarkPlayed,
    MediaFormat,
)
from gateway.carriers.asterisk import (
    AsteriskCarrier,
    AsteriskSettings,
    AsteriskStream,
    basic_header,
)

PASSWORD = "asterisk-ws-password-0123456789"
AGENTS = {"agents": {"helper": {"voice": "demo", "prompt": "You help."}}, "numbers": {"default": "helper"}}


def media_start(**fields: Any) -> str:
    body = {
        "event": "MEDIA_START",
        "connection_id": "e226e283-c90a-4ea9-9e37-389000b9ef47",
        "channel": "WebSocket/duplexgate/0x7f0001",
        "channel_id": "pbx1-1700000000.42",
        "format": "slin16",
        "optimal_frame_size": 640,
        "ptime": 20,
        "channel_variables": {
            "__DUPLEXGATE_CALLER": "+15550001111",
            "DUPLEXGATE_CALLED": "+15550002222",
            "__DUPLEXGATE_CHANNEL": "pbx1-1700000000.41",
        },
        **fields,
    }
    return json.dumps(body)


# --- the dialect -----------------------------------------------------------------------------------


def test_media_start_names_the_call_its_caller_and_the_channel_to_transfer() -> None:
    stream = AsteriskStream({"limit_max_duration": "60", "token": "ignored"}, {})
    started = stream.parse(media_start())
    assert started == CallStarted(
        call_id="pbx1-1700000000.42",
        stream_id="e226e283-c90a-4ea9-9e37-389000b9ef47",
        caller="+15550001111",
        called="+15550002222",
        custom_parameters={"limit_max_duration": "60"},
        media_format=MediaFormat("l16", 16000),
        control_id="pbx1-1700000000.41",
    )
    assert stream.optimal_frame_size == 640


@pytest.mark.parametrize(
    ("codec", "fmt"),
    [
        ("ulaw", MediaFormat("mulaw", 8000)),
        ("slin", MediaFormat("l16", 8000)),
        ("slin24", MediaFormat("l16", 24000)),
    ],
)
def test_each_understood_codec_maps_to_its_format(codec: str, fmt: MediaFormat) -> None:
    started = AsteriskStream({}, {}).parse(media_start(format=codec, channel_variables=None))
    assert isinstance(started, CallStarted) and started.media_format == fmt
    assert started.caller is None and started.control_id is None


def test_inbound_frames_become_call_events_and_notices_nothing() -> None:
    stream = AsteriskStream({}, {})
    stream.parse(media_start())
    assert stream.parse(b"\x01\x00" * 320) == CallerAudio(b"\x01\x00" * 320)
    assert stream.parse('{"event": "DTMF_END", "channel_id": "x", "digit": "#"}') == DtmfPressed("#")
    processed = '{"event": "MEDIA_MARK_PROCESSED", "channel_id": "x", "correlation_id": "agent-4"}'
    assert stream.parse(processed) == MarkPlayed("agent-4")
    for event in (
        "MEDIA_XOFF",
        "MEDIA_XOFF",
        "MEDIA_XON",
        "STATUS",
        "QUEUE_DRAINED",
        "MEDIA_BUFFERING_COMPLETED",
    ):
        assert stream.parse(json.dumps({"event": event, "channel_id": "x"})) is None


def test_outbound_frames_are_raw_media_and_exact_json_commands() -> None:
    stream = AsteriskStream({}, {})
    payload = b"\x02\x00" * 1280  # 80 ms of slin16: 4 x 640 bytes
    assert stream.audio(payload) == [payload]
    assert [orjson.loads(m) for m in stream.mark("agent-9")] == [
        {"command": "MARK_MEDIA", "correlation_id": "agent-9"}
    ]
    assert [orjson.loads(m) for m in stream.clear()] == [{"command": "FLUSH_MEDIA"}]
    assert [orjson.loads(m) for m in stream.end("hangup")] == [{"command": "HANGUP"}]
    assert all(
        isinstance(m, str) for m in [*stream.mark("m"), *stream.clear(), *stream.end("x")]
    )  # text frames


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"", "empty media frame"),
        ("MEDIA_START connection_id:abc channel:WebSocket/x format:ulaw", "f\\(json\\)"),
        ("[]", "not an object"),
        ('{"event": "HELLO"}', "unknown event"),
        ('{"event": "DTMF_END", "digit": "x"}', "not a DTMF key"),
        ('{"event": "MEDIA_MARK_PROCESSED"}', "correlation_id"),
        (media_start(channel_id="bad id/../"), "not a channel id"),
        (media_start(format="opus"), "format 'opus'"),
        (media_start(optimal_frame_size="640"), "optimal_frame_size"),
        (media_start(channel_variables=["A=1"]), "channel_variables"),
        (media_start(format=["ulaw"]), "unreadable message"),
    ],
)
def test_malformed_frames_are_refused_with_a_reason(message: str | bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        AsteriskStream({}, {}).parse(message)


# --- authentication, the missing webhook, transfer -----------------------------------------------


def test_the_upgrade_needs_the_configured_password_in_basic_auth() -> None:
    asterisk = AsteriskCarrier(AsteriskSettings(password=PASSWORD), None)
    assert asterisk.authenticates
    assert asterisk.verify_upgrade(
        "/asterisk/media", {}, {"authorization": basic_header("any-user", PASSWORD)}
    )
    for headers in (
        {},
        {"authorization": basic_header("asterisk", "wrong")},
        {"authorization": "Bearer " + PASSWORD},
        {"authorization": "Basic not-base64!"},
    ):
        assert not asterisk.verify_upgrade("/asterisk/media", {}, headers)
    open_door = AsteriskCarrier(AsteriskSettings(), None)
    assert not open_door.authenticates and open_door.verify_upgrade("/asterisk/media", {}, {})


async def test_a_transfer_sets_the_dialplans_global_variable_over_ari() -> None:
    api = CarrierApi()
    try:
        settings = AsteriskSettings(password=PASSWORD, ari_url=api.url, ari_user="gw", ari_password="ari-pw")
        started = AsteriskStream({}, {}).parse(media_start())
        assert isinstance(started, CallStarted)
        await AsteriskCarrier(settings, None).transfer(started, "sip:desk@pbx.example.com")
    finally:
        api.close()
    [request] = api.requests
    path, _, query = request["path"].partition("?")
    assert (request["method"], path) == ("POST", "/ari/asterisk/variable")
    # the caller's uniqueid through the dialplan's FILTER(0-9A-Za-z,...)
    expected = {"variable": ["DUPLEXGATE_TRANSFER_pbx1170000000041"], "value": ["sip:desk@pbx.example.com"]}
    assert parse_qs(query) == expected
    assert request["headers"]["authorization"] == basic_header("gw", "ari-pw")


async def test_a_transfer_without_ari_or_the_callers_channel_says_what_is_missing() -> None:
    started = AsteriskStream({}, {}).parse(media_start(channel_variables={}))
    assert isinstance(started, CallStarted)
    with pytest.raises(RuntimeError, match="ari_url"):
        await AsteriskCarrier(AsteriskSettings(), None).transfer(started, "+15557654321")
    with_ari = AsteriskSettings(ari_url="http://127.0.0.1:9", ari_user="gw", ari_password="pw")
    with pytest.raises(RuntimeError, match="DUPLEXGATE_CHANNEL"):
        await AsteriskCarrier(with_ari, None).transfer(started, "+15557654321")


@pytest.fixture
def asterisk_gateway(start_gateway):
    return start_gateway(
        EchoEngine(), tables={"asterisk": {}, **AGENTS}, env={"ASTERISK_WS_PASSWORD": PASSWORD}
    )


async def test_the_live_gateway_refuses_bad_upgrades_and_has_no_webhook(asterisk_gateway) -> None:
    media = asterisk_gateway.base_url.replace("http://", "ws://") + "/asterisk/media"
    for headers in ({}, {"Authorization": basic_header("asterisk", "wrong")}):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(media, additional_headers=headers, open_timeout=3):
                pass
        assert refused.value.response.status_code == 403
    async with httpx.AsyncClient() as client:
        voice = await client.post(asterisk_gateway.base_url + "/asterisk/voice", data={"a": "b"})
    assert voice.status_code == 404 and "no answer webhook" in voice.text
    assert asterisk_gateway.engine.opened == 0


def test_duplexgate_call_as_asterisk_hears_its_input_back(asterisk_gateway, tone_wav, tmp_path: Path) -> None:
    heard = tmp_path / "heard.wav"
    media = asterisk_gateway.base_url.replace("http://", "ws://") + "/asterisk/media"
    source = str(tone_wav(440, 1.2, rate=8000))
    options = ["--url", media, "--auth-token", PASSWORD, "--input", source, "--output", str(heard)]
    summary = placed_call("asterisk", *options, "--tail", "0.3")
    assert summary["closed_by"] == "carrier"
    assert summary["audio_received_s"] >= 0.8 * 1.2
    assert heard.stat().st_size > 44
