"""Call records from live calls: each call is registered in the call store while it lasts (kept alive by one
heartbeat task per gateway) and leaves a CallRecord there when it ends, however it ends.

The recorder listens to call notices; store work runs in background tasks, ordered per call, so a slow or
failing store never holds up a call's audio. Store failures are logged with the call id and dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.api import FRAME_S
from gateway.call.notices import CallNotice, Escalation, NoticeKind
from gateway.call.session import CallSession
from gateway.ops.records import CallRecord
from gateway.ops.store import CallStore, LiveCall

if TYPE_CHECKING:
    from gateway.config import AgentConfig
    from gateway.switchboard import Switchboard

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 5.0
FLUSH_TIMEOUT_S = 5.0  # at shutdown, how long pending records may take to reach the store

RecordHook = Callable[[CallRecord], None]


@dataclass
class _CallNotes:
    """What the recorder holds about a call between its start and end notices."""

    call: CallSession
    started_at: float  # Unix seconds
    escalations: list[Escalation] = field(default_factory=list)
    failovers: list[dict[str, Any]] = field(default_factory=list)  # moves to another engine worker


class CallRecorder:
    """Registers live calls in `store` under `replica_id` and saves a record for every call that ends.
    Install `on_notice` as a notice hook, `await start()` once the loop runs, `await aclose()` last."""

    def __init__(
        self,
        gateway: Switchboard,
        store: CallStore,
        replica_id: str,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    ) -> None:
        self.gateway = gateway
        self.store = store
        self.replica_id = replica_id
        self.heartbeat_s = min(heartbeat_s, store.live_ttl_s / 3)  # several beats inside one TTL
        self.record_hooks: list[RecordHook] = []  # told of each saved record (the call.ended webhook)
        self._calls: dict[str, _CallNotes] = {}
        self._chains: dict[str, asyncio.Task[None]] = {}  # call id -> its latest store task
        self._heartbeat: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat(), name=f"heartbeat:{self.replica_id}")

    async def aclose(self) -> None:
        """Stop heartbeating and wait (bounded) for the records of ended calls to be stored."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
        if self._pending:
            _, late = await asyncio.wait(set(self._pending), timeout=FLUSH_TIMEOUT_S)
            for task in late:
                log.error(
                    "replica %s: store write %s still running at shutdown; abandoned", self.replica_id, task
                )
                task.cancel()

    # --- notices ------------------------------------------------------------------------------------

    def on_notice(self, notice: CallNotice) -> None:
        if notice.kind == NoticeKind.STARTED:
            self._on_started(notice)
        elif notice.kind == NoticeKind.ESCALATED:
            self._on_escalated(notice)
        elif notice.kind == NoticeKind.ENGINE_FAILOVER:
            self._on_failover(notice)
        elif notice.kind == NoticeKind.ENDED:
            self._on_ended(notice)

    def _on_started(self, notice: CallNotice) -> None:
        call = self.gateway.calls.get(notice.call_id)
        if call is None:  # notices come from sessions the gateway holds; anything else is not a call
            log.warning("call %s: started notice for a call the gateway does not hold", notice.call_id)
            return
        notes = _CallNotes(call=call, started_at=time.time())
        self._calls[notice.call_id] = notes
        live = LiveCall(
            call_id=notice.call_id,
            replica=self.replica_id,
            agent=self._agent_of(call).name,
            caller=call.started.caller,
            called=call.started.called,
            started_at=notes.started_at,
            details={"stream_id": call.started.stream_id},
        )
        self._then(notice.call_id, self.store.register(live), "register the live call")

    def _on_escalated(self, notice: CallNotice) -> None:
        notes = self._calls.get(notice.call_id)
        if notes is None:
            return
        if notice.escalation is None:
            return
        notes.escalations.append(notice.escalation)
        details = {"escalations": len(notes.escalations), "last_escalation": notice.detail}
        self._then(notice.call_id, self._update(notice.call_id, details), "note the escalation")

    def _on_failover(self, notice: CallNotice) -> None:
        notes = self._calls.get(notice.call_id)
        if notes is None:
            return
        notes.failovers.append({"at_s": notice.at_s, **notice.data})
        details = {"failovers": len(notes.failovers), "worker": notice.data.get("to_worker", "")}
        self._then(notice.call_id, self._update(notice.call_id, details), "note the failover")

    def _on_ended(self, notice: CallNotice) -> None:
        notes = self._calls.pop(notice.call_id, None)
        if notes is None:
            log.warning("call %s ended without a start the recorder saw; no record kept", notice.call_id)
            return
        record = self.build_record(
            notes.call, notes.started_at, notes.escalations, ended_at=time.time(), failovers=notes.failovers
        )
        self._then(notice.call_id, self._finish(record), "store the call record")

    async def _update(self, call_id: str, details: dict[str, Any]) -> None:
        await self.store.update(call_id, details)

    async def _finish(self, record: CallRecord) -> None:
        # The record first: a call must never vanish from the live list before its record exists.
        await self.store.save_record(record)
        await self.store.unregister(record.call_id)
        for hook in self.record_hooks:
            try:
                hook(record)
            except Exception:
                log.exception("call %s: record hook %r failed", record.call_id, hook)

    def record_unstreamed(
        self,
        call_id: str,
        agent: AgentConfig,
        caller: str | None,
        called: str | None,
        received_at: float,
        end_reason: str = "no_media_stream",
    ) -> None:
        """A call the voice webhook announced whose media stream never came (its prepared call expired, or
        no engine slot was free for it: `end_reason` "overflow"): it still gets a record, so no call goes
        unaccounted for."""
        role = self.gateway.role_prompts.pop(call_id, None)
        record = CallRecord(
            call_id=call_id,
            started_at=received_at,
            caller=caller,
            called=called,
            agent=agent.name,
            prompt_sha256=hashlib.sha256(role.text.encode()).hexdigest() if role is not None else "",
            voice=agent.voice,
            seed=agent.seed,
            ended_at=time.time(),
            end_reason=end_reason,
            crm_status=role.crm.status if role is not None and role.crm is not None else None,
        )
        self._then(call_id, self._finish(record), "store the call record")

    # --- records ------------------------------------------------------------------------------------

    def build_record(
        self,
        call: CallSession,
        started_at: float,
        escalations: list[Escalation],
        ended_at: float | None = None,
        failovers: list[dict[str, Any]] | None = None,
    ) -> CallRecord:
        """The record of `call` as it stands now, from the session and what the gateway knows of it."""
        agent = self._agent_of(call)
        role = self.gateway.role_prompts.get(call.call_id)
        session = call.engine_session
        seed = getattr(session, "seed", None)
        first = call.first_bridged_frame
        stats = call.stats
        counters = {
            name: value
            for name, value in vars(stats).items()
            if isinstance(value, int) and not isinstance(value, bool)
        }
        return CallRecord(
            call_id=call.call_id,
            started_at=started_at,
            stream_id=call.started.stream_id,
            caller=call.started.caller,
            called=call.started.called,
            agent=agent.name,
            prompt_sha256=hashlib.sha256(role.text.encode()).hexdigest() if role is not None else "",
            voice=agent.voice,
            seed=seed if isinstance(seed, int) else agent.seed,
            # Caller audio arrives in real time, so its clock places the first bridged frame on the wall.
            answered_at=None if first is None else started_at + first * FRAME_S,
            ended_at=ended_at,
            end_reason=call.end_reason,
            escalations=tuple(escalations),
            crm_status=role.crm.status if role is not None and role.crm is not None else None,
            transcript=tuple(call.transcript),
            counters=counters,
            timeline=self._timeline_of(call),
            failovers=tuple(failovers or ()),
        )

    def _timeline_of(self, call: CallSession) -> dict[str, Any]:
        """The call's duplex timeline summary; empty when the call has none (it failed) or it cannot be
        summarised, which must never cost the record."""
        timeline = getattr(call, "timeline", None)
        if timeline is None:
            return {}
        try:
            return timeline.summary()
        except Exception:
            log.exception("call %s: could not summarise the duplex timeline", call.call_id)
            return {}

    def _agent_of(self, call: CallSession) -> AgentConfig:
        named = getattr(call, "agent", "")  # set by the gateway when it knows the agent (prepared calls)
        if named in self.gateway.config.agents:
            return self.gateway.config.agents[named]
        return self.gateway.config.agent_for(call.started.called)

    # --- background store work ----------------------------------------------------------------------

    def _then(self, call_id: str, work: Coroutine[Any, Any, None], what: str) -> None:
        """Run `work` after the call id's previous store task (a re-used id included), never raising into
        the call."""
        previous = self._chains.get(call_id)

        async def run() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            try:
                await work
            except Exception as exc:
                log.error("call %s: could not %s in the call store: %s", call_id, what, exc)

        task = asyncio.create_task(run(), name=f"record:{call_id}")
        self._chains[call_id] = task
        self._pending.add(task)
        task.add_done_callback(lambda done: self._settled(call_id, done))

    def _settled(self, call_id: str, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if self._chains.get(call_id) is task:
            del self._chains[call_id]

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.store.heartbeat(self.replica_id)
            except Exception as exc:  # the store may come back; calls go on meanwhile
                log.error("replica %s: heartbeat to the call store failed: %s", self.replica_id, exc)
