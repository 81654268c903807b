"""The switchboard: the calls this gateway holds, prepared by a voice webhook and waiting for their media
stream, or live, and what happens around them. It opens a call's engine session (CRM lookup, role prompt,
priming), tells a call's notices to their listeners (escalation, the recorder, webhooks), starts
escalations and publishes call events. It knows no carrier: the edge hands it the carrier's transfer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from engine.api import Engine, EngineBusy, EngineSession, SessionSpec
from gateway.agents.prompts import RolePrompt, prepare_role_prompt, reanchor_prompt
from gateway.agents.templates import PromptError, PromptRenderer
from gateway.call.escalation import EscalationActions, EscalationPolicy, escalate
from gateway.call.incoming import IncomingCall
from gateway.call.notices import CallNotice, NoticeHook, NoticeKind
from gateway.call.session import CallSession
from gateway.config import AgentConfig, GatewayConfig
from gateway.ops.auth_throttle import AuthThrottle
from gateway.ops.metrics import GatewayMetrics
from gateway.ops.records import CallRecord
from gateway.ops.store import PreparedEntry
from gateway.ops.webhooks import WebhookEvent, WebhookSender
from gateway.prepared import PreparedCall, PreparedCalls

log = logging.getLogger(__name__)

# Role prompts are kept while their call is prepared or live (re-anchoring reads them) and dropped when it
# ends; this bound only guards against calls that never end cleanly.
ROLE_PROMPTS_KEPT = 4096

# hand a live call to a number through its carrier; True when the carrier takes it on once our stream ends
Transfer = Callable[[CallSession, str], Awaitable[bool]]


class Switchboard:
    """The calls this gateway holds, and what happens around them: opening their engine sessions (role
    prompt, then priming), telling notices to their listeners, escalating, publishing call events."""

    def __init__(self, config: GatewayConfig, engine: Engine, transfer: Transfer | None = None) -> None:
        self.config = config
        self.engine = engine
        self._transfer_call = transfer
        self.prepared = PreparedCalls(config.server.call_token_ttl_s)
        self.draining = False  # set by `drain`: no new calls
        self.calls: dict[str, CallSession] = {}
        self.notice_hooks: list[NoticeHook] = []  # later issues (escalation, records) subscribe here
        self.renderer = PromptRenderer(config.templates_dir)
        self.role_prompts: OrderedDict[str, RolePrompt] = OrderedDict()  # call id -> its prompt's record
        self.escalated: set[str] = set()  # calls that have escalated (once per call)
        self.auth_throttle = AuthThrottle(config.server.auth_failures_per_minute)  # carrier and control API
        self._tasks: set[asyncio.Task[None]] = set()
        self.escalation_actions = EscalationActions(
            transfer=self._transfer, webhook=self._escalation_webhook, notify=self._escalation_notice
        )
        self.notice_hooks.append(self._escalation_trigger)
        self.webhooks = WebhookSender() if config.webhooks.url else None
        self.notice_hooks.append(self._publish_notice)
        self.metrics: GatewayMetrics | None = None  # set by the app when metrics are on
        # (call id, agent, caller, called, received at, end reason): the record of a call that never
        # streamed; set by the app to the recorder's
        self.record_unanswered: Callable[..., None] = lambda *args, **kwargs: None
        if isinstance(getattr(engine, "failover_hooks", None), list):  # remote workers: a call may move
            engine.failover_hooks.append(self._failed_over)  # type: ignore[attr-defined]
            engine.reanchor = self._failover_prompt  # type: ignore[attr-defined]

    # --- escalation -----------------------------------------------------------------------------------

    def _escalation_trigger(self, notice: CallNotice) -> None:
        """Notice hook: start the agent's escalation when a notice is one of its triggers."""
        call = self.calls.get(notice.call_id)
        if call is None or call.ended or notice.call_id in self.escalated:
            return
        policy = self.config.agents[call.agent].escalation if call.agent in self.config.agents else None
        if policy is None:
            return
        trigger = notice.kind
        if trigger == NoticeKind.DTMF and notice.detail not in policy.dtmf:
            return
        if trigger == NoticeKind.CONTEXT_HORIZON and notice.detail != "hand_off":
            return  # wrap_up and reanchor are the limit's own course
        if policy.actions_for(trigger):
            self.start_escalation(call, policy, trigger, notice.detail)

    def start_escalation(
        self, call: CallSession, policy: EscalationPolicy, trigger: str, reason: str
    ) -> None:
        self.escalated.add(call.call_id)
        task = asyncio.create_task(
            escalate(call, policy, trigger, reason, self.escalation_actions), name=f"escalate:{call.call_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def escalate(self, call_id: str, trigger: str = "api", reason: str = "") -> bool:
        """Escalate a live call held here (control API); False when it is not here or already escalated."""
        call = self.calls.get(call_id)
        if call is None or call.ended or call_id in self.escalated or call.agent not in self.config.agents:
            return False
        policy = self.config.agents[call.agent].escalation
        if not policy.actions_for(trigger):
            policy = replace(policy, actions={**policy.actions, trigger: ("hangup",)})
        self.start_escalation(call, policy, trigger, reason)
        return True

    async def _transfer(self, call: CallSession, target: str) -> bool:
        if self._transfer_call is None:
            raise RuntimeError("no carrier call control to transfer with")
        return await self._transfer_call(call, target)

    def _escalation_notice(self, call: CallSession, notice: CallNotice) -> None:
        self.notice(notice)

    def _escalation_webhook(self, call: CallSession, trigger: str, reason: str) -> None:
        at_s = round(call.caller_clock_s, 3)
        self.publish("call.escalated", call.call_id, {"trigger": trigger, "reason": reason, "at_s": at_s})

    # --- call events to the business's webhook ---------------------------------------------------------

    def publish(self, kind: str, call_id: str, data: Mapping[str, Any]) -> None:
        """Queue a signed call event for the configured webhook (never blocks; no URL: nothing to do)."""
        hooks = self.config.webhooks
        if self.webhooks is None or hooks.secret is None:
            return
        try:
            self.webhooks.emit(hooks.url, hooks.secret, WebhookEvent.create(kind, call_id, data))
        except ValueError as exc:  # data that is not plain JSON: a bug here, never the call's problem
            log.warning("call %s: %s event not sent (%s)", call_id, kind, exc)

    def _publish_notice(self, notice: CallNotice) -> None:
        call = self.calls.get(notice.call_id)
        if notice.kind == NoticeKind.STARTED and call is not None:
            data = {"caller": call.started.caller, "called": call.started.called, "agent": call.agent}
            self.publish("call.started", notice.call_id, data)
        elif notice.kind == NoticeKind.WARNING:
            self.publish("call.warning", notice.call_id, {"detail": notice.detail, "at_s": notice.at_s})

    def publish_record(self, record: CallRecord) -> None:
        """Record hook: the call.ended event carries the whole call record."""
        self.publish("call.ended", record.call_id, {"record": record.to_dict()})

    def reanchor_prompt(
        self,
        call_id: str,
        agent: AgentConfig,
        said: Sequence[str],
        engine_budget: int | None = None,
        role_text: str = "",
    ) -> str:
        """The call's role prompt (`role_text` when this replica did not render it) plus the agent's recent
        words, sanitised and held to the agent's token budget and to what the engine's window leaves."""
        role = self.role_prompts.get(call_id)
        text = role.text if role is not None else role_text
        budget = min(agent.max_prompt_tokens, engine_budget if engine_budget is not None else 1 << 30)
        return reanchor_prompt(text, said, self.engine.count_prompt_tokens, budget)

    # --- calls that move between engine workers -------------------------------------------------------

    def _call_of(self, session: object) -> CallSession | None:
        return next((call for call in self.calls.values() if call.engine_session is session), None)

    def _failover_prompt(self, session: Any, said: Sequence[str], budget: int) -> str | None:
        """What a call whose worker died is primed with on the next: its role prompt and recent words."""
        call = self._call_of(session)
        if call is None or call.agent not in self.config.agents:
            return None
        agent = self.config.agents[call.agent]
        return self.reanchor_prompt(call.call_id, agent, said, budget, getattr(session, "role_prompt", ""))

    def _failed_over(self, session: Any, failover: Any) -> None:
        """A call's session moved to another worker: its record and a call.failover event say so."""
        call = self._call_of(session)
        if call is None or call.ended:
            return
        data = {
            "from_worker": failover.from_worker,
            "to_worker": failover.to_worker,
            "why": failover.why,
            "gap_ms": round(failover.gap_s * 1000),
            "replayed_frames": failover.replayed_frames,
        }
        at_s = round(call.caller_clock_s, 3)
        detail = f"{failover.from_worker} -> {failover.to_worker}"
        self.notice(CallNotice(NoticeKind.ENGINE_FAILOVER, call.call_id, at_s, detail, data=data))
        self.publish("call.failover", call.call_id, {**data, "at_s": at_s})

    async def claim_prepared(
        self, call_id: str, token: str
    ) -> tuple[AgentConfig, str | None, str | None, Any] | None:
        """(agent, caller, called, engine session awaitable) of the prepared call `token` claims, wherever
        it was primed; None when the token is unknown, expired, used or for another call."""
        claimed = await self.prepared.claim(call_id, token)
        if claimed is None:
            return None
        if isinstance(claimed, PreparedCall):
            return claimed.agent, claimed.caller, claimed.called, claimed.engine_session
        agent = self.config.agents.get(claimed.agent) or self.config.agent_for(claimed.called)
        opening = asyncio.create_task(self._attach(claimed), name=f"attach:{call_id}")
        return agent, claimed.caller, claimed.called, opening

    async def _attach(self, entry: PreparedEntry) -> EngineSession:
        """The session another replica primed; its role prompt is kept for re-anchoring and the record."""
        session = await self.prepared.engine_of(entry, getattr(self.engine, "attach", None))
        text = getattr(session, "role_prompt", "")
        self.role_prompts[entry.call_id] = RolePrompt(text, self.engine.count_prompt_tokens(text), None)
        return session

    def open_engine_session(self, agent: AgentConfig, call: IncomingCall) -> asyncio.Task[EngineSession]:
        return asyncio.create_task(self._prime(agent, call), name=f"open:{call.call_id}")

    async def _prime(self, agent: AgentConfig, call: IncomingCall) -> EngineSession:
        """Look the caller up (within the CRM deadline), render the agent's role prompt, prime the session."""
        try:
            role = await prepare_role_prompt(
                agent, call, self.config.crm, self.renderer, self.engine.count_prompt_tokens
            )
        except PromptError as exc:  # `duplexgate config check` catches these before calls do
            log.error("call %s: agent %s has no usable role prompt: %s", call.call_id, agent.name, exc)
            raise
        self.role_prompts[call.call_id] = role
        metrics = self.metrics
        if metrics is not None and role.crm is not None:
            metrics.crm_lookup(role.crm.status, role.crm.elapsed_s, role.crm.cached)
        while len(self.role_prompts) > ROLE_PROMPTS_KEPT:
            self.role_prompts.popitem(last=False)
        crm = role.crm.summary() if role.crm is not None else None
        if crm is not None:  # the lookup key is usually the caller's number
            crm["key"] = self.config.number(crm["key"])
        log.info("call %s: role prompt %d tokens (%s); CRM %s", call.call_id, role.tokens, role.template, crm)
        if role.degraded:
            log.warning("call %s: CRM record left out of the prompt: %s", call.call_id, role.degraded)
        spec = SessionSpec(voice=agent.voice, prompt=role.text, seed=agent.seed, sampling=agent.sampling)
        if metrics is None:
            return await self.engine.open(spec)
        asked = time.perf_counter()
        try:
            session = await self.engine.open(spec)
        except EngineBusy as exc:
            metrics.refused(str(exc))
            raise
        metrics.primed(time.perf_counter() - asked)
        return session

    def notice(self, notice: CallNotice) -> None:
        for hook in self.notice_hooks:
            try:
                hook(notice)
            except Exception:
                log.exception("call %s: notice hook %r failed", notice.call_id, hook)
        if notice.kind == NoticeKind.ENDED:  # every listener has seen the end (the recorder its prompt)
            self.forget(notice.call_id)

    def forget(self, call_id: str) -> None:
        """Drop what was kept for a call that is over, so nothing here grows with the calls served."""
        self.escalated.discard(call_id)
        self.role_prompts.pop(call_id, None)

    async def drain(self, grace_s: float) -> None:
        """Stop taking calls (`draining`: new voice webhooks and unprepared streams are refused, /readyz
        says so), let the calls held here finish for up to `grace_s`, then end the rest (each gets its
        record as any ended call does)."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        log.warning(
            "draining: no new calls; waiting up to %.0f s for %d live and %d prepared calls",
            grace_s,
            len(self.calls),
            len(self.prepared),
        )
        while (self.calls or len(self.prepared)) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if self.calls:
            log.warning("drain grace over: ending %d calls", len(self.calls))
        await asyncio.gather(
            *(call.end("server_shutdown") for call in list(self.calls.values())), return_exceptions=True
        )

    async def shutdown(self) -> None:
        self.prepared.discard_all()
        await asyncio.gather(
            *(call.end("server_shutdown") for call in list(self.calls.values())), return_exceptions=True
        )
        await asyncio.gather(
            *(adapter.aclose() for adapter in self.config.crm.values()), return_exceptions=True
        )
