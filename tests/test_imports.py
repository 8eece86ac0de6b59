"""The project's modules import one another without cycles (read from the source, nothing imported).

The graph has one node per module of the packages ``rewards``, ``trainers`` and ``recipes`` (a
package is its ``__init__``) and an edge ``M -> T`` for every ``import`` / ``from ... import`` in
``M``, at any depth (function-level imports count: they run, just later), except those under
``if TYPE_CHECKING:``. How an import statement becomes edges, as Python executes it:

* ``import a.b.c``: ``a.b.c``, and the packages ``a`` and ``a.b`` whose ``__init__`` runs on the
  way (not the packages ``M`` itself lives in: those are initialised, or initialising, already);
* ``from X import n``: ``X.n`` when that is a module; otherwise ``n`` is an attribute of ``X``,
  so ``X``'s ``__init__`` must have run (also when ``X`` is a package ``M`` lives in: that is how a
  re-export through a package's ``__init__`` closes a cycle); plus ``X`` and its packages as for
  ``import X``, but for the packages ``M`` lives in. Relative imports resolve against ``M``'s package.

Only edges to the project's own modules are kept.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rewards", "trainers", "recipes")


def project_modules(root: Path, packages=PACKAGES) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is_package)}`` of every module under ``root/<package>``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            if all(p.isidentifier() for p in parts):
                modules[".".join(parts)] = (path, is_package)
    return modules


def _ancestors(name: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b"]``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


class _Imports(ast.NodeVisitor):
    """Every import statement of a module, ``if TYPE_CHECKING:`` blocks left out."""

    def __init__(self):
        self.found: list[ast.Import | ast.ImportFrom] = []

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
        if name == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.append(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append(node)


def module_imports(name: str, path: Path, is_package: bool, modules) -> set[str]:
    """The project modules that executing ``name`` (its file at ``path``) imports (module docstring)."""
    visitor = _Imports()
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    own = set(_ancestors(name)) | ({name} if is_package else set())  # packages this module lives in
    targets: set[str] = set()

    def add_module(target: str) -> None:  # ``target`` and the packages whose __init__ runs on the way
        for package in [*_ancestors(target), target]:
            if package not in own:
                targets.add(package)

    for node in visitor.found:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add_module(alias.name)
            continue
        if node.level:
            base = name if is_package else name.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = ".".join(p for p in (base, node.module) if p)
        else:
            source = node.module or ""
        add_module(source)
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in modules:
                targets.add(submodule)
            else:  # an attribute of ``source``: its __init__ (or body) must have run
                targets.add(source)
    return {t for t in targets if t in modules and t != name}


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    modules = project_modules(root, packages)
    return {name: module_imports(name, path, is_package, modules) for name, (path, is_package) in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(start: str) -> None:  # iterative: no recursion limit on long chains
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph.get(node, ()):
                        components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return [_cycle_in(graph, set(component), component[0]) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest path ``start -> ... -> start`` inside ``component`` (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if succ not in parents:
                    parents[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def describe(found: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in found)


KNOWN: dict[tuple[str, str], str] = {}
"""Edges known to close a cycle, each with why and what removes it. The test fails on any other cycle,
and on a known edge that no longer closes one (then delete it here)."""


def test_the_project_has_no_import_cycles():
    graph = import_graph()
    assert {"rewards", "trainers", "recipes", "trainers.rlif", "recipes.common.config"} <= set(graph)
    assert "rewards" in graph["trainers.rlif"]  # sanity: the graph sees imports at all
    for source, target in KNOWN:
        assert target in graph[source], f"known edge {source} -> {target} is gone: delete it from KNOWN"
        closes = any(source in cycle and target in cycle for cycle in cycles(graph))
        assert closes, f"known edge {source} -> {target} no longer closes a cycle: delete it from KNOWN"
        graph[source] = graph[source] - {target}
    found = cycles(graph)
    assert not found, "import cycles between the project's modules:\n" + describe(found)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import helper\n\nVALUE = 1\n",
        "pkg/b.py": "def helper():\n    from pkg.a import VALUE\n    return VALUE\n",
        "pkg/c.py": "from . import a\n",
    })
    found = cycles(import_graph(tmp_path, ("pkg",)))
    assert found == [["pkg.a", "pkg.b", "pkg.a"]], describe(found)


def test_a_cycle_through_a_package_reexport_is_found(tmp_path):
    """``pkg/__init__`` re-exports from ``x``, ``x`` imports ``y``, ``y`` imports the re-exported name
    from the package: importing ``pkg.y`` first fails at runtime, and the graph says why."""
    _write(tmp_path, {
        "pkg/__init__.py": "from .x import X\n",
        "pkg/x.py": "from .y import Y\n\nX = Y\n",
        "pkg/y.py": "Y = 1\n\ndef f():\n    from pkg import X\n    return X\n",
        "other/__init__.py": "",
        "other/z.py": "import pkg.x\nfrom pkg import y\n",
    })
    graph = import_graph(tmp_path, ("pkg", "other"))
    assert graph["other.z"] == {"pkg", "pkg.x", "pkg.y"}
    assert cycles(graph) == [["pkg", "pkg.x", "pkg.y", "pkg"]]


def test_relative_imports_and_type_checking_blocks(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "from . import leaf\n",
        "pkg/sub/leaf.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..top import T\n"
                           "else:\n    from .. import top\n",
        "pkg/top.py": "import os\nfrom .sub.leaf import top as _t\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.sub"] == {"pkg.sub.leaf"}
    assert graph["pkg.sub.leaf"] == {"pkg.top"}  # the TYPE_CHECKING import is not run
    assert graph["pkg.top"] == {"pkg.sub", "pkg.sub.leaf"}
    assert cycles(graph) == [["pkg.sub", "pkg.sub.leaf", "pkg.top", "pkg.sub"]]  # importing pkg.sub.leaf runs pkg.sub


def test_no_cycle_without_one(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "from .a import A\n", "pkg/a.py": "from .b import B\nA = B\n",
                      "pkg/b.py": "B = 1\n"})
    assert cycles(import_graph(tmp_path, ("pkg",))) == []
