"""The engine worker's app: one EngineWorker (one GPU, N slots) served to gateways over HTTP and WebSockets
(protocol.py), announced in the Redis registry.

`POST /sessions` takes a slot and primes it (409 when the worker cannot take the call: no free slot, or
steps over the real-time budget; 503 while draining) and answers with a ticket; the session is then held
for `reserve_ttl_s` for one gateway to attach over `WS /sessions/<id>`, after which it is freed. A
connection that ends frees its session; a session the engine ends closes its connection with the reason.
`/healthz` (alive), `/readyz` (503 while draining) and `/metrics` (Prometheus, behind the key) serve the
orchestrator. SIGTERM (through the CLI's server) drains: the registry says draining, no new sessions, live
ones may finish for the grace, then they are ended and each gateway moves its call elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import prometheus_client
from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.websockets import WebSocketDisconnect

from engine.api import EngineBusy, EngineError, SessionClosed
from engine.remote.protocol import (
    MAX_SPEC_BYTES,
    Positions,
    ProtocolError,
    Ticket,
    control,
    decode_caller,
    encode_agent,
    read_control,
    spec_from_dict,
)
from engine.remote.registry import DRAINING, READY, Registry, RegistryError, WorkerInfo
from engine.worker import EngineWorker, WorkerSession

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
POLICY_VIOLATION = 1008
ENGINE_ENDED = 1011  # the worker ended the session (engine lost it, or the drain grace ran out)


@dataclass
class _Held:
    """A session on this worker: reserved (primed, no gateway yet) or attached."""

    session: WorkerSession
    expiry: asyncio.TimerHandle | None = None
    attached: bool = False
    sends: asyncio.Lock = field(default_factory=asyncio.Lock)  # agent frames and replies share the socket
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # re-primes under way


class WorkerServer:
    def __init__(
        self,
        engine: EngineWorker,
        *,
        key: str,
        worker_id: str,
        url: str,
        registry: Registry | None = None,
        reserve_ttl_s: float = 30.0,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        if not key:
            raise ValueError("an engine worker needs the workers' shared key")
        self.engine, self.key, self.id, self.url = engine, key, worker_id, url
        self.registry, self.reserve_ttl_s, self.heartbeat_s = registry, reserve_ttl_s, heartbeat_s
        self.draining = False
        self._held: dict[str, _Held] = {}
        self._changed = asyncio.Event()  # slots changed: beat now rather than at the next interval
        self._registry_down = False
        self._metrics = _WorkerMetrics(engine)
        self.app = self._build_app()

    # --- registry ------------------------------------------------------------------------------------

    def info(self) -> WorkerInfo:
        attached = sum(1 for held in self._held.values() if held.attached)
        recent = self.engine.stats.recent_step_s
        return WorkerInfo(
            id=self.id,
            url=self.url,
            capacity=self.engine.capacity,
            free=0 if self.draining else self.engine.free_slots,
            active=attached,
            reserved=len(self._held) - attached,
            step_ms=round(recent * 1000, 2) if self.engine.stats.steps else None,
            state=DRAINING if self.draining else READY,
        )

    async def _heartbeat(self) -> None:
        assert self.registry is not None
        while True:
            self._changed.clear()
            try:
                await self.registry.publish(self.info())
                if self._registry_down:
                    log.warning("worker %s: the registry is reachable again", self.id)
                self._registry_down = False
            except RegistryError as exc:
                if not self._registry_down:  # once per outage: live sessions do not need the registry
                    log.error("worker %s: cannot heartbeat (%s); live sessions go on, retrying", self.id, exc)
                self._registry_down = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_s):
                    await self._changed.wait()

    # --- sessions ------------------------------------------------------------------------------------

    async def reserve(self, body: bytes) -> Response:
        if self.draining:
            return PlainTextResponse("this worker is draining", status_code=503)
        try:
            spec = spec_from_dict(json.loads(body))
        except (ValueError, ProtocolError) as exc:
            return PlainTextResponse(f"bad session request: {exc}", status_code=400)
        try:
            session = await self.engine.open(spec)
        except EngineBusy as exc:
            return PlainTextResponse(str(exc), status_code=409)
        except EngineError as exc:
            return PlainTextResponse(str(exc), status_code=422)
        finally:
            self._changed.set()
        session_id = secrets.token_urlsafe(12)
        held = _Held(session)
        held.expiry = asyncio.get_running_loop().call_later(self.reserve_ttl_s, self._expire, session_id)
        self._held[session_id] = held
        ticket = Ticket(self.id, self.url, session_id, session.seed, self.positions(session), spec)
        return Response(ticket.to_json(), media_type="application/json")

    def _expire(self, session_id: str) -> None:
        held = self._held.get(session_id)
        if held is not None and not held.attached:
            log.warning("worker %s: session %s never attached; freed", self.id, session_id)
            self._drop(session_id)

    def _drop(self, session_id: str) -> None:
        held = self._held.pop(session_id, None)
        if held is None:
            return
        if held.expiry is not None:
            held.expiry.cancel()
        held.session._finish("closed")
        self._changed.set()

    async def attach(self, websocket: WebSocket, session_id: str) -> None:
        held = self._held.get(session_id)
        if not self._authorized(websocket.headers) or held is None or held.attached:
            await websocket.close(code=POLICY_VIOLATION)  # before accept: HTTP 403
            return
        held.attached = True
        if held.expiry is not None:
            held.expiry.cancel()
        self._changed.set()
        await websocket.accept()
        session = held.session
        reader = asyncio.create_task(self._read(websocket, held), name=f"worker-read:{session_id}")
        writer = asyncio.create_task(self._write(websocket, held), name=f"worker-write:{session_id}")
        code, reason = None, ""
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if writer.done():  # the engine ended the session
                code, reason = ENGINE_ENDED, str(session.close_reason)
            elif not reader.cancelled() and isinstance(reader.exception(), ProtocolError | ValueError):
                code, reason = POLICY_VIOLATION, str(reader.exception())
                log.warning("worker %s: session %s: %s; closed", self.id, session_id, reason)
        finally:
            reader.cancel()
            writer.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            self._drop(session_id)
            if code is not None:
                with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
                    await websocket.close(code=code, reason=reason.encode()[:120].decode(errors="ignore"))

    async def _read(self, websocket: WebSocket, held: _Held) -> None:
        session = held.session
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                session.push(decode_caller(message["bytes"]))
                continue
            request = read_control(message.get("text") or "")
            if request["op"] == "say":
                session.say(str(request.get("text", "")))
            elif request["op"] == "reprime":
                task = asyncio.create_task(self._reprime(websocket, held, str(request.get("prompt", ""))))
                held.tasks.add(task)
                task.add_done_callback(held.tasks.discard)
            else:
                raise ProtocolError(f"unknown control op {request['op']!r}")

    async def _reprime(self, websocket: WebSocket, held: _Held, prompt: str) -> None:
        try:
            await held.session.reprime(prompt)
            reply = control("reprimed", positions=self.positions(held.session).__dict__)
        except (EngineError, ValueError) as exc:
            reply = control("error", message=f"re-prime failed: {exc}")
        async with held.sends:
            with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
                await websocket.send_text(reply)

    async def _write(self, websocket: WebSocket, held: _Held) -> None:
        with contextlib.suppress(SessionClosed):
            async for frame in held.session.frames():
                message = encode_agent(frame.token, frame.text, frame.pcm)
                async with held.sends:
                    await websocket.send_bytes(message)

    def positions(self, session: WorkerSession) -> Positions:
        return Positions(
            session.prompt_positions, session.text_start, session.prompt_overhead, self.engine.context
        )

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), self.key.encode())

    # --- drain ---------------------------------------------------------------------------------------

    async def drain(self, grace_s: float) -> None:
        """Take no new sessions (the registry says draining at once), let the held ones finish for up to
        `grace_s`, then end the rest (their gateways move the calls to other workers)."""
        self.draining = True
        self._changed.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        log.warning("worker %s draining: %d sessions, up to %.0f s", self.id, len(self._held), grace_s)
        while self._held and loop.time() < deadline:
            await asyncio.sleep(0.1)
        for session_id in list(self._held):
            held = self._held.get(session_id)
            if held is not None:
                held.session._finish("engine_closed")
        await asyncio.sleep(0.2)  # the connections carry the end to their gateways

    # --- app -----------------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            beat = asyncio.create_task(self._heartbeat()) if self.registry is not None else None
            yield
            if beat is not None:
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)
                with contextlib.suppress(RegistryError):
                    await self.registry.withdraw(self.id)  # type: ignore[union-attr]
                await self.registry.aclose()  # type: ignore[union-attr]
            for session_id in list(self._held):
                self._drop(session_id)

        app = FastAPI(title="duplexgate worker", lifespan=lifespan, docs_url=None, redoc_url=None)
        app.openapi_url = None

        @app.get("/healthz")
        async def healthz() -> dict[str, object]:
            return {"status": "ok", "worker": self.id, "sessions": len(self._held)}

        @app.get("/readyz")
        async def readyz() -> JSONResponse:
            info = self.info()
            body = {"status": "draining" if self.draining else "ready", "free": info.free}
            return JSONResponse(body, status_code=503 if self.draining else 200)

        @app.get("/metrics")
        async def metrics(request: Request) -> Response:
            if not self._authorized(request.headers):
                return PlainTextResponse("unauthorized", status_code=401)
            return Response(
                self._metrics.render(self.info()), media_type=prometheus_client.CONTENT_TYPE_LATEST
            )

        @app.post("/sessions")
        async def sessions(request: Request) -> Response:
            if not self._authorized(request.headers):
                return PlainTextResponse("unauthorized", status_code=401)
            body = await _capped_body(request, MAX_SPEC_BYTES)
            if body is None:
                return PlainTextResponse("session request too large", status_code=413)
            return await self.reserve(body)

        @app.delete("/sessions/{session_id}")
        async def release(request: Request, session_id: str) -> Response:
            if not self._authorized(request.headers):
                return PlainTextResponse("unauthorized", status_code=401)
            held = self._held.get(session_id)
            if held is None or held.attached:  # an attached session is its connection's to end
                return Response(status_code=404)
            self._drop(session_id)
            return Response(status_code=204)

        @app.websocket("/sessions/{session_id}")
        async def stream(websocket: WebSocket, session_id: str) -> None:
            await self.attach(websocket, session_id)

        app.state.drain = self.drain
        return app


async def _capped_body(request: Request, limit: int) -> bytes | None:
    """The body, or None once it passes `limit` bytes (read no further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class _WorkerMetrics:
    """The worker's Prometheus metrics: slots (what the autoscaler scales on) and step times."""

    def __init__(self, engine: EngineWorker) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        slots = "duplexgate_worker_slots"
        self.total = prometheus_client.Gauge(f"{slots}_total", "Engine slots", registry=self.registry)
        self.active = prometheus_client.Gauge(
            f"{slots}_active", "Slots holding a session a gateway is attached to", registry=self.registry
        )
        self.reserved = prometheus_client.Gauge(
            f"{slots}_reserved", "Slots primed and waiting for their gateway", registry=self.registry
        )
        self.draining = prometheus_client.Gauge(
            "duplexgate_worker_draining", "1 while the worker drains", registry=self.registry
        )
        self.steps = prometheus_client.Histogram(
            "duplexgate_worker_step_seconds",
            "Engine step time",
            buckets=(0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.15, 0.25),
            registry=self.registry,
        )
        engine.stats.observers.append(lambda size, seconds: self.steps.observe(seconds))

    def render(self, info: WorkerInfo) -> bytes:
        self.total.set(info.capacity)
        self.active.set(info.active)
        self.reserved.set(info.reserved)
        self.draining.set(1 if info.state == DRAINING else 0)
        return prometheus_client.generate_latest(self.registry)
