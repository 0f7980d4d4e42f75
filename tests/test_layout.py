"""The shape of the house: one job per file (no file of the library over 400 lines, none of the engine
over 300), no function over 80 lines, and no hand-kept list of passes, adapters or module types (each
registers itself when its package is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = [REPO / d for d in ("compress", "cli", "calib", "eval")]


def _files() -> list[Path]:
    return sorted(f for root in LIBRARY for f in root.rglob("*.py"))


def test_no_library_file_is_over_400_lines_and_no_engine_file_over_300() -> None:
    too_long = {str(f.relative_to(REPO)): n for f in _files() if (n := len(f.read_text().splitlines())) > 400}
    assert not too_long, too_long
    engine = {str(f.relative_to(REPO)): n for f in (REPO / "compress" / "pipeline").glob("*.py") if (n := len(f.read_text().splitlines())) > 300}
    assert not engine, engine


def test_no_function_is_over_80_lines() -> None:
    long = []
    for f in _files():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:  # type: ignore[operator]
                long.append(f"{f.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")  # type: ignore[operator]
    assert not long, long


def test_passes_modules_and_adapters_register_themselves() -> None:
    """Every pass file, module file and adapter file is found by its package; the registries hold them
    all without naming any of them."""
    from compress.adapters import ADAPTERS
    from compress.modules.base import MODULE_TYPES
    from compress.registry import all_passes

    passes = all_passes()
    modules = {f.stem for f in (REPO / "compress" / "passes").glob("*.py")} - {"__init__", "base", "context", "targeting"}
    assert {cls.__module__.rsplit(".", 1)[1] for cls in passes.values()} == modules
    assert {cls.__module__.rsplit(".", 1)[1] for cls in MODULE_TYPES.values()} >= {"quant", "bcq", "dictionary", "lora", "lowrank", "sparse"}
    assert {a.name for a in ADAPTERS} >= {"llama", "mistral", "qwen2", "qwen3", "phi3"}
    for pkg in ("passes", "modules", "adapters"):
        init = (REPO / "compress" / pkg / "__init__.py").read_text()
        strings = {n.value for n in ast.walk(ast.parse(init)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not strings & (set(passes) | {"quant", "bcq", "llama", "phi3", "dictionary"}), (pkg, strings)
