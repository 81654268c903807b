"""Prometheus metrics of one gateway, served at `GET /metrics` behind the control API's bearer key.

Each app gets its own `CollectorRegistry`, so many gateways can live in one process (the tests). Nothing
here runs per audio message: the families are fed per call (its notices and its record), per engine step
(the worker's step observers, on the model thread) and per scrape (live calls' carrier buffer, engine
slots, the webhook sender's running totals). Labels are bounded: carriers, normalised end reasons
(the part before ':'), a fixed set of refusal reasons, drop causes and CRM outcomes; never a call id.

Several processes: when `PROMETHEUS_MULTIPROC_DIR` names an empty directory in the environment that starts
the processes (before Python imports prometheus_client), every process writes its values there and
`/metrics` merges them (prometheus_client's multiprocess mode). Gauges then add up the live processes;
the values sampled from live calls are sampled every `SAMPLE_EVERY_S` in each process instead of at the
scrape; a process that stops removes its gauges. Wipe the directory before every start.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from gateway.call.notices import CallNotice, NoticeKind

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# what generate_latest writes (metric names all legacy-safe), which every Prometheus version reads
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SAMPLE_EVERY_S = 5.0  # several processes: how often each samples its live calls and engine
MAX_LABEL_VALUES = 32  # distinct carriers or end reasons kept as labels; beyond it they count as "other"

STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.15, 0.25)
PRIME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0)
CRM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
BUFFER_BUCKETS = (0.0, 0.08, 0.16, 0.24, 0.32, 0.48, 0.64, 0.96, 1.6)  # the 80 ms frame grid
LATENCY_BUCKETS = (0.04, 0.08, 0.16, 0.24, 0.32, 0.48, 0.64, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0)
RATIO_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
PER_MINUTE_BUCKETS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0)

# frames dropped: the cause label -> the CallRecord counter it is read from
DROP_CAUSES: Mapping[str, str] = {
    "caller_before_engine": "caller_frames_dropped",  # caller frames that never reached the engine
    "caller_too_fast": "caller_audio_dropped_fast",  # caller audio messages beyond wall clock
    "agent_carrier_full": "agent_frames_dropped",  # agent frames while the carrier held its maximum
    "agent_cleared": "agent_frames_discarded",  # agent frames cleared before they played
    "malformed": "malformed_messages",  # carrier messages that could not be read
}
REFUSAL_REASONS = ("no_slot", "step_time", "unmeasured", "shutting_down", "draining", "other")
CRM_OUTCOMES = ("found", "not_found", "no_key", "timeout", "error", "other")
WEBHOOK_OUTCOMES = ("delivered", "failed", "dropped")

_LABEL_VALUE = re.compile(r"[a-z][a-z0-9_]{0,47}")

StepObserver = Callable[[int, float], None]


def reason_label(reason: str | None) -> str:
    """An end reason as a label: the part before ':' ("engine_unavailable: EngineBusy: ..." is
    "engine_unavailable"), lower case; anything that is not a short identifier is "other"."""
    head = (reason or "unknown").split(":", 1)[0].strip().lower()
    return head if _LABEL_VALUE.fullmatch(head) else "other"


def refusal_label(message: str) -> str:
    """An engine's refusal (EngineBusy's words) as one of REFUSAL_REASONS."""
    text = message.lower()
    if "shutting down" in text:
        return "shutting_down"
    if "slot" in text or "full" in text:
        return "no_slot"
    if "could not be measured" in text:
        return "unmeasured"
    if "budget" in text:
        return "step_time"
    return "other"


def multiprocess_mode() -> bool:
    """Whether prometheus_client keeps its values in `PROMETHEUS_MULTIPROC_DIR` (decided when it was
    imported: the variable must be set before the process starts)."""
    return values.ValueClass is not values.MutexValue


class _Bounded:
    """Label values seen so far, at most `limit` of them; later newcomers are "other"."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return "other"
        self.seen.add(value)
        return value


class GatewayMetrics:
    """The gateway's metric families. `gateway` is the Switchboard (duck-typed: `calls`, `engine`,
    `webhooks`). Wire `on_notice` as a notice hook and `on_record` as a record hook; `await start()` once
    the loop runs (it subscribes to the engine's step times), `await aclose()` at shutdown."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        self.multiprocess = multiprocess_mode()
        if os.environ.get(MULTIPROC_ENV) and not self.multiprocess:
            log.warning(
                "%s is set but prometheus_client was imported before it: metrics stay in this process",
                MULTIPROC_ENV,
            )
        # several processes: the values live in files and are merged at the scrape, so the families are
        # registered nowhere here
        self.registry = CollectorRegistry(auto_describe=True)
        reg = None if self.multiprocess else self.registry
        live = {"multiprocess_mode": "livesum"}

        self.calls_active = Gauge("duplexgate_calls_active", "Calls streaming now.", registry=reg, **live)
        self.calls_started = Counter(
            "duplexgate_calls_started", "Calls whose media stream started.", ["carrier"], registry=reg
        )
        self.calls_ended = Counter(
            "duplexgate_calls_ended",
            "Calls that ended, by carrier and end reason (the part before ':').",
            ["carrier", "reason"],
            registry=reg,
        )
        self.calls_without_stream = Counter(
            "duplexgate_calls_without_stream",
            "Calls answered by the voice webhook whose media stream never came.",
            registry=reg,
        )
        self.admission_refusals = Counter(
            "duplexgate_admission_refusals",
            "Calls the gateway or its engine refused, by reason.",
            ["reason"],
            registry=reg,
        )
        self.step_seconds = Histogram(
            "duplexgate_engine_step_seconds",
            "Engine step time, by step size (batch slots stepped).",
            ["size"],
            buckets=STEP_BUCKETS,
            registry=reg,
        )
        self.slots_busy = Gauge(
            "duplexgate_engine_slots_busy", "Engine slots holding a session.", registry=reg, **live
        )
        self.slots_capacity = Gauge(
            "duplexgate_engine_slots_capacity", "Engine slots in all.", registry=reg, **live
        )
        self.prime_seconds = Histogram(
            "duplexgate_engine_prime_seconds",
            "From asking the engine for a session to its prompt being primed.",
            buckets=PRIME_BUCKETS,
            registry=reg,
        )
        self.frames_dropped = Counter(
            "duplexgate_frames_dropped",
            "Audio frames (caller_too_fast: messages) dropped, by cause; counted when the call ends.",
            ["cause"],
            registry=reg,
        )
        self.carrier_buffer = Histogram(
            "duplexgate_carrier_buffer_seconds",
            "Agent audio at the carrier not yet confirmed played, sampled from each live call.",
            buckets=BUFFER_BUCKETS,
            registry=reg,
        )
        self.webhook_deliveries = Counter(
            "duplexgate_webhook_deliveries",
            "Webhook events finished, by outcome.",
            ["outcome"],
            registry=reg,
        )
        self.webhook_retries = Counter(
            "duplexgate_webhook_retries", "Webhook attempts after the first.", registry=reg
        )
        self.crm_lookups = Counter(
            "duplexgate_crm_lookups", "CRM lookups for role prompts, by outcome.", ["outcome"], registry=reg
        )
        self.crm_seconds = Histogram(
            "duplexgate_crm_lookup_seconds",
            "CRM lookup time (cache hits and calls without a key left out).",
            buckets=CRM_BUCKETS,
            registry=reg,
        )
        self.response_latency = Histogram(
            "duplexgate_call_response_latency_seconds",
            "Per call: mean time from the caller's turn end to the agent's speech.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.yield_latency = Histogram(
            "duplexgate_call_yield_latency_seconds",
            "Per call: mean time from the caller's barge-in to the agent falling silent.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.overlap_ratio = Histogram(
            "duplexgate_call_overlap_ratio",
            "Per call: share of the call with both sides speaking.",
            buckets=RATIO_BUCKETS,
            registry=reg,
        )
        self.silence_ratio = Histogram(
            "duplexgate_call_silence_ratio",
            "Per call: share of the call with neither side speaking.",
            buckets=RATIO_BUCKETS,
            registry=reg,
        )
        self.backchannels = Histogram(
            "duplexgate_call_backchannels_per_minute",
            "Per call: backchannels (either side) per minute of call.",
            buckets=PER_MINUTE_BUCKETS,
            registry=reg,
        )
        for reason in REFUSAL_REASONS:  # bounded label sets start at zero, so rate() sees the first one
            self.admission_refusals.labels(reason=reason)
        for cause in DROP_CAUSES:
            self.frames_dropped.labels(cause=cause)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook_deliveries.labels(outcome=outcome)

        self._carriers = _Bounded()
        self._reasons = _Bounded()
        self._live: dict[str, str] = {}  # call id -> its carrier label, while it streams
        self._steps: dict[int, Any] = {}  # step size -> its histogram child (looked up once)
        self._webhooks_seen = {"delivered": 0, "failed": 0, "dropped": 0, "retried": 0}
        self._observed: list[StepObserver] | None = None  # the engine's observer list we joined
        self._sampler: asyncio.Task[None] | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to the engine's step times (an engine with `stats.observers`, as EngineWorker has);
        with several processes, sample the live calls in the background."""
        observers = getattr(getattr(self.gateway.engine, "stats", None), "observers", None)
        if isinstance(observers, list) and self._observed is None:
            observers.append(self.on_step)
            self._observed = observers
        if self.multiprocess and self._sampler is None:
            self._sampler = asyncio.create_task(self._sample_every(SAMPLE_EVERY_S), name="metrics-sampler")

    async def aclose(self) -> None:
        if self._observed is not None:
            try:
                self._observed.remove(self.on_step)
            except ValueError:
                pass
            self._observed = None
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None
        if self.multiprocess:  # this process's gauges stop counting
            multiprocess.mark_process_dead(os.getpid())

    # --- exposition -------------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        if not self.multiprocess:
            self.sample()
            return generate_latest(self.registry), CONTENT_TYPE
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged), CONTENT_TYPE

    def sample(self) -> None:
        """What is read rather than counted: live calls' carrier buffers, engine slots, webhook totals."""
        for call in list(self.gateway.calls.values()):
            ahead = getattr(call, "carrier_ahead_s", None)
            if isinstance(ahead, int | float) and not getattr(call, "ended", False):
                self.carrier_buffer.observe(ahead)
        engine = self.gateway.engine
        capacity = getattr(engine, "capacity", None)
        if capacity is None:
            capacity = getattr(engine, "max_sessions", None)  # the echo engine's bound, when it has one
        active = getattr(engine, "active", None)
        if isinstance(capacity, int):
            self.slots_capacity.set(capacity)
        if isinstance(active, int):
            self.slots_busy.set(active)
        sender = getattr(self.gateway, "webhooks", None)
        stats = getattr(sender, "stats", None)
        if stats is not None:
            for name, seen in self._webhooks_seen.items():
                now = getattr(stats, name, seen)
                if now > seen:
                    counter = (
                        self.webhook_retries
                        if name == "retried"
                        else self.webhook_deliveries.labels(outcome=name)
                    )
                    counter.inc(now - seen)
                    self._webhooks_seen[name] = now

    async def _sample_every(self, every_s: float) -> None:
        while True:
            try:
                self.sample()
            except Exception:
                log.exception("metrics: sampling failed")
            await asyncio.sleep(every_s)

    # --- feeds ------------------------------------------------------------------------------------

    def on_step(self, size: int, seconds: float) -> None:
        """Engine step observer (runs on the engine's model thread)."""
        child = self._steps.get(size)
        if child is None:
            child = self._steps[size] = self.step_seconds.labels(size=str(size))
        child.observe(seconds)

    def on_notice(self, notice: CallNotice) -> None:
        """Notice hook: calls starting and ending."""
        if notice.kind == NoticeKind.STARTED:
            call = self.gateway.calls.get(notice.call_id)
            started = getattr(call, "started", None)
            carrier = self._carriers(reason_label(getattr(started, "carrier", "") or "unknown"))
            self._live[notice.call_id] = carrier
            self.calls_started.labels(carrier=carrier).inc()
            self.calls_active.set(len(self._live))
        elif notice.kind == NoticeKind.ENDED:
            carrier = self._live.pop(notice.call_id, None)
            if carrier is None:  # never seen starting: not a streamed call
                return
            reason = self._reasons(reason_label(notice.detail))
            self.calls_ended.labels(carrier=carrier, reason=reason).inc()
            self.calls_active.set(len(self._live))

    def on_record(self, record: Any) -> None:
        """Record hook: a finished call's dropped frames and conversation quality."""
        if record.end_reason == "no_media_stream" and record.stream_id is None:
            self.calls_without_stream.inc()
        counters = getattr(record, "counters", None) or {}
        for cause, name in DROP_CAUSES.items():
            dropped = counters.get(name, 0)
            if isinstance(dropped, int) and dropped > 0:
                self.frames_dropped.labels(cause=cause).inc(dropped)
        timeline = getattr(record, "timeline", None) or {}
        measures = timeline.get("measures") if isinstance(timeline, Mapping) else None
        if isinstance(measures, Mapping):
            self._observe_quality(record, measures)

    def _observe_quality(self, record: Any, measures: Mapping[str, Any]) -> None:
        for key, histogram in (
            ("response_latency_s", self.response_latency),
            ("yield_latency_s", self.yield_latency),
        ):
            summary = measures.get(key)
            mean = _number(summary.get("mean")) if isinstance(summary, Mapping) else None
            if mean is not None and mean >= 0:
                histogram.observe(mean)
        for key, histogram in (("overlap_ratio", self.overlap_ratio), ("silence_ratio", self.silence_ratio)):
            ratio = _number(measures.get(key))
            if ratio is not None and 0 <= ratio <= 1:
                histogram.observe(ratio)
        per_minute = _number(measures.get("backchannels_per_min"))  # the timeline's own, over its span
        if per_minute is None:
            backchannels = _number(measures.get("backchannels"))
            minutes = _call_minutes(record)
            if backchannels is not None and minutes:
                per_minute = backchannels / minutes
        if per_minute is not None and per_minute >= 0:
            self.backchannels.observe(per_minute)

    # --- engine admission, priming, CRM (from the switchboard and the edge) -------------------------

    def refused(self, reason: str) -> None:
        """A call refused: `reason` is one of REFUSAL_REASONS, or an engine's refusal in its words."""
        label = reason if reason in REFUSAL_REASONS else refusal_label(reason)
        self.admission_refusals.labels(reason=label).inc()

    def primed(self, seconds: float) -> None:
        self.prime_seconds.observe(seconds)

    def crm_lookup(self, status: str, seconds: float, cached: bool = False) -> None:
        outcome = status if status in CRM_OUTCOMES else "other"
        self.crm_lookups.labels(outcome=outcome).inc()
        if not cached and outcome != "no_key":
            self.crm_seconds.observe(max(0.0, seconds))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _call_minutes(record: Any) -> float | None:
    """The call's length in minutes, from its answer (or start) to its end; None when unknown."""
    ended = _number(getattr(record, "ended_at", None))
    began = _number(getattr(record, "answered_at", None))
    if began is None:
        began = _number(getattr(record, "started_at", None))
    if ended is None or began is None or ended <= began:
        return None
    return (ended - began) / 60.0
