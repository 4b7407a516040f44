"""The floors of docs/ARCHITECTURE.md hold: the import-linter contracts of pyproject.toml pass, and
no import circle exists between imclass modules (function-level imports included)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """`lint-imports` (import-linter) with the project's contracts: an upward import fails here, named."""
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # analyse this checkout's imclass
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"import contracts broken:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    assert "0 broken" in done.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), over every import grimp sees."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if not w.startswith("imclass"):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(m for m in graph.modules if m.startswith("imclass")):
        if module not in index:
            visit(module)
    return groups


def test_no_import_cycles():
    """Zero import circles among imclass modules, counting imports inside functions too (not the
    annotations-only imports under ``TYPE_CHECKING``, which never run)."""
    sys.path.insert(0, str(ROOT))
    try:
        graph = grimp.build_graph("imclass", cache_dir=None, exclude_type_checking_imports=True)
    finally:
        sys.path.remove(str(ROOT))
    assert graph.find_modules_directly_imported_by("imclass.models.rebuild")  # the graph is this checkout's
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    """The check above can fail: a graph with a -> b -> a has one cycle."""
    graph = grimp.ImportGraph()
    for name in ("imclass.a", "imclass.b", "imclass.c"):
        graph.add_module(name)
    graph.add_import(importer="imclass.a", imported="imclass.b")
    graph.add_import(importer="imclass.b", imported="imclass.a")
    graph.add_import(importer="imclass.c", imported="imclass.a")
    assert _cycles(graph) == [["imclass.a", "imclass.b"]]
