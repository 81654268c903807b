"""The gateway's side of remote engine workers: `RemoteEngine` implements engine.api's Engine, and each of
its sessions (`RemoteSession`) implements EngineSession over one WebSocket to the worker holding it, so a
CallSession cannot tell it from the embedded engine.

A session is primed on a worker (`reserve`: POST /sessions on the worker with the most free slots that
takes it) and yields a Ticket, which any gateway may `attach` to; the connection opens on first use. When
its worker dies (the connection ends, or it owes frames and says nothing for `lost_after_s`) the session moves
on its own: it is primed again on another worker with the role prompt plus the agent's recent words; the
caller frames the lost worker never answered, and those pushed meanwhile, follow it; `failover_hooks` are
told. With no worker to take it, it ends as `engine_lost` like an embedded session whose engine failed.

Size: a session's connection, its failover and its position in the model's window share one state (what
was sent and not answered, the ticket, the positions); the engine beside it is small.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx
import numpy as np
import sentencepiece
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from engine.api import (
    FRAME_SAMPLES,
    MAX_QUEUED_FRAMES,
    Admission,
    AgentFrame,
    AgentFrames,
    EngineBusy,
    EngineError,
    SessionClosed,
    SessionSpec,
)
from engine.loading import announcement_tokens, encode_role_prompt
from engine.remote.protocol import (
    Positions,
    ProtocolError,
    Ticket,
    control,
    decode_agent,
    encode_caller,
    read_control,
    spec_to_dict,
)
from engine.remote.registry import Registry, RegistryError, WorkerInfo

log = logging.getLogger(__name__)

LOST_AFTER_S = 0.8  # owing frames and silent this long: the worker is hung or gone
CATCH_UP_S = 0.1  # then one wait more for what arrived while this process itself was stalled
LISTING_KEPT_S = 5.0  # while the registry is unreachable, its last listing serves this long
RECENT_PIECES = 400  # text pieces kept for a failover's re-anchor prompt
CONNECT_TIMEOUT_S = 5.0
MAX_FRUITLESS_MOVES = 3  # workers in a row that fail a session before it sent a frame: it is the session

# (session, the agent's recent words, token budget) -> the prompt to re-prime with elsewhere, or None for
# the session's own role prompt
Reanchor = Callable[["RemoteSession", Sequence[str], int], str | None]


@dataclass(frozen=True)
class Failover:
    """A session that moved from a lost worker to another."""

    from_worker: str
    to_worker: str
    why: str  # how the loss was noticed
    gap_s: float  # from noticing the loss to the new session being primed
    replayed_frames: int  # caller frames the lost worker never answered, sent again to the new one


FailoverHook = Callable[["RemoteSession", Failover], None]


class RemoteEngine:
    """Engine workers found in the registry, used as one engine (implements engine.api.Engine)."""

    shared = True  # every gateway replica sees the same workers: a full house is full for all of them

    def __init__(
        self,
        registry: Registry,
        key: str,
        tokenizer: sentencepiece.SentencePieceProcessor,
        *,
        lost_after_s: float = LOST_AFTER_S,
        request_timeout_s: float = 60.0,
    ) -> None:
        self.registry, self.key, self.tokenizer = registry, key, tokenizer
        self.lost_after_s = lost_after_s
        self.reanchor: Reanchor | None = None
        self.failover_hooks: list[FailoverHook] = []
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(request_timeout_s, connect=2.0), headers={"authorization": f"Bearer {key}"}
        )
        self._sessions: set[RemoteSession] = set()
        self._listing: list[WorkerInfo] = []
        self._listed_at = float("-inf")

    # ---- Engine API -----------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Slots of the workers in the last listing."""
        return sum(worker.capacity for worker in self._listing)

    @property
    def active(self) -> int:
        return len(self._sessions)

    def count_prompt_tokens(self, prompt: str) -> int:
        return len(encode_role_prompt(self.tokenizer, prompt))

    async def admission(self) -> Admission:
        """Ready when a registered worker says it has a free slot (the worker still decides on the call)."""
        try:
            workers = await self.workers()
        except RegistryError as exc:
            return Admission(False, f"the engine worker registry is unreachable ({exc})")
        if not workers:
            return Admission(False, "no engine worker is registered")
        open_ = [worker for worker in workers if worker.takes_calls]
        if not open_:
            return Admission(False, f"no free slot on any of the {len(workers)} engine workers", full=True)
        step_ms = open_[0].step_ms
        return Admission(True, step_s=None if step_ms is None else step_ms / 1000)

    async def open(self, spec: SessionSpec) -> RemoteSession:
        return self.attach(await self.reserve(spec))

    async def aclose(self) -> None:
        await asyncio.gather(*(session.close() for session in list(self._sessions)), return_exceptions=True)
        await self._http.aclose()
        await self.registry.aclose()

    # ---- workers --------------------------------------------------------------------------------------

    async def workers(self) -> list[WorkerInfo]:
        """The registered workers, most free slots first; the last listing while the registry is briefly
        unreachable (a Redis restart must not refuse every call at once)."""
        try:
            self._listing = await self.registry.workers()
            self._listed_at = time.monotonic()
        except RegistryError:
            if time.monotonic() - self._listed_at > LISTING_KEPT_S:
                raise
        return self._listing

    async def reserve(self, spec: SessionSpec, exclude: frozenset[str] = frozenset()) -> Ticket:
        """Prime a session on the first worker (most free slots first) that takes it. Raises EngineBusy when
        none does, EngineError for a voice or prompt a worker cannot use."""
        try:
            workers = await self.workers()
        except RegistryError as exc:
            raise EngineBusy(f"the engine worker registry is unreachable ({exc})") from None
        refusals = []
        body = json.dumps(spec_to_dict(spec))
        for worker in workers:
            if not worker.takes_calls or worker.id in exclude:
                continue
            try:
                response = await self._http.post(f"{worker.url}/sessions", content=body)
            except httpx.HTTPError as exc:
                refusals.append(f"{worker.id}: {type(exc).__name__}")
                continue
            if response.status_code == 200:
                return Ticket.from_json(response.content)
            if response.status_code in (400, 422):  # the same voice or prompt fails on every worker
                raise EngineError(f"engine worker {worker.id}: {response.text[:300]}")
            refusals.append(f"{worker.id}: {response.text[:120]}")
        if refusals:
            raise EngineBusy("no engine worker took the call (" + "; ".join(refusals) + ")")
        raise EngineBusy(f"no free slot on any of the {len(workers)} engine workers")

    def attach(self, ticket: Ticket | str) -> RemoteSession:
        """The session a ticket names; its connection opens on first use."""
        session = RemoteSession(self, Ticket.from_json(ticket) if isinstance(ticket, str) else ticket)
        self._sessions.add(session)
        return session

    async def release(self, ticket: Ticket) -> None:
        """Free a session nobody attached to (best effort: the worker frees it after its TTL anyway)."""
        with contextlib.suppress(httpx.HTTPError):
            await self._http.delete(f"{ticket.url}/sessions/{ticket.session}")

    def _failed_over(self, session: RemoteSession, failover: Failover) -> None:
        for hook in list(self.failover_hooks):
            try:
                hook(session, failover)
            except Exception:
                log.exception("session %s: failover hook %r failed", session.id, hook)


class RemoteSession:
    """A session on a worker, followed over one WebSocket (implements engine.api.EngineSession)."""

    def __init__(self, engine: RemoteEngine, ticket: Ticket) -> None:
        self.engine, self.ticket = engine, ticket
        self.id = f"{ticket.worker}/{ticket.session}"
        self.seed = ticket.seed
        self.role_prompt = ticket.spec.prompt  # what every re-prime elsewhere starts from
        self.close_reason: str | None = None
        self.failovers: list[Failover] = []
        self._positions = ticket.positions
        self._pushed = 0  # frames pushed to the current worker session
        self._outgoing: collections.deque[np.ndarray | str] = collections.deque()
        self._ready_to_send = asyncio.Event()
        self._frames = AgentFrames(MAX_QUEUED_FRAMES)
        self._delivered = 0
        # frames sent on this connection and not answered yet (when, frame): a lost worker's go to the next
        self._unanswered: collections.deque[tuple[float, np.ndarray]] = collections.deque()
        self._heard_at = 0.0  # when the worker's last message arrived
        self._recent: collections.deque[str] = collections.deque(maxlen=RECENT_PIECES)
        self._reprimed: asyncio.Future[Positions] | None = None
        self._runner: asyncio.Task[None] | None = None

    # ---- EngineSession API ----------------------------------------------------------------------------

    def push(self, pcm: np.ndarray) -> None:
        if self.close_reason is not None:
            raise SessionClosed(f"session {self.id} is closed ({self.close_reason})")
        frame = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if frame.shape[0] != FRAME_SAMPLES:
            raise ValueError(f"session {self.id}: a frame is {FRAME_SAMPLES} samples, got {frame.shape[0]}")
        if self._backlog() >= MAX_QUEUED_FRAMES:
            self._drop_oldest_frame()
        self._outgoing.append(frame)
        self._pushed += 1
        self._ready_to_send.set()
        self._run()

    def frames(self) -> AsyncIterator[AgentFrame]:
        self._run()
        return self._frames.read(self.id)

    async def close(self) -> None:
        if self.close_reason is not None:
            return
        attached = self._runner is not None
        self._finish("closed")
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        if not attached:  # primed for nobody: free the slot now rather than at the worker's TTL
            await self.engine.release(self.ticket)

    @property
    def position(self) -> int:
        return self._positions.prompt_positions + self._pushed

    @property
    def prompt_horizon_steps(self) -> int:
        return self._positions.text_start + self._positions.context - 2 - self.position

    def say(self, text: str) -> int:
        self._send_control(control("say", text=text))
        return len(announcement_tokens(self.engine.tokenizer, text))

    async def reprime(self, prompt: str) -> None:
        if self.close_reason is not None:
            raise SessionClosed(f"session {self.id} is closed ({self.close_reason})")
        self._reprimed = asyncio.get_running_loop().create_future()
        self._send_control(control("reprime", prompt=prompt))
        try:
            self._positions = await self._reprimed
        finally:
            self._reprimed = None

    def reprime_token_budget(self) -> int:
        return self._positions.context // 2 - self._positions.prompt_overhead

    # ---- the connection -------------------------------------------------------------------------------

    def _send_control(self, message: str) -> None:
        self._outgoing.append(message)
        self._ready_to_send.set()
        self._run()

    def _queued_frames(self) -> int:
        """Caller frames waiting to be sent (control messages wait beside them)."""
        return sum(isinstance(item, np.ndarray) for item in self._outgoing)

    def _backlog(self) -> int:
        """Caller frames not answered yet: waiting here, or sent and waiting at the worker."""
        return self._queued_frames() + len(self._unanswered)

    def _drop_oldest_frame(self) -> None:
        for index, item in enumerate(self._outgoing):
            if isinstance(item, np.ndarray):
                del self._outgoing[index]
                self._pushed -= 1  # it never reaches the worker
                return

    def _run(self) -> None:
        if self._runner is None and self.close_reason is None:
            self._runner = asyncio.get_running_loop().create_task(self._follow(), name=f"remote:{self.id}")
            self._runner.add_done_callback(self._followed)

    def _followed(self, task: asyncio.Task[None]) -> None:
        """The session's runner is supervised: if it fails (a bug), the call hears of it at once."""
        if not task.cancelled() and task.exception() is not None:
            log.error("session %s: lost its connection handler", self.id, exc_info=task.exception())
            self._finish("engine_lost")

    async def _follow(self) -> None:
        """Serve the session on its worker; when the worker is lost, move it and go on."""
        fruitless = 0  # moves in a row whose new worker never sent a frame
        while self.close_reason is None:
            delivered = self._delivered
            why = await self._serve()
            if self.close_reason is not None:
                return
            fruitless = 0 if self._delivered > delivered else fruitless + 1
            if fruitless > MAX_FRUITLESS_MOVES:
                log.error(
                    "session %s: %d workers in a row failed it (%s); giving up", self.id, fruitless, why
                )
                self._finish("engine_lost")
                return
            replayed = len(self._unanswered)
            noticed = time.monotonic()
            log.warning(
                "session %s: worker %s lost (%s); moving the session", self.id, self.ticket.worker, why
            )
            old = self.ticket
            try:
                ticket = await self.engine.reserve(self._respec(), exclude=frozenset({old.worker}))
            except EngineError as exc:
                log.error("session %s: no other worker can take it (%s)", self.id, exc)
                self._finish("engine_lost")
                return
            self.ticket, self._positions = ticket, ticket.positions
            self._pushed = self._backlog()  # what the new worker gets
            failover = Failover(old.worker, ticket.worker, why, time.monotonic() - noticed, replayed)
            self.failovers.append(failover)
            if self._reprimed is not None and not self._reprimed.done():
                self._reprimed.set_result(ticket.positions)  # the new session is primed afresh anyway
            self.engine._failed_over(self, failover)

    def _respec(self) -> SessionSpec:
        """The spec to prime another worker with: the role prompt plus the agent's recent words."""
        spec, budget = self.ticket.spec, self.reprime_token_budget()
        prompt = None
        if self.engine.reanchor is not None and self._recent:
            prompt = self.engine.reanchor(self, list(self._recent), budget)
        return replace(spec, prompt=prompt or self.role_prompt, seed=self.seed)

    async def _serve(self) -> str:
        """Carry frames to and from the worker until the connection ends; returns why it ended."""
        ticket = self.ticket
        url = ticket.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        # What the lost worker never answered goes to this one first: one agent frame per caller frame.
        self._outgoing.extendleft(frame for _, frame in reversed(self._unanswered))
        self._unanswered.clear()
        while self._queued_frames() > MAX_QUEUED_FRAMES:
            self._drop_oldest_frame()
        try:
            async with connect(
                f"{url}/sessions/{ticket.session}",
                additional_headers={"Authorization": f"Bearer {self.engine.key}"},
                open_timeout=CONNECT_TIMEOUT_S,
                compression=None,  # PCM does not compress; deflating it would only cost CPU
                ping_interval=None,  # the frames themselves show the worker is alive
                max_size=1 << 20,
                close_timeout=1.0,  # closing a session we are done with: the worker answers at once
            ) as ws:
                sender = asyncio.create_task(self._send(ws))
                try:
                    why = await self._receive(ws)
                    # Lost: no closing handshake with a worker that may never answer it (a hung one would
                    # hold the call for the close timeout).
                    ws.transport.abort()
                    return why
                finally:
                    sender.cancel()
                    await asyncio.gather(sender, return_exceptions=True)
        except InvalidStatus as exc:
            return f"the worker refused the connection ({exc.response.status_code})"
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            return f"cannot connect ({type(exc).__name__}: {exc})"

    async def _send(self, ws: ClientConnection) -> None:
        while True:
            while self._outgoing:  # what a lost connection left unsent goes first
                item = self._outgoing[0]
                if isinstance(item, np.ndarray):
                    if len(self._unanswered) >= MAX_QUEUED_FRAMES:
                        break  # the worker holds all it keeps: the next frame waits for an answer
                    await ws.send(encode_caller(item))
                    self._unanswered.append((time.monotonic(), item))
                else:
                    await ws.send(item)
                self._outgoing.popleft()  # only once sent: what a dead connection held goes to the next
            self._ready_to_send.clear()
            await self._ready_to_send.wait()

    async def _receive(self, ws: ClientConnection) -> str:
        last_look = False  # the worker is overdue: one short wait more before it is judged lost
        while True:
            try:
                async with asyncio.timeout(CATCH_UP_S if last_look else self._patience()):
                    message = await ws.recv()  # a recv cut short by the timeout loses no message
            except TimeoutError:
                # After a stall of this process the timer can fire before the socket is read: what the
                # worker sent meanwhile is judged first, once this loop has caught up.
                overdue = self._overdue()
                if overdue and last_look:
                    return f"no agent frame for {self.engine.lost_after_s:.1f} s"
                last_look = overdue
                continue
            except ConnectionClosed as exc:
                closed = exc.rcvd
                return f"connection closed ({closed.code} {closed.reason})" if closed else "connection lost"
            last_look = False
            self._heard_at = time.monotonic()
            try:
                if isinstance(message, bytes):
                    self._deliver(*decode_agent(message))
                else:
                    self._on_control(read_control(message))
            except ProtocolError as exc:
                return f"protocol error: {exc}"

    def _silent_since(self) -> float:
        """Since when the worker owes an answer and has said nothing: the later of its last message and the
        oldest frame it has not answered. A slow worker still answers, frame after frame, and is not lost
        however long its backlog; a hung one goes silent."""
        return max(self._heard_at, self._unanswered[0][0])

    def _patience(self) -> float:
        """How long to wait for the next message before checking whether the worker is overdue."""
        if not self._unanswered or self._reprimed is not None:
            return self.engine.lost_after_s
        return max(0.02, self._silent_since() + self.engine.lost_after_s - time.monotonic())

    def _overdue(self) -> bool:
        if self._reprimed is not None or not self._unanswered:  # a re-prime pauses the session's frames
            return False
        return time.monotonic() - self._silent_since() >= self.engine.lost_after_s

    def _deliver(self, token: int, text: str, pcm: np.ndarray) -> None:
        if self._unanswered:
            self._unanswered.popleft()
            self._ready_to_send.set()  # room at the worker for a frame waiting here
        if text:
            self._recent.append(text)
        self._frames.put(AgentFrame(self._delivered, pcm, text, token))  # nobody reading keeps the newest
        self._delivered += 1

    def _on_control(self, message: dict[str, Any]) -> None:
        waiting = self._reprimed
        if message["op"] == "reprimed" and waiting is not None and not waiting.done():
            waiting.set_result(Positions(**{k: int(v) for k, v in message["positions"].items()}))
        elif message["op"] == "error":
            log.warning("session %s: worker says: %s", self.id, message.get("message"))
            if waiting is not None and not waiting.done():
                waiting.set_exception(EngineError(str(message.get("message"))))

    def _finish(self, reason: str) -> None:
        if self.close_reason is not None:
            return
        self.close_reason = reason
        self._outgoing.clear()
        self._frames.end(reason)
        self.engine._sessions.discard(self)
        if self._reprimed is not None and not self._reprimed.done():
            self._reprimed.set_exception(SessionClosed(f"session {self.id} is closed ({reason})"))
