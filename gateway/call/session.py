"""CallSession: one phone call from `start` to hang-up, between a carrier stream and an engine session.

It speaks CallEvents with the transport and the EngineSession API with the engine, and knows neither a
carrier's wire format nor a tensor. Caller audio is framed into 80 ms and pushed to the engine; each agent
frame goes straight back to the carrier followed by a mark, and mark echoes say what the caller heard.
Every caller frame framed and every agent frame received also feeds the call's DuplexTimeline (voice
activity of both sides on the call clock, gateway/call/timeline.py), which the call record summarises.

Carrier buffer policy: before each agent frame is sent, the audio sent but not yet confirmed played
(marks not yet echoed) must be at most `max_ahead_s` (200 ms); otherwise the frame is dropped, not
queued. Holding it here would only move the delay from the carrier to us, and every frame of delay is
added to every turn of the rest of the call; so the carrier never holds more than `max_ahead_s` plus the
frame playing. Dropped frames still count on the agent clock and their text still enters the transcript.

Caller audio that arrives while the engine session is still being primed is dropped for the same reason:
the model steps once per caller frame in real time, so a backlog would never be worked off.

Size: the call's two directions (caller frames in, agent frames out with their marks), its limits and its
escalation watch share the call's clocks and counters; cut apart, each would reach into the others'.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.api import FRAME_S, AgentFrame, EngineError, EngineSession, SessionClosed
from gateway.audio import InboundAudio, OutboundAudio
from gateway.call.events import (
    CallerAudio,
    CallEvent,
    CallStarted,
    CallStopped,
    ClearAudio,
    DtmfPressed,
    EndStream,
    MarkPlayed,
    OutboundCommand,
    PlaceMark,
    PlayAudio,
    StreamConnected,
)
from gateway.call.limits import CallLimits, LimitEvent, LimitGuard
from gateway.call.notices import CallNotice, NoticeHook, NoticeKind
from gateway.call.timeline import DuplexTimeline

log = logging.getLogger(__name__)

MAX_AHEAD_S = 0.2
MAX_TRANSCRIPT_PIECES = 20_000  # the agent's words kept per call: over an hour of speech
REANCHOR_PIECES = 60  # the agent's last text pieces carried into a re-anchored prompt
# Caller frames kept while the engine session primes (a stream that starts before its prime is done): the
# engine hears them once it is ready; beyond this (2 s) the oldest go.
EARLY_FRAMES_KEPT = 25
STOP_GRACE_S = 0.5  # after a failed send, how long the carrier's own stop may take to arrive
SPOKEN_WINDOW_CHARS = 300  # the agent's recent words that phrase triggers look at

SendCommand = Callable[[OutboundCommand], Awaitable[None]]


@dataclass(frozen=True)
class TranscriptPiece:
    """A piece of the agent's text, stamped with the agent audio clock at the start of its frame."""

    at_s: float
    text: str


@dataclass
class CallStats:
    caller_frames: int = 0  # 80 ms caller frames framed from the carrier's audio
    caller_frames_dropped: int = 0  # never reached the engine (over EARLY_FRAMES_KEPT while it primed, or
    # it never opened)
    caller_audio_dropped_fast: int = 0  # messages of caller audio beyond wall clock (+ jitter): dropped
    agent_frames: int = 0  # produced by the engine
    agent_frames_sent: int = 0
    agent_frames_dropped: int = 0  # carrier already held max_ahead_s
    agent_frames_heard: int = 0  # confirmed played by a mark echo
    agent_frames_discarded: int = 0  # echoed after a clear: never played
    malformed_messages: int = 0  # counted by the transport loop
    dtmf_presses: int = 0
    transcript_pieces_dropped: int = 0  # the oldest words, once the transcript holds MAX_TRANSCRIPT_PIECES


class CallSession:
    """One call: owns its engine session, audio converters, playback accounting and transcript."""

    def __init__(
        self,
        started: CallStarted,
        engine_session: Awaitable[EngineSession],
        send: SendCommand,
        *,
        max_ahead_s: float = MAX_AHEAD_S,
        on_notice: NoticeHook | None = None,
        limits: CallLimits | None = None,
        reanchor_prompt: Callable[[Sequence[str], int | None], str] | None = None,
        agent: str = "",
        phrases: Sequence[re.Pattern[str]] = (),
        escalates: frozenset[str] = frozenset(),
    ) -> None:
        self.call_id = started.call_id
        self.started = started
        self.max_ahead_s = max_ahead_s
        self.stats = CallStats()
        self.transcript: list[TranscriptPiece] = []
        self.end_reason: str | None = None
        self._send = send
        self._on_notice = on_notice
        fmt = started.media_format
        self._inbound = InboundAudio(encoding=fmt.encoding, rate=fmt.sample_rate)
        self._outbound = OutboundAudio(encoding=fmt.encoding, rate=fmt.sample_rate)
        self._engine_task: asyncio.Future[EngineSession] = asyncio.ensure_future(engine_session)
        self._engine: EngineSession | None = None
        self._agent_task: asyncio.Task[None] | None = None
        self._first_pushed_frame: int | None = None  # caller frame the agent clock starts at
        self._early: deque[tuple[int, np.ndarray]] = deque()  # (caller frame, audio) while priming
        self._unconfirmed: deque[str] = deque()  # marks sent, not yet echoed, oldest first
        self._cleared: set[str] = set()  # marks pending when we sent a clear: their echo means discarded
        self._ended = asyncio.Event()
        self._guard = LimitGuard(limits) if limits is not None else None
        # (the agent's recent words, the engine's token budget) -> the prompt to re-prime with
        self._reanchor_prompt = reanchor_prompt
        self.agent = agent
        self._phrases = list(phrases)  # patterns in the agent's own words that trigger an escalation
        self._escalates = escalates  # triggers escalation takes over from their default course
        self._spoken = ""  # the agent's most recent words, for phrase triggers
        self._engine_lost = False
        # Voice activity of both sides on the call clock, for the record's quality measures (~25 us a side)
        self.timeline: DuplexTimeline | None = DuplexTimeline()

    # --- clocks -------------------------------------------------------------------------------------

    @property
    def caller_clock_s(self) -> float:
        """Seconds of caller audio received (whole 80 ms frames)."""
        return self.stats.caller_frames * FRAME_S

    @property
    def agent_clock_s(self) -> float:
        """Call time at the end of the last agent frame produced; agent frame i answers the i-th caller
        frame pushed, so the agent clock starts where the caller clock stood at the first push."""
        if self._first_pushed_frame is None:
            return 0.0
        return (self._first_pushed_frame + self.stats.agent_frames) * FRAME_S

    @property
    def heard_s(self) -> float:
        """Agent audio the carrier confirmed played."""
        return self.stats.agent_frames_heard * FRAME_S

    @property
    def carrier_ahead_s(self) -> float:
        """Agent audio at the carrier not yet confirmed played (the frame playing included)."""
        return len(self._unconfirmed) * FRAME_S

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    async def wait_ended(self) -> None:
        await self._ended.wait()

    @property
    def engine_session(self) -> EngineSession | None:
        """The engine session once primed; None before, or when it never opened (busy, failed)."""
        return self._engine

    @property
    def first_bridged_frame(self) -> int | None:
        """Caller frame (count from the start of the stream) first pushed to the engine; None if none was."""
        return self._first_pushed_frame

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin serving the call: wait for the engine session, then stream agent frames back."""
        if self._agent_task is None:
            self._agent_task = asyncio.create_task(self._serve_agent(), name=f"agent:{self.call_id}")
            self._notify(NoticeKind.STARTED, f"stream {self.started.stream_id}")

    async def handle(self, event: CallEvent) -> None:
        """Apply one inbound event; an event that makes no sense now is logged and dropped."""
        if isinstance(event, CallerAudio):  # 50 a second: first
            if not self.ended:
                try:
                    self._on_caller_audio(event.payload)
                except ValueError as exc:  # a payload the decoder cannot take: drop it, keep the call
                    log.warning("call %s: dropped caller audio (%s)", self.call_id, exc)
        elif isinstance(event, MarkPlayed):  # echoes keep coming after a clear at the end; count them
            self._on_mark(event.name)
        elif self.ended:
            return
        elif isinstance(event, DtmfPressed):
            self.stats.dtmf_presses += 1
            self._notify(NoticeKind.DTMF, event.digit)
        elif isinstance(event, CallStopped):
            await self.end(f"carrier_{event.reason}", notify_carrier=False)
        elif isinstance(event, CallStarted | StreamConnected):
            log.warning(
                "call %s: dropped a second %s on a running stream", self.call_id, type(event).__name__
            )
        else:
            log.warning("call %s: dropped unexpected event %r", self.call_id, event)

    async def end(self, reason: str, *, notify_carrier: bool = True) -> None:
        """End the call now, once: free the engine slot, stop our tasks, and (when the carrier is still
        there) clear its buffered audio and close the stream. Later issues' limits and escalations end
        calls through here."""
        if self.ended:
            return
        self.end_reason = reason
        self._ended.set()
        current = asyncio.current_task()
        if self._agent_task is not None and self._agent_task is not current:
            self._agent_task.cancel()
        await self._release_engine()
        if notify_carrier:
            try:
                await self.clear_carrier()
                await self._send(EndStream(reason))
            except Exception as exc:  # the carrier may already be gone; nothing left to tell it
                log.info("call %s: could not notify the carrier of the end (%s)", self.call_id, exc)
        if self._agent_task is not None and self._agent_task is not current:
            await asyncio.gather(self._agent_task, return_exceptions=True)
        self.stats.caller_frames_dropped += len(self._early)  # kept for an engine that never came
        self._early.clear()
        log.info("call %s ended: %s; %s", self.call_id, reason, self.stats)
        self._notify(NoticeKind.ENDED, reason)

    async def clear_carrier(self) -> None:
        """Drop the agent audio queued at the carrier (hang-up, hand-off); the echoes of its marks that
        follow mean "discarded", not "heard"."""
        if not self._unconfirmed:
            return
        self._cleared.update(self._unconfirmed)
        self._unconfirmed.clear()
        self._outbound.reset()  # no filter tail of the dropped audio may follow
        await self._send(ClearAudio())

    # --- caller -> engine ---------------------------------------------------------------------------

    def _on_caller_audio(self, payload: bytes) -> None:
        for frame in self._inbound.push(payload):
            self.stats.caller_frames += 1
            if self.timeline is not None:
                self._observe(self.timeline.caller_frame, (self.stats.caller_frames - 1) * FRAME_S, frame)
            if self._engine is None:  # priming: kept for the engine, the newest 2 s of it
                if len(self._early) == EARLY_FRAMES_KEPT:
                    self._early.popleft()
                    self.stats.caller_frames_dropped += 1
                self._early.append((self.stats.caller_frames - 1, frame))
                continue
            if not self._push(self.stats.caller_frames - 1, frame):
                return
            if self._guard is not None:
                horizon = getattr(self._engine, "prompt_horizon_steps", None)
                for event in self._guard.on_caller_frame(self.caller_clock_s, frame, horizon):
                    self._on_limit(event)

    def _push(self, index: int, frame: np.ndarray) -> bool:
        """Caller frame `index` to the engine; False once the session is lost."""
        assert self._engine is not None
        if self._first_pushed_frame is None:
            self._first_pushed_frame = index
        try:
            self._engine.push(frame)
        except SessionClosed as exc:
            self._on_engine_lost(str(exc))
            return False
        return True

    # --- limits -------------------------------------------------------------------------------------

    def _on_limit(self, event: LimitEvent) -> None:
        """Carry out what a limit asks for; every limit is also a notice (escalation hooks listen)."""
        limits = self._guard.limits if self._guard is not None else CallLimits()
        self._notify(NoticeKind(event.kind), event.detail)
        if event.kind == "warning":
            self.say(limits.wrap_up_line)
        elif event.kind in ("max_duration", "silence_timeout"):
            if event.kind not in self._escalates:  # else the escalation's actions decide how it ends
                self._spawn_end(event.kind)
        elif event.kind == "context_horizon":
            if limits.horizon_action == "wrap_up":
                self._spawn(self._wrap_up(limits.wrap_up_line), "wrap-up")
            elif limits.horizon_action == "reanchor":
                self._spawn(self._reanchor(), "reanchor")
            # hand_off: the notice above is the escalation trigger; its hooks do the hand-off.

    def say(self, line: str) -> float:
        """Make the agent say `line`; returns how long that takes (0 when there is nothing to say or no
        engine session to say it)."""
        engine = self._engine
        if not line or engine is None or getattr(engine, "close_reason", None) or not hasattr(engine, "say"):
            return 0.0
        return engine.say(line) * FRAME_S

    async def _wrap_up(self, line: str) -> None:
        # Let the line be spoken and played (what is queued at the carrier included) before hanging up.
        await asyncio.sleep(self.say(line) + self.max_ahead_s)
        await self.end("context_horizon")

    async def _reanchor(self) -> None:
        """Prime a fresh window with the role prompt plus the agent's recent words, so the call keeps its
        role past the model's 240 s window."""
        engine = self._engine
        if self._reanchor_prompt is None or engine is None or not hasattr(engine, "reprime"):
            return
        said = [piece.text for piece in self.transcript[-REANCHOR_PIECES:]]
        budget = engine.reprime_token_budget() if hasattr(engine, "reprime_token_budget") else None
        prompt = self._reanchor_prompt(said, budget)
        if not prompt:
            return
        try:
            await engine.reprime(prompt)
        except EngineError as exc:  # the prompt did not fit after all: the call must not go on roleless
            log.warning("call %s: re-anchoring failed (%s); wrapping up instead", self.call_id, exc)
            self._notify(NoticeKind.WARNING, f"re-anchor failed: {exc}")
            limits = self._guard.limits if self._guard is not None else CallLimits()
            await self._wrap_up(limits.wrap_up_line)
            return
        self._notify(NoticeKind.REANCHORED, f"{len(prompt)} characters")
        if self._guard is not None:
            self._guard.rearm("context_horizon")

    def _spawn(self, work: Awaitable[None], what: str) -> None:
        task = asyncio.ensure_future(work)
        task.set_name(f"{what}:{self.call_id}")
        _background.add(task)
        task.add_done_callback(_background.discard)

    # --- engine -> carrier --------------------------------------------------------------------------

    async def _serve_agent(self) -> None:
        try:
            self._engine = await self._engine_task
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # EngineBusy, EngineError, or an engine bug: never leave dead air
            kind = type(exc).__name__
            log.warning(
                "call %s: engine could not open a session (%s: %s); closing the stream so the call "
                "falls through",
                self.call_id,
                kind,
                exc,
            )
            await self.end(f"engine_unavailable: {kind}: {exc}")
            return
        if self.ended:  # the call ended while the session was priming
            await self._release_engine()
            return
        early, self._early = self._early, deque()
        for index, frame in early:  # what the caller said while the session primed, in order
            if not self._push(index, frame):
                break
        lost = ""
        try:
            async for frame in self._engine.frames():
                await self._on_agent_frame(frame)
        except SessionClosed as exc:  # the engine lost the session (a failed step, a dead worker)
            lost = str(exc)
        except Exception as exc:  # a send to a vanished carrier
            # Its `stop` (or close) may still be on its way through the stream's reader: let that say why
            # the call ended, and call it a failure only if nothing does.
            try:
                await asyncio.wait_for(self._ended.wait(), STOP_GRACE_S)
            except TimeoutError:
                log.warning("call %s: agent stream failed (%r)", self.call_id, exc)
                await self.end("agent_stream_failed", notify_carrier=False)
            return
        if not self.ended:  # the engine ended the session on its own
            self._on_engine_lost(lost or "the session ended")

    def _on_engine_lost(self, why: str) -> None:
        """The engine lost this call's session (seen by the agent stream or by a refused push): once,
        either hand it to escalation (which decides how the call ends) or end the call."""
        if self._engine_lost or self.ended:
            return
        self._engine_lost = True
        log.warning("call %s: the engine lost the session (%s)", self.call_id, why)
        if "engine_lost" in self._escalates:
            self._notify(NoticeKind.ENGINE_LOST, why)
        else:
            self._spawn_end("engine_lost")

    def _keep_text(self, piece: TranscriptPiece) -> None:
        """Keep the newest MAX_TRANSCRIPT_PIECES of the agent's words (trimmed in batches, not per piece)."""
        self.transcript.append(piece)
        if len(self.transcript) > MAX_TRANSCRIPT_PIECES + MAX_TRANSCRIPT_PIECES // 8:
            dropped = len(self.transcript) - MAX_TRANSCRIPT_PIECES
            del self.transcript[:dropped]
            self.stats.transcript_pieces_dropped += dropped

    async def _on_agent_frame(self, frame: AgentFrame) -> None:
        at_s = self.agent_clock_s
        self.stats.agent_frames += 1
        if self.timeline is not None:
            self._observe(self.timeline.agent_frame, at_s, frame.pcm, frame.text)
        if frame.text:
            self._keep_text(TranscriptPiece(at_s=round(at_s, 3), text=frame.text))
            if self._phrases:
                self._watch_phrases(frame.text)
        # Encode every frame, sent or not, so the converter's filter state follows the real timeline.
        payload = self._outbound.encode(frame.pcm)
        if self.carrier_ahead_s > self.max_ahead_s + 1e-9:
            self.stats.agent_frames_dropped += 1
            return
        name = f"agent-{frame.index}"
        await self._send(PlayAudio(payload))
        await self._send(PlaceMark(name))
        self._unconfirmed.append(name)
        self.stats.agent_frames_sent += 1

    def _watch_phrases(self, text: str) -> None:
        self._spoken = (self._spoken + text)[-SPOKEN_WINDOW_CHARS:]
        spoken = " ".join(self._spoken.split())
        for pattern in self._phrases:
            if pattern.search(spoken):
                self._notify(NoticeKind.PHRASE, pattern.pattern)
                self._phrases = []  # a call escalates once
                return

    def _on_mark(self, name: str) -> None:
        if name in self._cleared:
            self._cleared.discard(name)
            self.stats.agent_frames_discarded += 1
            return
        if name not in self._unconfirmed:
            log.warning("call %s: dropped echo of unknown mark %r", self.call_id, name)
            return
        # Carriers play in order, so an echo confirms every older mark too.
        while self._unconfirmed:
            self.stats.agent_frames_heard += 1
            if self._unconfirmed.popleft() == name:
                break

    # --- helpers ------------------------------------------------------------------------------------

    async def _release_engine(self) -> None:
        if self._engine is not None:
            await self._engine.close()
            return
        task = self._engine_task
        if not task.done():
            task.cancel()
        # Whenever the open finishes (even after our cancel), close what it opened: the slot is ours.
        task.add_done_callback(_close_opened_session)

    def _observe(self, feed: Callable[..., None], *args: object) -> None:
        """Feed the timeline; should it ever fail, the call goes on without one (its record's is empty)."""
        try:
            feed(*args)
        except Exception:
            log.exception("call %s: the duplex timeline failed; no timeline for this call", self.call_id)
            self.timeline = None

    def _spawn_end(self, reason: str) -> None:
        self._spawn(self.end(reason), "end")

    def _notify(self, kind: NoticeKind, detail: str) -> None:
        if self._on_notice is None:
            return
        try:
            self._on_notice(CallNotice(kind, self.call_id, round(self.caller_clock_s, 3), detail))
        except Exception:
            log.exception("call %s: notice hook failed on %s", self.call_id, kind)


_background: set[asyncio.Task[None]] = set()  # keeps fire-and-forget tasks referenced until done


def _close_opened_session(task: asyncio.Future[EngineSession]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    closing = asyncio.ensure_future(task.result().close())
    _background.add(closing)  # type: ignore[arg-type]
    closing.add_done_callback(_background.discard)  # type: ignore[arg-type]
