"""The call store: live calls (which replica owns each, kept alive by heartbeats), past call records, and
control commands routed to the replica that owns a call, behind one async interface with two
implementations: `MemoryStore` here (one process, the embedded default) and `RedisStore` in
redis_store.py (shared by every gateway replica)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sortedcontainers import SortedList

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
class PreparedEntry:
    """A call a voice webhook announced and some replica is priming, waiting for its media stream, which
    may reach any replica: the stream's token claims it once."""

    call_id: str
    agent: str
    replica: str  # the replica priming it (it publishes the engine ticket for the others)
    caller: str | None = None
    called: str | None = None
    received_at: float = 0.0  # Unix seconds

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> PreparedEntry:
        return cls(**json.loads(text))


def token_digest(token: str) -> str:
    """What the store keeps of a call token: enough to check one, useless to present."""
    return hashlib.sha256(token.encode()).hexdigest()


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
    replica. At most `records_kept` call records are kept, the oldest (by start time) dropped first."""

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

    # --- prepared calls -----------------------------------------------------------------------------

    @abstractmethod
    async def put_prepared(self, entry: PreparedEntry, token: str, ttl_s: float) -> None:
        """Keep a prepared call for `ttl_s`, claimable once with `token`."""

    @abstractmethod
    async def claim_prepared(self, call_id: str, token: str) -> PreparedEntry | None:
        """The prepared call if `token` is its token, taken atomically: no other claim gets it."""

    @abstractmethod
    async def drop_prepared(self, call_id: str) -> bool:
        """Forget an unclaimed prepared call; False when it was claimed (or expired) already."""

    @abstractmethod
    async def put_prepared_engine(self, call_id: str, value: str, ttl_s: float) -> None:
        """Publish what priming a prepared call gave (a JSON engine ticket or error) for `ttl_s`."""

    @abstractmethod
    async def prepared_engine(self, call_id: str) -> str | None:
        """What priming the prepared call gave; None while it is still priming (or gone)."""

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


def page_size(limit: int) -> int:
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
        self._order = SortedList()  # (started_at, call_id) of every kept record: O(log n) save, list, evict
        self._listeners: dict[str, set[asyncio.Queue[CallCommand]]] = {}
        # call id -> (entry, token digest, monotonic deadline); and what priming gave, with its deadline
        self._prepared: dict[str, tuple[PreparedEntry, str, float]] = {}
        self._prepared_engine: dict[str, tuple[str, float]] = {}

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
        previous = self._records.get(record.call_id)
        if previous is not None:
            self._order.remove(_record_order(previous))
        self._records[record.call_id] = record
        self._order.add(_record_order(record))
        while len(self._order) > self.records_kept:
            del self._records[self._order.pop(0)[1]]

    async def get_record(self, call_id: str) -> CallRecord | None:
        return self._records.get(call_id)

    async def list_records(self, limit: int = 50, before: float | None = None) -> list[CallRecord]:
        end = len(self._order) if before is None else self._order.bisect_left((before, ""))
        keys = self._order[max(0, end - page_size(limit)) : end]
        return [self._records[call_id] for _, call_id in reversed(keys)]

    def _expire_prepared(self) -> None:
        now = time.monotonic()
        for table in (self._prepared, self._prepared_engine):
            for call_id in [key for key, value in table.items() if value[-1] <= now]:
                del table[call_id]

    async def put_prepared(self, entry: PreparedEntry, token: str, ttl_s: float) -> None:
        self._expire_prepared()
        self._prepared[entry.call_id] = (entry, token_digest(token), time.monotonic() + ttl_s)

    async def claim_prepared(self, call_id: str, token: str) -> PreparedEntry | None:
        self._expire_prepared()
        held = self._prepared.get(call_id)
        if held is None or not hmac.compare_digest(held[1], token_digest(token)):
            return None
        del self._prepared[call_id]
        return held[0]

    async def drop_prepared(self, call_id: str) -> bool:
        self._expire_prepared()
        return self._prepared.pop(call_id, None) is not None

    async def put_prepared_engine(self, call_id: str, value: str, ttl_s: float) -> None:
        self._expire_prepared()
        self._prepared_engine[call_id] = (value, time.monotonic() + ttl_s)

    async def prepared_engine(self, call_id: str) -> str | None:
        self._expire_prepared()
        held = self._prepared_engine.get(call_id)
        return None if held is None else held[0]

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
