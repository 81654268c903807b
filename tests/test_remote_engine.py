"""Engine workers in-process on loopback (the real tiny engine behind the real worker app, served by uvicorn,
registered in a real redis-server) and the gateway's RemoteEngine: the hop loses nothing (bit-identical to
the embedded engine), the worker admits only its key, frees what nobody attaches to, refuses malformed
frames, and a call whose worker goes away moves to another, with its record and a call.failover event
saying so."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from callaudio import speech_like
from services import redis_server  # noqa: F401 (a fixture)
from test_call_webhooks import ENV, Receiver, tables
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from engine.api import FRAME_SAMPLES, MAX_QUEUED_FRAMES, Sampling, SessionClosed, SessionSpec
from engine.embedded import build_engine
from engine.loading import load_text_tokenizer, resolve_checkpoint
from engine.remote.client import LOST_AFTER_S, RemoteEngine
from engine.remote.registry import Registry
from engine.remote.server import WorkerServer
from gateway.cli import WS_IMPLEMENTATION
from gateway.simulator.call import simulate_call

KEY = "remote-test-key-0123456789abcdef"
GREEDY = SessionSpec(
    voice="demo", prompt="You answer the phone for a bakery.", seed=7, sampling=Sampling(greedy=True)
)


@dataclass
class LiveWorker:
    server: WorkerServer
    uv: uvicorn.Server
    thread: threading.Thread

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        """The worker goes away: its server closes every connection and stops heartbeating."""
        self.uv.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"  # each test its own registry, on the one Redis


@pytest.fixture
def start_worker(tiny_checkpoint, redis_server, prefix) -> Iterator[Callable[..., LiveWorker]]:  # noqa: F811
    started: list[LiveWorker] = []

    def start(name: str, slots: int = 2, reserve_ttl_s: float = 30.0) -> LiveWorker:
        engine = build_engine(resolve_checkpoint(tiny_checkpoint), torch.device("cpu"), capacity=slots)
        import socket

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        registry = Registry(redis_server.url, prefix=prefix)
        server = WorkerServer(
            engine, key=KEY, worker_id=name, url=url, registry=registry, reserve_ttl_s=reserve_ttl_s
        )
        config = uvicorn.Config(server.app, log_level="warning", ws=WS_IMPLEMENTATION, lifespan="on")
        uv = uvicorn.Server(config)
        thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not uv.started:
            assert time.monotonic() < deadline and thread.is_alive(), f"worker {name} did not start"
            time.sleep(0.01)
        live = LiveWorker(server, uv, thread)
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()
        live.server.engine.shutdown()


@pytest.fixture
def new_remote(tiny_checkpoint, redis_server, prefix) -> Callable[[], RemoteEngine]:  # noqa: F811
    """A gateway's RemoteEngine on this test's registry (used on one event loop only, as in a gateway)."""
    tokenizer = load_text_tokenizer(resolve_checkpoint(tiny_checkpoint).tokenizer)
    return lambda: RemoteEngine(Registry(redis_server.url, prefix=prefix), KEY, tokenizer)


@pytest.fixture
def remote(new_remote) -> RemoteEngine:
    return new_remote()


async def registered(remote: RemoteEngine, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(await remote.workers()) < count:
        assert time.monotonic() < deadline, "workers did not register"
        await asyncio.sleep(0.05)


def caller_frames(count: int) -> list[np.ndarray]:
    t = np.arange(count * FRAME_SAMPLES) / 24000
    pcm = (0.2 * np.sin(2 * np.pi * 300 * t) * (np.sin(2 * np.pi * 0.7 * t) > 0)).astype(np.float32)
    return [pcm[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES] for i in range(count)]


async def run_frames(session, frames: list[np.ndarray]) -> list:
    out = []
    iterator = session.frames().__aiter__()
    for frame in frames:
        session.push(frame)
        out.append(await asyncio.wait_for(iterator.__anext__(), 10))
    return out


async def test_a_remote_session_is_bit_identical_to_the_embedded_engine(
    start_worker, remote, tiny_checkpoint
):
    start_worker("w1")
    await registered(remote, 1)
    frames = caller_frames(20)
    session = await remote.open(GREEDY)
    try:
        far = await run_frames(session, frames)
    finally:
        await session.close()
    embedded = build_engine(resolve_checkpoint(tiny_checkpoint), torch.device("cpu"), capacity=2)
    try:
        near_session = await embedded.open(GREEDY)
        near = await run_frames(near_session, frames)
        await near_session.close()
    finally:
        await embedded.aclose()
    assert [f.token for f in far] == [f.token for f in near]
    assert [f.text for f in far] == [f.text for f in near]
    assert all(np.array_equal(a.pcm, b.pcm) for a, b in zip(far, near, strict=True))
    assert session.seed == 7 and session.position == near_session.position


async def test_the_worker_serves_only_its_key(start_worker) -> None:
    worker = start_worker("w1")
    spec = {"voice": "demo", "prompt": "hi"}
    async with httpx.AsyncClient() as client:
        assert (await client.post(f"{worker.url}/sessions", json=spec)).status_code == 401
        wrong = {"authorization": "Bearer " + secrets.token_hex(16)}
        assert (await client.post(f"{worker.url}/sessions", json=spec, headers=wrong)).status_code == 401
        assert (await client.get(f"{worker.url}/metrics")).status_code == 401
        good = {"authorization": f"Bearer {KEY}"}
        bad = await client.post(f"{worker.url}/sessions", json={"voice": 3}, headers=good)
        assert bad.status_code == 400
        unknown = await client.post(
            f"{worker.url}/sessions", json={"voice": "nobody", "prompt": ""}, headers=good
        )
        assert unknown.status_code == 422 and "nobody" in unknown.text
        ticket = (await client.post(f"{worker.url}/sessions", json=spec, headers=good)).json()
        metrics = (await client.get(f"{worker.url}/metrics", headers=good)).text
    assert (
        "duplexgate_worker_slots_total 2.0" in metrics and "duplexgate_worker_slots_reserved 1.0" in metrics
    )
    ws_url = worker.url.replace("http", "ws") + f"/sessions/{ticket['session']}"
    with pytest.raises(InvalidStatus) as refused:
        await connect(ws_url)  # no key
    assert refused.value.response.status_code == 403
    async with connect(ws_url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        with pytest.raises(InvalidStatus):  # attached once only
            await connect(ws_url, additional_headers={"Authorization": f"Bearer {KEY}"})
        await ws.send(b"\x00" * 100)  # not a frame
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert worker.server.engine.free_slots == 2  # the session went with its connection


async def test_a_session_nobody_attaches_to_is_freed_after_the_reserve_ttl(start_worker, remote) -> None:
    worker = start_worker("w1", reserve_ttl_s=0.5)
    await registered(remote, 1)
    ticket = await remote.reserve(GREEDY)
    assert worker.server.engine.free_slots == 1
    deadline = time.monotonic() + 5
    while worker.server.engine.free_slots != 2:
        assert time.monotonic() < deadline, "the reservation was never freed"
        await asyncio.sleep(0.05)
    assert ticket.worker == "w1"


async def test_a_gateway_ahead_of_its_worker_never_leaves_a_frame_owed(start_worker, remote) -> None:
    """Frames pushed faster than the worker steps: at most MAX_QUEUED_FRAMES wait unanswered at the worker
    (all it keeps) and the oldest of the rest are dropped here. A frame the worker dropped would stay owed
    forever, and once the caller paused the worker would look hung: the call moved, or ended."""
    start_worker("w1")
    await registered(remote, 1)
    session = await remote.open(GREEDY)
    stream = session.frames().__aiter__()
    for frame in caller_frames(40):
        session.push(frame)
        await asyncio.sleep(0.005)  # each sent at once, faster than the worker steps
    answered = 0
    with contextlib.suppress(TimeoutError):  # until the worker has said all it will
        while True:
            await asyncio.wait_for(stream.__anext__(), 2 * LOST_AFTER_S)
            answered += 1
    assert session.close_reason is None and session.failovers == []
    assert MAX_QUEUED_FRAMES <= answered <= 40
    await session.close()


async def test_a_session_moves_when_its_worker_goes_and_ends_when_none_is_left(start_worker, remote) -> None:
    w1, w2 = start_worker("w1"), start_worker("w2")
    await registered(remote, 2)
    moves = []
    remote.failover_hooks.append(lambda session, failover: moves.append(failover))
    remote.reanchor = lambda session, said, budget: (
        f"{session.role_prompt} You were saying: {' '.join(said)[-200:]}"
    )
    session = await remote.open(GREEDY)
    first = session.ticket.worker
    frames = caller_frames(60)
    got = await run_frames(session, frames[:10])
    (w1 if first == "w1" else w2).stop()
    got += await run_frames(session, frames[10:20])
    assert [f.index for f in got] == list(range(20))
    assert len(moves) == 1 and moves[0].from_worker == first and moves[0].to_worker != first
    assert session.ticket.worker == moves[0].to_worker and moves[0].gap_s < 1.0
    assert session.ticket.spec.prompt.startswith(GREEDY.prompt + " You were saying:")
    (w2 if first == "w1" else w1).stop()  # the last worker goes too
    with pytest.raises(SessionClosed):
        await run_frames(session, frames[20:60])
    assert session.close_reason == "engine_lost"


async def test_a_call_that_moves_says_so_in_its_record_and_a_webhook_event(
    start_worker, remote, new_remote, start_gateway
) -> None:
    receiver = Receiver()
    try:
        workers = {"w1": start_worker("w1"), "w2": start_worker("w2")}
        await registered(remote, 2)
        live = start_gateway(new_remote(), tables=tables(receiver.url), env=ENV)  # in the gateway's loop
        call = asyncio.create_task(simulate_call(None, speech_like(4.0), webhook=live.webhook, tail_s=0.2))
        deadline = time.monotonic() + 10
        while not any(w.server.info().active for w in workers.values()):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        holder = next(w for w in workers.values() if w.server.info().active)
        await asyncio.to_thread(holder.stop)
        summary = await call
        assert summary.closed_by == "carrier" and summary.audio_received_s > 0.7 * 4.0
        deadline = time.monotonic() + 5
        while "call.ended" not in receiver.types():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        receiver.server.shutdown()
    assert receiver.types() == ["call.started", "call.failover", "call.ended"]
    moved = receiver.events[1][0]["data"]
    assert moved["from_worker"] == holder.server.id and moved["to_worker"] != holder.server.id
    record = receiver.events[2][0]["data"]["record"]
    assert [(f["from_worker"], f["to_worker"]) for f in record["failovers"]] == [
        (moved["from_worker"], moved["to_worker"])
    ]
