"""Escalation: when a call should go to a human, and how.

Triggers are call notices: a DTMF key, a phrase in the agent's own words, a limit (warning, max_duration,
silence_timeout, context_horizon), the engine losing the session, or the control API. Each trigger maps to
an ordered list of actions: `announce` (the agent says the configured line, forced into its text stream),
`webhook` (a call.escalated event), `transfer` (the carrier moves the call to a number or SIP URI) and
`hangup`. A call escalates once; later triggers are recorded as notices only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from gateway.call.notices import CallNotice, Escalation, NoticeKind
from gateway.schema import validate

log = logging.getLogger(__name__)

Trigger = Literal[
    "dtmf", "phrase", "warning", "max_duration", "silence_timeout", "context_horizon", "engine_lost", "api"
]
Action = Literal["announce", "webhook", "transfer", "hangup"]
TRIGGERS: tuple[str, ...] = typing.get_args(Trigger)
ACTIONS: tuple[str, ...] = typing.get_args(Action)
TRANSFER_GRACE_S = 5.0  # after asking the carrier to transfer, it stops the stream; end ours if it does not


@dataclass(frozen=True)
class EscalationPolicy:
    """An agent's escalation ([agents.<name>.escalation]; the schema the config is checked against)."""

    dtmf: str = ""  # keys that ask for a human, e.g. "0" or "0*"
    phrases: tuple[str, ...] = ()  # regular expressions over the agent's recent words (case-insensitive)
    announcement: str = ""  # what the agent says before the hand-off
    transfer_to: str = ""  # E.164 number or sip: URI for `transfer`
    actions: Mapping[Trigger, tuple[Action, ...]] = field(
        default_factory=dict
    )  # trigger -> actions, in order

    def __post_init__(self) -> None:
        for phrase in self.phrases:
            try:
                re.compile(phrase)
            except re.error as exc:
                raise ValueError(f"phrase {phrase!r} is not a regular expression ({exc})") from None
        if any("transfer" in acts for acts in self.actions.values()) and not self.transfer_to:
            raise ValueError("a transfer action needs transfer_to (a number or sip: URI)")
        if self.dtmf and not self.actions_for("dtmf"):
            raise ValueError(f"dtmf = {self.dtmf!r} but actions.dtmf lists nothing to do")
        if self.phrases and not self.actions_for("phrase"):
            raise ValueError("phrases are given but actions.phrase lists nothing to do")

    def actions_for(self, trigger: str) -> tuple[str, ...]:
        return self.actions.get(trigger, ())  # type: ignore[call-overload]

    @property
    def handles(self) -> frozenset[str]:
        """Triggers that escalate instead of taking their default course (a limit ending the call)."""
        return frozenset(t for t, acts in self.actions.items() if acts)

    def compiled_phrases(self) -> list[re.Pattern[str]]:
        return [re.compile(p, re.IGNORECASE) for p in self.phrases]


def parse_escalation(table: Mapping[str, Any], where: str) -> EscalationPolicy:
    """An [agents.<name>.escalation] table; problems name `where` and the key."""
    return validate(EscalationPolicy, table, where)


class EscalatingCall(Protocol):
    """What escalation needs of a call (CallSession provides it)."""

    call_id: str
    max_ahead_s: float
    caller_clock_s: float

    @property
    def ended(self) -> bool: ...

    def say(self, line: str) -> float: ...

    async def clear_carrier(self) -> None: ...

    async def end(self, reason: str, *, notify_carrier: bool = True) -> None: ...


@dataclass
class EscalationActions:
    """How actions reach the outside world; the gateway supplies them."""

    # (call, target) -> True when the carrier takes the call on only once our stream ends
    transfer: Callable[[EscalatingCall, str], Awaitable[bool]]
    webhook: Callable[[EscalatingCall, str, str], None]  # (call, trigger, reason): emits call.escalated
    notify: Callable[[EscalatingCall, CallNotice], None]  # (call, notice): tell the call's listeners


async def escalate(
    call: EscalatingCall, policy: EscalationPolicy, trigger: str, reason: str, actions: EscalationActions
) -> None:
    """Carry out the trigger's actions, in order. A failing action is logged and the rest still run;
    if the call could not be handed off, it is ended rather than left in limbo."""
    steps = policy.actions_for(trigger)
    escalation = Escalation(round(call.caller_clock_s, 3), trigger, reason, steps)
    actions.notify(call, _notice(call, NoticeKind.ESCALATED, f"{trigger}: {reason}", escalation))
    handed_off = ends_stream = False
    for action in steps:
        if call.ended:
            break
        try:
            if action == "announce":
                await asyncio.sleep(call.say(policy.announcement) + call.max_ahead_s)
            elif action == "webhook":
                actions.webhook(call, trigger, reason)
            elif action == "transfer":
                await call.clear_carrier()
                ends_stream = await actions.transfer(call, policy.transfer_to)
                handed_off = True
            elif action == "hangup":
                await call.end(f"escalated_{trigger}")
        except Exception as exc:
            log.warning("call %s: escalation action %s failed (%s)", call.call_id, action, exc)
            actions.notify(call, _notice(call, NoticeKind.ESCALATION_FAILED, f"{action}: {exc}"))
    if handed_off and ends_stream and not call.ended:  # the carrier's flow goes on once the stream ends
        await call.end(f"transferred_{trigger}")
    elif handed_off and not call.ended:
        # The carrier stops the stream once the transfer takes over; if it does not, let go of the call.
        await asyncio.sleep(TRANSFER_GRACE_S)
        await call.end(f"transferred_{trigger}", notify_carrier=False)
    elif not handed_off and trigger in ("max_duration", "silence_timeout", "engine_lost") and not call.ended:
        await call.end(trigger)  # a hard limit still ends the call when no one took it over


def _notice(
    call: EscalatingCall, kind: NoticeKind, detail: str, escalation: Escalation | None = None
) -> CallNotice:
    return CallNotice(kind, call.call_id, round(call.caller_clock_s, 3), detail, escalation)
