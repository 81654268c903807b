"""Role prompts for calls: the agent's template (or inline prompt) rendered with the call's CRM record
looked up within its deadline, held to the agent's token budget, and checked per agent by `config check`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Annotated, Any, Protocol

from annotated_types import Gt

from crm_adapters.base import CrmAdapter, CrmResult
from engine.api import CONTEXT_STEPS
from engine.loading import SYSTEM_TAG
from gateway.agents.templates import (
    PromptError,
    PromptRenderer,
    one_line,
    prompt_context,
    sample_call,
    sanitise_text,
)
from gateway.call.incoming import IncomingCall

log = logging.getLogger(__name__)

DEFAULT_MAX_PROMPT_TOKENS = 300


TokenCounter = Callable[[str], int]


class PromptBudgetError(PromptError):
    """A rendered role prompt costs more tokens than its agent allows."""

    def __init__(self, message: str, agent: str, tokens: int, maximum: int) -> None:
        super().__init__(message)
        self.agent = agent
        self.tokens = tokens
        self.maximum = maximum


def check_budget(agent: str, text: str, tokens: int, maximum: int, source: str = "prompt") -> None:
    """Raise PromptBudgetError if `tokens` (the wrapped prompt's count) is over the agent's `maximum`."""
    if tokens > maximum:
        raise PromptBudgetError(
            f"agent '{agent}': the role prompt from {source} is {tokens} tokens, over max_prompt_tokens = "
            f"{maximum}; shorten it or raise max_prompt_tokens (every token is a model step before the call "
            f"starts, and the model sees only its last {CONTEXT_STEPS} steps)",
            agent,
            tokens,
            maximum,
        )


# ----------------------------------------------------------------------------------------------------
# One agent's role prompt for one call.


@dataclass(frozen=True)
class CrmBinding:
    """An agent's CRM lookup: which `[crm.<name>]` adapter, keyed by what from the call, waiting how long."""

    adapter: str
    key: str = "caller"
    deadline_s: Annotated[float, Gt(0)] | None = None  # None: the adapter's own deadline_s


class PromptAgent(Protocol):
    """What prompt preparation reads from an agent's configuration."""

    name: str
    prompt: str  # inline text, used when there is no template
    template: str  # file name in templates/, or ""
    vars: Mapping[str, Any]
    crm: CrmBinding | None
    max_prompt_tokens: int


@dataclass(frozen=True)
class RolePrompt:
    """The role prompt a call is primed with, and how it came about (for the call record)."""

    text: str
    tokens: int
    template: str | None
    crm: CrmResult | None = None
    degraded: str = ""  # why the CRM record was left out of the prompt; "" when it was used or there was none

    def summary(self) -> dict[str, Any]:
        return {
            "template": self.template,
            "tokens": self.tokens,
            "crm": self.crm.summary() if self.crm is not None else None,
            "degraded": self.degraded,
        }


async def prepare_role_prompt(
    agent: PromptAgent,
    call: IncomingCall,
    adapters: Mapping[str, CrmAdapter],
    renderer: PromptRenderer,
    count_tokens: TokenCounter,
    now: datetime | None = None,
) -> RolePrompt:
    """Look the caller up (within the CRM deadline; a failed lookup only means less data) and render."""
    crm = None
    if agent.crm is not None and agent.template:
        adapter = adapters[agent.crm.adapter]
        crm = await adapter.lookup(call, agent.crm.key, agent.crm.deadline_s)
    return render_role_prompt(agent, call, crm, renderer, count_tokens, now)


def render_role_prompt(
    agent: PromptAgent,
    call: IncomingCall,
    crm: CrmResult | None,
    renderer: PromptRenderer,
    count_tokens: TokenCounter,
    now: datetime | None = None,
) -> RolePrompt:
    """Render `agent`'s prompt for `call` with the CRM result. If the record breaks the template or the budget
    (it should not: both are checked with sample data), the prompt is rendered without it and says why."""
    if not agent.template:
        text = one_line(agent.prompt)
        if SYSTEM_TAG in text.lower():
            raise PromptError(
                f"agent '{agent.name}': the inline prompt contains {SYSTEM_TAG}; the engine adds the wrapper "
                "itself, remove the tag from the prompt"
            )
        tokens = count_tokens(text)
        check_budget(agent.name, text, tokens, agent.max_prompt_tokens)
        return RolePrompt(text, tokens, None, crm)
    try:
        return _render_checked(agent, call, crm, renderer, count_tokens, now, degraded="")
    except PromptError as exc:
        if crm is None or not crm.data:
            raise
        log.warning("call %s: agent %s: CRM record left out of the prompt: %s", call.call_id, agent.name, exc)
        without = replace(crm, status="error", data={}, reason=f"record unusable: {exc}")
        prompt = _render_checked(agent, call, without, renderer, count_tokens, now, degraded=str(exc))
        return replace(prompt, crm=crm)


def _render_checked(
    agent: PromptAgent,
    call: IncomingCall,
    crm: CrmResult | None,
    renderer: PromptRenderer,
    count_tokens: TokenCounter,
    now: datetime | None,
    degraded: str,
) -> RolePrompt:
    text = renderer.render(agent.template, prompt_context(call, crm, agent.vars, now))
    tokens = count_tokens(text)
    check_budget(agent.name, text, tokens, agent.max_prompt_tokens, source=f"template {agent.template}")
    return RolePrompt(text, tokens, agent.template, crm, degraded)


def check_agent(
    agent: PromptAgent, renderer: PromptRenderer, count_tokens: TokenCounter, now: datetime | None = None
) -> list[str]:
    """Every problem with `agent`'s prompt: rendered with its template's sample record and again as if the CRM
    had failed, each strictly and within the token budget."""
    if not agent.template:
        try:
            render_role_prompt(agent, sample_call({}), None, renderer, count_tokens, now)
        except PromptError as exc:
            return [str(exc)]
        return []
    try:
        sample = renderer.sample(agent.template)
    except PromptError as exc:
        return [f"agent '{agent.name}': {exc}"]
    call = sample_call(sample)
    # The agent's own vars only: the sample's `agent` vars stand in for a config in the template check alone,
    # so a var the config forgot is caught here and not on every call.
    cases = [("no CRM record", CrmResult("sample", "timeout", reason="CRM deadline passed"))]
    if "customer" in sample:
        cases.insert(
            0, ("the sample record", CrmResult("sample", "found", data=sample["customer"], key="sample"))
        )
    problems = []
    for label, crm in cases:
        try:
            _render_checked(agent, call, crm, renderer, count_tokens, now, degraded="")
        except PromptError as exc:
            problems.append(f"agent '{agent.name}' with {label}: {exc}")
    return problems


REANCHOR_LEAD = "Earlier in this call you said:"
REANCHOR_MAX_CHARS = 4000  # the agent's recent words before the token budget trims them further


def reanchor_prompt(role: str, said: Sequence[str], count_tokens: TokenCounter, maximum: int) -> str:
    """The prompt a long call is re-primed with: its role prompt plus as many of the agent's most recent words
    as the agent's token budget leaves room for. The words are the model's own output, so they are sanitised
    like any field a prompt takes in (no `<system>` wrapper, no control characters) before they are used."""
    recent = " ".join(said)
    if len(recent) > REANCHOR_MAX_CHARS:  # the newest words, starting at a word boundary
        recent = recent[-REANCHOR_MAX_CHARS:].split(" ", 1)[-1]
    words = sanitise_text(recent, REANCHOR_MAX_CHARS).split()

    def with_words(n: int) -> str:
        return f"{role} {REANCHOR_LEAD} {' '.join(words[-n:])}".strip() if n else role

    if count_tokens(with_words(len(words))) <= maximum:
        return with_words(len(words))
    low, high = 0, len(words)  # the most recent `low` words fit; `high` do not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if count_tokens(with_words(mid)) <= maximum else (low, mid)
    return with_words(low)


# ----------------------------------------------------------------------------------------------------
# Counting tokens without loading the model.
