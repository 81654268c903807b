"""Prepared calls: announced by a voice webhook, primed while the phone rings, waiting for their media
stream. The stream may reach any gateway replica, so each prepared call is kept in the call store (claimed
once, by its single-use token) while the replica that answered the webhook primes it and publishes what
priming gave: a remote engine's ticket, which any replica can attach to, or an error. The replica that
primed keeps the priming task itself; a claim on that replica uses it directly.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.api import EngineError, EngineSession
from gateway.config import AgentConfig
from gateway.ops.store import CallStore, PreparedEntry, StoreError

log = logging.getLogger(__name__)

POLL_S = 0.02  # a replica waiting for another's priming looks this often
# The replica that answered drops its unclaimed calls when their token TTL is up; the store keeps them this
# much longer only so that a replica which died meanwhile does not leave them behind for good.
STORE_GRACE_S = 10.0


@dataclass
class PreparedCall:
    """A call announced by the voice webhook, its engine session priming, waiting for its stream."""

    call_id: str
    token: str
    agent: AgentConfig
    caller: str | None
    called: str | None
    engine_session: asyncio.Future[EngineSession]
    expiry: asyncio.TimerHandle | None = None
    received_at: float = field(default_factory=time.time)  # when the voice webhook announced it


class PreparedCalls:
    """Single-use, short-lived per-call tokens; an unclaimed call's engine session is freed on expiry."""

    def __init__(self, ttl_s: float, replica: str = "") -> None:
        self.ttl_s, self.replica = ttl_s, replica
        self.store: CallStore | None = None  # where the other replicas find these calls (set by the app)
        self._by_call: dict[str, PreparedCall] = {}
        self.on_expire: Callable[[PreparedCall], None] | None = None  # the recorder keeps its record
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._by_call)

    async def add(self, call: PreparedCall) -> None:
        previous = self._by_call.pop(call.call_id, None)
        if previous is not None:  # the webhook came again for the same call: the newest wins
            _discard(previous)
        call.expiry = asyncio.get_running_loop().call_later(
            self.ttl_s, lambda: self._spawn(self._expire(call.call_id, call.token))
        )
        self._by_call[call.call_id] = call
        if self.store is None:
            return
        entry = PreparedEntry(
            call.call_id, call.agent.name, self.replica, call.caller, call.called, call.received_at
        )
        try:
            await self.store.put_prepared(entry, call.token, self.ttl_s + STORE_GRACE_S)
        except StoreError as exc:  # this replica can still serve the stream itself
            log.error("call %s: prepared call not shared with other replicas: %s", call.call_id, exc)
            return
        call.engine_session.add_done_callback(lambda task: self._spawn(self._publish(call.call_id, task)))

    async def claim(self, call_id: str, token: str) -> PreparedCall | PreparedEntry | None:
        """The prepared call for `call_id` if `token` is its token, once: this replica's own PreparedCall, or
        the store's entry of a call another replica primes (attach with `engine_of`)."""
        local = self._by_call.get(call_id)
        if self.store is not None:
            try:
                entry = await self.store.claim_prepared(call_id, token)
            except StoreError as exc:
                log.error("call %s: cannot claim through the store (%s); trying this replica", call_id, exc)
            else:
                if entry is None:
                    return None
                return self._take(call_id) if local is not None else entry
        if local is None or not hmac.compare_digest(local.token.encode(), token.encode()):
            return None
        return self._take(call_id)

    async def engine_of(
        self, entry: PreparedEntry, attach: Callable[[str], EngineSession] | None
    ) -> EngineSession:
        """The session another replica primed for `entry`, once its priming is published."""
        assert self.store is not None
        deadline = time.monotonic() + self.ttl_s
        while (published := await self.store.prepared_engine(entry.call_id)) is None:
            if time.monotonic() > deadline:
                raise EngineError(f"replica {entry.replica} never finished priming call {entry.call_id}")
            await asyncio.sleep(POLL_S)
        outcome = json.loads(published)
        if "error" in outcome:
            raise EngineError(f"priming on replica {entry.replica} failed: {outcome['error']}")
        if "ticket" not in outcome or attach is None:
            raise EngineError(
                f"call {entry.call_id} was primed in replica {entry.replica}'s embedded engine, which no "
                "other replica can reach: send the stream to that replica, or run engine workers ([workers])"
            )
        return attach(outcome["ticket"])

    def discard_all(self) -> None:
        for call in self._by_call.values():
            _discard(call)
        self._by_call.clear()

    def _take(self, call_id: str) -> PreparedCall | None:
        call = self._by_call.pop(call_id, None)
        if call is not None and call.expiry is not None:
            call.expiry.cancel()
        return call

    async def _publish(self, call_id: str, task: asyncio.Future[EngineSession]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        ticket = getattr(task.result(), "ticket", None) if error is None else None
        if error is not None:
            outcome: dict[str, str] = {"error": f"{type(error).__name__}: {error}"}
        elif ticket is not None:
            outcome = {"ticket": ticket.to_json()}
        else:
            outcome = {"embedded": self.replica}
        assert self.store is not None
        try:
            await self.store.put_prepared_engine(call_id, json.dumps(outcome), self.ttl_s + STORE_GRACE_S)
        except StoreError as exc:
            log.error("call %s: priming not published to other replicas: %s", call_id, exc)

    async def _expire(self, call_id: str, token: str) -> None:
        call = self._by_call.get(call_id)
        if call is None or call.token != token:
            return
        del self._by_call[call_id]
        unclaimed = True
        if self.store is not None:
            try:
                unclaimed = await self.store.drop_prepared(call_id)
            except StoreError as exc:
                log.error("call %s: cannot tell whether another replica took it: %s", call_id, exc)
        if not unclaimed and _remote(call):
            return  # another replica's stream attached to it: the session is theirs now
        log.warning(
            "call %s: no media stream within %.0f s of the voice webhook; engine session freed",
            call_id,
            self.ttl_s,
        )
        _discard(call)
        if unclaimed and self.on_expire is not None:
            self.on_expire(call)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _remote(call: PreparedCall) -> bool:
    task = call.engine_session
    return (
        task.done() and not task.cancelled() and task.exception() is None and hasattr(task.result(), "ticket")
    )


def _discard(call: PreparedCall) -> None:
    if call.expiry is not None:
        call.expiry.cancel()
    task = call.engine_session
    if not task.done():
        task.cancel()
    task.add_done_callback(_close_if_opened)


def _close_if_opened(task: asyncio.Future[EngineSession]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    closing = asyncio.ensure_future(task.result().close())
    _background.add(closing)
    closing.add_done_callback(_background.discard)


_background: set[asyncio.Future[Any]] = set()
