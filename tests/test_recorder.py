"""Call records from real calls: the simulated Twilio carrier calls a real gateway on the real tiny engine,
and every call, however it ends, leaves a record in the call store, read back over the control API."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

import httpx
import pytest
import torch
from services import free_port

from engine.echo import EchoEngine
from gateway.carriers.base import AnsweredWithoutStream
from gateway.config import load_config
from gateway.ops.recorder import CallRecorder
from gateway.ops.store import LiveCall, MemoryStore
from gateway.simulator.call import simulate_call
from gateway.switchboard import Switchboard

API_KEY = "recorder-test-key-0123456789"
FRAME_CHUNKS = 4  # 20 ms carrier chunks per 80 ms engine frame


@pytest.fixture(autouse=True)
def _control_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUPLEXGATE_API_KEY", API_KEY)
    torch.set_num_threads(1)


async def stored_record(
    live: Any, call_id: str, timeout_s: float = 5.0, api_key: str = API_KEY
) -> dict[str, Any]:
    """The call's record from GET /v1/records/{call_id}, waiting (bounded) for the recorder to store it."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}) as client:
        while True:
            response = await client.get(f"{live.base_url}/v1/records/{call_id}")
            if response.status_code == 200 or time.monotonic() > deadline:
                assert response.status_code == 200, response.text
                return response.json()
            await asyncio.sleep(0.05)


async def test_a_call_that_ends_normally_leaves_a_full_record(start_gateway, engine, tone_wav) -> None:
    live = start_gateway(engine)
    sessions: list[Any] = []
    roles: list[Any] = []

    async def watch() -> None:  # keep the CallSession and its role prompt to compare with the record
        while not sessions:
            sessions.extend(live.state.calls.values())
            await asyncio.sleep(0.01)
        roles.extend(live.state.role_prompts.values())

    watcher = asyncio.create_task(asyncio.wait_for(watch(), 10.0))
    summary = await simulate_call(None, tone_wav(440, 1.0), webhook=live.webhook, tail_s=0.3)
    await watcher
    record = await stored_record(live, summary.call_sid)

    (role,) = roles
    assert summary.call_sid not in live.state.role_prompts  # dropped once the call was over
    agent = live.state.config.agent_for(record["called"])
    assert record["prompt_sha256"] == hashlib.sha256(role.text.encode()).hexdigest()
    assert (record["agent"], record["voice"]) == (agent.name, agent.voice)
    assert (record["caller"], record["called"]) == ("+15550001111", "+15550002222")
    assert record["crm_status"] == role.crm.status
    assert isinstance(record["seed"], int)  # drawn by the engine session: the agent sets none
    assert record["end_reason"] == "carrier_stop"
    assert record["started_at"] <= record["answered_at"] <= record["ended_at"]
    assert record["counters"]["caller_frames"] == summary.media_sent // FRAME_CHUNKS
    assert record["counters"]["agent_frames_sent"] == summary.media_received
    (call,) = sessions
    expected = [{"at_s": piece.at_s, "text": piece.text} for piece in call.transcript]
    assert expected and record["transcript"] == expected


async def test_a_call_the_webhook_turns_away_leaves_an_overflow_record(
    start_gateway, engine, tone_wav
) -> None:
    engine.admit_fraction = -1.0  # any step time is too slow: no call is admitted
    live = start_gateway(engine)
    sid = "CA" + "7" * 32
    with pytest.raises(AnsweredWithoutStream, match="busy"):
        await simulate_call(None, tone_wav(440, 2.0), webhook=live.webhook, call_sid=sid)
    record = await stored_record(live, sid)
    assert record["end_reason"] == "overflow" and record["answered_at"] is None
    assert record["caller"] == "+15550001111" and record["agent"] == "receptionist"


async def test_a_call_refused_by_a_busy_engine_leaves_a_record(start_gateway, engine, tone_wav) -> None:
    engine.admit_fraction = -1.0  # any step time is too slow: every open raises EngineBusy
    live = start_gateway(engine)
    summary = await simulate_call(live.ws_url, tone_wav(440, 2.0))  # no webhook: refused when it opens
    assert summary.closed_by == "gateway" and summary.media_received == 0
    record = await stored_record(live, summary.call_sid)
    assert record["end_reason"].startswith("engine_unavailable: EngineBusy")
    assert record["answered_at"] is None and record["seed"] is None
    assert record["counters"]["caller_frames"] == record["counters"]["caller_frames_dropped"]


async def test_a_carrier_that_vanishes_mid_call_leaves_a_record(start_gateway, engine, tone_wav) -> None:
    live = start_gateway(engine)
    summary = await simulate_call(None, tone_wav(440, 3.0), webhook=live.webhook, drop_at_s=0.8)
    assert summary.closed_by == "carrier"
    record = await stored_record(live, summary.call_sid)
    assert record["end_reason"] == "carrier_disconnected"
    assert record["counters"]["caller_frames"] <= summary.media_sent // FRAME_CHUNKS
    assert record["ended_at"] - record["started_at"] < 3.0  # ended at the drop, not after the audio


async def test_an_unreachable_store_never_breaks_a_call(start_gateway, engine, tone_wav, caplog) -> None:
    nobody = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    live = start_gateway(engine, tables={"store": {"url": nobody, "replica_id": "lonely"}})
    summary = await simulate_call(None, tone_wav(440, 1.0), webhook=live.webhook, tail_s=0.3)
    assert summary.closed_by == "carrier" and summary.media_received > 0 and summary.violations == []
    assert await live.until(lambda: not live.state.calls and engine.active == 0)
    assert await live.until(
        lambda: any(
            summary.call_sid in r.getMessage() and "call store" in r.getMessage() for r in caplog.records
        )
    )


async def test_record_hooks_hear_each_record_once_it_is_stored(start_gateway, engine, tone_wav) -> None:
    live = start_gateway(engine)
    heard: list[Any] = []
    live.app.state.control.recorder.record_hooks.append(heard.append)
    summary = await simulate_call(None, tone_wav(440, 0.4), webhook=live.webhook, tail_s=0.1)
    stored = await stored_record(live, summary.call_sid)
    assert await live.until(lambda: len(heard) == 1)
    assert json.loads(heard[0].to_json()) == stored


async def test_heartbeats_keep_the_replicas_live_calls_alive_until_the_recorder_stops() -> None:
    store = MemoryStore(live_ttl_s=0.3)  # the recorder beats three times inside it
    gateway = Switchboard(load_config(), EchoEngine())
    recorder = CallRecorder(gateway, store, "replica-hb")
    await store.register(LiveCall(call_id="CA" + "5" * 32, replica="replica-hb"))
    await recorder.start()
    await asyncio.sleep(1.0)  # three TTLs
    kept = await store.get_live("CA" + "5" * 32)
    await recorder.aclose()
    await asyncio.sleep(0.5)
    assert kept is not None
    assert await store.get_live("CA" + "5" * 32) is None  # no more beats: it lapses


async def test_a_call_whose_media_stream_never_comes_still_leaves_a_record(start_gateway, engine) -> None:
    from gateway.carriers.twilio import fetch_twiml

    live = start_gateway(engine, call_token_ttl_s=0.3)
    sid = "CA" + "6" * 32
    form = {"CallSid": sid, "From": "+15550001111", "To": "+15551230000", "AccountSid": "AC" + "0" * 32}
    await fetch_twiml(live.webhook, form, None)
    record = await stored_record(live, sid)
    assert record["end_reason"] == "no_media_stream" and record["caller"] == "+15550001111"
    assert record["answered_at"] is None and record["agent"] == "receptionist"
