"""What a call tells its listeners (escalation, the recorder, webhooks, the control plane): typed notices,
and the structured record of an escalation, which the recorder stores as it is."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class NoticeKind(StrEnum):
    """What happened. The values are the words records, logs and webhooks use."""

    STARTED = "started"  # the stream started; detail: "stream <id>"
    DTMF = "dtmf"  # detail: the key
    PHRASE = "phrase"  # an escalation phrase in the agent's words; detail: its pattern
    WARNING = "warning"  # the max-duration warning was spoken
    MAX_DURATION = "max_duration"
    SILENCE_TIMEOUT = "silence_timeout"
    CONTEXT_HORIZON = "context_horizon"  # detail: the horizon action ("wrap_up", "reanchor", "hand_off")
    REANCHORED = "reanchored"
    ENGINE_LOST = "engine_lost"
    ENGINE_FAILOVER = "engine_failover"  # the call moved to another engine worker; `data` says how
    ESCALATED = "escalated"  # `escalation` says what fired it, why, and the actions
    ESCALATION_FAILED = "escalation_failed"  # detail: "<action>: <error>"
    ENDED = "ended"  # detail: the end reason


@dataclass(frozen=True)
class Escalation:
    """One hand-off attempt: when (caller audio clock), what fired it, why, and what was done."""

    at_s: float
    trigger: str  # "dtmf", "max_duration", "api", "engine_lost", ...
    reason: str
    actions: tuple[str, ...] = ()  # "announce", "webhook", "transfer", "hangup", in order


@dataclass(frozen=True)
class CallNotice:
    """Something that happened on a call, for hooks (escalation, limits, records) to react to."""

    kind: NoticeKind
    call_id: str
    at_s: float  # caller audio clock
    detail: str = ""
    escalation: Escalation | None = None  # set on ESCALATED notices
    data: Mapping[str, Any] = field(default_factory=dict)  # structured detail (ENGINE_FAILOVER)


NoticeHook = Callable[[CallNotice], None]
