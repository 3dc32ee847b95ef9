"""The import contract: each package imports only the packages below it (docs/architecture.md).

Every `import` statement of every module counts, at module level or inside a function (a lazy
import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import vlaopt

ROOT = Path(vlaopt.__file__).parent

# package -> the vlaopt packages it may import (itself always allowed)
ALLOWED: dict[str, set[str]] = {
    "utils": set(),
    "config": {"utils"},
    "model": {"config", "utils"},
    "sim": {"config", "utils"},
    "data": {"sim", "config", "utils"},
    "optimize": {"model", "data", "config", "utils"},
    "train": {"model", "data", "config", "utils"},
    "importers": {"model", "optimize", "config", "utils"},
    "eval": {"model", "optimize", "sim", "data", "config", "utils"},
    "bench": {"model", "optimize", "eval", "data", "sim", "config", "utils"},
    "cli": {"bench", "eval", "train", "importers", "optimize", "model", "data", "sim", "config", "utils"},
    "__init__": set(),  # lazy attribute access only (importlib), no import statement
}


def _package(path: Path) -> str:
    part = path.relative_to(ROOT).parts[0]
    return part.removesuffix(".py")


def _imported(tree: ast.AST) -> set[str]:
    """vlaopt packages named by the import statements of a module."""
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "vlaopt" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_imports_point_one_way():
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        package = _package(path)
        if package == "assets":
            continue
        assert package in ALLOWED, f"{path.relative_to(ROOT)}: package {package!r} is not in the import contract"
        for target in _imported(ast.parse(path.read_text())) - {package}:
            if target not in ALLOWED[package]:
                violations.append(f"{path.relative_to(ROOT)} imports vlaopt.{target}")
    assert not violations, "reverse imports: " + "; ".join(violations)


def test_the_checker_sees_lazy_imports():
    tree = ast.parse("def f():\n    from vlaopt.optimize import rebuild\n")
    assert _imported(tree) == {"optimize"}
