"""TOML tables checked against the dataclasses they configure, with pydantic: the dataclass is the schema
(field names, types, `Literal` choices and `annotated_types` bounds), and every problem comes back as one
line naming the file, the section and the key.

Validation is strict (the string "80" is not a port) and in JSON mode, which is what TOML values are:
arrays fill tuples and integers fill floats, nothing else is converted. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

T = TypeVar("T")


class ConfigProblems(ValueError):
    """Every problem found in one table, one line each (the message is the lines joined)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def validate(kind: type[T], table: Any, where: str, *, strict: bool = True) -> T:
    """`kind` built from `table`; `where` ("file: [section]") starts each problem. With strict=False, text
    is converted to numbers (values that came as text, such as a call's parameters)."""
    if not isinstance(table, Mapping):
        raise ConfigProblems([f"{where} must be a table, got {type(table).__name__}"])
    document = json.dumps({"value": dict(table)}, default=str)  # TOML dates and times: no setting takes one
    try:
        return _wrapper(kind).model_validate_json(document, strict=strict).value
    except ValidationError as exc:
        raise ConfigProblems([_line(where, kind, error) for error in exc.errors()]) from None


@cache
def _wrapper(kind: type) -> type[BaseModel]:
    # A model around the dataclass carries the config: nested dataclasses inherit its extra="forbid".
    return create_model(
        f"{kind.__name__}Table", __config__=ConfigDict(extra="forbid", allow_inf_nan=False), value=(kind, ...)
    )


_EXPECTED = {
    "int_type": "an integer (int)",
    "int_parsing": "an integer (int)",
    "int_from_float": "an integer (int)",
    "float_type": "a number (float)",
    "float_parsing": "a number (float)",
    "finite_number": "a finite number",
    "string_type": "text (str)",
    "bool_type": "true or false (bool)",
    "bool_parsing": "true or false (bool)",
    "tuple_type": "a list",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "dataclass_type": "a table",
    "dataclass_exact_type": "a table",
}


def _line(where: str, kind: type, error: Any) -> str:
    location = [str(part) for part in error["loc"][1:]]  # [0] is the wrapper's "value"
    kind_of = error["type"]
    if kind_of in ("unexpected_keyword_argument", "extra_forbidden"):
        *tables, key = location
        return f"{_section(where, tables)} has unknown key '{key}'; known keys: {_known(kind, tables)}"
    if kind_of == "missing" or kind_of == "missing_argument":
        *tables, key = location
        return f"{_section(where, tables)} is missing required key(s) ['{key}']"
    if location[-1:] == ["[key]"]:  # a table's key that is not one of its allowed names
        expected = error["msg"].removeprefix("Input should be ")
        return f"{_section(where, location[:-2])} key {error.get('input')!r} should be {expected}"
    if kind_of == "value_error":  # a dataclass's own check across its settings; its message names them
        return f"{_section(where, location)} {error['msg'].removeprefix('Value error, ')}"
    # Values inside a list or table are named by the setting they belong to.
    tables, key = _setting(location)
    value = error.get("input")
    if _EXPECTED.get(kind_of) == "a table":
        return f"{_section(where, [*tables, key])} must be a table, got {type(value).__name__}"
    expected = _EXPECTED.get(kind_of) or error["msg"].removeprefix("Input should be ")
    shown = f" = {value!r}" if value is not None and not isinstance(value, dict) else ""
    return f"{_section(where, tables)} {key}{shown} should be {expected}"


def _setting(location: list[str]) -> tuple[list[str], str]:
    """(the tables, the key) of a location; list indexes and union branches are left out."""
    parts = [
        p for p in location if not p.isdigit() and not p.startswith(("function-", "tuple[", "is-instance"))
    ]
    parts = [
        p for p in parts if p not in ("float", "int", "str", "bool", "none", "literal", "constrained-float")
    ]
    return (parts[:-1], parts[-1]) if parts else ([], "value")


def _section(where: str, tables: list[str]) -> str:
    """'file: [agents.a]' + ['sampling'] -> 'file: [agents.a.sampling]'."""
    if not tables:
        return where
    if where.endswith("]"):
        return f"{where[:-1]}.{'.'.join(tables)}]"
    return f"{where} [{'.'.join(tables)}]"


def _known(kind: type, tables: list[str]) -> list[str]:
    """The keys of the (nested) dataclass a location points into."""
    for table in tables:
        hints = typing.get_type_hints(kind) if dataclasses.is_dataclass(kind) else {}
        kind = next(
            (
                t
                for t in (hints.get(table), *typing.get_args(hints.get(table)))
                if dataclasses.is_dataclass(t)
            ),
            None,
        )
    return sorted(f.name for f in dataclasses.fields(kind)) if dataclasses.is_dataclass(kind) else []
