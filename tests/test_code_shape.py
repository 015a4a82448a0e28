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
        for path in sorted([*(PROJECT_DIR / "tests").glob("*.py"), *(PROJECT_DIR / "bench").rglob("*.py")])
        for text in [path.read_text(encoding="utf-8")]
        for match in _ASSIGNS_TO_PACKAGE.finditer(text)
    ]
    assert not found, found


def _imports_of_package_modules() -> dict[str, set[str]]:
    """Each ``sd_utils`` module -> the ``sd_utils`` modules it imports, at module level or inside functions."""
    modules = {}
    for path in (PROJECT_DIR / "sd_utils").rglob("*.py"):
        parts = path.relative_to(PROJECT_DIR).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    imports: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            imports[name].update(target for target in targets if target in modules and target != name)
    return imports


def _a_cycle(imports: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the modules (depth-first search), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(imports[module]):
            if state.get(imported) == "open":
                return [*path[path.index(imported) :], imported]
            if imported not in state and (cycle := visit(imported, [*path, imported])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(imports):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    """Layers depend one way (the CLI, window, jobs and server above ``app``), function-level imports included."""
    cycle = _a_cycle(_imports_of_package_modules())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_folder_of_the_package_is_named_like_build_output():
    named = [path for path in (PROJECT_DIR / "sd_utils").rglob("*") if path.is_dir() and path.name in {"build", "dist"}]
    assert not named, named
