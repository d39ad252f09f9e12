"""Arrows only downward (../shared/DESIGN.md section 2): no library module imports the command-line module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cskd_ray"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def test_no_library_module_imports_the_cli() -> None:
    offenders = sorted(str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                       if p.name != "cli.py" and "cskd_ray.cli" in _imports(p))
    assert not offenders, f"these import cskd_ray.cli; move what they need below it: {offenders}"
