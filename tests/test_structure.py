"""The import graph, read from the source: no cycle, and a collector that needs only the probe's model.

Every `import` statement counts, wherever it stands: inside a function, under `if TYPE_CHECKING`
(a cycle that only the type checker sees is still two modules that cannot be read apart).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("probe", "collector", "fleet", "dashboards")
# What the collector may use of the probe: the measurement model it stores, the bounds both sides
# enforce and the error base class of its config messages. Not the probe's transports, engine or daemon.
COLLECTOR_MAY_IMPORT = frozenset({"probe", "probe.errors", "probe.limits", "probe.model"})

Graph = dict[str, set[str]]


def _modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str] | dict[str, Path]) -> set[str]:
    """The project modules `name` imports directly; `from pkg import mod` names the module."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - node.level + 1]
                module = ".".join([*parent, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for a in node.names:
                found.add(f"{module}.{a.name}" if f"{module}.{a.name}" in known else module)
    return {m for m in found if m in known and m != name}


def import_graph(root: Path = ROOT) -> Graph:
    modules = _modules(root)
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: Graph) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def reachable(graph: Graph, start: str) -> set[str]:
    """Every project module that importing `start` loads, its packages' __init__ included."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        m = todo.pop()
        parts = m.split(".")
        for k in range(1, len(parts) + 1):
            step = ".".join(parts[:k])
            if step in graph and step not in seen:
                seen.add(step)
                todo.extend(graph[step])
    return seen


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "collector.store" in graph["collector.metrics"]  # the graph is read, not empty
    assert cycles(graph) == []


def test_the_collector_imports_only_the_probes_model() -> None:
    graph = import_graph()
    used = set().union(*(reachable(graph, m) for m in graph if m.split(".")[0] == "collector"))
    from_probe = {m for m in used if m.split(".")[0] == "probe"}
    assert from_probe <= COLLECTOR_MAY_IMPORT, sorted(from_probe - COLLECTOR_MAY_IMPORT)
    assert from_probe == COLLECTOR_MAY_IMPORT  # an allowance nobody uses is taken back


def test_the_check_sees_type_checking_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself can fail: a cycle hidden under TYPE_CHECKING, or made by a relative
    import inside a function, is found; a collector reaching the engine through the model is too."""
    (tmp_path / "collector").mkdir()
    (tmp_path / "probe").mkdir()
    for pkg in ("dashboards", "fleet"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "collector" / "__init__.py").write_text("")
    (tmp_path / "collector" / "store.py").write_text("from collector.reach import f\n")
    (tmp_path / "collector" / "reach.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from collector.store import Store\n"
    )
    (tmp_path / "collector" / "app.py").write_text("from probe import model\n")
    (tmp_path / "probe" / "__init__.py").write_text("")
    (tmp_path / "probe" / "model.py").write_text("def f():\n    from . import engine\n")
    (tmp_path / "probe" / "engine.py").write_text("from .model import X\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["collector.reach", "collector.store"], ["probe.engine", "probe.model"]]
    assert "probe.engine" in reachable(graph, "collector.app")
