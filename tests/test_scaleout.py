"""The two-tier deployment as separate processes on loopback: two gateways and two engine workers (the tiny
model on the CPU, 2 slots each) coordinated through a real redis-server. A call answered by one gateway is
streamed through the other, a full house gets the overflow answer, a worker killed mid-call loses no call,
a worker told to stop finishes its call first, and a Redis restart costs live calls nothing."""

from __future__ import annotations

import asyncio
import signal
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import httpx
import pytest
from callaudio import speech_like
from cluster import Cluster, Proc

from gateway.ops.records import CallRecord
from gateway.ops.redis_store import RedisStore
from gateway.simulator.call import simulate_call

CALL_S = 6.0
# After its audio a caller stays on the line this long at most for the answers still in flight: on a busy
# test machine the agent's frames come late, and these tests count what the caller got, not how soon.
SETTLE_S = 5.0


def place(gateway: Proc, seconds: float = CALL_S, stream_url: str | None = None):
    """A simulated call answered by `gateway`'s voice webhook (streamed to `stream_url` when given)."""
    return simulate_call(
        stream_url, speech_like(seconds), webhook=f"{gateway.url}/twilio/voice", tail_s=0.3, settle_s=SETTLE_S
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), slots=2, drain_grace_s=30.0)
    try:
        cluster.start_redis()
        workers = [cluster.start("worker", name) for name in ("w1", "w2")]
        cluster.wait_ready(*workers)
        gateways = [cluster.start("serve", name) for name in ("gA", "gB")]
        cluster.wait_ready(*gateways)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
async def calm(cluster: Cluster) -> Cluster:
    """Both workers running, registered and idle before each test (a test may have stopped one)."""
    for name in ("w1", "w2"):
        if cluster.procs[name].process.poll() is not None:
            cluster.wait_ready(cluster.start("worker", name))
    await cluster.idle(workers=2)
    return cluster


async def record_of(cluster: Cluster, call_id: str, timeout_s: float = 10.0) -> CallRecord:
    store = RedisStore(cluster.redis_url)
    try:
        deadline = time.monotonic() + timeout_s
        while (record := await store.get_record(call_id)) is None:
            assert time.monotonic() < deadline, f"no record of call {call_id}"
            await asyncio.sleep(0.1)
        return record
    finally:
        await store.aclose()


def served(summary, seconds: float = CALL_S, share: float = 0.8) -> None:
    assert summary.closed_by == "carrier", (summary.close_code, summary.close_reason)
    assert summary.violations == []
    assert summary.audio_received_s >= share * seconds


async def holder(cluster: Cluster) -> Proc:
    """The worker process holding the one live call."""

    async def one_active() -> bool:
        return sum(w.active for w in await cluster.workers()) == 1

    assert await cluster.until(one_active, 10.0)
    busy = next(w for w in await cluster.workers() if w.active == 1)
    return next(p for p in cluster.procs.values() if p.url == busy.url)


async def test_a_call_answered_by_one_gateway_streams_through_the_other(calm: Cluster) -> None:
    a, b = calm.procs["gA"], calm.procs["gB"]
    summary = await place(a, 3.0, stream_url=f"{b.ws}/twilio/media")
    served(summary, 3.0)
    record = await record_of(calm, summary.call_sid)
    assert record.end_reason == "carrier_stop" and record.agent == "receptionist"
    assert record.counters["agent_frames_sent"] > 30 and record.failovers == ()


async def test_four_calls_fill_both_workers_and_the_fifth_gets_the_overflow(calm: Cluster) -> None:
    gateways = [calm.procs["gA"], calm.procs["gB"]]
    calls = [asyncio.create_task(place(gateways[i % 2])) for i in range(4)]

    async def full() -> bool:  # both workers, two streaming calls each
        return [(w.free, w.active) for w in await calm.workers()] == [(0, 2), (0, 2)]

    assert await calm.until(full, 20.0), await calm.workers()
    ready = httpx.get(f"{gateways[1].url}/readyz", timeout=5)  # full, yet still the place for webhooks
    assert ready.status_code == 200 and "no free slot" in ready.json()["reason"]
    fifth = "CA" + "5" * 32
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"{gateways[0].url}/twilio/voice",
            data={
                "CallSid": fifth,
                "AccountSid": "AC" + "0" * 32,
                "From": "+15550001111",
                "To": "+15550002222",
            },
        )
    assert answer.status_code == 200
    twiml = ET.fromstring(answer.text)
    assert [child.tag for child in twiml] == ["Say", "Hangup"]
    assert "busy" in (twiml.find("Say").text or "")
    # Four calls saturate this 2-core machine (bench/hop.py): a worker behind real time sheds its oldest
    # frames, by design, so here each call must be answered to its end, not in full.
    for summary in await asyncio.gather(*calls):
        served(summary, share=0.6)
    record = await record_of(calm, fifth)
    assert record.end_reason == "overflow" and record.caller == "+15550001111"


async def test_a_worker_killed_mid_call_hands_the_call_to_the_other_within_a_second(calm: Cluster) -> None:
    gateway = calm.procs["gA"]
    call = asyncio.create_task(place(gateway))
    worker = await holder(calm)
    await asyncio.sleep(1.5)
    worker.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    summary = await call
    served(summary, share=0.7)
    # The longest silence the caller heard: the failover (noticed at once, primed on the other worker).
    gap_ms = summary.brief()["agent_gap_max_ms"]
    assert gap_ms is not None and gap_ms < 1000, gap_ms
    record = await record_of(calm, summary.call_sid)
    assert record.end_reason == "carrier_stop"
    assert len(record.failovers) == 1
    moved = record.failovers[0]
    survivor = calm.procs["w2" if worker.name == "w1" else "w1"]
    assert moved["to_worker"] != moved["from_worker"]
    assert moved["gap_ms"] < 1000 and 1.0 < moved["at_s"] < CALL_S
    assert time.monotonic() - killed_at < 30
    assert (await calm.worker_of(survivor)) is not None


async def test_a_hung_worker_is_noticed_by_its_missing_frames(calm: Cluster) -> None:
    # SIGSTOP: the socket stays open, only the agent frames stop coming.
    call = asyncio.create_task(place(calm.procs["gB"]))
    worker = await holder(calm)
    await asyncio.sleep(1.5)
    worker.process.send_signal(signal.SIGSTOP)
    try:
        summary = await call
    finally:
        worker.process.send_signal(signal.SIGKILL)
        worker.process.send_signal(signal.SIGCONT)
        await asyncio.to_thread(worker.process.wait, 10)  # gone before the next test counts workers
    served(summary, share=0.7)
    moved = (await record_of(calm, summary.call_sid)).failovers
    assert len(moved) == 1 and moved[0]["why"].startswith("no agent frame for 0.8 s"), moved
    gap_ms = summary.brief()["agent_gap_max_ms"]
    assert gap_ms is not None and gap_ms < 0.8 * 1000 + 1000, gap_ms  # noticed at 0.8 s, then moved


async def test_a_draining_worker_takes_no_new_call_and_finishes_its_own(calm: Cluster) -> None:
    first = asyncio.create_task(place(calm.procs["gA"]))
    worker = await holder(calm)
    other = calm.procs["w2" if worker.name == "w1" else "w1"]
    worker.process.send_signal(signal.SIGTERM)

    async def draining() -> bool:
        info = await calm.worker_of(worker)
        return info is not None and info.state == "draining"

    assert await calm.until(draining, 1.0)
    assert httpx.get(worker.url + "/readyz", timeout=2).status_code == 503
    second = asyncio.create_task(place(calm.procs["gB"]))

    async def other_has_it() -> bool:
        info = await calm.worker_of(other)
        return info is not None and info.active == 1

    assert await calm.until(other_has_it, 10.0)
    first_summary, second_summary = await asyncio.gather(first, second)
    served(first_summary)
    served(second_summary)
    assert (await record_of(calm, first_summary.call_sid)).failovers == ()  # it finished where it was
    assert await asyncio.to_thread(worker.process.wait, 20) == 0
    assert await calm.worker_of(worker) is None  # it withdrew from the registry


async def test_live_calls_survive_a_redis_restart_and_the_registry_recovers(calm: Cluster) -> None:
    call = asyncio.create_task(place(calm.procs["gB"]))
    await holder(calm)
    await asyncio.sleep(1.0)
    calm.stop_redis()
    await asyncio.sleep(1.0)
    calm.start_redis()  # empty: no persistence
    summary = await call
    served(summary)
    gap_ms = summary.brief()["agent_gap_max_ms"]
    assert gap_ms is not None and gap_ms < 500, gap_ms
    await calm.idle(workers=2, timeout_s=5.0)  # both workers registered again by their heartbeats
    again = await place(calm.procs["gA"], 2.0)
    served(again, 2.0)
