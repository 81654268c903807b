"""Role-prompt templates: rendered in a Jinja sandbox from templates/ with the call's facts and the caller's
sanitised CRM record, normalised to one line. Templates are checked against their sample data before any
call reaches them (`duplexgate config check`, start-up): a variable that is neither in the sample data nor
given a default is an error then, not in the middle of a call.
"""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from collections.abc import Mapping
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from crm_adapters.base import CrmResult
from engine.loading import SYSTEM_TAG
from gateway.agents.spoken import FILTERS
from gateway.assets import asset_root
from gateway.call.incoming import IncomingCall

log = logging.getLogger(__name__)


TEMPLATES_DIR = asset_root() / "templates"
SAMPLE_SUFFIX = ".sample.json"  # templates/<name>.sample.json: the data `config check` renders <name>.j2 with
PARTIALS = "partials"  # shared macros; not agents' templates themselves

# Caps on what a CRM record can bring into a prompt: a field holds a fact, not a paragraph of instructions.
FIELD_MAX_CHARS = 160
RECORD_MAX_FIELDS = 50
LIST_MAX_ITEMS = 20
RECORD_MAX_DEPTH = 3
# No field can open or close the <system> wrapper, nor write a look-alike of it (after NFKC folding).
_STRUCTURE_CHARS = str.maketrans("", "", "<>\u2039\u203a\u3008\u3009\u300a\u300b\u27e8\u27e9\u29fc\u29fd")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([.,;:!?])")
_NOT_IDENTIFIER = re.compile(r"\W+")


class PromptError(ValueError):
    """A role prompt cannot be produced; the message names the template (file and line) or agent concerned."""


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
