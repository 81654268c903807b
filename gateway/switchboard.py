"""The switchboard: the calls this gateway holds, prepared by a voice webhook and waiting for their media
stream, or live, and what happens around them. It opens a call's engine session (CRM lookup, role prompt,
priming), tells a call's notices to their listeners (escalation, the recorder, webhooks), starts
escalations and publishes call events. It knows no carrier: the edge hands it the carrier's transfer.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
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
from gateway.ops.webhooks import WebhookEvent, WebhookSender

log = logging.getLogger(__name__)

# Role prompts are kept while their call is prepared or live (re-anchoring reads them) and dropped when it
# ends; this bound only guards against calls that never end cleanly.
ROLE_PROMPTS_KEPT = 4096

# hand a live call to a number through its carrier; True when the carrier takes it on once our stream ends
Transfer = Callable[[CallSession, str], Awaitable[bool]]


@dataclass
class PreparedCall:
    """A call announced by the voice webhook, its engine session priming, waiting for its stream."""

    call_id: str
    token: str
    agent: AgentConfig
    caller: str | None
    called: str | None
    engine_session: asyncio.Task[EngineSession]
    expiry: asyncio.TimerHandle | None = None
    received_at: float = field(default_factory=time.time)  # when the voice webhook announced it


class PreparedCalls:
    """Single-use, short-lived per-call tokens; an unclaimed call's engine session is freed on expiry."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._by_call: dict[str, PreparedCall] = {}
        self.on_expire: Callable[[PreparedCall], None] | None = None  # the recorder keeps its record

    def __len__(self) -> int:
        return len(self._by_call)

    def add(self, call: PreparedCall) -> None:
        previous = self._by_call.pop(call.call_id, None)
        if previous is not None:  # the webhook came again for the same call: the newest wins
            _discard(previous)
        call.expiry = asyncio.get_running_loop().call_later(
            self.ttl_s, self._expire, call.call_id, call.token
        )
        self._by_call[call.call_id] = call

    def claim(self, call_id: str, token: str) -> PreparedCall | None:
        """The prepared call for `call_id` if `token` is its token; it can be claimed only once."""
        call = self._by_call.get(call_id)
        if call is None or not hmac.compare_digest(call.token.encode(), token.encode()):
            return None
        del self._by_call[call_id]
        if call.expiry is not None:
            call.expiry.cancel()
        return call

    def discard_all(self) -> None:
        for call in self._by_call.values():
            _discard(call)
        self._by_call.clear()

    def _expire(self, call_id: str, token: str) -> None:
        call = self._by_call.get(call_id)
        if call is not None and call.token == token:
            del self._by_call[call_id]
            log.warning(
                "call %s: no media stream within %.0f s of the voice webhook; engine session freed",
                call_id,
                self.ttl_s,
            )
            _discard(call)
            if self.on_expire is not None:
                self.on_expire(call)


def _discard(call: PreparedCall) -> None:
    if call.expiry is not None:
        call.expiry.cancel()
    task = call.engine_session
    if not task.done():
        task.cancel()
    task.add_done_callback(_close_if_opened)


def _close_if_opened(task: asyncio.Task[EngineSession]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    closing = asyncio.ensure_future(task.result().close())
    _background.add(closing)
    closing.add_done_callback(_background.discard)


_background: set[asyncio.Future[Any]] = set()


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
        self, call_id: str, agent: AgentConfig, said: Sequence[str], engine_budget: int | None = None
    ) -> str:
        """The call's role prompt plus the agent's recent words, sanitised and held to the agent's token
        budget and to what the engine's window leaves (`engine_budget`)."""
        role = self.role_prompts.get(call_id)
        text = role.text if role is not None else ""
        budget = min(agent.max_prompt_tokens, engine_budget if engine_budget is not None else 1 << 30)
        return reanchor_prompt(text, said, self.engine.count_prompt_tokens, budget)

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
