"""The FastAPI app: assembles the rooms (switchboard, control plane, the carrier's routes) and serves
Twilio's voice webhook and media stream, `/healthz` and `/readyz`.

The voice webhook starts priming the engine session while the phone rings and answers TwiML at once with a
single-use token bound to the CallSid; the media stream (edge/stream.py) is authenticated before it is
accepted, then claims that prepared call with the token from `start.customParameters` and bridges it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse

from engine.api import Admission, Engine
from gateway.call.incoming import IncomingCall
from gateway.call.session import CallSession
from gateway.config import GatewayConfig
from gateway.edge.body_limit import BodyLimit
from gateway.edge.stream import TOKEN_PARAMETER, serve_media_stream
from gateway.edge.transports.twilio import (
    CALL_SID,
    MEDIA_PATH,
    VOICE_PATH,
    TwilioCallControl,
    TwilioDialect,
    connect_stream_twiml,
)
from gateway.ops.control import install_control
from gateway.switchboard import PreparedCall, Switchboard

log = logging.getLogger(__name__)


def create_app(config: GatewayConfig, engine: Engine) -> FastAPI:
    """Build the gateway app for `config`, serving calls from `engine` (which the caller owns)."""
    twilio = TwilioDialect(config.twilio.auth_token, config.server.public_url or None)
    account = config.twilio
    call_control = TwilioCallControl(account.auth_token, account.account_sid, account.api_base)

    async def transfer(call: CallSession, target: str) -> None:
        await call_control.transfer(call.call_id, target, account_sid=call.started.account_id)

    gateway = Switchboard(config, engine, transfer)
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
        if gateway.webhooks is not None:
            await gateway.webhooks.aclose()  # bounded: delivers what it can of the last events

    # No /docs or /openapi.json: this listener faces the carriers, and a map of the API helps nobody there.
    app = FastAPI(title="duplexgate", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=config.server.max_body_bytes)
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
        if gateway.draining:  # no engine measurement for a gateway that takes no calls
            admission = Admission(False, "draining: this gateway is shutting down")
        else:
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

    app.state.drain = lambda: gateway.drain(config.server.drain_grace_s)

    @app.post(VOICE_PATH)
    async def twilio_voice(request: Request) -> Response:
        address = request.client.host if request.client else "?"
        if wait_s := gateway.auth_throttle.blocked(address):
            return too_many_failures(wait_s)
        body = (await request.body()).decode("utf-8", errors="replace")
        form = parse_qsl(body, keep_blank_values=True)  # exact values: signatures cover them byte for byte
        if not twilio.verify_webhook(request.url.path, request.url.query, form, request.headers):
            log.warning("voice webhook: bad or missing X-Twilio-Signature from %s; refused", address)
            gateway.auth_throttle.failed(address)
            return Response("invalid signature", status_code=403, media_type="text/plain")
        if gateway.draining:  # Twilio then follows the number's fallback URL, if one is set
            return Response("draining", status_code=503, media_type="text/plain")
        fields = dict(form)
        call_id = fields.get("CallSid", "")
        if not CALL_SID.fullmatch(call_id):
            return JSONResponse(
                {"error": "voice webhook without a CallSid (CA + 32 hex digits)"}, status_code=400
            )
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
            config.number(fields.get("From")),
            config.number(fields.get("To")),
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


def too_many_failures(wait_s: float) -> Response:
    """The answer to an address over its failed-authentication allowance."""
    return PlainTextResponse(
        "too many failed authentications; try later",
        status_code=429,
        headers={"Retry-After": str(max(1, round(wait_s)))},
    )
