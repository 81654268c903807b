"""Signed webhooks: call events posted as JSON to a customer's URL, retried with backoff, off the audio path.

Receivers check each request like this (the scheme is all there is to implement):

- The body is a JSON envelope: ``{"id", "type", "created_at", "call_id", "data"}``. ``type`` is one of
  ``call.started``, ``call.warning``, ``call.escalated``, ``call.failover`` (the call moved to another
  engine worker), ``call.ended``; ``id`` is unique per event and stays the same on every retry, so a
  receiver that has seen an id can answer 2xx and ignore the repeat.
  ``created_at`` is ISO 8601 UTC.
- ``X-Duplexgate-Timestamp`` holds the Unix time in whole seconds at which this attempt was signed.
- ``X-Duplexgate-Signature`` holds ``v1=<hex>``, where ``<hex>`` is the lowercase hex HMAC-SHA256, keyed with
  the shared secret (UTF-8), of the timestamp's decimal digits, one ``.``, then the raw body bytes exactly as
  received. Several comma-separated ``v1=`` entries may appear; any one matching is enough.
- Compare in constant time, and refuse timestamps more than a few minutes from your clock (replays).

Any 2xx is a delivery. 429, 5xx, timeouts and connection errors are retried with exponential backoff and
jitter until a maximum number of attempts or a maximum age; other statuses (4xx, redirects) are not retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-Duplexgate-Timestamp"
SIGNATURE_HEADER = "X-Duplexgate-Signature"
SIGNATURE_VERSION = "v1"
EVENT_TYPES = ("call.started", "call.warning", "call.escalated", "call.failover", "call.ended")
USER_AGENT = "duplexgate-webhooks/1"
DROP_WARNING_EVERY_S = 1.0  # under a flood, one warning a second (with a count) instead of one per event


# --- signing ----------------------------------------------------------------------------------------


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``f"{timestamp}.".encode() + body`` under ``secret``."""
    return hmac.new(_key(secret), f"{int(timestamp)}.".encode() + body, hashlib.sha256).hexdigest()


def signature_headers(secret: str | bytes, timestamp: int, body: bytes) -> dict[str, str]:
    """The two headers a signed request carries."""
    return {
        TIMESTAMP_HEADER: str(int(timestamp)),
        SIGNATURE_HEADER: f"{SIGNATURE_VERSION}={sign(secret, timestamp, body)}",
    }


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # Plain dicts are case-sensitive; HTTP header names are not.
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None


def verify(
    secret: str | bytes, headers: Mapping[str, str], body: bytes, now: float, tolerance_s: float = 300
) -> bool:
    """Whether ``body`` was signed with ``secret`` within ``tolerance_s`` of ``now`` (Unix seconds)."""
    stamp = _header(headers, TIMESTAMP_HEADER)
    signature = _header(headers, SIGNATURE_HEADER)
    if not stamp or not signature:
        return False
    try:
        timestamp = int(stamp.strip())
    except ValueError:
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).encode()
    matched = False
    for entry in signature.split(","):
        version, _, digest = entry.strip().partition("=")
        # Check every entry so the time taken does not say which one matched.
        if version == SIGNATURE_VERSION and hmac.compare_digest(digest.encode(), expected):
            matched = True
    return matched


# --- events -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookEvent:
    """One call event as receivers see it; ``id`` lets them ignore a repeat delivery."""

    id: str
    type: str
    created_at: str
    call_id: str
    data: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, type: str, call_id: str, data: Mapping[str, Any] | None = None) -> WebhookEvent:
        """A new event with a fresh id, stamped now; refuses unknown types and data that is not JSON."""
        if type not in EVENT_TYPES:
            raise ValueError(f"call {call_id}: unknown webhook event type {type!r}; use one of {EVENT_TYPES}")
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        event = cls(f"evt_{uuid.uuid4().hex}", type, now, call_id, dict(data or {}))
        try:
            event.body()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"call {call_id}: {type} event data is not plain JSON: {exc}") from exc
        return event

    def envelope(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "created_at": self.created_at,
            "call_id": self.call_id,
            "data": dict(self.data),
        }

    def body(self) -> bytes:
        """The exact bytes that are signed and sent."""
        return json.dumps(
            self.envelope(), separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()


# --- delivery ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryPolicy:
    """How hard the sender tries: attempts, age, backoff and the time one attempt may take."""

    max_attempts: int = 6
    max_age_s: float = 900.0  # give up on an event this long after it was emitted
    backoff_base_s: float = 1.0  # wait before the 2nd attempt; doubles each time after
    backoff_max_s: float = 60.0
    attempt_timeout_s: float = 5.0  # the whole request, connect to status line

    def backoff_s(self, failed_attempts: int, rng: random.Random) -> float:
        """Wait after ``failed_attempts`` failures: exponential, capped, with jitter in its upper half."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (failed_attempts - 1))
        # Jitter spreads retries from many calls so a receiver coming back up is not hit all at once.
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


@dataclass
class WebhookStats:
    delivered: int = 0  # got a 2xx
    retried: int = 0  # attempts after the first
    failed: int = 0  # gave up: not retryable, out of attempts or too old
    dropped: int = 0  # never finished: queue full, emitted after close, or still pending when close gave up


@dataclass
class _Delivery:
    url: str
    secret: str | bytes
    event: WebhookEvent
    body: bytes
    emitted_at: float  # monotonic
    number: int  # the sender's own count: one event may go to several URLs
    attempts: int = 0


def _where(url: str) -> str:
    # Query strings often carry tokens; logs get scheme, host and path only.
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"


def _retry_after_s(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return 0.0  # absent, or an HTTP date: our own backoff applies


class WebhookSender:
    """Posts events from a bounded queue with a few worker tasks; ``emit`` never blocks and never raises.

    Call ``emit`` from the event loop's thread (the call sessions' thread). A retry waits off the queue, so a
    receiver that is down does not hold a worker; waiting retries are bounded by ``queue_size`` too.
    """

    def __init__(
        self,
        policy: DeliveryPolicy | None = None,
        *,
        queue_size: int = 1000,
        workers: int = 4,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy or DeliveryPolicy()
        self.stats = WebhookStats()
        self._queue_size = queue_size
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue(maxsize=queue_size)
        self._worker_count = workers
        self._workers: list[asyncio.Task[None]] = []
        self._waiting: dict[int, tuple[asyncio.TimerHandle, _Delivery]] = {}  # delivery number -> its timer
        self._numbers = itertools.count()
        self._in_flight = 0
        self._settled = asyncio.Event()
        self._settled.set()
        self._closed = False
        self._last_drop_warning = -float("inf")
        self._unwarned_drops = 0
        self._rng = rng or random.Random()
        # Redirects are not followed: a signed body should go only where it was configured to go.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.policy.attempt_timeout_s),
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT, "Content-Type": "application/json"},
        )

    @property
    def pending(self) -> int:
        """Events queued, waiting to retry, or being posted."""
        return self._queue.qsize() + len(self._waiting) + self._in_flight

    def emit(self, url: str, secret: str | bytes, event: WebhookEvent) -> None:
        """Queue ``event`` for ``url``; when the queue is full the oldest queued event is dropped."""
        try:
            if self._closed:
                self._drop(event, url, "the webhook sender is closed")
                return
            self._start_workers()
            delivery = _Delivery(url, secret, event, event.body(), time.monotonic(), next(self._numbers))
            self._enqueue(delivery)
        except Exception:
            # Whatever went wrong, the caller is a live call: log it and let the call go on.
            self.stats.dropped += 1
            log.exception("call %s: webhook %r could not be queued", getattr(event, "call_id", "?"), event)

    async def aclose(self, drain_s: float = 5.0) -> None:
        """Stop taking events, try to finish those pending for up to ``drain_s``, then drop the rest."""
        if self._closed and self._client.is_closed:
            return
        self._closed = True
        if self.pending:
            try:
                await asyncio.wait_for(self._settled.wait(), drain_s)
            except TimeoutError:
                log.warning(
                    "webhooks: %d event(s) still pending after %.1f s; dropping them", self.pending, drain_s
                )
        for handle, delivery in list(self._waiting.values()):
            handle.cancel()
            self._drop(delivery.event, delivery.url, "the webhook sender closed before its retry")
        self._waiting.clear()
        while not self._queue.empty():
            delivery = self._queue.get_nowait()
            self._drop(delivery.event, delivery.url, "the webhook sender closed before it was sent")
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        if self._unwarned_drops:
            log.warning(
                "webhooks: %d more event(s) dropped without a warning of their own", self._unwarned_drops
            )
            self._unwarned_drops = 0
        await self._client.aclose()

    # --- internals ----------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        if self._workers:
            return
        asyncio.get_running_loop()  # outside a running loop there is nobody to post: fail before queueing
        self._workers = [
            asyncio.create_task(self._work(), name=f"webhooks:{n}") for n in range(self._worker_count)
        ]

    def _drop(self, event: WebhookEvent, url: str, why: str) -> None:
        self.stats.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_warning < DROP_WARNING_EVERY_S:
            # Logging is synchronous and emit runs on the audio path's thread: do not write one line per drop.
            self._unwarned_drops += 1
            log.debug("call %s: webhook %s %s dropped: %s", event.call_id, event.type, event.id, why)
            return
        if self._unwarned_drops:
            why += f" ({self._unwarned_drops} more dropped since the last warning)"
            self._unwarned_drops = 0
        self._last_drop_warning = now
        log.warning(
            "call %s: webhook %s %s to %s dropped: %s", event.call_id, event.type, event.id, _where(url), why
        )

    def _enqueue(self, delivery: _Delivery) -> None:
        if self._queue.full():
            oldest = self._queue.get_nowait()
            self._drop(oldest.event, oldest.url, f"queue full ({self._queue_size} events)")
        self._queue.put_nowait(delivery)
        self._settled.clear()

    def _settle_if_idle(self) -> None:
        if not self.pending:
            self._settled.set()

    async def _work(self) -> None:
        while True:
            delivery = await self._queue.get()
            self._in_flight += 1
            try:
                await self._attempt(delivery)
            except asyncio.CancelledError:
                self._drop(
                    delivery.event, delivery.url, "the webhook sender closed while it was being posted"
                )
                raise
            except Exception:
                self.stats.failed += 1
                log.exception(
                    "call %s: webhook %s %s to %s failed unexpectedly",
                    delivery.event.call_id,
                    delivery.event.type,
                    delivery.event.id,
                    _where(delivery.url),
                )
            finally:
                self._in_flight -= 1
                self._settle_if_idle()

    async def _attempt(self, delivery: _Delivery) -> None:
        """One POST; settles the delivery or schedules its retry."""
        event = delivery.event
        if time.monotonic() - delivery.emitted_at > self.policy.max_age_s:
            self._fail(delivery, f"it was older than {self.policy.max_age_s:g} s before this attempt")
            return
        delivery.attempts += 1
        if delivery.attempts > 1:
            self.stats.retried += 1
        # Signed per attempt so a retry after a long backoff is not refused as stale.
        headers = signature_headers(delivery.secret, int(time.time()), delivery.body)
        retry_after = 0.0
        try:
            async with asyncio.timeout(self.policy.attempt_timeout_s):
                async with self._client.stream(
                    "POST", delivery.url, content=delivery.body, headers=headers
                ) as r:
                    status = r.status_code
                    retry_after = _retry_after_s(r)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            self._fail(delivery, f"the URL cannot be posted to ({exc}); fix the webhook URL in the config")
            return
        except (httpx.TransportError, TimeoutError) as exc:
            outcome = f"{type(exc).__name__} {exc}".strip()
        else:
            if 200 <= status < 300:
                self.stats.delivered += 1
                return
            if status != 429 and status < 500:
                self._fail(delivery, f"the receiver answered {status}, which is not retried")
                return
            outcome = f"HTTP {status}"
        self._retry_or_fail(delivery, outcome, retry_after)
        log.debug("call %s: webhook %s attempt %d: %s", event.call_id, event.id, delivery.attempts, outcome)

    def _retry_or_fail(self, delivery: _Delivery, outcome: str, retry_after: float) -> None:
        policy = self.policy
        if delivery.attempts >= policy.max_attempts:
            self._fail(delivery, f"{outcome} after {delivery.attempts} attempts")
            return
        wait = min(policy.backoff_max_s, max(policy.backoff_s(delivery.attempts, self._rng), retry_after))
        if time.monotonic() + wait - delivery.emitted_at > policy.max_age_s:
            self._fail(
                delivery, f"{outcome}; the event would be older than {policy.max_age_s:g} s by its retry"
            )
            return
        if len(self._waiting) >= self._queue_size:
            oldest_number = next(iter(self._waiting))  # dicts keep insertion order: the first is the oldest
            handle, oldest = self._waiting.pop(oldest_number)
            handle.cancel()
            self._drop(oldest.event, oldest.url, f"too many retries waiting ({self._queue_size})")
        loop = asyncio.get_running_loop()
        self._waiting[delivery.number] = (
            loop.call_later(wait, self._retry_now, delivery.number),
            delivery,
        )

    def _retry_now(self, number: int) -> None:
        _, delivery = self._waiting.pop(number)
        self._enqueue(delivery)

    def _fail(self, delivery: _Delivery, why: str) -> None:
        self.stats.failed += 1
        event = delivery.event
        log.warning(
            "call %s: webhook %s %s to %s failed: %s",
            event.call_id,
            event.type,
            event.id,
            _where(delivery.url),
            why,
        )
