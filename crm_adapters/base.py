"""The one interface every CRM adapter implements, and what it adds to each: a deadline, a TTL cache and
failure capture, so a lookup never raises into a call and the call record can say what happened.

An adapter is one file in this package exporting `ADAPTER`, a `CrmAdapter` subclass whose `fetch(key)`
returns the caller's record (a mapping), None if there is none, or raises; `lookup(call, key)` does the rest.
The file's module name is the adapter's `type` in the config (`[crm.<name>] type = "static_file"`).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import pkgutil
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from annotated_types import Ge, Gt

from gateway.call.incoming import KEY_SOURCES, IncomingCall
from gateway.schema import ConfigProblems, validate

log = logging.getLogger(__name__)

__all__ = [
    "CrmAdapter",
    "CrmConfigError",
    "CrmLookupError",
    "CrmResult",
    "CrmSettings",
    "LookupStatus",
    "adapter_class",
    "adapter_types",
    "check_key_spec",
    "create_adapter",
]

LookupStatus = Literal["found", "not_found", "no_key", "timeout", "error"]


class CrmConfigError(ValueError):
    """An adapter's settings are unusable; the message names the config section and key."""


class CrmLookupError(RuntimeError):
    """A lookup failed for a reason the adapter can state plainly (HTTP 500, bad JSON, missing table...)."""


def check_key_spec(spec: Any, where: str) -> str:
    """Validate a lookup key spec such as "caller" or "params.account"; `where` prefixes the error."""
    if isinstance(spec, str):
        source, dot, name = spec.partition(".")
        if spec in ("caller", "called", "call_id") or (source in ("fields", "params") and dot and name):
            return spec
    raise CrmConfigError(f"{where} key = {spec!r} should be one of {', '.join(KEY_SOURCES)}")


@dataclass(frozen=True)
class CrmResult:
    """One lookup's outcome: the record (empty unless found) and, for the call record, how it went."""

    adapter: str
    status: LookupStatus
    data: Mapping[str, Any] = field(default_factory=dict)
    key: str | None = None
    reason: str = ""  # why there is no data, in words; "" when found
    elapsed_s: float = 0.0
    cached: bool = False

    @property
    def found(self) -> bool:
        return self.status == "found"

    def summary(self) -> dict[str, Any]:
        """What the call record keeps: no field values, only which fields came and why any did not."""
        return {
            "adapter": self.adapter,
            "status": self.status,
            "key": self.key,
            "reason": self.reason,
            "elapsed_ms": round(self.elapsed_s * 1000, 1),
            "cached": self.cached,
            "fields": sorted(self.data),
        }


@dataclass(frozen=True, kw_only=True)
class CrmSettings:
    """Settings every adapter takes; an adapter's own settings dataclass extends this one."""

    type: str
    deadline_s: Annotated[float, Gt(0)] = 1.0  # a lookup still running after this is abandoned
    cache_ttl_s: Annotated[float, Ge(0)] = 0.0  # 0: no cache; found and not-found results are kept this long
    cache_size: Annotated[int, Gt(0)] = 10_000  # most keys kept; the oldest entry goes first


class _TtlCache:
    """Lookups by key for `ttl_s` seconds, at most `size` keys."""

    def __init__(self, ttl_s: float, size: int) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self._entries: OrderedDict[str, tuple[float, Mapping[str, Any] | None]] = OrderedDict()

    def get(self, key: str) -> tuple[bool, Mapping[str, Any] | None]:
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        if entry[0] <= time.monotonic():
            del self._entries[key]
            return False, None
        return True, entry[1]

    def put(self, key: str, record: Mapping[str, Any] | None) -> None:
        if self.ttl_s <= 0:
            return
        self._entries.pop(key, None)
        self._entries[key] = (time.monotonic() + self.ttl_s, record)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class CrmAdapter(ABC):
    """Looks up a caller's record in one CRM. Subclasses set `settings_type` and implement `fetch`."""

    settings_type: ClassVar[type[CrmSettings]] = CrmSettings

    def __init__(
        self,
        name: str,
        settings: CrmSettings,
        env: Mapping[str, str] | None = None,
        where: str = "",
        base_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.env: Mapping[str, str] = env if env is not None else {}
        self.where = where or f"[crm.{name}]"  # prefix of this adapter's configuration errors
        self.base_dir = base_dir  # relative paths in the settings are relative to this (the config's folder)
        self._cache = _TtlCache(settings.cache_ttl_s, settings.cache_size)

    @classmethod
    def from_table(
        cls,
        name: str,
        table: Mapping[str, Any],
        where: str,
        env: Mapping[str, str] | None = None,
        base_dir: Path | None = None,
    ) -> CrmAdapter:
        """Build the adapter from its TOML table; errors start with `where` (file and section)."""
        settings = parse_settings(cls.settings_type, table, where)
        return cls(name, settings, env, where, base_dir)

    def resolve_path(self, path: str) -> Path:
        """A path from the settings; a relative one is taken from `base_dir` (else the working directory)."""
        resolved = Path(path).expanduser()
        return resolved if self.base_dir is None else self.base_dir / resolved

    @abstractmethod
    async def fetch(self, key: str) -> Mapping[str, Any] | None:
        """The record stored under `key`, or None; raise (CrmLookupError if possible) on failure."""

    async def aclose(self) -> None:
        """Release connections; the adapter may be used again afterwards (it reconnects)."""
        return None

    def secret(self, env_key: str) -> str | None:
        """The secret held in the environment variable that setting `env_key` names (None if no name is set).
        A named variable that is unset is a start-up error, not a failed lookup on every call."""
        variable = getattr(self.settings, env_key)
        if not variable:
            return None
        value = self.env.get(variable)
        if not value:
            raise CrmConfigError(
                f"{self.where} {env_key} = {variable!r}: environment variable {variable} is not set"
            )
        return value

    def describe(self) -> str:
        """Where this adapter looks, for logs and the CLI; never includes a secret."""
        return self.settings.type

    async def lookup(
        self, call: IncomingCall, key: str = "caller", deadline_s: float | None = None
    ) -> CrmResult:
        """Look up the record `key` (a KEY_SOURCES spec) picks from `call`, within the deadline. Never raises
        except when the call itself is cancelled."""
        started = time.monotonic()
        value = call.key_value(key)
        if value is None:
            return CrmResult(self.name, "no_key", reason=f"the call carries no {key}")
        hit, cached = self._cache.get(value)
        if hit:
            return self._result(value, cached, started, cached=True)
        deadline_s = self.settings.deadline_s if deadline_s is None else deadline_s
        try:
            async with asyncio.timeout(deadline_s):
                record = await self.fetch(value)
            if record is not None and not isinstance(record, Mapping):
                raise CrmLookupError(f"the record is a {type(record).__name__}, not a set of named fields")
        except TimeoutError:
            reason = f"no answer within the {deadline_s:g} s deadline"
            return self._failure(call, "timeout", value, reason, started)
        except Exception as exc:  # an adapter must never take a call down with it
            reason = str(exc) if isinstance(exc, CrmLookupError) else f"{type(exc).__name__}: {exc}"
            return self._failure(call, "error", value, reason, started)
        self._cache.put(value, record)
        return self._result(value, record, started, cached=False)

    def _result(
        self, key: str, record: Mapping[str, Any] | None, started: float, *, cached: bool
    ) -> CrmResult:
        elapsed = time.monotonic() - started
        if record is None:
            return CrmResult(
                self.name, "not_found", key=key, reason="no record", elapsed_s=elapsed, cached=cached
            )
        return CrmResult(self.name, "found", data=dict(record), key=key, elapsed_s=elapsed, cached=cached)

    def _failure(
        self, call: IncomingCall, status: LookupStatus, key: str, reason: str, started: float
    ) -> CrmResult:
        log.warning(
            "call %s: CRM %s (%s) lookup failed: %s", call.call_id, self.name, self.describe(), reason
        )
        return CrmResult(self.name, status, key=key, reason=reason, elapsed_s=time.monotonic() - started)


def adapter_types() -> list[str]:
    """The adapter types this installation has: modules of this package that export ADAPTER."""
    package = importlib.import_module(__package__ or "crm_adapters")
    names = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "base" and not info.name.startswith("_"):
            names.append(info.name)
    return sorted(names)


def adapter_class(kind: str, where: str) -> type[CrmAdapter]:
    """The adapter class for `type = kind`; the error lists the types there are."""
    if kind not in adapter_types():
        raise CrmConfigError(f"{where} type = {kind!r} is not an adapter; known types: {adapter_types()}")
    module = importlib.import_module(f"{__package__ or 'crm_adapters'}.{kind}")
    found = getattr(module, "ADAPTER", None)
    if not (isinstance(found, type) and issubclass(found, CrmAdapter)):
        raise CrmConfigError(f"{where} type = {kind!r}: module {module.__name__} exports no ADAPTER class")
    return found


def create_adapter(
    name: str,
    table: Mapping[str, Any],
    where: str,
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> CrmAdapter:
    """Build the adapter a `[crm.<name>]` table declares; `where` is "<file>: [crm.<name>]", `env` holds the
    secrets, relative paths are taken from `base_dir` (the config file's folder)."""
    if not isinstance(table, Mapping):
        raise CrmConfigError(f"{where} must be a table, got {type(table).__name__}")
    kind = table.get("type")
    if not isinstance(kind, str):
        raise CrmConfigError(f"{where} needs type = one of {adapter_types()}")
    return adapter_class(kind, where).from_table(name, table, where, env, base_dir)


def parse_settings(kind: type[CrmSettings], table: Mapping[str, Any], where: str) -> Any:
    """Settings dataclass `kind` from a TOML table, checked against its fields (gateway/schema.py); every
    problem at once, each naming `where` and the key."""
    try:
        return validate(kind, table, where)
    except ConfigProblems as exc:
        raise CrmConfigError(str(exc)) from None
