"""The carriers: one module per carrier, each a `Carrier` (and its `CarrierPeer`) behind the interface in
`base.py`. A module dropped in this package is a carrier: `registry()` finds it, the config reads its
`[<name>]` section, the edge mounts its routes and `duplexgate call --carrier <name>` speaks it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from functools import cache

from gateway.carriers.base import Carrier

DEFAULT_CARRIER = "twilio"  # served when a config names no carrier section


@cache
def registry() -> dict[str, type[Carrier]]:
    """Every carrier class in this package, by name."""
    found: dict[str, type[Carrier]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and issubclass(value, Carrier)
                and value.__module__ == module.__name__
                and not inspect.isabstract(value)
            ):
                found[value.name] = value
    return found


def carrier_class(name: str) -> type[Carrier]:
    carriers = registry()
    if name not in carriers:
        raise KeyError(f"unknown carrier {name!r}; known carriers: {sorted(carriers)}")
    return carriers[name]
