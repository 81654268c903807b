"""The step loop's policy, as data: each tick, which slots step, which prime runs a chunk and how long that
chunk is, and which slot moves down. The worker asks, then runs the tick on the model thread.

Chunked priming (the idea of vLLM's chunked prefill): a new call's prompt (voice, silence, role prompt,
silence: hundreds of positions) no longer runs in one piece between two live steps, which every live
caller would hear as a gap. Each tick runs the live step plus at most one chunk of one prime, sized from
the measured prefill speed so the chunk takes about `chunk_budget_s`, and never so long that step plus chunk
leave the 80 ms frame. Primes in flight take turns, least recently served first. With no live call to
delay, a prime runs whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

FRAME_BUDGET_S = 0.08  # one frame of audio: a tick (step plus chunk) must fit in it
CHUNK_BUDGET_S = 0.015  # the longest a prime chunk may hold a live frame back
FIRST_CHUNK = 16  # positions, before the prefill speed has been measured
MIN_CHUNK = 1


@dataclass(frozen=True)
class PrimeRequest:
    """A prime waiting or under way."""

    id: int
    remaining: int  # prompt positions still to run


@dataclass(frozen=True)
class Tick:
    """What the worker runs next, in order: the move, the live step, the prime chunk."""

    step: tuple[int, ...] = ()  # slots that step (each has a caller frame waiting)
    prime: int | None = None  # the prime that runs a chunk
    chunk: int = 0  # its positions
    move: tuple[int, int] | None = None  # (from slot, to slot)

    @property
    def idle(self) -> bool:
        return not self.step and self.prime is None and self.move is None


class Scheduler:
    """Decides ticks; learns the prefill speed from the chunks the worker reports."""

    def __init__(
        self, frame_budget_s: float = FRAME_BUDGET_S, chunk_budget_s: float = CHUNK_BUDGET_S
    ) -> None:
        self.frame_budget_s, self.chunk_budget_s = frame_budget_s, chunk_budget_s
        self.seconds_per_position: float | None = None
        self._served: dict[int, int] = {}  # prime id -> the tick it last ran in
        self._ticks = 0

    def tick(
        self,
        ready: Sequence[int],
        primes: Sequence[PrimeRequest],
        live: int,
        step_s: float | None = None,
        move: tuple[int, int] | None = None,
    ) -> Tick:
        """The next tick: every `ready` slot steps; the least recently served prime runs a chunk sized to
        fit beside a step of `step_s` (with `live` calls that a long chunk would delay; none: whole);
        `move` (a compaction the worker found worth doing) goes first."""
        self._ticks += 1
        prime, chunk = None, 0
        if primes:
            chosen = min(primes, key=lambda p: (self._served.get(p.id, -1), p.id))
            prime, chunk = chosen.id, self.chunk_positions(chosen.remaining, live, step_s)
            self._served[chosen.id] = self._ticks
        waiting = {p.id for p in primes}
        self._served = {k: v for k, v in self._served.items() if k in waiting}
        return Tick(tuple(sorted(ready)), prime, chunk, move)

    def chunk_positions(self, remaining: int, live: int, step_s: float | None) -> int:
        """Positions of the next chunk: all of them with no live call; else as many as fit in the chunk
        budget, less if a step of `step_s` leaves less of the frame."""
        if live == 0:
            return remaining
        if self.seconds_per_position is None:
            return min(remaining, FIRST_CHUNK)
        room = min(self.chunk_budget_s, self.frame_budget_s - (step_s or 0.0))
        positions = math.floor(max(room, 0.0) / self.seconds_per_position)
        return max(MIN_CHUNK, min(remaining, positions))

    def observe_chunk(self, positions: int, seconds: float) -> None:
        """Learn the prefill speed from a chunk that ran (a moving average: the machine's load moves)."""
        if positions <= 0 or seconds <= 0:
            return
        rate = seconds / positions
        previous = self.seconds_per_position
        self.seconds_per_position = rate if previous is None else 0.7 * previous + 0.3 * rate
