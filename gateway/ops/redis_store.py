"""The call store in Redis (`RedisStore`): shared by every gateway replica pointing at the same server and
key prefix; the interface and its in-memory twin are in store.py."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.ops.records import CallRecord
from gateway.ops.store import (
    DEFAULT_LIVE_TTL_S,
    DEFAULT_RECORDS_KEPT,
    CallCommand,
    CallStore,
    CommandSubscription,
    LiveCall,
    PreparedEntry,
    StoreError,
    page_size,
    token_digest,
)

log = logging.getLogger(__name__)

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


# KEYS: the prepared call's key. ARGV: the token's digest. Returns the entry once, to the right token.
_CLAIM = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return false end
local entry = redis.call('HGET', KEYS[1], 'entry')
redis.call('DEL', KEYS[1])
return entry
"""


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
    `records` (zset by start time), `prepared:<call>` (hash: the entry and its token's digest; expires),
    `prepared-engine:<call>` (what priming it gave; expires) and the pub/sub channel `commands:<replica>`.
    Sets are pruned of expired calls when read.
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
        self._client = redis.Redis.from_url(
            url,
            password=password,
            decode_responses=True,
            # a pooled connection from before a Redis restart fails once: try again on a fresh one
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
        )
        self._ttl_ms = max(1, round(live_ttl_s * 1000))
        self._update = self._client.register_script(_UPDATE)
        self._heartbeat = self._client.register_script(_HEARTBEAT)
        self._save_record = self._client.register_script(_SAVE_RECORD)
        self._claim = self._client.register_script(_CLAIM)

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
        size = page_size(limit)
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

    async def put_prepared(self, entry: PreparedEntry, token: str, ttl_s: float) -> None:
        key = self._key("prepared", entry.call_id)
        with self._doing(f"keep prepared call {entry.call_id}"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, mapping={"entry": entry.to_json(), "token": token_digest(token)})
                pipe.pexpire(key, max(1, round(ttl_s * 1000)))
                await pipe.execute()

    async def claim_prepared(self, call_id: str, token: str) -> PreparedEntry | None:
        with self._doing(f"claim prepared call {call_id}"):
            text = await self._claim(keys=[self._key("prepared", call_id)], args=[token_digest(token)])
        return None if not text else PreparedEntry.from_json(text)

    async def drop_prepared(self, call_id: str) -> bool:
        with self._doing(f"drop prepared call {call_id}"):
            return bool(await self._client.delete(self._key("prepared", call_id)))

    async def put_prepared_engine(self, call_id: str, value: str, ttl_s: float) -> None:
        with self._doing(f"publish the engine of prepared call {call_id}"):
            key, ttl_ms = self._key("prepared-engine", call_id), max(1, round(ttl_s * 1000))
            await self._client.set(key, value, px=ttl_ms)

    async def prepared_engine(self, call_id: str) -> str | None:
        with self._doing(f"read the engine of prepared call {call_id}"):
            return await self._client.get(self._key("prepared-engine", call_id))

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
