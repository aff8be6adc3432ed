"""No import cycle between maescale's modules, lazy imports (inside functions) included.

The graph is read from the source (AST), so it sees every import statement, whether or not it
runs: an import inside a function is a cycle waiting for the day it moves to the top of its
module. Edges are module -> module, as Python executes them:

- ``from .parallel import foo`` runs maescale/parallel/__init__.py: an edge to ``maescale.parallel``;
- ``from . import checkpoint`` imports the module ``maescale.checkpoint``: an edge to it;
- importing ``maescale.data.kinds`` from outside ``maescale.data`` runs the package's __init__
  first: edges to both; from inside the package the __init__ is already running, so only the
  submodule counts (a package's __init__ importing its own submodules is no cycle);
- ``if TYPE_CHECKING:`` blocks never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "maescale"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

Graph = dict[str, set[str]]


# ---------------------------------------------------------------- reading the graph


def module_files(package_dir: Path = PACKAGE_DIR, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (a package directory
    shadows a module file of the same name, as it does when Python imports it)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        elif (path.with_suffix("") / "__init__.py").is_file():
            continue
        modules[".".join([package, *parts])] = path
    return modules


def import_graph(sources: dict[str, tuple[str, bool]]) -> Graph:
    """Edges between the given modules: ``sources`` maps a module name to (its source, whether it
    is a package's __init__)."""
    known = set(sources)
    return {
        name: {target for target in imported_modules(text, name, is_package, known) if target != name}
        for name, (text, is_package) in sources.items()
    }


def package_graph() -> Graph:
    files = module_files()
    return import_graph({name: (path.read_text(), path.name == "__init__.py") for name, path in files.items()})


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that running ``module`` (its ``source``) may import."""
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            named = [alias.name for alias in node.names]
        else:
            base = _absolute_base(node, module, is_package)
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself.
            named = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for name in named:
            targets |= _executed(_deepest_known(name, known), module, known)
    return targets


def _import_nodes(tree: ast.AST):
    """Every import statement, at any depth, outside ``if TYPE_CHECKING:`` blocks."""
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _deepest_known(name: str, known: set[str]) -> str | None:
    """``name`` or its closest enclosing module that is one of ``known`` (None: not maescale's)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def _executed(target: str | None, importer: str, known: set[str]) -> set[str]:
    """``target`` and the packages above it that importing it runs, leaving out the packages
    that contain ``importer`` (already running when it imports)."""
    if target is None:
        return set()
    parts = target.split(".")
    chain = {".".join(parts[:end]) for end in range(1, len(parts) + 1)}
    running = {".".join(importer.split(".")[:end]) for end in range(1, importer.count(".") + 2)}
    return {name for name in chain - running if name in known} | ({target} - {importer})


# ---------------------------------------------------------------- finding a cycle


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None; depth-first, in sorted order so the answer is stable."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return path[path.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


# ---------------------------------------------------------------- the package


def test_maescale_has_no_import_cycle():
    graph = package_graph()
    assert "maescale.config" in graph and "maescale.data" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ---------------------------------------------------------------- the cycle finder and the edges


@pytest.mark.parametrize(("graph", "cycle"), [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),  # a diamond is no cycle
    ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": {"d", "b"}, "d": set()}, ["b", "c", "b"]),
    ({"x": set(), "a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
])
def test_find_cycle_names_the_modules_of_a_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def synthetic_package(**modules: str) -> dict[str, tuple[str, bool]]:
    """Sources of a made-up maescale: keyword ``data__init`` is the package maescale.data."""
    sources = {}
    for key, source in modules.items():
        is_package = key.endswith("__init")
        name = ".".join([PACKAGE, *key.removesuffix("__init").strip("_").split("__")]).rstrip(".")
        sources[name] = (source, is_package)
    return sources


def test_edges_follow_how_python_runs_imports():
    graph = import_graph(synthetic_package(
        __init="",
        config="from .data.kinds import names\ndef lazy():\n    from . import train\n",
        data__init="from .loader import build\nfrom .kinds import names\n",
        data__kinds="from ..errors import ConfigError\n",
        data__loader="from .kinds import names\nfrom . import seeding\n",
        data__seeding="",
        errors="from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .config import Config\n",
        parallel__init="from .zero import step\n",
        parallel__zero="import maescale.data.seeding\n",
        train="from .parallel import step\nfrom .config import load\n",
    ))
    assert graph["maescale.config"] == {"maescale.data", "maescale.data.kinds", "maescale.train"}
    assert graph["maescale.data"] == {"maescale.data.loader", "maescale.data.kinds"}
    assert graph["maescale.data.loader"] == {"maescale.data.kinds", "maescale.data.seeding"}  # not its own __init__
    assert graph["maescale.parallel.zero"] == {"maescale.data", "maescale.data.seeding"}
    assert graph["maescale.train"] == {"maescale.parallel", "maescale.config"}
    assert graph["maescale.errors"] == set()  # TYPE_CHECKING imports never run
    assert find_cycle(graph) == ["maescale.config", "maescale.train", "maescale.config"]


def test_a_cycle_through_a_package_init_is_found():
    """config -> data.kinds runs data/__init__, which imports the loader, which imports config."""
    graph = import_graph(synthetic_package(
        config="from .data.kinds import names\n",
        data__init="from .loader import build\n",
        data__kinds="",
        data__loader="from ..config import check\n",
    ))
    assert find_cycle(graph) == ["maescale.config", "maescale.data", "maescale.data.loader", "maescale.config"]
