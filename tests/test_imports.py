"""The package's module-level import graph has no cycle: every `import` / `from ... import` at the top of a module
under hiresrun/, with the packages each import runs (`hiresrun.a.b` runs `hiresrun.a`), is an edge, and the graph
is acyclic. Imports inside functions (a heavy module deferred off a fast path) are not edges."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "hiresrun"


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    names = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        names[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in names.items():
        targets = set()
        for node in ast.parse(path.read_text()).body:  # the module's top level only
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("hiresrun"):
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                            for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("hiresrun")}
        runs = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 2)}
        graph[name] = {t for t in runs if t in names and t != name and not name.startswith(t + ".")}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that returns to its start, or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node))), None)


def test_the_module_level_import_graph_has_no_cycle():
    graph = module_graph()
    assert {"hiresrun.run", "hiresrun.sampling", "hiresrun.models", "hiresrun.accelerators"} <= set(graph)
    assert "hiresrun.models" in graph["hiresrun.sampling"]  # edges are read (sampling imports models at the top)
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"b"}}) is None
