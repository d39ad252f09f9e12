"""Arrows only downward (docs/architecture.md, ../shared/DESIGN.md section 2): the floors are checked, not hoped for.

``pyproject.toml`` holds the import-linter contracts (``app`` > ``stages`` > ``train`` > ``models`` > ``io`` >
``config | losses | metrics``; nothing in the package imports the ``cskd_ray.data`` alias); ``make lint`` runs
them too. An import that goes up a floor, directly or through other modules, fails here.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cskd_ray"


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
                       if p.name != "cli.py" and "cskd_ray.app.cli" in _imports(p))
    assert not offenders, f"these import cskd_ray.app.cli; move what they need below it: {offenders}"


def test_the_import_contracts_of_pyproject_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    command = str(lint) if lint.exists() else shutil.which("lint-imports")
    assert command, "lint-imports is missing: install the dev extra (make setup)"
    done = subprocess.run([command, "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"an import goes up a floor (see docs/architecture.md):\n{done.stdout[-6000:]}" \
                                 f"{done.stderr[-2000:]}"
    assert "0 broken" in done.stdout, done.stdout[-2000:]
