"""The package layout as a contract (issue 21), read from the source with `ast`, nothing
imported: no import cycles, `gossip` never imports `node` or torch, the production node
never imports the rehearsal, and no module grows past MAX_LINES.

An import inside a function counts as an import for the layering rules (it runs when the
function does); the cycle rule looks at what runs at import time: module level and class
bodies, but not `if TYPE_CHECKING:` blocks (they never run)."""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("node", "gossip")

# A module past this many lines holds more than one concern; split it.
MAX_LINES = 700
# Today's big files with their current length as a cap (being split in issue 21): each
# entry may only shrink, and goes once its file is under MAX_LINES.
BIG_FILES: dict[str, int] = {}
# The round machine's driver stays thin (issue 21: about 400 lines at most): capped at
# its current length, lowered as it shrinks.
DRIVER = "node/runtime/node.py"
DRIVER_MAX_LINES = 383

# The production node's modules: they never import the rehearsal (attacks, faults, the
# simulators), at any level.
RUNTIME = ("node.runtime", "node.runtime.node", "node.runtime.daemon", "node.runtime.config")
REHEARSAL = ("node.rehearsal", "node.rehearsal.simulation")
# (importer, imported) pairs that break that rule today.
KNOWN_RUNTIME_TO_REHEARSAL: set[tuple[str, str]] = set()

FORBIDDEN_IN_GOSSIP = ("node", "torch")


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    at_import_time: bool  # module level or a class body, outside `if TYPE_CHECKING:`
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
            if "__pycache__" not in p.parts}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, modules: set[str]) -> list[Edge]:
    """Every import in the file, with the module it names: `from a import b` names a.b if
    that is a module of the tree, else a."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    edges: list[Edge] = []

    def visit(node: ast.AST, at_import_time: bool) -> None:
        if isinstance(node, ast.Import):
            edges.extend(Edge(name, a.name, at_import_time, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, is_package, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                edges.append(Edge(name, sub if sub in modules else target, at_import_time,
                                  node.lineno))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for child in ast.iter_child_nodes(node):
                visit(child, False)
            return
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, at_import_time)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, at_import_time)

    visit(tree, True)
    return edges


@functools.cache
def import_graph() -> tuple[Edge, ...]:
    files = source_files()
    modules = set(files)
    return tuple(e for name, path in files.items() for e in imports_of(name, path, modules))


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def cycles(edges: list[Edge] | tuple[Edge, ...]) -> list[list[str]]:
    """Import-time cycles among the tree's modules (Tarjan's strongly connected
    components of more than one module, or a module importing itself)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.at_import_time and within(e.imported, PACKAGES):
            graph.setdefault(e.importer, set()).add(e.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def test_no_import_cycles_in_node_or_gossip():
    assert cycles(import_graph()) == []


def test_gossip_never_imports_node_or_torch():
    bad = [f"{e.importer}:{e.line} imports {e.imported}" for e in import_graph()
           if within(e.importer, ("gossip",)) and within(e.imported, FORBIDDEN_IN_GOSSIP)]
    assert bad == []


def test_the_runtime_never_imports_the_rehearsal():
    found = {(e.importer, e.imported) for e in import_graph()
             if within(e.importer, RUNTIME) and within(e.imported, REHEARSAL)}
    assert found - KNOWN_RUNTIME_TO_REHEARSAL == set(), "the production node imports rehearsal code"
    # a KNOWN entry whose import is gone is removed from the list (it only shrinks)
    assert KNOWN_RUNTIME_TO_REHEARSAL - found == set()


# The operator's surfaces (`flnode status`, `flnode report`) read a node's state dir and
# config; they never build or import the running node, its transports or the rehearsal.
OPS = ("node.ops",)
NOT_FROM_OPS = ("node.runtime.node", "node.runtime.daemon", "node.runtime.release",
                "node.runtime.signer", "node.rehearsal", "gossip.protocol")


def test_ops_reads_state_dirs_never_the_running_node():
    bad = [f"{e.importer}:{e.line} imports {e.imported}" for e in import_graph()
           if within(e.importer, OPS) and within(e.imported, NOT_FROM_OPS)]
    assert bad == []


def test_no_module_over_the_line_limit():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
               for p in source_files().values()}
    over = {f: n for f, n in lengths.items() if n > BIG_FILES.get(f, MAX_LINES)}
    assert over == {}, f"over {MAX_LINES} lines (or past their cap in BIG_FILES): {over}"
    done = {f for f, cap in BIG_FILES.items() if lengths.get(f, 0) <= MAX_LINES}
    assert done == set(), f"split below {MAX_LINES} lines (or gone): drop from BIG_FILES: {done}"
    assert lengths[DRIVER] <= DRIVER_MAX_LINES, (
        f"{DRIVER}: {lengths[DRIVER]} lines, over its cap {DRIVER_MAX_LINES}: the driver "
        "carries out what the round machine decides; put the work in a part of its own")


def test_the_graph_sees_function_level_imports_and_cycles():
    """The checks above cannot pass vacuously: the parser finds a known function-level
    import, and a cycle fed to it is reported."""
    edges = import_graph()
    assert any(e.importer == "node.cli" and not e.at_import_time and within(e.imported, ("node",))
               for e in edges)
    assert any(e.importer == "node.strategy.base" and e.at_import_time
               and e.imported == "node.strategy.distance" for e in edges)
    fake = [Edge("node.a", "node.b", True, 1), Edge("node.b", "node.a", True, 1),
            Edge("node.c", "node.d", False, 1), Edge("node.d", "node.c", True, 1)]
    assert cycles(fake) == [["node.a", "node.b"]]


# Every import inside a function is there for a lean start (a command that needs no torch
# or transport starts without it) and says so: "lean start" on the import's line or the
# line above; one comment above a run of consecutive imports covers the run. Files exempt
# from the check (none: add one only with a comment saying why and until when).
LEAN_START_UNCHECKED: set[str] = set()


def unexplained_function_imports(source: str) -> list[int]:
    """First lines of the function-level imports (a run of consecutive import statements
    counts as one) with no "lean start" on the line above the run or on any of its lines."""
    lines = source.splitlines()
    found = []

    def explained(run: list[ast.stmt]) -> bool:
        first, last = run[0].lineno, run[-1].end_lineno or run[-1].lineno
        return any("lean start" in lines[n - 1] for n in range(max(first - 1, 1), last + 1))

    def visit(node: ast.AST, in_function: bool) -> None:
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for field in ("body", "orelse", "finalbody", "handlers"):
            stmts = getattr(node, field, None)
            if not isinstance(stmts, list) or not inside:
                continue
            run: list[ast.stmt] = []
            for stmt in [*stmts, None]:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    run.append(stmt)
                    continue
                if run and not explained(run):
                    found.append(run[0].lineno)
                run = []
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(source), False)
    return sorted(found)


def test_an_unexplained_function_import_is_found():
    source = ("import os\n"
              "def f():\n"
              "    import json\n"
              "    x = 1\n"
              "    # lean start: torch is heavy\n"
              "    import torch\n"
              "    import numpy\n"
              "    x = 2\n"
              "    import msgpack  # lean start: only here\n"
              "    if x:\n"
              "        from x import (a,\n"
              "                       b)\n"
              "class C:\n"
              "    import typing\n")
    assert unexplained_function_imports(source) == [3, 11]


def test_every_function_level_import_says_lean_start():
    missing = []
    for path in source_files().values():
        rel = path.relative_to(ROOT).as_posix()
        if rel in LEAN_START_UNCHECKED:
            continue
        missing += [f"{rel}:{n}" for n in unexplained_function_imports(path.read_text())]
    assert not missing, ("function-level imports without a `# lean start: <why>` comment "
                         "(move them to the top if they cost nothing at start): "
                         + ", ".join(missing))
