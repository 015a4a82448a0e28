"""The package's shape, kept by test: short functions, no test or benchmark reaching into module globals."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 80


def test_no_function_in_the_package_is_longer_than_80_lines():
    long = []
    for path in sorted((PROJECT_DIR / "sd_utils").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PROJECT_DIR)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these functions: " + "; ".join(long)


# `module.attribute = ...` on a module of the package (what a seam replaces: hand a provider table, options, ...)
_ASSIGNS_TO_PACKAGE = re.compile(
    r"^\s*(providers|generation|olive_workflow|olive_passes|app)\.\w+(\[[^]]*\])?\s*=", re.M
)


def test_no_test_or_benchmark_assigns_to_a_module_of_the_package():
    found = [
        f"{path.relative_to(PROJECT_DIR)}:{text[: match.start()].count(chr(10)) + 1}"
        for path in sorted([*(PROJECT_DIR / "tests").glob("*.py"), *(PROJECT_DIR / "bench").glob("*.py")])
        for text in [path.read_text(encoding="utf-8")]
        for match in _ASSIGNS_TO_PACKAGE.finditer(text)
    ]
    assert not found, found
