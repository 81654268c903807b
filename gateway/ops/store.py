"""The call store: live calls (which replica owns each, kept alive by heartbeats), past call records,
concurrency slots, and control commands routed to the replica that owns a call, behind one async
interface with two implementations: `MemoryStore` (one process, the embedded default) and `RedisStore`
(shared by every gateway replica)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.exceptions import RedisError

from gateway.ops.records import CallRecord

log = logging.getLogger(__name__)

DEFAULT_LIVE_TTL_S = 30.0  # a replica heartbeats well inside this; a silent one's calls vanish after it
DEFAULT_RECORDS_KEPT = 100_000
MAX_RECORDS_PAGE = 1000


class StoreError(RuntimeError):
    """The store could not do what was asked (server unreachable, bad settings); says where and what."""


@dataclass(frozen=True)
class LiveCall:
    """A call in progress, as every replica and the control API see it. `details` holds small JSON values
    the owner updates during the call (answered_at, escalated, ...)."""

    call_id: str
    replica: str  # the gateway process holding the call's stream: commands for it go there
    agent: str = ""
    caller: str | None = None
    called: str | None = None
    started_at: float = 0.0  # Unix seconds
    details: Mapping[str, Any] = field(default_factory=dict)

    def core_json(self) -> str:
        """Everything except `details`, which are stored (and updated) one by one."""
        core = {
            "call_id": self.call_id,
            "replica": self.replica,
            "agent": self.agent,
            "caller": self.caller,
            "called": self.called,
            "started_at": self.started_at,
        }
        return json.dumps(core, separators=(",", ":"))


@dataclass(frozen=True)
class CallCommand:
    """An order for one live call, from the control API to whichever replica owns the call."""

    call_id: str
    action: str  # "escalate", "hangup"
    reason: str = ""

    def to_json(self) -> str:
        return json.dumps({"call_id": self.call_id, "action": self.action, "reason": self.reason})

    @classmethod
    def from_json(cls, text: str) -> CallCommand:
        data = json.loads(text)
        return cls(
            call_id=str(data["call_id"]), action=str(data["action"]), reason=str(data.get("reason", ""))
        )


class CommandSubscription(ABC):
    """Commands addressed to one replica, in the order they were sent. Only commands sent after the
    subscription exists arrive: a replica subscribes before it registers calls."""

    def __init__(self, replica: str) -> None:
        self.replica = replica

    @abstractmethod
    async def next(self, timeout_s: float | None = None) -> CallCommand | None:
        """The next command, or None when `timeout_s` passes first (None: wait as long as it takes)."""

    @abstractmethod
    async def aclose(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[CallCommand]:
        return self._forever()

    async def _forever(self) -> AsyncIterator[CallCommand]:
        while True:
            command = await self.next()
            if command is not None:
                yield command

    async def __aenter__(self) -> CommandSubscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class CallStore(ABC):
    """Shared call state. A live call lasts `live_ttl_s` after its last register, update or heartbeat of its
    replica; a concurrency slot lasts `live_ttl_s` after its last claim. At most `records_kept` call
    records are kept, the oldest (by start time) dropped first."""

    def __init__(
        self, live_ttl_s: float = DEFAULT_LIVE_TTL_S, records_kept: int = DEFAULT_RECORDS_KEPT
    ) -> None:
        if live_ttl_s <= 0:
            raise StoreError(f"live_ttl_s = {live_ttl_s!r} must be positive (seconds)")
        if records_kept < 1:
            raise StoreError(f"records_kept = {records_kept!r} must be at least 1")
        self.live_ttl_s = live_ttl_s
        self.records_kept = records_kept

    # --- live calls ---------------------------------------------------------------------------------

    @abstractmethod
    async def register(self, call: LiveCall) -> None:
        """Add (or replace) a live call, owned by `call.replica`."""

    @abstractmethod
    async def update(self, call_id: str, details: Mapping[str, Any]) -> LiveCall | None:
        """Merge `details` into a live call and keep it alive; None when the call is not live."""

    @abstractmethod
    async def heartbeat(self, replica: str) -> int:
        """Keep every live call of `replica` alive for another `live_ttl_s`; returns how many it holds."""

    @abstractmethod
    async def unregister(self, call_id: str) -> bool:
        """Forget a live call; False when it was not live."""

    @abstractmethod
    async def get_live(self, call_id: str) -> LiveCall | None: ...

    @abstractmethod
    async def list_live(self, replica: str | None = None) -> list[LiveCall]:
        """Live calls (of one replica, or all), oldest first."""

    # --- call records -------------------------------------------------------------------------------

    @abstractmethod
    async def save_record(self, record: CallRecord) -> None:
        """Keep `record` (replacing one with the same call id), dropping the oldest beyond `records_kept`."""

    @abstractmethod
    async def get_record(self, call_id: str) -> CallRecord | None: ...

    @abstractmethod
    async def list_records(self, limit: int = 50, before: float | None = None) -> list[CallRecord]:
        """Up to `limit` (at most MAX_RECORDS_PAGE) records, newest start first; with `before`, only calls
        that started strictly before that Unix time (the next page)."""

    # --- concurrency slots --------------------------------------------------------------------------

    @abstractmethod
    async def claim_slot(self, scope: str, holder: str, limit: int) -> bool:
        """Atomically take one of `limit` slots of `scope` (a tenant, an agent) for `holder` (a call id).
        Claiming a slot already held renews it and always succeeds, so owners renew by claiming again;
        a slot not renewed within `live_ttl_s` (its replica died) frees itself."""

    @abstractmethod
    async def release_slot(self, scope: str, holder: str) -> bool:
        """Give back `holder`'s slot; False when it held none (releasing twice frees one slot, not two)."""

    @abstractmethod
    async def slots_in_use(self, scope: str) -> int: ...

    # --- control commands ---------------------------------------------------------------------------

    @abstractmethod
    async def send_command(self, command: CallCommand) -> bool:
        """Deliver `command` to the replica owning its call; False when the call is not live or its
        replica is not listening."""

    @abstractmethod
    async def subscribe(self, replica: str) -> CommandSubscription:
        """Start receiving the commands for `replica`'s calls; listening when this returns."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections; the stored state stays (for MemoryStore it goes with the process)."""


def _page_size(limit: int) -> int:
    return max(0, min(limit, MAX_RECORDS_PAGE))


# --- in memory --------------------------------------------------------------------------------------


class _MemorySubscription(CommandSubscription):
    def __init__(self, replica: str, registry: dict[str, set[asyncio.Queue[CallCommand]]]) -> None:
        super().__init__(replica)
        self._queue: asyncio.Queue[CallCommand] = asyncio.Queue()
        self._registry = registry
        registry.setdefault(replica, set()).add(self._queue)

    async def next(self, timeout_s: float | None = None) -> CallCommand | None:
        try:
            return await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            return None

    async def aclose(self) -> None:
        listeners = self._registry.get(self.replica, set())
        listeners.discard(self._queue)
        if not listeners:
            self._registry.pop(self.replica, None)


class MemoryStore(CallStore):
    """Everything in this process's memory: one gateway process, nothing shared, gone on restart."""

    def __init__(
        self, live_ttl_s: float = DEFAULT_LIVE_TTL_S, records_kept: int = DEFAULT_RECORDS_KEPT
    ) -> None:
        super().__init__(live_ttl_s, records_kept)
        self._live: dict[str, tuple[LiveCall, float]] = {}  # call id -> (call, monotonic deadline)
        self._records: dict[str, CallRecord] = {}
        self._slots: dict[str, dict[str, float]] = {}  # scope -> holder -> monotonic deadline
        self._listeners: dict[str, set[asyncio.Queue[CallCommand]]] = {}

    def _deadline(self) -> float:
        return time.monotonic() + self.live_ttl_s

    def _alive(self, call_id: str) -> LiveCall | None:
        entry = self._live.get(call_id)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._live[call_id]
            return None
        return entry[0]

    async def register(self, call: LiveCall) -> None:
        details = json.loads(json.dumps(dict(call.details)))  # stored as JSON, as Redis stores them
        self._live[call.call_id] = (replace(call, details=details), self._deadline())

    async def update(self, call_id: str, details: Mapping[str, Any]) -> LiveCall | None:
        call = self._alive(call_id)
        if call is None:
            return None
        # A JSON round trip, as Redis stores them: callers see the same values from both stores.
        merged = {**call.details, **json.loads(json.dumps(dict(details)))}
        call = replace(call, details=merged)
        self._live[call_id] = (call, self._deadline())
        return call

    async def heartbeat(self, replica: str) -> int:
        held = await self.list_live(replica)
        deadline = self._deadline()
        for call in held:
            self._live[call.call_id] = (call, deadline)
        return len(held)

    async def unregister(self, call_id: str) -> bool:
        alive = self._alive(call_id) is not None
        self._live.pop(call_id, None)
        return alive

    async def get_live(self, call_id: str) -> LiveCall | None:
        return self._alive(call_id)

    async def list_live(self, replica: str | None = None) -> list[LiveCall]:
        calls = [call for call_id in list(self._live) if (call := self._alive(call_id)) is not None]
        calls = [call for call in calls if replica is None or call.replica == replica]
        return sorted(calls, key=lambda call: (call.started_at, call.call_id))

    async def save_record(self, record: CallRecord) -> None:
        self._records[record.call_id] = record
        excess = len(self._records) - self.records_kept
        if excess > 0:
            for oldest in sorted(self._records.values(), key=_record_order)[:excess]:
                del self._records[oldest.call_id]

    async def get_record(self, call_id: str) -> CallRecord | None:
        return self._records.get(call_id)

    async def list_records(self, limit: int = 50, before: float | None = None) -> list[CallRecord]:
        records = (r for r in self._records.values() if before is None or r.started_at < before)
        return sorted(records, key=_record_order, reverse=True)[: _page_size(limit)]

    def _holders(self, scope: str) -> dict[str, float]:
        """The scope's unexpired holders; a scope left empty is forgotten, so scopes never pile up."""
        now = time.monotonic()
        holders = {h: deadline for h, deadline in self._slots.pop(scope, {}).items() if deadline > now}
        if holders:
            self._slots[scope] = holders
        return holders

    async def claim_slot(self, scope: str, holder: str, limit: int) -> bool:
        holders = self._holders(scope)
        if holder not in holders and len(holders) >= limit:
            return False
        holders[holder] = self._deadline()
        self._slots[scope] = holders
        return True

    async def release_slot(self, scope: str, holder: str) -> bool:
        holders = self._holders(scope)
        released = holders.pop(holder, None) is not None
        if not holders:
            self._slots.pop(scope, None)
        return released

    async def slots_in_use(self, scope: str) -> int:
        return len(self._holders(scope))

    async def send_command(self, command: CallCommand) -> bool:
        call = self._alive(command.call_id)
        listeners = self._listeners.get(call.replica, set()) if call is not None else set()
        for queue in listeners:
            queue.put_nowait(command)
        return bool(listeners)

    async def subscribe(self, replica: str) -> CommandSubscription:
        return _MemorySubscription(replica, self._listeners)

    async def aclose(self) -> None:
        pass  # no connections to release


def _record_order(record: CallRecord) -> tuple[float, str]:
    # Redis orders equal scores by member bytes; UTF-8 byte order is code point order, as Python compares.
    return (record.started_at, record.call_id)


# --- Redis ------------------------------------------------------------------------------------------

# Scripts build some key names from a prefix argument, so this store needs a single Redis server (or a
# primary with replicas), not Redis Cluster.

_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: the replica's call-id set. ARGV: live-key prefix, ttl ms, replica. Calls that expired or moved to
# another replica leave the set here.
_HEARTBEAT = """
local held = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. id
  if redis.call('HGET', key, 'replica') == ARGV[3] then
    redis.call('PEXPIRE', key, ARGV[2])
    held = held + 1
  else
    redis.call('SREM', KEYS[1], id)
  end
end
if held > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return held
"""

# KEYS: records index, the record's key. ARGV: record JSON, started_at, call id, records kept, record prefix.
_SAVE_RECORD = """
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[4])
if excess > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, excess - 1)) do
    redis.call('DEL', ARGV[5] .. id)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
end
return excess
"""

# Slots are zset members scored by their expiry on the server's clock, so replicas' clocks never matter.
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: the scope's slots. ARGV: holder, limit, ttl ms.
_CLAIM_SLOT = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

_SLOTS_IN_USE = _NOW_MS + "\nreturn redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')\n"


class _RedisSubscription(CommandSubscription):
    def __init__(self, replica: str, pubsub: Any, where: str) -> None:
        super().__init__(replica)
        self._pubsub = pubsub
        self._where = where

    async def next(self, timeout_s: float | None = None) -> CallCommand | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=remaining)
            except RedisError as exc:
                raise StoreError(f"{self._where}: commands for replica {self.replica}: {exc}") from exc
            if message is not None and message.get("type") == "message":
                try:
                    return CallCommand.from_json(message["data"])
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("%s: dropped malformed command %r (%s)", self._where, message["data"], exc)
            if deadline is not None and time.monotonic() >= deadline:
                return None

    async def aclose(self) -> None:
        try:
            await self._pubsub.unsubscribe()
        except RedisError:
            pass  # the connection is going anyway
        await self._pubsub.aclose()


class RedisStore(CallStore):
    """State in Redis, shared by every replica pointing at the same server and prefix.

    Keys under `prefix`: `live:<call>` (hash: the call, its owner, `d:<name>` details; expires),
    `live` (set of live call ids), `replica:<id>` (set of a replica's call ids), `record:<call>` (JSON),
    `records` (zset by start time), `slots:<scope>` (zset of holders by expiry) and the pub/sub channel
    `commands:<replica>`. Sets are pruned of expired calls when read.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "duplexgate",
        password: str | None = None,
        live_ttl_s: float = DEFAULT_LIVE_TTL_S,
        records_kept: int = DEFAULT_RECORDS_KEPT,
    ) -> None:
        super().__init__(live_ttl_s, records_kept)
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise StoreError(f"store url {url!r} should start with redis://, rediss:// or unix://")
        server = (
            parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}{parts.path}"
        )
        self.where = f"redis store {server} ({prefix})"  # never the password a URL may hold
        self.prefix = prefix
        self._client = redis.Redis.from_url(url, password=password, decode_responses=True)
        self._ttl_ms = max(1, round(live_ttl_s * 1000))
        self._update = self._client.register_script(_UPDATE)
        self._heartbeat = self._client.register_script(_HEARTBEAT)
        self._save_record = self._client.register_script(_SAVE_RECORD)
        self._claim_slot = self._client.register_script(_CLAIM_SLOT)
        self._slots_in_use = self._client.register_script(_SLOTS_IN_USE)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @contextmanager
    def _doing(self, what: str) -> Iterator[None]:
        try:
            yield
        except RedisError as exc:
            raise StoreError(f"{self.where}: {what}: {type(exc).__name__}: {exc}") from exc

    def _live_call(self, fields: Mapping[str, str]) -> LiveCall | None:
        if "call" not in fields:
            return None
        core = json.loads(fields["call"])
        details = {name[2:]: json.loads(value) for name, value in fields.items() if name.startswith("d:")}
        return LiveCall(
            call_id=core["call_id"],
            replica=core["replica"],
            agent=core["agent"],
            caller=core["caller"],
            called=core["called"],
            started_at=core["started_at"],
            details=details,
        )

    async def register(self, call: LiveCall) -> None:
        key = self._key("live", call.call_id)
        fields = {"call": call.core_json(), "replica": call.replica}
        fields.update({f"d:{name}": json.dumps(value) for name, value in call.details.items()})
        replica_key = self._key("replica", call.replica)
        with self._doing(f"register call {call.call_id}"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping=fields)
                pipe.pexpire(key, self._ttl_ms)
                pipe.sadd(self._key("live"), call.call_id)
                pipe.sadd(replica_key, call.call_id)
                pipe.pexpire(replica_key, self._ttl_ms)
                await pipe.execute()

    async def update(self, call_id: str, details: Mapping[str, Any]) -> LiveCall | None:
        pairs = [part for name, value in details.items() for part in (f"d:{name}", json.dumps(value))]
        with self._doing(f"update call {call_id}"):
            flat = await self._update(keys=[self._key("live", call_id)], args=[self._ttl_ms, *pairs])
        if not flat:
            return None
        return self._live_call(dict(zip(flat[::2], flat[1::2], strict=True)))

    async def heartbeat(self, replica: str) -> int:
        with self._doing(f"heartbeat of replica {replica}"):
            return int(
                await self._heartbeat(
                    keys=[self._key("replica", replica)],
                    args=[self._key("live", ""), self._ttl_ms, replica],
                )
            )

    async def unregister(self, call_id: str) -> bool:
        with self._doing(f"unregister call {call_id}"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._key("live", call_id))
                pipe.srem(self._key("live"), call_id)
                deleted, _ = await pipe.execute()
        return bool(deleted)

    async def get_live(self, call_id: str) -> LiveCall | None:
        with self._doing(f"get call {call_id}"):
            return self._live_call(await self._client.hgetall(self._key("live", call_id)))

    async def list_live(self, replica: str | None = None) -> list[LiveCall]:
        with self._doing("list live calls"):
            call_ids = sorted(await self._client.smembers(self._key("live")))
            async with self._client.pipeline(transaction=False) as pipe:
                for call_id in call_ids:
                    pipe.hgetall(self._key("live", call_id))
                found = await pipe.execute()
            calls = []
            gone = []
            for call_id, fields in zip(call_ids, found, strict=True):
                call = self._live_call(fields)
                if call is None:
                    gone.append(call_id)
                elif replica is None or call.replica == replica:
                    calls.append(call)
            if gone:
                await self._client.srem(self._key("live"), *gone)
        return sorted(calls, key=lambda call: (call.started_at, call.call_id))

    async def save_record(self, record: CallRecord) -> None:
        with self._doing(f"save the record of call {record.call_id}"):
            await self._save_record(
                keys=[self._key("records"), self._key("record", record.call_id)],
                args=[
                    record.to_json(),
                    repr(float(record.started_at)),
                    record.call_id,
                    self.records_kept,
                    self._key("record", ""),
                ],
            )

    async def get_record(self, call_id: str) -> CallRecord | None:
        with self._doing(f"get the record of call {call_id}"):
            text = await self._client.get(self._key("record", call_id))
        return None if text is None else CallRecord.from_json(text)

    async def list_records(self, limit: int = 50, before: float | None = None) -> list[CallRecord]:
        size = _page_size(limit)
        if size == 0:
            return []
        top = "+inf" if before is None else f"({before!r}"
        with self._doing("list call records"):
            call_ids = await self._client.zrevrangebyscore(
                self._key("records"), top, "-inf", start=0, num=size
            )
            if not call_ids:
                return []
            texts = await self._client.mget([self._key("record", call_id) for call_id in call_ids])
        # A record trimmed between the two reads is simply not listed.
        return [CallRecord.from_json(text) for text in texts if text is not None]

    async def claim_slot(self, scope: str, holder: str, limit: int) -> bool:
        with self._doing(f"claim a slot of {scope} for {holder}"):
            claimed = await self._claim_slot(
                keys=[self._key("slots", scope)], args=[holder, limit, self._ttl_ms]
            )
        return bool(claimed)

    async def release_slot(self, scope: str, holder: str) -> bool:
        with self._doing(f"release the slot of {scope} held by {holder}"):
            return bool(await self._client.zrem(self._key("slots", scope), holder))

    async def slots_in_use(self, scope: str) -> int:
        with self._doing(f"count the slots of {scope}"):
            return int(await self._slots_in_use(keys=[self._key("slots", scope)]))

    async def send_command(self, command: CallCommand) -> bool:
        with self._doing(f"send {command.action} to call {command.call_id}"):
            replica = await self._client.hget(self._key("live", command.call_id), "replica")
            if replica is None:
                return False
            receivers = await self._client.publish(self._key("commands", replica), command.to_json())
        return receivers > 0

    async def subscribe(self, replica: str) -> CommandSubscription:
        channel = self._key("commands", replica)
        pubsub = self._client.pubsub()
        with self._doing(f"subscribe replica {replica} to {channel}"):
            await pubsub.subscribe(channel)
            # Wait for the server's confirmation: a command published before it would be lost.
            deadline = time.monotonic() + 10.0
            while True:
                message = await pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                if message is not None and message.get("type") == "subscribe":
                    break
                if time.monotonic() >= deadline:
                    await pubsub.aclose()
                    raise StoreError(
                        f"{self.where}: no confirmation of the subscription to {channel} in 10 s"
                    )
        return _RedisSubscription(replica, pubsub, self.where)

    async def aclose(self) -> None:
        await self._client.aclose()
