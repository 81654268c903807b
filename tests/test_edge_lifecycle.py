"""A stream's life at the edge: one that goes quiet is ended on the wall clock, with a record, while a
caller who is silent but still streaming audio is not; over real sockets on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from callaudio import speech_like
from test_recorder import API_KEY, stored_record
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from engine.echo import EchoEngine
from gateway.simulator.twilio import simulate_call

SID = "CA" + "d" * 32
STREAM = "MZ" + "d" * 32


def start_message() -> str:
    start = {
        "callSid": SID,
        "streamSid": STREAM,
        "accountSid": "AC" + "0" * 32,
        "customParameters": {},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    return json.dumps({"event": "start", "sequenceNumber": "1", "start": start, "streamSid": STREAM})


def media_message(n: int) -> str:
    payload = base64.b64encode(b"\xff" * 160).decode()
    media = {"track": "inbound", "chunk": str(n), "timestamp": str(20 * n), "payload": payload}
    return json.dumps({"event": "media", "sequenceNumber": str(n + 1), "media": media, "streamSid": STREAM})


@pytest.fixture
def recorded_gateway(start_gateway, monkeypatch):
    monkeypatch.setenv("DUPLEXGATE_API_KEY", API_KEY)
    return start_gateway(EchoEngine(), stream_idle_timeout_s=0.5)


async def test_a_stream_that_stops_sending_audio_is_ended_with_a_record(recorded_gateway) -> None:
    live = recorded_gateway
    async with connect(live.ws_url) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(start_message())
        for n in range(1, 5):
            await ws.send(media_message(n))
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            while True:  # agent audio and marks, then the close
                await asyncio.wait_for(ws.recv(), 5)
        waited = time.monotonic() - started
    assert closed.value.rcvd is not None and closed.value.rcvd.reason == "stream_idle"
    assert 0.4 < waited < 2.0
    record = await stored_record(live, SID)
    assert record["end_reason"] == "stream_idle"
    assert await live.until(lambda: live.engine.active == 0)


async def test_a_silent_caller_who_keeps_streaming_is_not_idle(recorded_gateway) -> None:
    summary = await simulate_call(recorded_gateway.ws_url, speech_like(0.1), tail_s=1.5)  # mostly silence
    assert summary.closed_by == "carrier"
