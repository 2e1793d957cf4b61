"""The import graph of ``src/actpatch``, read with ``ast`` (function-local imports included,
``if TYPE_CHECKING:`` blocks excluded because they never run): no module imports itself back
through any chain, and the layers below the report never import it, except in ``plot()`` /
``_repr_html_`` (the one documented, lazy upward edge)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "actpatch"
LAZY_UPWARD = {"plot", "_repr_html_"}
"""Functions that may reach up into the report: a result shows itself."""
ABOVE = ("actpatch.report", "actpatch.app")
"""Layers that everything else sits below."""


def _name(path: Path) -> str:
    parts = list((path.relative_to(SRC.parent) if path.is_relative_to(SRC.parent) else Path(path.name))
                 .with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> list[tuple[str, str]]:
    """(imported module, enclosing function or "") for each runtime import of actpatch code."""
    name, tree = _name(path), ast.parse(path.read_text())
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, func: str) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child, func)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((target if target in modules else base, func))
        elif isinstance(node, ast.Import):
            found.extend((a.name, func) for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(tree, "")
    return [(m, f) for m, f in found if m in modules and m != name]


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, str]]]]:
    files = {_name(p): p for p in SRC.rglob("*.py")}
    modules = set(files)
    edges = {n: _imports(p, modules) for n, p in files.items()}
    return {n: {m for m, _ in e} for n, e in edges.items()}, edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph, _ = _graph()
    assert len(graph) > 50  # the walk really found the package
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_nothing_below_the_report_imports_it_except_to_show_itself():
    _, edges = _graph()
    bad = [(n, m, f or "module level") for n, found in edges.items() if not n.startswith(ABOVE) and n != "actpatch"
           for m, f in found if m.startswith(ABOVE) and f not in LAZY_UPWARD]
    assert bad == []
    lazy = {(n, m) for n, found in edges.items() if not n.startswith(ABOVE) for m, f in found if m.startswith(ABOVE)}
    assert ("actpatch.results", "actpatch.report.figures") in lazy  # the walk sees function-local imports


def test_function_local_and_type_checking_imports_are_told_apart(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n"
                   "def plot():\n    import b\nimport c\n")
    assert _imports(src, {"a", "b", "c"}) == [("b", "plot"), ("c", "")]


MAX_FUNCTION_LINES = 80
"""Longest function body allowed in src/ (signature and code, the docstring not counted)."""


def _long_functions() -> list[tuple[str, str, int]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                doc = node.body[0] if node.body and isinstance(node.body[0], ast.Expr) and isinstance(
                    getattr(node.body[0], "value", None), ast.Constant) and isinstance(node.body[0].value.value, str) else None
                if doc is not None:
                    lines -= doc.end_lineno - doc.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append((str(path.relative_to(SRC)), node.name, lines))
    return out


def test_no_function_is_over_80_lines():
    assert _long_functions() == []
