"""The package's import graph (read with ``ast``, every ``import`` at any depth, lazy ones
inside functions included) has no cycle: a module never needs, even indirectly, a module that
needs it. Cycles hide initialisation-order bugs and make the layout lie about its layers."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rotp_triton")


def _modules():
    mods = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                name = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
                mods[name] = path
    return mods


def _imports(name, path, mods):
    """Package modules imported by ``name`` (each ``from X import y`` counts X and, where y is
    a module, X.y; importing a module imports its packages' ``__init__`` too)."""
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in mods and prefix != name:
                    out.add(prefix)
    # a package's __init__ importing its own submodules is fine; a submodule importing its
    # package __init__ is implied by Python and not an edge of the layout
    return {m for m in out if not name.startswith(m + ".")}


def _graph():
    mods = _modules()
    return {n: _imports(n, p, mods) for n, p in mods.items()}


def _find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                cyc = visit(m)
                if cyc:
                    return cyc
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            cyc = visit(n)
            if cyc:
                return cyc
    return None


def test_package_import_graph_has_no_cycle():
    graph = _graph()
    assert "rotp_triton.ops.rot.route" in graph and graph["rotp_triton.functional"]
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", ["rotp_triton.ops.rot.route", "rotp_triton.functional"])
def test_route_does_not_import_legacy_routing(module):
    graph = _graph()
    assert "rotp_triton.ops.rot.dispatch" not in graph[module]
