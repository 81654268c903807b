"""The worker registry in Redis: each engine worker publishes its entry (address, free slots, step time,
state) at least every heartbeat and whenever its slots change; an entry expires `ttl_s` after its last
beat, so a worker that dies or loses the network drops out by itself. Gateways list the entries to pick a
worker; the worker itself stays authoritative for its slots (it refuses a request it cannot take).

Keys under the prefix: `worker:<id>` (JSON, expiring) and `workers` (the set of ids, pruned of expired
ones when listed).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

DEFAULT_PREFIX = "duplexgate"
READY, DRAINING = "ready", "draining"


class RegistryError(RuntimeError):
    """The registry's Redis could not be reached or answered with an error."""


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as its last heartbeat described it."""

    id: str
    url: str  # where gateways reach it: http://host:port
    capacity: int  # slots in all
    free: int  # slots neither live, reserved nor priming
    active: int  # sessions attached to a gateway
    reserved: int  # primed, waiting for their gateway to attach
    step_ms: float | None  # recent step time (90th percentile), None before the first live step
    state: str = READY  # READY or DRAINING
    at: float = 0.0  # Unix time of the beat

    @property
    def takes_calls(self) -> bool:
        return self.state == READY and self.free > 0


class Registry:
    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, ttl_s: float = 2.0) -> None:
        self._client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            # a pooled connection from before a Redis restart fails once: try again on a fresh one
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
        )
        self.prefix, self.ttl_s = prefix, ttl_s

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def publish(self, info: WorkerInfo) -> None:
        entry = json.dumps({**asdict(info), "at": time.time()}, separators=(",", ":"))
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self._key("worker", info.id), entry, px=max(1, round(self.ttl_s * 1000)))
                pipe.sadd(self._key("workers"), info.id)
                await pipe.execute()
        except RedisError as exc:
            raise RegistryError(f"publishing worker {info.id}: {type(exc).__name__}: {exc}") from exc

    async def withdraw(self, worker_id: str) -> None:
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._key("worker", worker_id))
                pipe.srem(self._key("workers"), worker_id)
                await pipe.execute()
        except RedisError as exc:
            raise RegistryError(f"withdrawing worker {worker_id}: {type(exc).__name__}: {exc}") from exc

    async def workers(self) -> list[WorkerInfo]:
        """Every worker whose entry has not expired, the most free slots first."""
        try:
            ids = sorted(await self._client.smembers(self._key("workers")))
            entries = await self._client.mget([self._key("worker", i) for i in ids]) if ids else []
            gone = [worker_id for worker_id, entry in zip(ids, entries, strict=True) if entry is None]
            if gone:
                await self._client.srem(self._key("workers"), *gone)
        except RedisError as exc:
            raise RegistryError(f"listing workers: {type(exc).__name__}: {exc}") from exc
        found = []
        for entry in entries:
            if entry is None:
                continue
            try:
                found.append(WorkerInfo(**json.loads(entry)))
            except (TypeError, ValueError):
                continue  # an entry from another version; its worker re-publishes its own
        return sorted(found, key=lambda w: (-w.free, w.id))

    async def aclose(self) -> None:
        await self._client.aclose()
