"""Imports only go down: pipelines -> fvlm -> anatomy (DESIGN.md section 2)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: package -> the project packages it must not import
FORBIDDEN = {"anatomy": {"fvlm", "pipelines"}, "fvlm": {"pipelines"}}


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_only_go_down(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    bad = {
        str(f.relative_to(ROOT)): sorted(_imported_roots(f) & FORBIDDEN[package])
        for f in files
        if _imported_roots(f) & FORBIDDEN[package]
    }
    assert not bad, f"{package} imports a higher layer: {bad}"


def test_anatomy_does_not_import_torch() -> None:
    """The ground floor stays light: no training framework under anatomy/."""
    bad = [str(f.relative_to(ROOT)) for f in (ROOT / "anatomy").rglob("*.py") if "torch" in _imported_roots(f)]
    assert not bad, f"anatomy modules import torch: {bad}"
