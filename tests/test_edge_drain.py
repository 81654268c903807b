"""SIGTERM drains the gateway: `duplexgate serve` (a real process) stops taking calls at once, lets its live
calls finish within the grace, records each of them, and exits; a call longer than the grace is ended
with a record. Records land in a real Redis, so they can be read after the process is gone."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
from callaudio import speech_like
from serveproc import ADMIT_FRACTION, serve
from services import RedisServer, redis_server  # noqa: F401 (a fixture)

from gateway.ops.redis_store import RedisStore
from gateway.simulator.call import simulate_call


def drain_config(directory: Path, redis_url: str, grace_s: float) -> Path:
    config = directory / "gateway.toml"
    config.write_text(
        f"[server]\ndrain_grace_s = {grace_s}\n[engine]\nslots = 4\nadmit_fraction = {ADMIT_FRACTION}\n"
        f'[store]\nurl = "{redis_url}"\n'
        '[agents.helper]\nvoice = "demo"\nprompt = "You are a helpful assistant."\n'
    )
    return config


async def until_live(client: httpx.AsyncClient, url: str, count: int, calls: list[asyncio.Task]) -> None:
    """Until the gateway holds `count` live calls (at most 30 s); a call that ended before is the failure."""
    deadline = time.monotonic() + 30
    while (await client.get(url + "/healthz")).json()["calls"] < count:
        ended = [call.result().brief() for call in calls if call.done()]
        assert not ended, ended
        assert time.monotonic() < deadline, f"fewer than {count} live calls after 30 s"
        await asyncio.sleep(0.05)


async def wait_for_exit(process, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert process.poll() is not None, f"serve still running {timeout_s} s after SIGTERM"
    return process.returncode


async def test_sigterm_lets_live_calls_finish_refuses_new_ones_and_records_every_call(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    sids = ["CA" + c * 32 for c in "ab"]
    with serve(tmp_path, drain_config(tmp_path, redis_server.url, grace_s=20)) as server:
        webhook = server.url + "/twilio/voice"
        calls = [
            asyncio.create_task(
                simulate_call(None, speech_like(3.0), webhook=webhook, call_sid=sid, tail_s=0)
            )
            for sid in sids
        ]
        async with httpx.AsyncClient() as client:
            await until_live(client, server.url, 2, calls)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            ready = await client.get(server.url + "/readyz")
            refused = await client.post(webhook, data={"CallSid": "CA" + "c" * 32, "To": "+15550002222"})
        assert ready.status_code == 503 and ready.json()["reason"].startswith("draining")
        assert refused.status_code == 503
        summaries = await asyncio.gather(*calls)
        assert [s.closed_by for s in summaries] == ["carrier", "carrier"]  # both ran their whole input
        assert await wait_for_exit(server.process, 15) == 0
    store = RedisStore(redis_server.url)
    try:
        records = [await store.get_record(sid) for sid in sids]
    finally:
        await store.aclose()
    assert all(record is not None and record.end_reason != "server_shutdown" for record in records)


async def test_calls_still_live_when_the_grace_is_over_are_ended_with_a_record(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    sid = "CA" + "e" * 32
    with serve(tmp_path, drain_config(tmp_path, redis_server.url, grace_s=1)) as server:
        call = asyncio.create_task(
            simulate_call(None, speech_like(8.0), webhook=server.url + "/twilio/voice", call_sid=sid)
        )
        async with httpx.AsyncClient() as client:
            await until_live(client, server.url, 1, [call])
        server.process.send_signal(signal.SIGTERM)
        summary = await call
        assert summary.closed_by == "gateway" and summary.media_sent * 0.02 < 5
        assert await wait_for_exit(server.process, 15) == 0
    store = RedisStore(redis_server.url)
    try:
        record = await store.get_record(sid)
    finally:
        await store.aclose()
    assert record is not None and record.end_reason == "server_shutdown"
