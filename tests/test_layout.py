"""The house rules of the package's layout (README: How the code is laid out), checked on the source:
imports point down the rooms, no two modules import each other, no stage imports another stage or
reads store files, and a module past about 500 lines says why at its top."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
# rooms below the stages: they never reach up into the stages, the run context or the entry points
LOWER_ROOMS = ("methods", "models", "data", "store")
UPPER = ("pipeline.stages", "pipeline.runtime", "pipeline.app", "pipeline.api", "pipeline.__main__")
LONG_MODULE = 550


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, top_level: bool) -> set[str]:
    """The package's modules that ``path`` imports (``from pkg import submodule`` counts as the
    submodule only); with ``top_level``, only the imports run when the module loads."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            out.update(subs)
            if len(subs) < len(node.names):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("pipeline"))
    return {m for m in out if m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_two_modules_import_each_other() -> None:
    assert _cycles({m: _imports(p, True) for m, p in MODULES.items()}) == []


def test_imports_point_down_the_rooms() -> None:
    upward = []
    for mod, path in MODULES.items():
        room = mod.split(".")[1] if mod.count(".") else ""
        for dep in _imports(path, False):
            if dep == "pipeline.__main__" or (room in LOWER_ROOMS and dep.startswith(UPPER)):
                upward.append(f"{mod} -> {dep}")
            elif room == "stages" and mod != "pipeline.stages" and dep.startswith("pipeline.stages."):
                upward.append(f"{mod} -> {dep} (a stage imports another stage)")
    assert upward == []


def test_long_modules_say_why_at_the_top() -> None:
    unexplained = []
    for mod, path in MODULES.items():
        text = path.read_text()
        if text.count("\n") > LONG_MODULE:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "lines" not in doc:
                unexplained.append(f"{mod} ({text.count(chr(10))} lines)")
    assert unexplained == []


def test_the_checks_see_a_violation() -> None:
    """The cycle finder is not vacuous: a two-module loop is found."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
