"""The package's import graph has no cycles: module-level and function-level imports both count
(imports under ``if TYPE_CHECKING:`` are annotations only and do not)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: installed name → source folder (pyproject's package-dir mapping)
ROOTS = {"compress": REPO / "compress", "compress.cli": REPO / "cli", "compress.calib": REPO / "calib", "compress.eval": REPO / "eval"}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg, root in ROOTS.items():
        for f in root.rglob("*.py"):
            rel = f.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "compress" and parts and parts[0] in ("cli", "calib", "eval"):
                continue
            out[name] = f
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    pkg = base.split(".")
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    mod = ".".join(pkg + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                for alias in child.names:
                    full = f"{mod}.{alias.name}"
                    found.add(full if full in known else mod)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {n: _imports(n, p, known) for n, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_import_graph_is_read() -> None:
    g = _graph()
    assert "compress.pipeline.sequential" in g and "compress.passes.base" in g["compress.pipeline.sequential"]


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert cycles == [], f"import cycles: {cycles}"


def test_engine_and_io_name_no_concrete_pass() -> None:
    """The engine, the planner, the drivers, the checkpoint and the report never name a concrete pass or
    its modules."""
    from compress.registry import all_passes

    names = set(all_passes())
    files = [REPO / "compress" / "checkpoint.py", REPO / "compress" / "report.py", *(REPO / "compress" / "pipeline").glob("*.py"),
             *(REPO / "compress" / "planning").glob("*.py"), *(REPO / "compress" / "drivers").glob("*.py")]
    for f in files:
        tree = ast.parse(f.read_text())
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        idents = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not (strings & names), f"{f.name} names passes {strings & names}"
        assert not {i for i in idents | imported if "slice" in i.lower() or "Sliced" in i or "MixedHead" in i}, f.name
