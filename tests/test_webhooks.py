"""Signed webhooks against a real HTTP receiver on 127.0.0.1: signatures, retries, give-ups, the queue bound
and draining on close."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from services import free_port

from gateway.ops.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DeliveryPolicy,
    WebhookEvent,
    WebhookSender,
    sign,
    signature_headers,
    verify,
)

SECRET = "whsec_test_only"
FAST = DeliveryPolicy(
    max_attempts=4, max_age_s=10.0, backoff_base_s=0.01, backoff_max_s=0.05, attempt_timeout_s=0.3
)
HANG_LIMIT_S = 10.0  # a hanging handler gives up by itself even if teardown never releases it


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


class Receiver:
    """A customer's webhook endpoint; each path misbehaves in its own way, and every request is recorded."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.release = threading.Event()  # lets /hang handlers finish at teardown
        self._lock = threading.Lock()
        self.url = ""

    def answer(self, path: str) -> int:
        """The status this request gets, from how many requests the path has had before it."""
        earlier = sum(1 for r in self.requests if r.path == path)
        if path == "/flaky":
            return 500 if earlier < 2 else 200
        if path == "/busy":
            return 429 if earlier < 1 else 200
        if path == "/bad":
            return 400
        return 200

    def record(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            status = self.answer(path)
            self.requests.append(Received(path, headers, body, status))
            return status

    def at(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.path == path]


def handler_for(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = receiver.record(self.path, dict(self.headers.items()), body)
            if self.path == "/hang":
                receiver.release.wait(HANG_LIMIT_S)
            if self.path == "/trickle":
                self.trickle()
                return
            try:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the sender gave up on this attempt: that is the point

        def trickle(self) -> None:
            """A status line, then one header byte at a time: each read is quick, the reply never ends."""
            try:
                self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
                self.wfile.flush()
                deadline = time.monotonic() + HANG_LIMIT_S
                while not receiver.release.is_set() and time.monotonic() < deadline:
                    self.wfile.write(b"a")
                    self.wfile.flush()
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(receiver))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield receiver
    receiver.release.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s} s")
        await asyncio.sleep(0.005)


def started(call_id: str = "CA0001", **data: Any) -> WebhookEvent:
    return WebhookEvent.create("call.started", call_id, {"agent": "support", **data})


def receiver_check(headers: dict[str, str], body: bytes) -> bool:
    """The documented scheme, written the way a receiver in another codebase would write it."""
    stamp = headers[TIMESTAMP_HEADER]
    given = headers[SIGNATURE_HEADER].removeprefix("v1=")
    wanted = hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(given, wanted)


# --- signing ----------------------------------------------------------------------------------------


def test_verify_accepts_a_genuine_signature() -> None:
    body = started().body()
    now = time.time()
    assert verify(SECRET, signature_headers(SECRET, int(now), body), body, now)


def test_verify_reads_header_names_in_any_case() -> None:
    body = started().body()
    now = time.time()
    lowered = {k.lower(): v for k, v in signature_headers(SECRET, int(now), body).items()}
    assert verify(SECRET, lowered, body, now)


def test_verify_refuses_a_signature_forged_with_another_secret() -> None:
    body = started().body()
    now = time.time()
    forged = signature_headers("guessed-secret", int(now), body)
    assert not verify(SECRET, forged, body, now)


def test_verify_refuses_a_body_changed_after_signing() -> None:
    body = started().body()
    now = time.time()
    headers = signature_headers(SECRET, int(now), body)
    assert not verify(SECRET, headers, body.replace(b"support", b"billing"), now)


def test_verify_refuses_a_stale_timestamp() -> None:
    body = started().body()
    signed_at = int(time.time())
    headers = signature_headers(SECRET, signed_at, body)
    assert verify(SECRET, headers, body, signed_at + 299, tolerance_s=300)
    assert not verify(SECRET, headers, body, signed_at + 301, tolerance_s=300)


def test_verify_refuses_a_replayed_signature_under_a_new_timestamp() -> None:
    body = started().body()
    old = int(time.time()) - 3600
    now = int(time.time())
    replayed = {TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: f"v1={sign(SECRET, old, body)}"}
    assert not verify(SECRET, replayed, body, now)


# --- events -----------------------------------------------------------------------------------------


def test_each_event_gets_its_own_id() -> None:
    ids = {started().id for _ in range(200)}
    assert len(ids) == 200


def test_event_body_is_the_documented_envelope() -> None:
    event = WebhookEvent.create("call.escalated", "CA0042", {"reason": "caller_asked"})
    envelope = json.loads(event.body())
    assert set(envelope) == {"id", "type", "created_at", "call_id", "data"}
    assert (envelope["type"], envelope["call_id"], envelope["data"]) == (
        "call.escalated",
        "CA0042",
        {"reason": "caller_asked"},
    )


def test_an_unknown_event_type_is_refused_naming_the_call() -> None:
    with pytest.raises(ValueError, match="CA0007.*call.transferred"):
        WebhookEvent.create("call.transferred", "CA0007", {})


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    policy = DeliveryPolicy(backoff_base_s=1.0, backoff_max_s=8.0)
    rng = random.Random(5)
    for failed, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (9, 8.0)]:
        waits = [policy.backoff_s(failed, rng) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits), (failed, min(waits), max(waits))
        assert len(set(waits)) > 1  # jittered, not one fixed value


# --- delivery ---------------------------------------------------------------------------------------


async def test_a_receiver_that_fails_twice_gets_one_signed_event_on_the_third_attempt(
    receiver: Receiver,
) -> None:
    sender = WebhookSender(FAST)
    event = started()
    sender.emit(f"{receiver.url}/flaky", SECRET, event)
    await wait_until(lambda: sender.stats.delivered + sender.stats.failed > 0)
    await sender.aclose()

    attempts = receiver.at("/flaky")
    assert [a.status for a in attempts] == [500, 500, 200]
    assert all(a.body == event.body() for a in attempts)  # same event id on every retry
    accepted = attempts[-1]
    assert verify(SECRET, accepted.headers, accepted.body, time.time())
    assert receiver_check(accepted.headers, accepted.body)
    assert (sender.stats.delivered, sender.stats.retried, sender.stats.failed) == (1, 2, 0)


async def test_a_400_is_not_retried(receiver: Receiver) -> None:
    sender = WebhookSender(FAST)
    sender.emit(f"{receiver.url}/bad", SECRET, started())
    await wait_until(lambda: sender.stats.failed > 0)
    await asyncio.sleep(0.2)  # several backoffs' worth: a retry would have arrived by now
    await sender.aclose()

    assert len(receiver.at("/bad")) == 1
    assert (sender.stats.delivered, sender.stats.retried, sender.stats.failed) == (0, 0, 1)


async def test_a_429_is_retried(receiver: Receiver) -> None:
    sender = WebhookSender(FAST)
    sender.emit(f"{receiver.url}/busy", SECRET, started())
    await wait_until(lambda: sender.stats.delivered > 0)
    await sender.aclose()

    assert [a.status for a in receiver.at("/busy")] == [429, 200]


async def test_an_unreachable_receiver_is_retried_up_to_max_attempts_then_given_up() -> None:
    sender = WebhookSender(FAST)
    sender.emit(f"http://127.0.0.1:{free_port()}/hooks", SECRET, started())
    await wait_until(lambda: sender.stats.failed > 0)
    await sender.aclose()

    assert (sender.stats.delivered, sender.stats.retried, sender.stats.failed) == (
        0,
        FAST.max_attempts - 1,
        1,
    )


async def test_a_hanging_receiver_is_abandoned_after_each_attempt_timeout(receiver: Receiver) -> None:
    policy = DeliveryPolicy(max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.01, attempt_timeout_s=0.2)
    sender = WebhookSender(policy)
    began = time.monotonic()
    sender.emit(f"{receiver.url}/hang", SECRET, started())
    await wait_until(lambda: sender.stats.failed > 0)
    took = time.monotonic() - began
    await sender.aclose()

    assert len(receiver.at("/hang")) == 2
    assert 2 * policy.attempt_timeout_s <= took < 2 * policy.attempt_timeout_s + 1.0


async def test_a_receiver_trickling_its_reply_is_abandoned_at_the_attempt_timeout(receiver: Receiver) -> None:
    policy = DeliveryPolicy(max_attempts=1, attempt_timeout_s=0.3)
    sender = WebhookSender(policy)
    began = time.monotonic()
    sender.emit(f"{receiver.url}/trickle", SECRET, started())
    await wait_until(lambda: sender.stats.failed > 0)
    took = time.monotonic() - began
    await sender.aclose()

    assert policy.attempt_timeout_s <= took < policy.attempt_timeout_s + 1.0
    assert sender.stats.delivered == 0


async def test_emit_returns_within_a_millisecond_while_the_receiver_hangs(receiver: Receiver) -> None:
    sender = WebhookSender(DeliveryPolicy(attempt_timeout_s=5.0), workers=1)
    sender.emit(f"{receiver.url}/hang", SECRET, started())
    await wait_until(lambda: len(receiver.at("/hang")) == 1)  # the only worker is now stuck on it

    durations = []
    for n in range(20):
        event = started(call_id=f"CA{n:04d}")
        began = time.perf_counter()
        sender.emit(f"{receiver.url}/hang", SECRET, event)
        durations.append(time.perf_counter() - began)
    await sender.aclose(drain_s=0.05)

    assert statistics.median(durations) < 0.001, durations


async def test_a_flood_drops_the_oldest_events_beyond_the_queue_bound(receiver: Receiver) -> None:
    sender = WebhookSender(FAST, queue_size=3, workers=1)
    # No await between emits: the worker cannot take anything off the queue during the flood.
    events = [started(call_id=f"CA{n:04d}") for n in range(10)]
    for event in events:
        sender.emit(f"{receiver.url}/ok", SECRET, event)
    assert sender.stats.dropped == 7
    await sender.aclose()

    delivered_ids = [json.loads(r.body)["id"] for r in receiver.at("/ok")]
    assert delivered_ids == [e.id for e in events[-3:]]


async def test_a_dropped_event_is_logged_with_its_call_and_event_id(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    sender = WebhookSender(FAST, queue_size=1, workers=1)
    first, second = started(call_id="CA0100"), started(call_id="CA0101")
    with caplog.at_level(logging.WARNING, logger="gateway.ops.webhooks"):
        sender.emit(f"{receiver.url}/ok", SECRET, first)
        sender.emit(f"{receiver.url}/ok", SECRET, second)
    await sender.aclose()

    drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drops) == 1 and "CA0100" in drops[0] and first.id in drops[0], drops


async def test_a_flood_warns_once_with_a_count_not_once_per_dropped_event(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    sender = WebhookSender(FAST, queue_size=1, workers=1)
    with caplog.at_level(logging.WARNING, logger="gateway.ops.webhooks"):
        for n in range(50):
            sender.emit(f"{receiver.url}/ok", SECRET, started(call_id=f"CA{n:04d}"))
        await sender.aclose()

    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert sender.stats.dropped == 49
    assert len(warnings) == 2 and "48 more" in warnings[-1], warnings


async def test_one_event_sent_to_two_receivers_is_retried_for_each(receiver: Receiver) -> None:
    sender = WebhookSender(FAST)
    event = started()
    sender.emit(f"{receiver.url}/flaky", SECRET, event)
    sender.emit(f"{receiver.url}/busy", SECRET, event)
    await wait_until(lambda: sender.stats.delivered + sender.stats.failed >= 2)
    await sender.aclose()

    assert [a.status for a in receiver.at("/flaky")] == [500, 500, 200]
    assert [a.status for a in receiver.at("/busy")] == [429, 200]


async def test_an_event_is_not_retried_past_its_max_age() -> None:
    policy = DeliveryPolicy(max_attempts=10, max_age_s=0.05, backoff_base_s=0.2, backoff_max_s=0.2)
    sender = WebhookSender(policy)
    sender.emit(f"http://127.0.0.1:{free_port()}/hooks", SECRET, started())
    await wait_until(lambda: sender.stats.failed > 0)
    await sender.aclose()

    assert (sender.stats.retried, sender.stats.failed) == (0, 1)


async def test_aclose_delivers_what_is_still_queued(receiver: Receiver) -> None:
    sender = WebhookSender(FAST, workers=2)
    events = [started(call_id=f"CA{n:04d}") for n in range(5)]
    for event in events:
        sender.emit(f"{receiver.url}/ok", SECRET, event)
    await sender.aclose(drain_s=3.0)

    assert sorted(json.loads(r.body)["id"] for r in receiver.at("/ok")) == sorted(e.id for e in events)
    assert (sender.stats.delivered, sender.stats.dropped) == (5, 0)


async def test_aclose_gives_up_on_a_hanging_receiver_after_its_drain_time(receiver: Receiver) -> None:
    sender = WebhookSender(DeliveryPolicy(attempt_timeout_s=5.0))
    sender.emit(f"{receiver.url}/hang", SECRET, started())
    await wait_until(lambda: len(receiver.at("/hang")) == 1)
    began = time.monotonic()
    await sender.aclose(drain_s=0.3)

    assert time.monotonic() - began < 1.0
    assert (sender.stats.delivered, sender.stats.dropped) == (0, 1)


async def test_emit_after_aclose_drops_the_event_without_raising(receiver: Receiver) -> None:
    sender = WebhookSender(FAST)
    await sender.aclose()
    sender.emit(f"{receiver.url}/ok", SECRET, started())
    await asyncio.sleep(0.05)

    assert sender.stats.dropped == 1
    assert receiver.at("/ok") == []


def test_emit_outside_an_event_loop_drops_the_event_without_raising() -> None:
    sender = WebhookSender(FAST)
    sender.emit("http://127.0.0.1:9/hooks", SECRET, started())
    asyncio.run(sender.aclose())

    assert sender.stats.dropped == 1
