"""The FastAPI app: assembles the rooms (switchboard, control plane, each configured carrier's routes) and
serves every carrier's voice webhook and media stream, `/healthz`, `/readyz` and `/metrics` (Prometheus,
behind the control API's key; gateway/ops/metrics.py).

A voice webhook (`/<carrier>/voice`) starts priming the engine session while the phone rings and answers
in the carrier's markup at once, with a single-use token bound to the call; the media stream
(`/<carrier>/media`, edge/stream.py) is authenticated before it is accepted, then claims that prepared call
with the token and bridges it.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse

from engine.api import Admission, Engine
from gateway.call.incoming import IncomingCall
from gateway.call.session import CallSession
from gateway.carriers import carrier_class
from gateway.carriers.base import Answering, Carrier, CarrierRoute, WebhookRefused
from gateway.config import AgentConfig, GatewayConfig
from gateway.edge.body_limit import BodyLimit
from gateway.edge.stream import serve_media_stream
from gateway.ops.auth_throttle import client_address
from gateway.ops.control import install_control
from gateway.ops.dashboard import install_dashboard
from gateway.ops.metrics import GatewayMetrics
from gateway.prepared import PreparedCall
from gateway.switchboard import Switchboard

log = logging.getLogger(__name__)


def build_carriers(config: GatewayConfig) -> dict[str, Carrier]:
    """The carriers this config serves, each with its settings."""
    public_url = config.server.public_url or None
    return {name: carrier_class(name)(settings, public_url) for name, settings in config.carriers.items()}


def create_app(config: GatewayConfig, engine: Engine, *, metrics: bool = True) -> FastAPI:
    """Build the gateway app for `config`, serving calls from `engine` (which the caller owns); with
    `metrics`, its own Prometheus registry behind `GET /metrics`."""
    carriers = build_carriers(config)

    async def transfer(call: CallSession, target: str) -> bool:
        carrier = carriers.get(call.started.carrier)
        if carrier is None:
            raise RuntimeError(
                f"call {call.call_id} came from no configured carrier ({call.started.carrier!r})"
            )
        await carrier.transfer(call.started, target)
        return carrier.transfer_ends_stream

    gateway = Switchboard(config, engine, transfer)
    control = install_control(gateway)  # call store, records, control API
    control.recorder.record_hooks.append(gateway.publish_record)  # call.ended carries the record
    gateway.prepared.store, gateway.prepared.replica = control.store, control.replica_id
    gateway.prepared.on_expire = lambda call: control.recorder.record_unstreamed(  # every call gets a record
        call.call_id, call.agent, call.caller, call.called, call.received_at
    )
    gateway.record_unanswered = control.recorder.record_unstreamed
    if metrics:  # fed per call (notices, records), per engine step and per scrape; never per audio message
        gateway.metrics = GatewayMetrics(gateway)
        gateway.notice_hooks.append(gateway.metrics.on_notice)
        control.recorder.record_hooks.append(gateway.metrics.on_record)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for carrier in carriers.values():
            base = config.server.public_url or f"http://{config.server.host}:{config.server.port}"
            log.info(
                "%s: answer webhook %s%s, media stream %s (%s)",
                carrier.name,
                base,
                carrier.voice_path,
                carrier.stream_url(base),
                carrier.console or "see the README",
            )
            if not carrier.authenticates:
                log.warning(
                    "%s: [%s] has no secret in the environment: its signatures are NOT checked; anyone who "
                    "can reach this server can place calls. Set it before exposing the gateway.",
                    config.source,
                    carrier.name,
                )
        await control.start()
        if gateway.metrics is not None:
            await gateway.metrics.start()
        yield
        await gateway.shutdown()
        await control.aclose()
        if gateway.metrics is not None:
            await gateway.metrics.aclose()
        if gateway.webhooks is not None:
            await gateway.webhooks.aclose()  # bounded: delivers what it can of the last events

    # No /docs or /openapi.json: this listener faces the carriers, and a map of the API helps nobody there.
    app = FastAPI(title="duplexgate", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=config.server.max_body_bytes)
    app.state.gateway = gateway
    app.state.control = control
    app.include_router(control.router)
    install_dashboard(app, control)  # /dashboard: pages over the store, behind the control API's key
    if gateway.metrics is not None:
        app.include_router(control.metrics_router(gateway.metrics.render))

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Alive: the process answers. Whether it can take a call is /readyz."""
        return {"status": "ok", "calls": len(gateway.calls), "prepared": len(gateway.prepared)}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Ready when the engine would admit a call now (a free slot, steps inside the real-time budget), or,
        in front of engine workers, while any worker is registered; 503 with the engine's reason otherwise."""
        if gateway.draining:  # no engine measurement for a gateway that takes no calls
            admission = Admission(False, "draining: this gateway is shutting down")
        else:
            admission = await engine.admission()
        # In front of shared engine workers a full house is full for every replica alike, and this one still
        # gives callers the overflow answer: it stays in the load balancer.
        ready = admission.ready or (admission.full and getattr(engine, "shared", False))
        body: dict[str, Any] = {"status": "ready" if ready else "unready", "calls": len(gateway.calls)}
        if not admission.ready:
            body["reason"] = admission.reason
        if admission.step_s is not None:
            body["step_ms"] = round(admission.step_s * 1000, 1)
        return JSONResponse(body, status_code=200 if ready else 503)

    app.state.drain = lambda: gateway.drain(config.server.drain_grace_s)

    for carrier in carriers.values():
        _mount(app, carrier, gateway, config)

    @app.websocket("/{path:path}")
    async def no_media_stream(websocket: WebSocket, path: str) -> None:
        # Registered last: a stream to any other path gets 404 (Starlette's default, 403, reads as a
        # refused signature when the URL is what is wrong).
        paths = ", ".join(c.media_path for c in carriers.values())
        text = f"no media stream at /{path}; streams go to {paths}"
        await websocket.send_denial_response(PlainTextResponse(text[:200], status_code=404))

    return app


def _mount(app: FastAPI, carrier: Carrier, gateway: Switchboard, config: GatewayConfig) -> None:
    """`carrier`'s voice webhook and media stream."""

    async def voice(request: Request, body: bytes) -> Response:
        answering = carrier.read_answer(
            request.method, request.url.path, request.url.query, body, request.headers
        )
        if gateway.draining:  # the carrier then follows the number's fallback, if one is set
            if gateway.metrics is not None:
                gateway.metrics.refused("draining")
            return Response("draining", status_code=503, media_type="text/plain")
        call_id = answering.call_id
        agent = config.agent_for(answering.called)
        token = secrets.token_hex(24)  # hex: every carrier's parameter syntax carries it unchanged
        incoming = IncomingCall(
            call_id, caller=answering.caller, called=answering.called, fields=dict(answering.fields)
        )
        admission = await gateway.engine.admission()
        if not admission.ready:
            return _overflow(carrier, answering, agent, admission.reason, gateway, config)
        await gateway.prepared.add(
            PreparedCall(
                call_id=call_id,
                token=token,
                agent=agent,
                caller=answering.caller,
                called=answering.called,
                engine_session=gateway.open_engine_session(agent, incoming),
            )
        )
        log.info(
            "call %s: %s -> %s answered by agent %s (%s)",
            call_id,
            config.number(answering.caller),
            config.number(answering.called),
            agent.name,
            carrier.name,
        )
        body_text, media_type = carrier.answer(answering, carrier.stream_url(str(request.base_url)), token)
        return Response(body_text, media_type=media_type)

    async def media(websocket: WebSocket) -> None:
        await serve_media_stream(websocket, carrier, gateway)

    for route in carrier.routes():
        app.add_api_route(
            f"/{carrier.name}/{route.path.lstrip('/')}",
            _guarded(_route_answer(route), f"{carrier.name} {route.path}", gateway),
            methods=list(route.methods),
            name=f"{carrier.name}_{route.path.strip('/').replace('/', '_')}",
        )

    app.add_api_route(
        carrier.voice_path,
        _guarded(voice, f"{carrier.name} voice webhook", gateway),
        methods=list(carrier.voice_methods),
        name=f"{carrier.name}_voice",
    )
    app.add_api_websocket_route(carrier.media_path, media, name=f"{carrier.name}_media")


def _overflow(
    carrier: Carrier,
    answering: Answering,
    agent: AgentConfig,
    why: str,
    gateway: Switchboard,
    config: GatewayConfig,
) -> Response:
    """No engine slot is free anywhere: the caller hears the configured overflow at once (a busy message and
    hang-up, or a transfer), and the call gets a record and a call.ended event."""
    transfer_to = config.server.overflow_transfer_to or None
    log.warning(
        "call %s: no engine slot free (%s); overflow answer (%s)",
        answering.call_id,
        why,
        f"transfer to {config.number(transfer_to)}" if transfer_to else "busy message",
    )
    if gateway.metrics is not None:
        gateway.metrics.refused(why)
    gateway.record_unanswered(
        answering.call_id, agent, answering.caller, answering.called, time.time(), end_reason="overflow"
    )
    markup = carrier.overflow(answering, config.server.overflow_message, transfer_to)
    if markup is None:  # the carrier's answer cannot say it: its fallback (URL, next applet) runs
        return PlainTextResponse(f"no agent free: {why}", status_code=503)
    return Response(markup[0], media_type=markup[1])


CarrierHandler = Callable[[Request, bytes], Awaitable[Response]]


def _guarded(
    handle: CarrierHandler, what: str, gateway: Switchboard
) -> Callable[[Request], Awaitable[Response]]:
    """A carrier's HTTP route: an address over its failed-auth allowance is refused unread; the body (capped
    by BodyLimit before any of it was read) goes to `handle`, whose WebhookRefused becomes its answer and,
    for a failed authentication, counts against the sender."""

    async def endpoint(request: Request) -> Response:
        address = client_address(request)
        if (retry := gateway.auth_throttle.retry_after(address)) is not None:
            return too_many_failures(retry)
        body = await request.body()
        try:
            return await handle(request, body)
        except WebhookRefused as exc:
            log.warning("%s from %s refused: %s", what, address, exc)
            if exc.auth_failed:
                gateway.auth_throttle.failed(address)
            return PlainTextResponse(str(exc), status_code=exc.status)

    return endpoint


def _route_answer(route: CarrierRoute) -> CarrierHandler:
    async def handle(request: Request, body: bytes) -> Response:
        status, text, media_type = await route.handle(
            request.method, request.url.path, request.url.query, body, request.headers
        )
        return Response(text, status_code=status, media_type=media_type)

    return handle


def too_many_failures(retry_after: dict[str, str]) -> Response:
    """The answer to an address over its failed-authentication allowance."""
    return PlainTextResponse("too many failed authentications; try later", 429, headers=retry_after)
