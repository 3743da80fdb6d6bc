"""The package's layering, as docs/architecture.md draws it: every import between parts follows
an allowed arrow, and no file or part imports itself round a cycle. Imports inside functions and
under TYPE_CHECKING count like any other."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "peerpipe"
BASE = {"errors", "paths", "logs", "dtypes", "compute"}  # small modules every part may use
# Each part and the parts it may import (besides itself and BASE). Read top-down: nothing
# imports a part above it.
ALLOWED: dict[str, set[str]] = {
    "__main__": {"cli"},
    "cli": {"__init__", "python_api", "api", "cluster", "inference", "plan", "engine", "room", "transport", "protocol", "models", "weights", "webgpu"},
    "python_api": {"api", "cluster", "inference", "plan", "engine", "room", "transport", "protocol", "models", "weights", "webgpu"},
    "api": {"cluster", "inference", "engine", "protocol", "room", "transport", "webgpu"},
    "cluster": {"plan", "engine", "room", "transport", "protocol", "webgpu"},
    "inference": {"plan", "engine", "room", "transport", "protocol", "weights", "webgpu"},
    "weights": {"engine", "room", "transport", "protocol"},
    "webgpu": {"engine"},
    "room": {"transport", "protocol"},
    "transport": {"protocol"},
    "protocol": set(),
    "plan": {"engine"},
    "engine": set(),
    "devtools": {"engine"},
    "models": set(),
    **{name: set() for name in BASE},
    "__init__": {"python_api"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def imports() -> dict[str, set[str]]:
    """Module -> the peerpipe modules it imports (``from peerpipe.x import y`` names y when y is a
    module, else peerpipe.x)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
            for target in targets:
                if target.startswith("peerpipe") and target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_import_between_parts_follows_an_allowed_arrow() -> None:
    graph = imports()
    wrong = []
    for module, targets in graph.items():
        src = part_of(module)
        assert src in ALLOWED, f"{module}: part {src!r} is not in the layering; add it to ALLOWED and docs/architecture.md"
        for target in targets:
            dst = part_of(target)
            if dst != src and dst not in BASE and dst not in ALLOWED[src]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_file_imports_itself_round_a_cycle() -> None:
    assert find_cycle(imports()) is None, find_cycle(imports())


def test_no_part_imports_itself_round_a_cycle() -> None:
    graph = imports()
    parts: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        parts[part_of(module)] |= {part_of(t) for t in targets} - {part_of(module)}
    assert find_cycle(parts) is None, find_cycle(parts)


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
        ({"a": {"b"}, "b": {"a"}}, True),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, True),
    ],
)
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], cycle: bool) -> None:
    assert (find_cycle(graph) is not None) is cycle


def test_no_python_file_is_over_450_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long
