"""The benchmark scripts (not run in CI: they need a GPU) still import what fine_tune (and the tests'
helpers) have: a helper removed as unused in fine_tune/ once broke speed.py on the GPU machine,
found only there."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
from helpers import ROOT

BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


def checked_imports(path: Path) -> list[tuple[int, str, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.lineno, node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("fine_tune", "helpers"))
        for alias in node.names
    ]


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_a_benchmark_imports_only_what_fine_tune_has(script: Path):
    missing = []
    for line, module, name in checked_imports(script):
        found = importlib.import_module(module)
        if not hasattr(found, name) and importlib.util.find_spec(f"{module}.{name}") is None:
            missing.append(f"{script.name}:{line}: {module}.{name}")
    assert not missing
