"""The house rules of the layout (docs/architecture.md), checked on the source: no import cycle among the
project's modules (every import counts, also those under TYPE_CHECKING or inside a function), each room
imports only what sits below it on the path of a call, and no module grows past ~400 lines without
saying why in its docstring."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "engine", "crm_adapters")
MAX_LINES = 420  # "about 400"


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def imports_of(name: str) -> set[str]:
    """The project modules `name` imports, anywhere in its file."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c` imports a.b, and a.b.c when c is a module
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in MODULES and target != name}
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_the_project_has_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target] if target in path else [name, target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_cycle_check_sees_a_cycle() -> None:
    # Guards the check above against passing vacuously: the graph does hold the edges it walks.
    assert "gateway.call.session" in GRAPH["gateway.switchboard"]
    assert "engine.api" in GRAPH["gateway.call.session"]


# Which rooms each room may import from the project (besides its own modules).
ALLOWED = {
    "engine": {"engine"},
    "crm_adapters": {"crm_adapters", "gateway.call.incoming", "gateway.schema"},
    "gateway.call": {"gateway.call", "gateway.audio", "gateway.schema", "engine.api", "engine.config"},
    "gateway.agents": {"gateway.agents", "gateway.assets", "gateway.call.incoming", "crm_adapters", "engine"},
    "gateway.ops": {"gateway.ops", "gateway.call", "gateway.config", "gateway.switchboard", "engine.api"},
    "gateway.edge": {"gateway", "crm_adapters", "engine.api"},
    "gateway.carriers": {"gateway.carriers", "gateway.call.events", "gateway.schema"},
}


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_each_room_imports_only_what_lies_below_it(room: str) -> None:
    allowed = ALLOWED[room]
    stray = {
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if name == room or name.startswith(room + ".")
        for target in targets
        if not any(target == a or target.startswith(a + ".") for a in allowed)
    }
    assert stray == set()


def test_the_call_layer_knows_the_engine_only_by_its_protocol() -> None:
    used = {
        t for n, ts in GRAPH.items() if n.startswith("gateway.call") for t in ts if t.startswith("engine")
    }
    assert used <= {"engine.api", "engine.config"}


def test_no_module_is_over_about_400_lines_without_saying_why() -> None:
    long = []
    for name, path in MODULES.items():
        lines = len(path.read_text().splitlines())
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "Size:" not in docstring:
            long.append(f"{name} ({lines} lines)")
    assert long == [], "over ~400 lines with no 'Size:' reason in the docstring: " + ", ".join(long)


def test_the_readme_layout_table_matches_the_tree() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout") : readme.index("\n## ", readme.index("## Layout") + 1)]
    named = set(
        re.findall(r"`((?:gateway|engine|crm_adapters|templates|deploy|bench|tests)/[\w./]*)`", table)
    )
    assert {path for path in named if not (ROOT / path).exists()} == set()
    rooms = {f"{p.relative_to(ROOT)}/" for pkg in PACKAGES for p in (ROOT / pkg).iterdir() if p.is_dir()}
    rooms -= {room for room in rooms if "__pycache__" in room or room.endswith("transports/")}
    assert {room for room in rooms if room not in table} == set()
