"""One carrier media stream from upgrade to close, for any carrier dialect: authenticate the upgrade, wait
for `start`, claim the call the voice webhook prepared (or prime one now), then bridge the carrier's
messages to the CallSession until either side ends it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from fastapi import WebSocket
from fastapi.responses import PlainTextResponse
from starlette.websockets import WebSocketDisconnect, WebSocketState

from gateway.call.events import CallerAudio, CallStarted, EndStream, MalformedMessage, OutboundCommand
from gateway.call.incoming import IncomingCall
from gateway.call.session import CallSession
from gateway.carriers.base import TOKEN_PARAMETER, Carrier, CarrierStream
from gateway.ops.auth_throttle import client_address
from gateway.switchboard import Switchboard

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024  # carriers' media messages are 0.2-8 KiB; anything this big is not one
POLICY_VIOLATION = 1008  # WebSocket close code for a stream we refuse after accepting it
MESSAGE_TOO_BIG = 1009
TRY_AGAIN_LATER = 1013
JITTER_S = 1.0  # caller audio may run this far ahead of the wall clock (network bunching, a lagging carrier)
MAX_PACING_PAUSE_S = 0.1  # reading pauses at most this long after audio that came too early
YIELD_EVERY = 16  # messages handled between forced yields to the event loop


async def serve_media_stream(websocket: WebSocket, carrier: Carrier, gateway: Switchboard) -> None:
    """One carrier media stream from upgrade to close; works for any carrier whose stream reports
    CallStarted."""
    peer = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else "?"
    address = client_address(websocket)
    if (retry := gateway.auth_throttle.retry_after(address)) is not None:
        await websocket.send_denial_response(PlainTextResponse("too many failed authentications", 429, retry))
        return
    query = dict(websocket.query_params)
    if not carrier.verify_upgrade(websocket.url.path, query, websocket.headers):
        log.warning("%s stream from %s: bad or missing signature; refused before accept", carrier.name, peer)
        gateway.auth_throttle.failed(address)
        await websocket.close(code=POLICY_VIOLATION)  # before accept: the server answers HTTP 403
        return
    await websocket.accept()
    dialect = carrier.open_stream(query, websocket.headers)
    try:
        async with asyncio.timeout(gateway.config.server.stream_start_timeout_s):
            started = await _wait_for_start(websocket, dialect, carrier.name, peer)
    except TimeoutError:
        timeout_s = gateway.config.server.stream_start_timeout_s
        log.warning("%s stream from %s: no start within %.1f s; closed", carrier.name, peer, timeout_s)
        await _close(websocket, POLICY_VIOLATION)
        return
    if started is None:  # the carrier went away before starting
        return
    started = replace(started, carrier=carrier.name)
    call_id = started.call_id
    if call_id in gateway.calls:  # a stream never takes over a call that is live
        log.warning("call %s: a second media stream for a live call; refused, the live call goes on", call_id)
        await _close(websocket, POLICY_VIOLATION)
        return
    token = started.custom_parameters.get(TOKEN_PARAMETER)
    if token is not None:
        prepared = await gateway.claim_prepared(call_id, token)
        if prepared is None:
            log.warning(
                "call %s: stream token unknown, expired, already used or for another call; closed", call_id
            )
            await _close(websocket, POLICY_VIOLATION)
            return
        agent, caller, called, engine_session = prepared
        started = replace(started, caller=started.caller or caller, called=started.called or called)
    else:
        # Straight from a TwiML Bin: nothing was prepared, so prime now with the default agent. A signed
        # upgrade covers only the constant stream URL and can be replayed, so with signatures on only the
        # single-use token vouches for a stream, unless the agent takes unprepared streams.
        agent = gateway.config.agent_for(started.called)
        if gateway.draining:
            log.warning("call %s: stream without a call token while draining; refused", call_id)
            await _close(websocket, TRY_AGAIN_LATER)
            return
        if carrier.authenticates and carrier.prepares_calls and not agent.allow_unprepared_streams:
            log.warning("call %s: stream without a call token; refused (agent %s)", call_id, agent.name)
            await _close(websocket, POLICY_VIOLATION)
            return
        log.info("call %s: stream without a token; priming agent %s now", call_id, agent.name)
        incoming = IncomingCall(
            call_id, caller=started.caller, called=started.called, params=dict(started.custom_parameters)
        )
        engine_session = gateway.open_engine_session(agent, incoming)

    async def send(command: OutboundCommand) -> None:
        for message in dialect.render(command):
            if isinstance(message, str):
                await websocket.send_text(message)
            else:
                await websocket.send_bytes(message)
        if isinstance(command, EndStream):
            await _close(websocket, 1000, command.reason)

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
        reanchor_prompt=lambda said, budget: gateway.reanchor_prompt(call_id, agent, said, budget),
        agent=agent.name,
        phrases=agent.escalation.compiled_phrases(),
        escalates=agent.escalation.handles,
    )
    gateway.calls[call_id] = call
    call.start()
    try:
        await _bridge(websocket, dialect, call, gateway.config.server.stream_idle_timeout_s)
    finally:
        await call.end("carrier_disconnected", notify_carrier=False)
        if gateway.calls.get(call_id) is call:
            del gateway.calls[call_id]
        await _close(websocket, 1000, call.end_reason or "")


async def _wait_for_start(
    websocket: WebSocket, dialect: CarrierStream, carrier: str, peer: str
) -> CallStarted | None:
    warnings = LogThrottle()
    while True:
        raw = await _receive(websocket)
        if raw is None:
            return None
        if len(raw) > MAX_MESSAGE_BYTES:  # nobody is on this stream yet: no reason to keep reading it
            log.warning("%s stream from %s: a %d-byte message before start; closed", carrier, peer, len(raw))
            await _close(websocket, MESSAGE_TOO_BIG)
            return None
        try:
            event = dialect.parse(raw)
        except MalformedMessage as exc:
            if (skipped := warnings.due()) is not None:
                log.warning(
                    "%s stream from %s: dropped malformed message before start: %s%s",
                    carrier,
                    peer,
                    exc,
                    _since(skipped),
                )
            continue
        if isinstance(event, CallStarted):
            return event
        # `connected` precedes `start`; anything else before `start` has no call to go to.


async def _bridge(websocket: WebSocket, dialect: CarrierStream, call: CallSession, idle_s: float) -> None:
    await _Bridge(websocket, dialect, call).run(idle_s)


class _Bridge:
    """Carrier messages to one call until either side ends it."""

    def __init__(self, websocket: WebSocket, dialect: CarrierStream, call: CallSession) -> None:
        self.websocket, self.dialect, self.call = websocket, dialect, call
        self.loop = asyncio.get_running_loop()
        self.last_audio = self.loop.time()
        self.pace = AudioPace(call.started.media_format.bytes_per_second)
        self.junk_warnings, self.pace_warnings = LogThrottle(), LogThrottle()

    async def run(self, idle_s: float) -> None:
        """A carrier streams caller audio without pause, silence included: a stream with no audio for
        `idle_s` of wall clock is dead or hostile, and its call ends ("stream_idle") rather than hold an
        engine slot. One timer serves many messages: it fires at most once per `idle_s` on a live stream."""
        while not self.call.ended:
            try:
                async with asyncio.timeout_at(self.last_audio + idle_s):
                    await self.carry()
                return  # the peer went, or the call ended
            except TimeoutError:
                if self.loop.time() < self.last_audio + idle_s:
                    continue  # audio came since the timer was set
                log.warning("call %s: no caller audio for %.0f s; ending the call", self.call.call_id, idle_s)
                await self.call.end("stream_idle")
                return

    async def carry(self) -> None:
        call, handled = self.call, 0
        while not call.ended:
            raw = await _receive(self.websocket)
            if raw is None:
                return
            handled += 1
            if handled % YIELD_EVERY == 0:  # queued messages come back without a pause: let others run
                await asyncio.sleep(0)
            try:
                if len(raw) > MAX_MESSAGE_BYTES:
                    raise MalformedMessage(f"a {len(raw)}-byte message (limit {MAX_MESSAGE_BYTES})")
                event = self.dialect.parse(raw)
                if event is None:  # an acknowledgement or notice with nothing for the call
                    continue
            except MalformedMessage as exc:
                call.stats.malformed_messages += 1  # every one counted in the record; logged at most 1/s
                if (skipped := self.junk_warnings.due()) is not None:
                    log.warning(
                        "call %s: dropped malformed message: %s%s", call.call_id, exc, _since(skipped)
                    )
                continue
            if isinstance(event, CallerAudio):
                self.last_audio = self.loop.time()
                ahead_s = self.pace.ahead_s(len(event.payload), self.last_audio)
                if ahead_s > 0:  # dropped before any decoding or resampling
                    call.stats.caller_audio_dropped_fast += 1
                    if (skipped := self.pace_warnings.due()) is not None:
                        log.warning(
                            "call %s: caller audio faster than real time; dropped%s",
                            call.call_id,
                            _since(skipped),
                        )
                    # Read this socket no faster than real time for a while: its excess waits in its
                    # own buffers instead of costing this process (and every other call) its handling.
                    await asyncio.sleep(min(ahead_s, MAX_PACING_PAUSE_S))
                    continue
            await call.handle(event)


class AudioPace:
    """Caller audio may not arrive faster than the wall clock, plus `jitter_s` a network can bunch up:
    the model steps once per 80 ms of caller audio, so a peer sending faster would take engine steps,
    and CPU for decoding, from every other call. Audio beyond the allowance is refused."""

    def __init__(self, bytes_per_second: int, jitter_s: float = JITTER_S) -> None:
        self.bytes_per_second, self.jitter_s = bytes_per_second, jitter_s
        self._started: float | None = None
        self._received_s = 0.0

    def ahead_s(self, payload_bytes: int, now: float) -> float:
        """0 when this much more audio is within the allowance (and it is counted), else how far ahead of
        the allowance it would take the stream (and it is not counted: the caller drops it)."""
        if self._started is None:
            self._started = now
        seconds = payload_bytes / self.bytes_per_second
        ahead = self._received_s + seconds - (now - self._started + self.jitter_s)
        if ahead > 0:
            return ahead
        self._received_s += seconds
        return 0.0


class LogThrottle:
    """At most one log line per `interval_s` for one stream: a peer sending junk must not flood the log.
    `due()` says whether to log now and how many lines were held back since the last one."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._next_at = 0.0
        self._held = 0

    def due(self) -> int | None:
        now = time.monotonic()
        if now < self._next_at:
            self._held += 1
            return None
        held, self._held, self._next_at = self._held, 0, now + self.interval_s
        return held


def _since(held: int) -> str:
    return f" ({held} more since the last warning)" if held else ""


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
