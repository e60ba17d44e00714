"""bench's module structure: no import cycle between its modules, and the systems table makes each
system through a runner registered by name (imported only then)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from bench.base import System
from bench.systems import RUNNERS, SYSTEMS, make_system

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _runtime_imports(tree: ast.Module) -> set[str]:
    """The bench modules a module imports when it runs (at the top or in a function; not under TYPE_CHECKING)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bench":
            found.add(node.module)
            if node.module == "bench":
                found.update(f"bench.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("bench."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (found := walk(dep, [*path, dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := walk(start, [start])):
            return found
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_bench_modules_import_each_other_without_a_cycle() -> None:
    graph = {f"bench.{p.stem}": _runtime_imports(ast.parse(p.read_text(encoding="utf-8"))) for p in BENCH.glob("*.py")}
    assert graph["bench.peers"] == {"bench.base"}  # a system module imports the interface, not the table
    assert _cycle(graph) is None, f"import cycle in bench: {' -> '.join(_cycle(graph) or [])}"


def test_every_system_has_a_registered_runner_that_implements_the_interface() -> None:
    for spec in SYSTEMS:
        assert spec.runner in RUNNERS, spec.name
    for name, target in RUNNERS.items():
        module, _, cls = target.partition(":")
        runner = getattr(importlib.import_module(module), cls)
        assert issubclass(runner, System), name


@pytest.mark.parametrize(("name", "runner"), [("transformers-pytorch-fp32", "PipelineSystem"), ("ctranslate2-int8", "CTranslate2System"),
                                              ("spanrt-native-int8", "SpanRTSystem")])
def test_make_system_builds_the_registered_runner_without_loading_anything(name: str, runner: str) -> None:
    from bench.base import Artifacts
    from bench.systems import SYSTEMS_BY_NAME, QASettings

    system = make_system(SYSTEMS_BY_NAME[name], Artifacts(), QASettings(), threads=1, max_batch_size=1)
    assert type(system).__name__ == runner and system.spec.name == name
