"""The engine's contract with the gateway: open a session, push caller frames, read agent frames.

The engine knows no telephony. A session is opened with a voice, a role prompt, a seed and sampling
settings; the caller's audio goes in as 80 ms frames of 24 kHz float PCM and for every frame pushed
exactly one 80 ms agent frame (PCM plus the text piece of that step) comes out, in order.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engine.config import CONTEXT_STEPS, FRAME_S, FRAME_SAMPLES, SAMPLE_RATE

__all__ = [
    "CONTEXT_STEPS",
    "FRAME_S",
    "FRAME_SAMPLES",
    "Admission",
    "MAX_QUEUED_FRAMES",
    "MAX_TOP_K",
    "SAMPLE_RATE",
    "AgentFrame",
    "AgentFrames",
    "Engine",
    "EngineBusy",
    "EngineError",
    "EngineSession",
    "SessionClosed",
    "SessionSpec",
    "Sampling",
]


class EngineError(RuntimeError):
    """The engine could not serve a session (bad voice, prompt too long, engine lost...)."""


class EngineBusy(EngineError):
    """No batch slot is free, or admitting another session would break the real-time budget."""


class SessionClosed(EngineError):
    """The session was closed (by the caller or because the engine lost it)."""


MAX_TOP_K = 256  # every step keeps this many candidates per token, whatever its sessions ask for


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; defaults are the published server's. A temperature of 0 samples greedily."""

    greedy: bool = False
    temp_audio: float = 0.8
    temp_text: float = 0.7
    topk_audio: int = 250
    topk_text: int = 25

    def __post_init__(self) -> None:
        for name in ("temp_audio", "temp_text"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"sampling {name} must be a finite number >= 0, got {value!r}")
        for name in ("topk_audio", "topk_text"):
            value = getattr(self, name)
            if not (isinstance(value, int) and 1 <= value <= MAX_TOP_K):
                raise ValueError(f"sampling {name} must be an integer from 1 to {MAX_TOP_K}, got {value!r}")


@dataclass(frozen=True)
class Admission:
    """Whether the engine would take a new session now, and why not (for readiness checks and refusals)."""

    ready: bool
    reason: str = ""  # empty when ready
    size: int | None = None  # the step size a new session would make every step, where batching applies
    step_s: float | None = None  # what a step of that size takes now
    full: bool = False  # not ready only because every slot is taken


@dataclass(frozen=True)
class SessionSpec:
    """Everything needed to prime a session before its first live step."""

    voice: str  # voice name known to the engine (e.g. "NATF2") or a path to a .pt/.wav voice prompt
    prompt: str  # role prompt text, without the <system> wrapper
    seed: int | None = None  # None: the engine draws one and reports it on the session
    sampling: Sampling = Sampling()


@dataclass(frozen=True)
class AgentFrame:
    """One 80 ms step of the agent."""

    index: int  # live step number, 0 for the first frame of the call
    pcm: np.ndarray  # float32 [FRAME_SAMPLES], 24 kHz, nominally in [-1, 1]
    text: str  # the text piece of this step ("" when the model emitted padding)
    token: int  # raw text token id (3 = PAD, 0 = end of padding)


# 2 s of frames a session holds either way (caller frames waiting for a step, agent frames waiting for their
# reader): beyond it the oldest go. A remote session keeps no more than this unanswered at its worker, so the
# worker never drops a frame the gateway would count as owed.
MAX_QUEUED_FRAMES = 25


class AgentFrames:
    """A session's agent frames on their way to its reader: at most `limit` wait (nobody reading keeps the
    newest), and the stream ends once, with the session's close reason: `engine_lost` raises SessionClosed
    in the reader, any other reason ends the iteration."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._queue: asyncio.Queue[AgentFrame | str] = asyncio.Queue()

    def put(self, frame: AgentFrame) -> bool:
        """Queue `frame`; True when the oldest waiting frame was dropped to make room."""
        dropped = self._queue.qsize() >= self.limit
        if dropped:
            self._queue.get_nowait()
        self._queue.put_nowait(frame)
        return dropped

    def end(self, reason: str) -> None:
        self._queue.put_nowait(reason)

    def waiting(self) -> int:
        """Frames (and the end, once the session ended) not read yet."""
        return self._queue.qsize()

    async def read(self, session: str) -> AsyncIterator[AgentFrame]:
        while True:
            item = await self._queue.get()
            if isinstance(item, AgentFrame):
                yield item
            elif item == "engine_lost":
                raise SessionClosed(f"session {session}: the engine lost this session")
            else:
                return


class EngineSession(Protocol):
    """A primed conversation occupying one engine slot."""

    id: str
    seed: int
    close_reason: str | None  # None while open; "closed", "engine_lost", "engine_closed" afterwards

    def push(self, pcm: np.ndarray) -> None:
        """Queue 80 ms (FRAME_SAMPLES) of caller audio; never blocks. Raises SessionClosed."""
        ...

    def frames(self) -> AsyncIterator[AgentFrame]:
        """Agent frames, one per pushed caller frame, in order; ends when the session closes."""
        ...

    async def close(self) -> None:
        """Free the slot now. Idempotent."""
        ...

    # Controls for call limits and escalation.
    position: int  # model position of the next caller frame (the window holds the last `context`)
    prompt_horizon_steps: int  # steps before the role prompt starts leaving the model's window

    def say(self, text: str) -> int:
        """Force `text` into the agent's text stream (an announcement); returns the steps it takes."""
        ...

    async def reprime(self, prompt: str) -> None:
        """Re-anchor the session on a fresh prompt (a long call about to lose its role prompt)."""
        ...

    def reprime_token_budget(self) -> int:
        """Role-prompt tokens a re-prime may take and still leave half the model's window to the call."""
        ...


class Engine(Protocol):
    """Serves many sessions from one model."""

    capacity: int  # sessions it can hold at once
    active: int  # sessions open now

    async def open(self, spec: SessionSpec) -> EngineSession:
        """Prime a session (voice + role prompt) and return it ready for live frames. Raises EngineBusy
        when it cannot take the call, EngineError for a bad voice or prompt. Cancelling it frees the slot."""
        ...

    def count_prompt_tokens(self, prompt: str) -> int:
        """Tokens the role prompt costs (each one is a model step of the prefill)."""
        ...

    async def admission(self) -> Admission:
        """Whether `open` would admit a session now (a free slot, steps inside the real-time budget); may
        take a fresh measurement first. Takes no slot."""
        ...

    async def aclose(self) -> None: ...
