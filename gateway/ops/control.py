"""The control API (list, inspect, escalate and hang up live calls; read past call records) and the pieces it
stands on: the call store chosen by `[store]`, the call recorder, and the task that applies commands sent
by other replicas to the calls this one holds.

Every route needs `Authorization: Bearer <key>`, the key read from the variable named by
`[control] api_key_env`; without it set, the API answers 503 and does nothing. `GET /metrics` (Prometheus)
is guarded the same way (`metrics_router`).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.call.notices import CallNotice, Escalation, NoticeKind
from gateway.call.session import CallSession
from gateway.ops.auth_throttle import client_address
from gateway.ops.recorder import CallRecorder
from gateway.ops.redis_store import RedisStore
from gateway.ops.store import (
    MAX_RECORDS_PAGE,
    CallCommand,
    CallStore,
    CommandSubscription,
    MemoryStore,
    StoreError,
)

if TYPE_CHECKING:
    from gateway.switchboard import Switchboard

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 500  # an escalation reason travels into records, webhooks and logs

HANGUP_REASON = "api_hangup"
RESUBSCRIBE_S = 1.0  # after the store drops the command subscription, try again this often


class EscalateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=MAX_REASON_CHARS)


def open_store(url: str) -> CallStore:
    """The call store for `[store] url`: empty is this process's memory, redis:// a shared Redis."""
    return RedisStore(url) if url else MemoryStore()


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ControlPlane:
    """One gateway's store, recorder, command listener and control routes."""

    def __init__(self, gateway: Switchboard, store: CallStore, replica_id: str, api_key: str | None) -> None:
        self.gateway = gateway
        self.store = store
        self.replica_id = replica_id
        self.api_key = api_key
        self.recorder = CallRecorder(gateway, store, replica_id)
        self.router = self._routes()
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen for commands (before any call is registered, so none is missed), then heartbeat. A store
        that is down is logged and retried in the background; calls are served meanwhile."""
        if self._listener is None:
            subscription = None
            try:
                subscription = await self.store.subscribe(self.replica_id)
            except StoreError as exc:
                log.error("replica %s: cannot receive call commands yet: %s", self.replica_id, exc)
            self._listener = asyncio.create_task(
                self._listen(subscription), name=f"commands:{self.replica_id}"
            )
        await self.recorder.start()

    async def aclose(self) -> None:
        await self.recorder.aclose()
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        await self.store.aclose()

    # --- commands -----------------------------------------------------------------------------------

    async def hang_up(self, call: CallSession) -> None:
        await call.end(HANGUP_REASON)

    async def escalate(self, call: CallSession, reason: str) -> None:
        """Hand the call off through the gateway's escalation when it has one, else just record it."""
        entry = getattr(self.gateway, "escalate", None)
        if callable(entry):
            outcome = entry(call.call_id, trigger="api", reason=reason)
            if inspect.isawaitable(outcome):
                await outcome
            return
        at_s = round(call.caller_clock_s, 3)
        escalation = Escalation(at_s, "api", reason)
        self.gateway.notice(
            CallNotice(NoticeKind.ESCALATED, call.call_id, at_s, f"api: {reason}", escalation)
        )

    async def apply(self, command: CallCommand) -> bool:
        """Carry out `command` on a call held here; False when this replica does not hold it."""
        call = self.gateway.calls.get(command.call_id)
        if call is None or call.ended:
            return False
        if command.action == "hangup":
            await self.hang_up(call)
        elif command.action == "escalate":
            await self.escalate(call, command.reason)
        else:
            log.warning("call %s: ignored unknown command %r", command.call_id, command.action)
            return False
        return True

    async def _listen(self, subscription: CommandSubscription | None) -> None:
        while True:
            if subscription is None:
                await asyncio.sleep(RESUBSCRIBE_S)
                try:
                    subscription = await self.store.subscribe(self.replica_id)
                except StoreError as exc:
                    log.error("replica %s: cannot receive call commands: %s", self.replica_id, exc)
                    continue
            try:
                async with subscription:
                    async for command in subscription:
                        try:
                            await self.apply(command)
                        except Exception:
                            log.exception("call %s: command %s failed", command.call_id, command.action)
            except StoreError as exc:
                log.error("replica %s: call commands interrupted: %s", self.replica_id, exc)
            subscription = None

    # --- routes -------------------------------------------------------------------------------------

    def _authorise(self, request: Request) -> None:
        env = self.gateway.config.control.api_key_env
        if self.api_key is None:
            raise HTTPException(503, f"control API disabled: set {env} (see [control] in the config)")
        address = client_address(request)
        throttle = self.gateway.auth_throttle
        if (retry := throttle.retry_after(address)) is not None:
            raise HTTPException(429, "too many failed authentications; try later", retry)
        if not self.bearer_matches(request.headers.get("authorization", "")):
            throttle.failed(address)
            raise HTTPException(
                401, f"send Authorization: Bearer <the key in {env}>", headers={"WWW-Authenticate": "Bearer"}
            )

    def bearer_matches(self, authorization: str) -> bool:
        """Whether an `Authorization` header value is `Bearer <the API key>` (compared in constant time)."""
        scheme, _, given = authorization.partition(" ")
        key = self.api_key
        return (
            key is not None
            and scheme.lower() == "bearer"
            and hmac.compare_digest(given.strip().encode(), key.encode())
        )

    def _routes(self) -> APIRouter:
        router = APIRouter(prefix="/v1", dependencies=[Depends(self._authorise)], tags=["control"])
        store = self.store

        @router.get("/calls")
        async def list_calls() -> dict[str, Any]:
            with _store_errors():
                calls = await store.list_live()
            return {"calls": [asdict(call) for call in calls]}

        @router.get("/calls/{call_id}")
        async def get_call(call_id: str) -> dict[str, Any]:
            with _store_errors():
                call = await store.get_live(call_id)
            if call is None:
                raise HTTPException(404, f"call {call_id} is not live; its record: GET /v1/records/{call_id}")
            return asdict(call)

        @router.post("/calls/{call_id}/hangup")
        async def hang_up(call_id: str) -> dict[str, Any]:
            return await self._command(CallCommand(call_id, "hangup", HANGUP_REASON))

        @router.post("/calls/{call_id}/escalate")
        async def escalate(call_id: str, body: EscalateBody) -> dict[str, Any]:
            return await self._command(CallCommand(call_id, "escalate", body.reason))

        @router.get("/records")
        async def list_records(
            limit: int = Query(50, ge=1, le=MAX_RECORDS_PAGE), before: float | None = None
        ) -> dict[str, Any]:
            with _store_errors():
                records = await store.list_records(limit, before)
            next_before = records[-1].started_at if len(records) == limit else None
            return {"records": [record.to_dict() for record in records], "next_before": next_before}

        @router.get("/records/{call_id}")
        async def get_record(call_id: str) -> dict[str, Any]:
            with _store_errors():
                record = await store.get_record(call_id)
            if record is None:
                raise HTTPException(404, f"no record of call {call_id} (live calls: GET /v1/calls/{call_id})")
            return record.to_dict()

        return router

    def metrics_router(self, render: Callable[[], tuple[bytes, str]]) -> APIRouter:
        """`GET /metrics`: what `render` returns (body, content type), behind the control API's key."""
        router = APIRouter(dependencies=[Depends(self._authorise)], tags=["metrics"])

        @router.get("/metrics")
        async def metrics() -> Response:
            body, content_type = render()
            return Response(body, media_type=content_type)

        return router

    async def _command(self, command: CallCommand) -> dict[str, Any]:
        """Apply here when this replica holds the call, else route it through the store to its owner."""
        if await self.apply(command):
            return {"call_id": command.call_id, "action": command.action, "replica": self.replica_id}
        with _store_errors():
            live = await self.store.get_live(command.call_id)
            mine = live is not None and live.replica == self.replica_id
            delivered = live is not None and not mine and await self.store.send_command(command)
        if live is None or not delivered:
            # Held here but not in `gateway.calls`: it has just ended and its record is on its way.
            raise HTTPException(404, f"call {command.call_id} is not live on any gateway replica")
        return {"call_id": command.call_id, "action": command.action, "replica": live.replica}


@contextmanager
def _store_errors() -> Iterator[None]:
    """A store failure becomes 503 naming the store, not a bare 500."""
    try:
        yield
    except StoreError as exc:
        raise HTTPException(503, f"call store unavailable: {exc}") from exc


def install_control(gateway: Switchboard) -> ControlPlane:
    """The control plane for `gateway` as its config says; its recorder hears every call notice."""
    config = gateway.config
    replica_id = config.store.replica_id or default_replica_id()
    api_key = os.environ.get(config.control.api_key_env) or None
    plane = ControlPlane(gateway, open_store(config.store.url), replica_id, api_key)
    gateway.notice_hooks.append(plane.recorder.on_notice)
    return plane
