"""Per-call limits: a hard maximum duration with an optional warning before it, a caller-silence timeout,
and the context-horizon guard that acts before the role prompt leaves the model's attention window.

All limits are judged on the caller's audio clock (the model is clocked by it, one step per 80 ms frame).
`LimitGuard.on_caller_frame` returns what is due; the call session carries it out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from annotated_types import Gt, Lt

from engine.api import FRAME_S
from gateway.schema import validate

TIGHTENABLE = ("max_duration", "silence_timeout")  # limits a call's own parameters may shorten
OVERRIDE_PREFIX = "limit_"  # per-call overrides arrive as <Parameter name="limit_max_duration" value="60"/>


Seconds = Annotated[float, Gt(0)]
HorizonAction = Literal["wrap_up", "reanchor", "hand_off", "none"]


@dataclass(frozen=True)
class CallLimits:
    """An agent's limits ([agents.<name>.limits]; the schema the config is checked against)."""

    max_duration: Seconds | None = None  # the call ends at this caller-clock time
    warn_before: Seconds | None = None  # seconds before max_duration: a warning event (and the wrap-up line)
    wrap_up_line: str = ""  # what the agent says at the warning or before a horizon wrap-up
    silence_timeout: Seconds | None = None  # seconds without caller speech: the call ends
    silence_dbfs: Annotated[float, Lt(0)] = -45.0  # a caller frame quieter than this (RMS, dBFS) is silence
    horizon_action: HorizonAction = "wrap_up"  # before the role prompt leaves the model's window
    horizon_margin: Seconds = 15.0  # seconds before that point to act

    def __post_init__(self) -> None:
        if self.warn_before is not None and self.max_duration is None:
            raise ValueError("warn_before needs max_duration")

    def with_overrides(self, params: Mapping[str, str]) -> CallLimits:
        """This agent's limits, tightened by the call's own `limit_*` parameters. A stream's parameters come
        from outside, so they may only shorten `max_duration` or `silence_timeout` (or set one the agent
        leaves open); a longer, cleared ("off") or other limit is ignored. A value that is not a number of
        seconds raises ValueError."""
        asked = {
            key: value
            for name, value in params.items()
            if name.startswith(OVERRIDE_PREFIX) and (key := name[len(OVERRIDE_PREFIX) :]) in TIGHTENABLE
        }
        if not asked:
            return self
        parsed = parse_limits(asked, "call parameters", from_text=True)
        shorter = {}
        for key in asked:
            mine, theirs = getattr(self, key), getattr(parsed, key)
            if theirs is not None and (mine is None or theirs < mine):
                shorter[key] = theirs
        return dataclasses.replace(self, **shorter)


def parse_limits(
    table: Mapping[str, Any], where: str, base: CallLimits | None = None, from_text: bool = False
) -> CallLimits:
    """`base` (default: no limits) with the limits of a config table, or of call parameters, whose values
    are text ("off", "none" or "" clears a limit); problems name `where` and the key."""
    if from_text:
        table = {k: None if str(v).strip().lower() in ("", "none", "off") else v for k, v in table.items()}
    values = {**dataclasses.asdict(base or CallLimits()), **table}
    return validate(CallLimits, values, where, strict=not from_text)


@dataclass(frozen=True)
class LimitEvent:
    kind: str  # "warning", "max_duration", "silence_timeout", "context_horizon"
    at_s: float  # caller clock
    detail: str = ""


class LimitGuard:
    """Watches one call's limits frame by frame; each event fires once."""

    def __init__(self, limits: CallLimits) -> None:
        self.limits = limits
        self._fired: set[str] = set()
        self._last_speech_s = 0.0

    def on_caller_frame(self, clock_s: float, pcm: np.ndarray, horizon_steps: int | None) -> list[LimitEvent]:
        """`clock_s` is the caller clock after this frame, `pcm` the frame (float, 24 kHz),
        `horizon_steps` the engine's steps before the role prompt starts leaving its window (None if the
        engine cannot tell)."""
        limits, events = self.limits, []
        if _dbfs(pcm) > limits.silence_dbfs:
            self._last_speech_s = clock_s
        if limits.max_duration is not None:
            if limits.warn_before is not None and clock_s >= limits.max_duration - limits.warn_before:
                events += self._once("warning", clock_s, f"{limits.max_duration - clock_s:.1f} s left")
            if clock_s >= limits.max_duration:
                events += self._once("max_duration", clock_s, f"{limits.max_duration:g} s")
        if limits.silence_timeout is not None and clock_s - self._last_speech_s >= limits.silence_timeout:
            events += self._once(
                "silence_timeout", clock_s, f"caller silent for {limits.silence_timeout:g} s"
            )
        if (
            horizon_steps is not None
            and limits.horizon_action != "none"
            and horizon_steps * FRAME_S <= limits.horizon_margin
        ):
            events += self._once("context_horizon", clock_s, limits.horizon_action)
        return events

    def rearm(self, kind: str) -> None:
        """Let an event fire again (after a re-anchor, the horizon moves forward)."""
        self._fired.discard(kind)

    def _once(self, kind: str, at_s: float, detail: str) -> list[LimitEvent]:
        if kind in self._fired:
            return []
        self._fired.add(kind)
        return [LimitEvent(kind, round(at_s, 3), detail)]


def _dbfs(pcm: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) if len(pcm) else 0.0
    return 20 * math.log10(rms) if rms > 0 else -math.inf
