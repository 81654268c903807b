"""A stream's life at the edge: one that goes quiet is ended on the wall clock, with a record, while a
caller who is silent but still streaming audio is not; over real sockets on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from callaudio import speech_like
from flood_stream import start_message as twilio_start
from test_recorder import API_KEY, stored_record
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from engine.echo import EchoEngine
from gateway.simulator.call import simulate_call

SID = "CA" + "d" * 32
STREAM = "MZ" + "d" * 32


def start_message() -> str:
    return twilio_start(SID, STREAM)


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


async def test_killing_the_engine_step_loop_tells_every_live_call_within_a_second(
    start_gateway, engine
) -> None:
    live = start_gateway(engine)
    lost: list[tuple[str, float]] = []

    def on_notice(notice) -> None:  # no escalation configured: the call ends as engine_lost
        if notice.kind == "ended" and notice.detail == "engine_lost":
            lost.append((notice.call_id, time.monotonic()))

    live.state.notice_hooks.append(on_notice)
    sids = ["CA" + str(i) * 32 for i in (1, 2)]
    calls = [asyncio.create_task(simulate_call(live.ws_url, speech_like(3.0), call_sid=sid)) for sid in sids]
    assert await live.until(lambda: engine.active == 2 and engine.stats.steps > 3, timeout_s=10)
    task = engine._loop_task
    killed_at = time.monotonic()
    task.get_loop().call_soon_threadsafe(task.cancel)
    assert await live.until(lambda: len(lost) == 2, timeout_s=2)
    assert sorted(call_id for call_id, _ in lost) == sids
    assert max(at for _, at in lost) - killed_at < 1.0
    await asyncio.gather(*calls)
