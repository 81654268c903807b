"""Role prompts for calls: Jinja templates from templates/ rendered in a sandbox with the call's facts and the
caller's sanitised CRM record, normalised to one line and held to each agent's token budget.

Templates are checked before any call reaches them (`duplexgate config check`, start-up): a variable that is
neither in the sample data nor given a default is an error then, not in the middle of a call.
"""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from crm_adapters.base import CrmAdapter, CrmResult, IncomingCall
from gateway.assets import asset_root

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PROMPT_TOKENS",
    "MODEL_CONTEXT_STEPS",
    "TEMPLATES_DIR",
    "CrmBinding",
    "PromptAgent",
    "PromptBudgetError",
    "PromptError",
    "PromptRenderer",
    "RolePrompt",
    "check_agent",
    "check_budget",
    "check_templates",
    "one_line",
    "prepare_role_prompt",
    "prompt_context",
    "prompt_token_counter",
    "render_role_prompt",
    "sanitise_record",
    "sanitise_text",
]

TEMPLATES_DIR = asset_root() / "templates"
SAMPLE_SUFFIX = ".sample.json"  # templates/<name>.sample.json: the data `config check` renders <name>.j2 with
PARTIALS = "partials"  # shared macros; not agents' templates themselves
MODEL_CONTEXT_STEPS = 3000  # the model attends to its last 3000 steps; every prompt token is one of them
DEFAULT_MAX_PROMPT_TOKENS = 300

# Caps on what a CRM record can bring into a prompt: a field holds a fact, not a paragraph of instructions.
FIELD_MAX_CHARS = 160
RECORD_MAX_FIELDS = 50
LIST_MAX_ITEMS = 20
RECORD_MAX_DEPTH = 3

SYSTEM_TAG = "<system>"
# No field can open or close the <system> wrapper, nor write a look-alike of it (after NFKC folding).
_STRUCTURE_CHARS = str.maketrans("", "", "<>\u2039\u203a\u3008\u3009\u300a\u300b\u27e8\u27e9\u29fc\u29fd")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([.,;:!?])")
_NOT_IDENTIFIER = re.compile(r"\W+")
_CURRENCY_SYMBOLS = {"USD": "$"}
_CURRENCY_WORDS = {"EUR": "euros", "GBP": "pounds", "CAD": "Canadian dollars", "AUD": "Australian dollars"}

TokenCounter = Callable[[str], int]


class PromptError(ValueError):
    """A role prompt cannot be produced; the message names the template (file and line) or agent concerned."""


class PromptBudgetError(PromptError):
    """A rendered role prompt costs more tokens than its agent allows."""

    def __init__(self, message: str, agent: str, tokens: int, maximum: int) -> None:
        super().__init__(message)
        self.agent = agent
        self.tokens = tokens
        self.maximum = maximum


# ----------------------------------------------------------------------------------------------------
# Filters: values spoken the way a person on the phone says them.


def _ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _as_date(value: Any) -> date | None:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.strip()).date()
        except ValueError:
            return None
    return None


@jinja2.pass_context
def spoken_date(context: Any, value: Any, weekday: bool = False) -> str:
    """2026-04-12 -> "April 12th" ("Sunday, April 12th" with weekday); the year only when it is not this
    year's. Text that is not an ISO date is kept as it is (a CRM may already say "next Tuesday")."""
    day = _as_date(value)
    if day is None:
        return str(value)
    text = f"{day:%B} {_ordinal(day.day)}"
    now = context.get("now")
    if not isinstance(now, date) or now.year != day.year:
        text += f", {day.year}"
    return f"{day:%A}, {text}" if weekday else text


def spoken_time(value: Any) -> str:
    """14:30 -> "2:30 PM", 09:00 -> "9 AM"; text that is not a time of day is kept as it is."""
    if isinstance(value, datetime):
        moment: time | None = value.time()
    elif isinstance(value, time):
        moment = value
    elif isinstance(value, str):
        try:
            moment = time.fromisoformat(value.strip())
        except ValueError:
            moment = None
    else:
        moment = None
    if moment is None:
        return str(value)
    hour = moment.hour % 12 or 12
    half = "AM" if moment.hour < 12 else "PM"
    return f"{hour} {half}" if moment.minute == 0 else f"{hour}:{moment.minute:02d} {half}"


def money(value: Any, currency: str = "USD") -> str:
    """89 -> "$89", 1234.5 -> "$1,234.50", ("12", "EUR") -> "12 euros"; text that is not an amount is kept."""
    try:
        text = str(value).strip().replace(",", "").lstrip("$€£")
        amount = Decimal(text)
    except (InvalidOperation, ValueError):
        return str(value)
    if not amount.is_finite():
        return str(value)
    sign = "minus " if amount < 0 else ""
    amount = abs(amount)
    digits = f"{amount:,.0f}" if amount == amount.to_integral_value() else f"{amount:,.2f}"
    code = currency.upper()
    if code in _CURRENCY_SYMBOLS:
        return f"{sign}{_CURRENCY_SYMBOLS[code]}{digits}"
    return f"{sign}{digits} {_CURRENCY_WORDS.get(code, code)}"


def phone(value: Any, last: int | None = None) -> str:
    """+15551230000 -> "555 123 0000" (North American numbers lose the +1), other numbers in groups of three;
    `last=4` gives only the last four digits, for "the number ending in ...". Text without digits is kept."""
    digits = "".join(ch for ch in str(value) if ch.isdigit())
    if not digits:
        return str(value)
    if last is not None:
        return " ".join(digits[-last:])
    if len(digits) == 11 and digits.startswith("1"):
        digits = digits[1:]
    if len(digits) == 10:
        return f"{digits[:3]} {digits[3:6]} {digits[6:]}"
    return " ".join(digits[i : i + 3] for i in range(0, len(digits), 3))


def spoken_list(items: Any, conjunction: str = "and") -> str:
    """["gutters", "roof", "windows"] -> "gutters, roof and windows"."""
    if isinstance(items, str) or not isinstance(items, Iterable):
        return str(items)
    words = [str(item) for item in items if item not in (None, "")]
    if len(words) <= 1:
        return "".join(words)
    return f"{', '.join(words[:-1])} {conjunction} {words[-1]}"


FILTERS: dict[str, Callable[..., str]] = {
    "spoken_date": spoken_date,
    "spoken_time": spoken_time,
    "money": money,
    "phone": phone,
    "spoken_list": spoken_list,
}


# ----------------------------------------------------------------------------------------------------
# Sanitising what callers and CRMs supply, and normalising what templates produce.


def sanitise_text(value: str, max_chars: int = FIELD_MAX_CHARS) -> str:
    """One short line of plain text: compatibility forms folded (so look-alike brackets become '<' and are
    dropped), control and invisible format characters removed, angle brackets removed, whitespace collapsed,
    cut at a word boundary to `max_chars`."""
    text = unicodedata.normalize("NFKC", value)
    text = "".join(
        " " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch)[0] != "C"
    )
    text = " ".join(text.translate(_STRUCTURE_CHARS).split())
    if len(text) > max_chars:
        cut = text[: max_chars + 1].rsplit(" ", 1)[0]
        text = cut if len(cut) >= max_chars // 2 else text[:max_chars]
    return text.strip()


def _field_name(key: Any) -> str | None:
    """A record's field name as a template can write it (`customer.next_pickup`); None if nothing is left."""
    name = _NOT_IDENTIFIER.sub("_", unicodedata.normalize("NFKC", str(key))).strip("_")[:64]
    if not name or name[0].isdigit():
        return None
    return name


def _sanitise_value(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool | date | time):
        return value  # date covers datetime
    if isinstance(value, int):
        return value
    if isinstance(value, float | Decimal):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return sanitise_text(value) or None
    if depth >= RECORD_MAX_DEPTH:
        return None
    if isinstance(value, Mapping):
        return sanitise_record(value, depth + 1)
    if isinstance(value, list | tuple):
        items = (_sanitise_value(item, depth + 1) for item in list(value)[:LIST_MAX_ITEMS])
        return [item for item in items if item is not None]
    return sanitise_text(str(value)) or None


def sanitise_record(record: Mapping[str, Any], depth: int = 0) -> dict[str, Any]:
    """A CRM record safe to put in a prompt: field names made identifiers, text sanitised and capped, empty
    and unrepresentable values dropped (so the template's default applies), sizes and nesting bounded."""
    clean: dict[str, Any] = {}
    for key, value in record.items():
        if len(clean) >= RECORD_MAX_FIELDS:
            break
        name = _field_name(key)
        cleaned = _sanitise_value(value, depth)
        if name is not None and cleaned is not None and name not in clean:
            clean[name] = cleaned
    return clean


def one_line(text: str) -> str:
    """A rendered prompt as the model is primed with it: one line, single spaces, no space before punctuation
    (left where a template's optional part rendered nothing)."""
    return _SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(text.split()))


# ----------------------------------------------------------------------------------------------------
# Rendering.


def prompt_context(
    call: IncomingCall,
    crm: CrmResult | None,
    agent_vars: Mapping[str, Any],
    now: datetime | None = None,
) -> dict[str, Any]:
    """The variables a template sees: `agent` (the agent's vars from the config), `customer` (the sanitised
    CRM record, empty when there is none), `crm` (status, found, reason), `call` (id, caller, called, fields,
    params: all sanitised, since callers and carriers can put anything there), `now` and `today`."""
    now = now or datetime.now().astimezone()
    return {
        "agent": dict(agent_vars),
        "customer": sanitise_record(crm.data) if crm is not None else {},
        "crm": {
            "status": crm.status if crm is not None else "none",
            "found": crm is not None and crm.found,
            "reason": crm.reason if crm is not None else "",
        },
        "call": {
            "id": sanitise_text(call.call_id),
            "caller": sanitise_text(call.caller or ""),
            "called": sanitise_text(call.called or ""),
            "fields": sanitise_record(call.fields),
            "params": sanitise_record(call.params),
        },
        "now": now,
        "today": now.date(),
    }


def _finalize(value: Any) -> Any:
    return "" if value is None else value  # a NULL renders as nothing, not as "None"


def _template_line(traceback: TracebackType | None, templates_dir: Path) -> str:
    """'path:line' of the innermost template frame in a rendering traceback (Jinja maps frames to lines)."""
    where = ""
    while traceback is not None:
        filename = traceback.tb_frame.f_code.co_filename
        if filename.endswith(".j2") or filename.startswith(str(templates_dir)):
            where = f"{filename}:{traceback.tb_lineno}"
        traceback = traceback.tb_next
    return where


class PromptRenderer:
    """Renders the templates of one directory in a sandbox where undefined variables are errors."""

    def __init__(self, templates_dir: str | Path = TEMPLATES_DIR) -> None:
        self.templates_dir = Path(templates_dir)
        self.environment = ImmutableSandboxedEnvironment(
            loader=jinja2.FileSystemLoader(str(self.templates_dir)),
            undefined=jinja2.StrictUndefined,
            autoescape=False,  # prompts are plain text; sanitising, not escaping, keeps CRM text in its place
            finalize=_finalize,
        )
        self.environment.filters.update(FILTERS)

    def template_names(self) -> list[str]:
        """Templates agents can name: *.j2 in the directory, partials excluded."""
        if not self.templates_dir.is_dir():
            return []
        return sorted(p.name for p in self.templates_dir.glob("*.j2"))

    def sample_path(self, template: str) -> Path:
        return self.templates_dir / (template.removesuffix(".j2") + SAMPLE_SUFFIX)

    def sample(self, template: str) -> dict[str, Any]:
        """The template's sample data ({"agent": .., "customer": .., "call": ..}); empty if it has none."""
        path = self.sample_path(template)
        if not path.is_file():
            return {}
        try:
            sample = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PromptError(f"{path}: sample data is not readable JSON: {exc}") from None
        if not isinstance(sample, dict) or not all(isinstance(sample.get(k, {}), dict) for k in sample):
            raise PromptError(f"{path}: sample data must be an object of objects (agent, customer, call)")
        return sample

    def render(self, template: str, context: Mapping[str, Any]) -> str:
        """The template rendered with `context` as one line; PromptError names file, line and problem."""
        path = self.templates_dir / template
        try:
            text = self.environment.get_template(template).render(context)
        except jinja2.TemplateNotFound as exc:
            missing = exc.name if exc.name != template else template
            raise PromptError(
                f"template {missing!r} not found in {self.templates_dir}; "
                f"templates there: {self.template_names()}"
            ) from None
        except jinja2.TemplateSyntaxError as exc:
            raise PromptError(
                f"{exc.filename or path}:{exc.lineno}: template syntax error: {exc.message}"
            ) from None
        except jinja2.UndefinedError as exc:
            where = _template_line(exc.__traceback__, self.templates_dir) or str(path)
            raise PromptError(
                f"{where}: {exc.message}; add it to the sample data {self.sample_path(template).name} if "
                "every call has it, or give the template a default, e.g. "
                "{{ customer.name | default('the caller') }}"
            ) from None
        except SecurityError as exc:
            where = _template_line(exc.__traceback__, self.templates_dir) or str(path)
            raise PromptError(f"{where}: refused by the template sandbox: {exc}") from None
        except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as exc:
            where = _template_line(exc.__traceback__, self.templates_dir) or str(path)
            raise PromptError(f"{where}: {type(exc).__name__}: {exc}") from None
        text = one_line(text)
        if SYSTEM_TAG in text.lower():
            raise PromptError(
                f"{path}: the rendered prompt contains {SYSTEM_TAG}; the engine adds the wrapper itself, "
                "remove the tag from the template"
            )
        return text


def check_budget(agent: str, text: str, tokens: int, maximum: int, source: str = "prompt") -> None:
    """Raise PromptBudgetError if `tokens` (the wrapped prompt's count) is over the agent's `maximum`."""
    if tokens > maximum:
        raise PromptBudgetError(
            f"agent '{agent}': the role prompt from {source} is {tokens} tokens, over max_prompt_tokens = "
            f"{maximum}; shorten it or raise max_prompt_tokens (every token is a model step before the call "
            f"starts, and the model sees only its last {MODEL_CONTEXT_STEPS} steps)",
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
    deadline_s: float | None = None  # None: the adapter's own deadline_s


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


def sample_call(sample: Mapping[str, Any]) -> IncomingCall:
    """The call a template's sample data describes (defaults for what it leaves out)."""
    call = sample.get("call", {})
    return IncomingCall(
        call_id=str(call.get("id", "CA00000000000000000000000000000000")),
        caller=call.get("caller", "+15550001111"),
        called=call.get("called", "+15550002222"),
        fields={str(k): str(v) for k, v in call.get("fields", {}).items()},
        params={str(k): str(v) for k, v in call.get("params", {}).items()},
    )


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


def check_templates(renderer: PromptRenderer) -> list[str]:
    """Every problem with the template directory itself: syntax of each file (partials included), and each
    agent-facing template rendered from its own sample data."""
    problems: list[str] = []
    for path in sorted(renderer.templates_dir.rglob("*.j2")):
        name = path.relative_to(renderer.templates_dir).as_posix()
        try:
            renderer.environment.get_template(name)
        except jinja2.TemplateSyntaxError as exc:
            problems.append(f"{exc.filename or path}:{exc.lineno}: template syntax error: {exc.message}")
    for name in renderer.template_names():
        try:
            sample = renderer.sample(name)
            crm = CrmResult("sample", "found", data=sample["customer"]) if "customer" in sample else None
            renderer.render(name, prompt_context(sample_call(sample), crm, sample.get("agent", {})))
        except PromptError as exc:
            if "syntax error" not in str(exc):  # already reported above
                problems.append(str(exc))
    return problems


# ----------------------------------------------------------------------------------------------------
# Counting tokens without loading the model.


def prompt_token_counter(checkpoint: str) -> TokenCounter:
    """Count role-prompt tokens with the tokenizer of `checkpoint` (as `[engine] checkpoint` names it: a local
    directory, a hub repo id, or "" for the demo model), loading only the tokenizer."""
    from engine.loading import encode_role_prompt, load_text_tokenizer

    tokenizer = load_text_tokenizer(_tokenizer_path(checkpoint))
    return lambda text: len(encode_role_prompt(tokenizer, text))


def _tokenizer_path(checkpoint: str) -> Path:
    from engine.loading import TEXT_TOKENIZER_FILE, CheckpointError

    if not checkpoint:
        from engine.checkpoint import write_random_checkpoint
        from engine.embedded import home_dir

        directory = home_dir() / "random-tiny"
        if not (directory / TEXT_TOKENIZER_FILE).is_file():
            write_random_checkpoint(directory)
        return directory / TEXT_TOKENIZER_FILE
    local = Path(checkpoint).expanduser()
    if local.is_dir():
        return local / TEXT_TOKENIZER_FILE
    if "/" not in checkpoint or checkpoint.startswith((".", "/", "~")):
        raise CheckpointError(
            f"[engine] checkpoint = '{checkpoint}' is neither a directory nor a hub repo id"
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(checkpoint, TEXT_TOKENIZER_FILE))
    except Exception as exc:  # hub errors come in many types; all mean the same to the user here
        raise CheckpointError(
            f"cannot fetch {TEXT_TOKENIZER_FILE} from hub repo {checkpoint}: {exc}; check HF_TOKEN and the "
            "licence acceptance, or point [engine] checkpoint at a local directory"
        ) from None
