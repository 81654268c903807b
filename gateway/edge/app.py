"""The FastAPI app: Twilio's voice webhook and media-stream WebSocket, wired to CallSessions and the engine.

The voice webhook starts priming the engine session while the phone rings and answers TwiML at once with a
single-use token bound to the CallSid; the media stream is authenticated before it is accepted, then
claims that prepared call with the token from `start.customParameters` and bridges it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from crm_adapters.base import IncomingCall
from engine.api import Engine, EngineSession, SessionSpec
from gateway.agents.prompts import PromptError, PromptRenderer, RolePrompt, prepare_role_prompt
from gateway.call.escalation import EscalationActions, EscalationPolicy, escalate
from gateway.call.events import CallStarted, EndStream, MalformedMessage, OutboundCommand
from gateway.call.session import CallNotice, CallSession, NoticeHook
from gateway.config import AgentConfig, GatewayConfig
from gateway.edge.transports.base import CarrierDialect
from gateway.edge.transports.twilio import (
    MEDIA_PATH,
    VOICE_PATH,
    TwilioCallControl,
    TwilioDialect,
    connect_stream_twiml,
)
from gateway.ops.control import install_control
from gateway.ops.records import CallRecord
from gateway.ops.webhooks import WebhookEvent, WebhookSender

log = logging.getLogger(__name__)

ROLE_PROMPTS_KEPT = 1024  # the newest calls' role-prompt records (what was rendered, CRM outcome)
MAX_MESSAGE_BYTES = 64 * 1024  # Twilio's frames are ~400 B; anything this big is not a media message
TOKEN_PARAMETER = "token"
POLICY_VIOLATION = 1008  # WebSocket close code for a stream we refuse after accepting it


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


class Gateway:
    """Per-app state: configuration, engine, prepared calls and live calls."""

    def __init__(self, config: GatewayConfig, engine: Engine, dialect: TwilioDialect) -> None:
        self.config = config
        self.engine = engine
        self.twilio = dialect
        self.prepared = PreparedCalls(config.server.call_token_ttl_s)
        self.calls: dict[str, CallSession] = {}
        self.notice_hooks: list[NoticeHook] = []  # later issues (escalation, records) subscribe here
        self.renderer = PromptRenderer(config.templates_dir)
        self.role_prompts: OrderedDict[str, RolePrompt] = OrderedDict()  # call id -> its prompt's record
        self.escalated: set[str] = set()  # calls that have escalated (once per call)
        self._tasks: set[asyncio.Task[None]] = set()
        twilio = config.twilio
        self.call_control = TwilioCallControl(twilio.auth_token, twilio.account_sid, twilio.api_base)
        self.escalation_actions = EscalationActions(
            transfer=self._transfer, webhook=self._escalation_webhook, notify=self._escalation_notice
        )
        self.notice_hooks.append(self._escalation_trigger)
        self.webhooks = WebhookSender() if config.webhooks.url else None
        self.notice_hooks.append(self._publish_notice)

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
        if trigger == "dtmf" and notice.detail not in policy.dtmf:
            return
        if trigger == "context_horizon" and notice.detail != "hand_off":
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

    async def _transfer(self, call: CallSession, target: str) -> None:
        await self.call_control.transfer(call.call_id, target, account_sid=call.started.account_id)

    def _escalation_notice(self, call: CallSession, kind: str, detail: str) -> None:
        self.notice(CallNotice(kind, call.call_id, round(call.caller_clock_s, 3), detail))

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
        if notice.kind == "started" and call is not None:
            data = {"caller": call.started.caller, "called": call.started.called, "agent": call.agent}
            self.publish("call.started", notice.call_id, data)
        elif notice.kind == "warning":
            self.publish("call.warning", notice.call_id, {"detail": notice.detail, "at_s": notice.at_s})

    def publish_record(self, record: CallRecord) -> None:
        """Record hook: the call.ended event carries the whole call record."""
        self.publish("call.ended", record.call_id, {"record": record.to_dict()})

    def role_prompt_text(self, call_id: str) -> str:
        role = self.role_prompts.get(call_id)
        return role.text if role is not None else ""

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
        while len(self.role_prompts) > ROLE_PROMPTS_KEPT:
            self.role_prompts.popitem(last=False)
        crm = role.crm.summary() if role.crm is not None else None
        log.info("call %s: role prompt %d tokens (%s); CRM %s", call.call_id, role.tokens, role.template, crm)
        if role.degraded:
            log.warning("call %s: CRM record left out of the prompt: %s", call.call_id, role.degraded)
        spec = SessionSpec(voice=agent.voice, prompt=role.text, seed=agent.seed, sampling=agent.sampling)
        return await self.engine.open(spec)

    def notice(self, notice: CallNotice) -> None:
        for hook in self.notice_hooks:
            try:
                hook(notice)
            except Exception:
                log.exception("call %s: notice hook %r failed", notice.call_id, hook)

    async def shutdown(self) -> None:
        self.prepared.discard_all()
        await asyncio.gather(
            *(call.end("server_shutdown") for call in list(self.calls.values())), return_exceptions=True
        )
        await asyncio.gather(
            *(adapter.aclose() for adapter in self.config.crm.values()), return_exceptions=True
        )


def create_app(config: GatewayConfig, engine: Engine) -> FastAPI:
    """Build the gateway app for `config`, serving calls from `engine` (which the caller owns)."""
    twilio = TwilioDialect(config.twilio.auth_token, config.server.public_url or None)
    gateway = Gateway(config, engine, twilio)
    control = install_control(gateway)  # call store, records, control API
    control.recorder.record_hooks.append(gateway.publish_record)  # call.ended carries the record
    gateway.prepared.on_expire = control.recorder.record_unstreamed  # every call gets a record

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if twilio.auth_token is None:
            log.warning(
                "%s: %s is not set: Twilio signatures are NOT checked; anyone who can reach this server can "
                "place calls. Set it before exposing the gateway.",
                config.source,
                config.twilio.auth_token_env,
            )
        await control.start()
        yield
        await gateway.shutdown()
        await control.aclose()
        if gateway.ops.webhooks is not None:
            await gateway.ops.webhooks.aclose()  # bounded: delivers what it can of the last events

    app = FastAPI(title="duplexgate", lifespan=lifespan)
    app.state.gateway = gateway
    app.state.control = control
    app.include_router(control.router)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Alive: the process answers. Whether it can take a call is /readyz."""
        return {"status": "ok", "calls": len(gateway.calls), "prepared": len(gateway.prepared)}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Ready when the engine would admit a call now (a free slot, steps inside the real-time budget);
        503 with the engine's reason otherwise."""
        admission = await engine.admission()
        body: dict[str, Any] = {
            "status": "ready" if admission.ready else "unready",
            "calls": len(gateway.calls),
        }
        if not admission.ready:
            body["reason"] = admission.reason
        if admission.step_s is not None:
            body["step_ms"] = round(admission.step_s * 1000, 1)
        return JSONResponse(body, status_code=200 if admission.ready else 503)

    @app.post(VOICE_PATH)
    async def twilio_voice(request: Request) -> Response:
        body = (await request.body()).decode("utf-8", errors="replace")
        form = parse_qsl(body, keep_blank_values=True)  # exact values: signatures cover them byte for byte
        if not twilio.verify_webhook(request.url.path, request.url.query, form, request.headers):
            log.warning("voice webhook: bad or missing X-Twilio-Signature from %s; refused", request.client)
            return Response("invalid signature", status_code=403, media_type="text/plain")
        fields = dict(form)
        call_id = fields.get("CallSid", "")
        if not call_id:
            return JSONResponse({"error": "voice webhook without CallSid"}, status_code=400)
        agent = config.agent_for(fields.get("To"))
        token = secrets.token_urlsafe(24)
        gateway.prepared.add(
            PreparedCall(
                call_id=call_id,
                token=token,
                agent=agent,
                caller=fields.get("From"),
                called=fields.get("To"),
                engine_session=gateway.open_engine_session(
                    agent,
                    IncomingCall(call_id, caller=fields.get("From"), called=fields.get("To"), fields=fields),
                ),
            )
        )
        log.info(
            "call %s: %s -> %s answered by agent %s",
            call_id,
            fields.get("From"),
            fields.get("To"),
            agent.name,
        )
        stream_url = twilio.stream_url(MEDIA_PATH, request_base=str(request.base_url))
        twiml = connect_stream_twiml(stream_url, {TOKEN_PARAMETER: token})
        return Response(twiml, media_type="application/xml")

    @app.websocket(MEDIA_PATH)
    async def twilio_media(websocket: WebSocket) -> None:
        await serve_media_stream(websocket, twilio, gateway)

    @app.websocket("/{path:path}")
    async def no_media_stream(websocket: WebSocket, path: str) -> None:
        # Registered last: a stream to any other path gets 404 (Starlette's default, 403, reads as a
        # refused signature when the URL is what is wrong).
        text = f"no media stream at /{path}; Twilio streams go to {MEDIA_PATH}"
        await websocket.send_denial_response(PlainTextResponse(text[:200], status_code=404))

    return app


async def serve_media_stream(websocket: WebSocket, dialect: CarrierDialect, gateway: Gateway) -> None:
    """One carrier media stream from upgrade to close; works for any dialect that reports CallStarted."""
    peer = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else "?"
    if not dialect.verify_upgrade(websocket.url.path, websocket.headers):
        log.warning("%s stream from %s: bad or missing signature; refused before accept", dialect.name, peer)
        await websocket.close(code=POLICY_VIOLATION)  # before accept: the server answers HTTP 403
        return
    await websocket.accept()
    try:
        async with asyncio.timeout(gateway.config.server.stream_start_timeout_s):
            started = await _wait_for_start(websocket, dialect, peer)
    except TimeoutError:
        timeout_s = gateway.config.server.stream_start_timeout_s
        log.warning("%s stream from %s: no start within %.1f s; closed", dialect.name, peer, timeout_s)
        await _close(websocket, POLICY_VIOLATION)
        return
    if started is None:  # the carrier went away before starting
        return
    call_id = started.call_id
    token = started.custom_parameters.get(TOKEN_PARAMETER)
    if token is not None:
        prepared = gateway.prepared.claim(call_id, token)
        if prepared is None:
            log.warning(
                "call %s: stream token unknown, expired, already used or for another call; closed", call_id
            )
            await _close(websocket, POLICY_VIOLATION)
            return
        started = replace(
            started, caller=started.caller or prepared.caller, called=started.called or prepared.called
        )
        agent = prepared.agent
        engine_session = prepared.engine_session
    else:
        # Straight from a TwiML Bin: nothing was prepared, so prime now with the default agent.
        agent = gateway.config.agent_for(started.called)
        log.info("call %s: stream without a token; priming agent %s now", call_id, agent.name)
        incoming = IncomingCall(
            call_id, caller=started.caller, called=started.called, params=dict(started.custom_parameters)
        )
        engine_session = gateway.open_engine_session(agent, incoming)

    stream_id = started.stream_id

    async def send(command: OutboundCommand) -> None:
        if isinstance(command, EndStream):
            await _close(websocket, 1000, command.reason)
        else:
            await websocket.send_text(dialect.render(command, stream_id))  # type: ignore[arg-type]

    try:
        limits = agent.limits.with_overrides(started.custom_parameters)
    except ValueError as exc:
        log.warning("call %s: ignoring bad per-call limits (%s); using agent %s's", call_id, exc, agent.name)
        limits = agent.limits
    call = CallSession(
        started,
        engine_session,
        send,
        max_ahead_s=gateway.config.server.carrier_buffer_s,
        on_notice=gateway.notice,
        limits=limits,
        role_prompt=lambda: gateway.role_prompt_text(call_id),
        agent=agent.name,
        phrases=agent.escalation.compiled_phrases(),
        escalates=agent.escalation.handles,
    )
    if call_id in gateway.calls:
        log.warning("call %s: a second media stream replaces the first", call_id)
        await gateway.calls[call_id].end("replaced_by_new_stream")
    gateway.calls[call_id] = call
    call.start()
    try:
        await _bridge(websocket, dialect, call)
    finally:
        await call.end("carrier_disconnected", notify_carrier=False)
        if gateway.calls.get(call_id) is call:
            del gateway.calls[call_id]
        await _close(websocket, 1000, call.end_reason or "")


async def _wait_for_start(websocket: WebSocket, dialect: CarrierDialect, peer: str) -> CallStarted | None:
    while True:
        raw = await _receive(websocket)
        if raw is None:
            return None
        try:
            event = dialect.parse(raw)
        except MalformedMessage as exc:
            log.warning(
                "%s stream from %s: dropped malformed message before start: %s", dialect.name, peer, exc
            )
            continue
        if isinstance(event, CallStarted):
            return event
        # `connected` precedes `start`; anything else before `start` has no call to go to.


async def _bridge(websocket: WebSocket, dialect: CarrierDialect, call: CallSession) -> None:
    while not call.ended:
        raw = await _receive(websocket)
        if raw is None:
            return
        if len(raw) > MAX_MESSAGE_BYTES:
            call.stats.malformed_messages += 1
            log.warning(
                "call %s: dropped a %d-byte message (limit %d)", call.call_id, len(raw), MAX_MESSAGE_BYTES
            )
            continue
        try:
            event = dialect.parse(raw)
        except MalformedMessage as exc:
            call.stats.malformed_messages += 1
            log.warning("call %s: dropped malformed message: %s", call.call_id, exc)
            continue
        await call.handle(event)


async def _receive(websocket: WebSocket) -> str | bytes | None:
    """The next message's text or bytes; None once the peer has gone."""
    message: Mapping[str, Any] = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        return None
    text = message.get("text")
    return text if text is not None else message.get("bytes") or b""


async def _close(websocket: WebSocket, code: int, reason: str = "") -> None:
    if WebSocketState.DISCONNECTED in (websocket.application_state, websocket.client_state):
        return  # closed already, by us or by the peer
    try:
        # A close reason is capped at 123 bytes of UTF-8.
        await websocket.close(code=code, reason=reason.encode()[:120].decode(errors="ignore"))
    except (RuntimeError, OSError, WebSocketDisconnect):
        pass  # the peer went away meanwhile
