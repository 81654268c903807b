"""The engine worker: admits sessions into batch slots, primes them, and runs the step loop.

Every session that has a caller frame waiting joins the next step (continuous batching with an execution
mask), so a frame waits at most one step. Model work runs on one dedicated thread, serialised, so the
asyncio loop that talks to the gateway never blocks on the GPU/CPU. A new session is admitted only while
there is a free slot and steps of the size it would need (the runner's step sizes, profiled at start-up,
timed at every live step and re-measured before a refusal would rest on an old figure) leave room inside
the 80 ms real-time budget.

Size: sessions, admission and the step loop share the worker's slot bookkeeping (the free-slot heap, the
sessions by slot, the model thread); cut apart, each would reach into the others' state.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import heapq
import itertools
import logging
import math
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece
import torch

from engine.api import (
    FRAME_S,
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
from engine.loading import CheckpointError, announcement_tokens, encode_role_prompt
from engine.prompt import TEXT_PAD
from engine.runner import BatchRunner, PrefillJob, VoicePrefix
from engine.scheduler import PrimeRequest, Scheduler, Tick
from engine.voices import VoiceEmbeddings, load_voice

log = logging.getLogger(__name__)

FRAME_BUDGET_S = FRAME_S  # a step must finish within one frame of audio
SILENT_TEXT_IDS = frozenset({0, 1, 2, TEXT_PAD})  # EPAD, <s>, </s>, PAD carry no words
STEP_TIMES_KEPT_S = 10.0  # admission looks at the step times of the last 10 s only
PROBE_INTERVAL_S = 2.0  # a verdict over budget older than this is re-measured before a call is refused
PROBE_REPEATS = 3  # steps per re-measurement (their median counts)

StepObserver = Callable[[int, float], None]  # (step size, seconds), called on the model thread


def _p90(values: collections.abc.Iterable[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.9 * (len(ordered) - 1))]


@dataclass
class WorkerStats:
    """Step counters, and the recent step times by step size (live steps and re-measurements) that
    admission decides on. Samples older than `kept_s` are forgotten, so a slow start-up or a past load
    spike stops counting by itself."""

    capacity: int
    kept_s: float = STEP_TIMES_KEPT_S
    steps: int = 0
    last_step_s: float = 0.0
    recent_step_s: float = 0.0  # 90th percentile of the recent steps, whatever their size
    dropped_frames: int = 0
    window: collections.deque = field(default_factory=lambda: collections.deque(maxlen=50), repr=False)
    # size -> (time taken, seconds), newest last
    by_size: dict[int, collections.deque[tuple[float, float]]] = field(default_factory=dict, repr=False)
    # told of every live step (e.g. the gateway's metrics); one that raises is dropped
    observers: list[StepObserver] = field(default_factory=list, repr=False)

    def record(self, seconds: float, size: int) -> None:
        """A live step of `size` that took `seconds`."""
        self.steps += 1
        self.last_step_s = seconds
        self.window.append(seconds)
        self.recent_step_s = _p90(self.window)
        self._add(size, seconds, time.monotonic())
        for observer in tuple(self.observers):
            try:
                observer(size, seconds)
            except Exception:
                log.exception("engine: step observer %r failed; dropped", observer)
                if observer in self.observers:
                    self.observers.remove(observer)

    def remeasured(self, size: int, seconds: list[float], at: float | None = None) -> None:
        """Fresh timings of `size` replace what was known of it."""
        self.by_size.pop(size, None)
        for value in seconds:
            self._add(size, value, time.monotonic() if at is None else at)

    def _add(self, size: int, seconds: float, at: float) -> None:
        self.by_size.setdefault(size, collections.deque(maxlen=50)).append((at, seconds))

    def expected_step_s(self, size: int, now: float | None = None) -> tuple[float, float] | None:
        """(median seconds, age of the newest sample) of the steps of `size` in the last `kept_s`; None
        when there are none."""
        now = time.monotonic() if now is None else now
        recent = [(at, s) for at, s in self.by_size.get(size, ()) if now - at <= self.kept_s]
        if not recent:
            return None
        return statistics.median(s for _, s in recent), now - recent[-1][0]


@dataclass
class _Voice:
    """A loaded voice prompt and, once a session has used it, the KV of its voice-only positions."""

    source: VoiceEmbeddings | torch.Tensor  # stored embeddings, or Mimi codes [V, 8] of the audio
    prefix: VoicePrefix | None = None


@dataclass
class _Prime:
    """A prime queued or under way: a new session's (`fresh`), or a live one's re-anchor."""

    id: int
    session: WorkerSession
    text_ids: list[int]
    done: asyncio.Future[None]
    fresh: bool
    job: PrefillJob | None = None
    voice: _Voice | None = None  # the voice it primes with, once planned (its prefix is cached there)
    cancelled: bool = False  # its caller went away: dropped at the next tick boundary

    @property
    def remaining(self) -> int:
        return self.job.remaining if self.job is not None else 1 << 20  # not planned yet: a whole chunk


class WorkerSession:
    """One primed conversation in one slot (implements engine.api.EngineSession)."""

    def __init__(self, worker: EngineWorker, slot: int, seed: int, spec: SessionSpec) -> None:
        self.id = f"s{next(_session_ids)}"
        self.seed, self.slot, self.spec = seed, slot, spec
        self.prompt_positions = 0  # P: positions the prompt took; live frame i runs at position P + i
        self.text_start = 0  # position of the role prompt's first token
        self.prompt_overhead = 0  # prompt positions that are not role-prompt tokens (voice, silences)
        self._worker = worker
        self._forced: collections.deque[int] = collections.deque()
        self._inbox: collections.deque[np.ndarray] = collections.deque()
        self._outbox = AgentFrames(MAX_QUEUED_FRAMES)
        self._frames_out = 0
        self._slot_lock = asyncio.Lock()  # held while the slot's state is rewritten (reprime, move)
        self._priming = False  # re-anchoring: its slot takes no step until the new prompt is in
        self.closed = False
        self.close_reason: str | None = None

    def push(self, pcm: np.ndarray) -> None:
        if self.closed:
            raise SessionClosed(f"session {self.id} is closed ({self.close_reason})")
        frame = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if frame.shape[0] != FRAME_SAMPLES:
            raise ValueError(f"session {self.id}: a frame is {FRAME_SAMPLES} samples, got {frame.shape[0]}")
        if len(self._inbox) >= MAX_QUEUED_FRAMES:
            self._inbox.popleft()
            self._worker.stats.dropped_frames += 1
        self._inbox.append(frame)
        self._worker._wake.set()

    def frames(self) -> AsyncIterator[AgentFrame]:
        return self._outbox.read(self.id)

    async def close(self) -> None:
        self._finish("closed")

    @property
    def position(self) -> int:
        """The model position the next caller frame will be run at."""
        return self.prompt_positions + self._frames_out + len(self._inbox)

    @property
    def prompt_horizon_steps(self) -> int:
        """Steps left before the role prompt's first token leaves the model's attention window (a query
        at position q sees positions down to q - context + 2); 0 or less once it has started to go."""
        return self.text_start + self._worker.context - 2 - self.position

    def say(self, text: str) -> int:
        """Make the agent say `text`: its tokens are forced into the text stream, one per step, words
        spaced at a speaking pace; the audio follows the text. Returns the steps it will take."""
        tokens = self._worker.announcement_tokens(text)
        self._forced.extend(tokens)
        return len(tokens)

    def reprime_token_budget(self) -> int:
        """Role-prompt tokens a re-prime may take and still leave half the window to the call: the window's
        other half less the prompt's positions that are not role-prompt tokens (voice and silences)."""
        return self._worker.context // 2 - self.prompt_overhead

    async def reprime(self, prompt: str) -> None:
        """Re-anchor a long call: prime this slot afresh with `prompt` (e.g. the role prompt plus what
        matters from the call so far), keeping the session, its seed and its frame numbering."""
        if self.closed:
            raise SessionClosed(f"session {self.id} is closed ({self.close_reason})")
        text_ids = encode_role_prompt(self._worker.tokenizer, prompt)
        self._forced.clear()
        frames_before = self._frames_out
        async with self._slot_lock:
            self._priming = True
            try:
                await self._worker._prime_between_steps(self, text_ids, fresh=False)
            finally:
                self._priming = False
        self.prompt_positions -= frames_before  # live frame numbering continues across the re-anchor

    def _deliver(self, pcm: np.ndarray, token: int) -> None:
        text = "" if token in SILENT_TEXT_IDS else self._worker.piece(token)
        if self._outbox.put(AgentFrame(self._frames_out, pcm, text, token)):  # nobody reads: kept the newest
            self._worker.stats.dropped_frames += 1
        self._frames_out += 1

    def _finish(self, reason: str) -> None:
        if self.closed:
            return
        self.closed, self.close_reason = True, reason
        self._inbox.clear()
        self._outbox.end(reason)
        self._worker._release(self)


_session_ids = itertools.count(1)


class _TickFailed(Exception):
    """A tick's step or prime chunk raised; carries what the other half produced."""

    def __init__(self, stepped: object, step_error: BaseException | None, prime_error: BaseException | None):
        super().__init__(repr(step_error or prime_error))
        self.stepped, self.step_error, self.prime_error = stepped, step_error, prime_error


def _use_device(runner: BatchRunner) -> None:
    """Make the model thread's current CUDA device the runner's (a new thread starts on cuda:0), so its
    default stream, where steps and graph replays are queued, is that device's."""
    device = runner.lm.device
    if device.type == "cuda":
        torch.cuda.set_device(device)


class EngineWorker:
    """Serves many sessions from one model (implements engine.api.Engine)."""

    def __init__(
        self,
        runner: BatchRunner,
        tokenizer: sentencepiece.SentencePieceProcessor,
        voices_dir: Path | None,
        *,
        notice: str | None = None,
        admit_fraction: float = 0.8,  # admit while steps take at most this share of the 80 ms budget
        max_cached_voices: int = 16,
        step_profile: Mapping[int, float] | None = None,  # seconds per step size (BatchRunner.profile)
        probe_interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        self.runner, self.tokenizer, self.voices_dir = runner, tokenizer, voices_dir
        self.notice = notice
        self.admit_fraction = admit_fraction
        self.probe_interval_s = probe_interval_s
        self.stats = WorkerStats(runner.capacity)
        for size, seconds in (step_profile or {}).items():
            self.stats.remeasured(size, [seconds])
        self._probed: dict[int, float] = {}  # size -> when it was last re-measured
        self._probing: dict[int, asyncio.Future[None]] = {}  # size -> its measurement under way
        self._free = list(range(runner.capacity))  # a heap: the lowest free slot goes first, which keeps
        # the busy slots packed at the front so the runner's smaller step sizes apply
        self._sessions: dict[int, WorkerSession] = {}
        self._voices: collections.OrderedDict[str, _Voice] = collections.OrderedDict()
        self._max_voices = max_cached_voices
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="duplexgate-engine", initializer=_use_device, initargs=(runner,)
        )
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._closing = False
        self.scheduler = Scheduler()
        self._primes: dict[int, _Prime] = {}  # queued or under way, oldest first
        self._prime_ids = itertools.count(1)
        self.ticks: collections.deque[Tick] = collections.deque(maxlen=256)  # the latest, for tests

    # ---- Engine API -----------------------------------------------------------------------------------

    def count_prompt_tokens(self, prompt: str) -> int:
        return len(encode_role_prompt(self.tokenizer, prompt))

    async def admission(self) -> Admission:
        """Would a new session be admitted now? It is when a slot is free and the median of the last 10 s
        of steps of the size it would need (its lowest free slot plus the busy ones) fits in
        `admit_fraction` of the 80 ms budget. Before a call is refused on a figure older than the probe
        interval, or when there is no figure, that size is re-measured (at most once per interval), so a
        slow start-up or a past spike can never refuse calls for good."""
        if self._closing:
            return Admission(False, "the engine is shutting down")
        if not self._free:
            return Admission(False, f"all {self.runner.capacity} engine slots are in use")
        size = self._size_needed()
        budget = FRAME_BUDGET_S * self.admit_fraction
        known = self.stats.expected_step_s(size)
        if known is None or (known[0] > budget and known[1] > self.probe_interval_s):
            await self._probe(size)
            known = self.stats.expected_step_s(size) or known
        if known is None:  # could not be measured (shutting down, or a probe failed): do not guess
            return Admission(False, f"engine steps of size {size} could not be measured", size)
        step_s, age_s = known
        if step_s > budget:
            return Admission(
                False,
                f"engine steps of size {size} take {step_s * 1000:.0f} ms (measured {age_s:.1f} s ago), too "
                f"close to the {FRAME_BUDGET_S * 1000:.0f} ms real-time budget to admit another call",
                size,
                step_s,
            )
        return Admission(True, "", size, step_s)

    def _size_needed(self) -> int:
        """The step size once a new call is in: it takes the lowest free slot, and the steps then run the
        size covering it and every busy slot."""
        return self.runner.size_covering(max(self._free[0], *self._sessions, -1) + 1)

    async def _probe(self, size: int) -> None:
        """Re-measure steps of `size` on the model thread (between live steps), unless that was done within
        the probe interval: refused callers cannot make the engine measure more often than that. Callers
        asking at once share one measurement, and one who hangs up does not cancel it."""
        probing = self._probing.get(size)
        if probing is None:
            if time.monotonic() - self._probed.get(size, -math.inf) < self.probe_interval_s:
                return
            probing = self._probing[size] = asyncio.ensure_future(self._measure(size))
            probing.add_done_callback(lambda _: self._probing.pop(size, None))
        await asyncio.shield(probing)

    async def _measure(self, size: int) -> None:
        try:
            seconds = await self._run_on_model_thread(self.runner.time_steps, size, PROBE_REPEATS)
        except Exception:
            log.exception("engine: re-measuring steps of size %d failed", size)
            return
        finally:
            self._probed[size] = time.monotonic()
        self.stats.remeasured(size, seconds)
        log.info(
            "engine: steps of size %d re-measured: %s ms", size, ", ".join(f"{s * 1000:.1f}" for s in seconds)
        )

    async def open(self, spec: SessionSpec) -> WorkerSession:
        if self._closing:
            raise EngineError("the engine is shutting down")
        self._ensure_loop()
        while True:  # admission may measure (an await): judge again if other calls took slots meanwhile
            admission = await self.admission()
            if not admission.ready:
                raise EngineBusy(admission.reason)
            if self._free and self._size_needed() == admission.size:
                break
        text_ids = encode_role_prompt(self.tokenizer, spec.prompt)
        slot = heapq.heappop(self._free)
        seed = spec.seed if spec.seed is not None else secrets.randbits(63)
        session = WorkerSession(self, slot, seed, spec)
        # The slot goes back to the free heap from the step loop if the prime fails or is abandoned, once
        # no chunk of it can still be running.
        await self._prime_between_steps(session, text_ids, fresh=True)
        self._sessions[slot] = session
        return session

    async def _prime_between_steps(self, session: WorkerSession, text_ids: list[int], fresh: bool) -> None:
        """Queue the session's prime for the step loop, which runs it in chunks between live steps; return
        once it is in. A caller who stops waiting abandons it (at the next tick boundary)."""
        if self._closing:
            raise EngineError("the engine is shutting down")
        prime = _Prime(
            next(self._prime_ids), session, text_ids, asyncio.get_running_loop().create_future(), fresh
        )
        self._primes[prime.id] = prime
        self._ensure_loop()
        self._wake.set()
        try:
            await asyncio.shield(prime.done)
        except asyncio.CancelledError:
            prime.cancelled = True
            self._wake.set()
            raise

    def shutdown(self) -> None:
        """End every session and stop the model thread (from any thread; aclose also stops the step loop)."""
        self._closing = True
        self._fail_primes(EngineError("the engine is shutting down"))
        for session in list(self._sessions.values()):
            session._finish("engine_closed")
        self._executor.shutdown(wait=True)

    async def aclose(self) -> None:
        self._closing = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        self.shutdown()

    @property
    def capacity(self) -> int:
        return self.runner.capacity

    @property
    def active(self) -> int:
        return len(self._sessions)

    @property
    def free_slots(self) -> int:
        """Slots no session holds or primes in."""
        return len(self._free)

    @property
    def context(self) -> int:
        return self.runner.lm.cfg.context

    def announcement_tokens(self, text: str) -> list[int]:
        return announcement_tokens(self.tokenizer, text)

    def piece(self, token: int) -> str:
        return self.tokenizer.id_to_piece(int(token)).replace("\u2581", " ")

    # ---- model thread ---------------------------------------------------------------------------------

    def _prime_chunk(self, prime: _Prime, positions: int) -> tuple[bool, int, float]:
        """Run the next `positions` positions of a prime (planning it first); returns (finished, positions
        run, seconds)."""
        started = time.perf_counter()
        session = prime.session
        if prime.job is None:
            voice = self._voice(session.spec.voice)
            plan = self.runner.plan(voice.source, prime.text_ids)
            context = self.runner.lm.cfg.context
            if plan.length >= context:
                raise EngineError(
                    f"the prompt takes {plan.length} model steps but the model sees only {context}: shorten "
                    f"the role prompt ({len(prime.text_ids)} tokens) or use a shorter voice prompt"
                )
            self.runner.configure(session.slot, session.spec.sampling, session.seed)
            prime.job = self.runner.begin_prefill(session.slot, plan, voice.prefix)
            prime.voice = voice
        job, before = prime.job, prime.job.done
        finished = self.runner.prefill_chunk(job, positions)
        if finished:
            prefill = self.runner.finish_prefill(job)
            voice = prime.voice
            if voice is not None and voice.prefix is None:
                voice.prefix = prefill.prefix
            session.prompt_positions = job.plan.length
            session.text_start = job.plan.voice_positions
            session.prompt_overhead = job.plan.length - len(prime.text_ids)
        return finished, job.done - before, time.perf_counter() - started

    def _voice(self, name: str) -> _Voice:
        if name in self._voices:
            self._voices.move_to_end(name)
            return self._voices[name]
        loaded = load_voice(name, self.voices_dir, model_dim=self.runner.lm.cfg.dim)
        voice = self._voices[name] = _Voice(self.runner.voice_source(loaded))
        while len(self._voices) > self._max_voices:
            self._voices.popitem(last=False)
        return voice

    def _step(self, pcm: np.ndarray, active: np.ndarray, forced: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        self.runner.forced_text.copy_(torch.from_numpy(forced))
        result = self.runner.step(torch.from_numpy(pcm), torch.from_numpy(active))
        out_pcm, text = result.pcm.cpu().numpy(), result.tokens[:, 0].cpu().numpy()
        self.stats.record(time.perf_counter() - started, size=len(text))
        return out_pcm, text

    async def _run_on_model_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- the step loop --------------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._step_loop(), name="engine-steps")
            self._loop_task.add_done_callback(self._on_loop_end)

    def _on_loop_end(self, task: asyncio.Task[None]) -> None:
        """The step loop is supervised: if it ends while the engine is open (a bug, or something cancelled
        it), every session it was stepping is told at once (`engine_lost`), so its call can take the
        escalation path instead of waiting for frames that will never come. The next `open` starts a new
        loop."""
        if self._closing:
            return
        why = "cancelled" if task.cancelled() else repr(task.exception())
        log.error("engine step loop ended (%s); %d sessions lost", why, len(self._sessions))
        self._fail_primes(EngineError(f"the engine step loop ended ({why})"))
        for session in list(self._sessions.values()):
            session._finish("engine_lost")

    async def _step_loop(self) -> None:
        capacity = self.runner.capacity
        while True:
            self._drop_abandoned_primes()
            ready = [s for s in self._sessions.values() if s._inbox and not s._priming]
            if not ready and not self._primes:
                await self._wake.wait()
                self._wake.clear()
                continue
            size = self.runner.size_covering(max((s.slot for s in ready), default=0) + 1)
            known = self.stats.expected_step_s(size)
            tick = self.scheduler.tick(
                [s.slot for s in ready],
                [PrimeRequest(p.id, p.remaining) for p in self._primes.values()],
                live=len(self._sessions),
                step_s=known[0] if known else None,
                move=self._compaction(),
            )
            self.ticks.append(tick)
            if tick.move is not None:
                try:
                    await self._move(*tick.move)
                except Exception:  # an optimisation: never a reason to stop stepping the calls
                    log.exception("engine slot compaction failed")
                ready = [s for s in self._sessions.values() if s._inbox and not s._priming]  # slots moved
            prime = self._primes.get(tick.prime) if tick.prime is not None else None
            pcm = np.zeros((capacity, FRAME_SAMPLES), dtype=np.float32)
            active = np.zeros(capacity, dtype=bool)
            forced = np.full(capacity, -1, dtype=np.int64)
            for session in ready:
                pcm[session.slot] = session._inbox.popleft()
                active[session.slot] = True
                if session._forced:
                    forced[session.slot] = session._forced.popleft()
            try:
                stepped, primed = await self._run_on_model_thread(
                    self._run_tick, pcm if ready else None, active, forced, prime, tick.chunk
                )
            except _TickFailed as failed:
                stepped, primed = failed.stepped, None
                if failed.step_error is not None:
                    log.error(
                        "engine step failed (%r); ending the %d sessions in it", failed.step_error, len(ready)
                    )
                    for session in ready:
                        session._finish("engine_lost")
                if prime is not None and failed.prime_error is not None:
                    self._prime_failed(prime, failed.prime_error)
            if stepped is not None:
                out_pcm, text = stepped
                for session in ready:
                    if not session.closed:
                        session._deliver(out_pcm[session.slot], int(text[session.slot]))
            if prime is not None and primed is not None:
                finished, positions, seconds = primed
                self.scheduler.observe_chunk(positions, seconds)
                if finished:
                    self._prime_finished(prime)

    def _run_tick(
        self, pcm: np.ndarray | None, active: np.ndarray, forced: np.ndarray, prime: _Prime | None, chunk: int
    ) -> tuple[tuple[np.ndarray, np.ndarray] | None, tuple[bool, int, float] | None]:
        """One tick on the model thread: the live step, then the prime chunk. A failure of either is
        reported with what the other produced."""
        stepped = primed = None
        step_error = prime_error = None
        if pcm is not None:
            try:
                stepped = self._step(pcm, active, forced)
            except Exception as exc:
                step_error = exc
        if prime is not None and not prime.cancelled:
            try:
                primed = self._prime_chunk(prime, chunk)
            except Exception as exc:
                prime_error = exc
        if step_error is not None or prime_error is not None:
            raise _TickFailed(stepped, step_error, prime_error)
        return stepped, primed

    def _prime_finished(self, prime: _Prime) -> None:
        self._primes.pop(prime.id, None)
        if prime.cancelled:
            self._abandon(prime)
        elif not prime.done.done():
            prime.done.set_result(None)

    def _prime_failed(self, prime: _Prime, exc: BaseException) -> None:
        log.warning("session %s: priming failed: %r", prime.session.id, exc)
        self._primes.pop(prime.id, None)
        self._abandon(prime)
        if isinstance(exc, CheckpointError):  # an unknown or broken voice prompt
            exc = EngineError(str(exc))
        if not prime.done.done():
            prime.done.set_exception(exc)

    def _drop_abandoned_primes(self) -> None:
        """Between ticks (no chunk of theirs running): forget primes nobody waits for any more."""
        for prime in [p for p in self._primes.values() if p.cancelled]:
            del self._primes[prime.id]
            self._abandon(prime)

    def _abandon(self, prime: _Prime) -> None:
        """A new session's slot goes back to the free heap (the next prime of it resets it); a live
        session's re-anchor is simply not done."""
        if prime.fresh and prime.session.slot not in self._sessions:
            heapq.heappush(self._free, prime.session.slot)

    def _fail_primes(self, exc: BaseException) -> None:
        for prime in list(self._primes.values()):
            self._primes.pop(prime.id, None)
            if not prime.done.done():
                prime.done.set_exception(exc)

    def _compaction(self) -> tuple[int, int] | None:
        """(from, to): the session in the highest busy slot moves down to the lowest free one when that
        makes every step smaller (calls below it have ended); one move at a time, between steps."""
        if not self._sessions or not self._free:
            return None
        source, target = max(self._sessions), self._free[0]
        rest = [slot for slot in self._sessions if slot != source]
        size_after = self.runner.size_covering(max([target, *rest]) + 1)
        if size_after >= self.runner.size_covering(source + 1) or self._sessions[source]._slot_lock.locked():
            return None
        return source, target

    async def _move(self, source: int, target: int) -> None:
        session = self._sessions[source]
        heapq.heappop(self._free)  # `target` (the lowest free slot) is taken while the state moves
        async with session._slot_lock:
            try:
                await self._run_on_model_thread(self.runner.move_slot, source, target)
            except Exception:
                log.exception("session %s: move from slot %d to %d failed", session.id, source, target)
                heapq.heappush(self._free, target)
                return
            if session.closed:  # it ended during the move, and its old slot was freed then
                heapq.heappush(self._free, target)
                return
            del self._sessions[source]
            self._sessions[target] = session
            session.slot = target
            heapq.heappush(self._free, source)

    def _release(self, session: WorkerSession) -> None:
        if self._sessions.get(session.slot) is session:
            del self._sessions[session.slot]
            heapq.heappush(self._free, session.slot)  # the next prefill resets it on the model thread
