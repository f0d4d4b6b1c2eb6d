"""The import rules that keep the layers apart: the core knows no platform and no shell."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    # the core: no adapter, no application shell, no sandbox, no chat platform library
    "bot": {"adapters", "imagebot", "sandbox", "telegram", "discord"},
    # adapters translate; the ledger's storage is the core's business
    "adapters": {"sqlite3", "aiosqlite", "asyncpg", "imagebot", "sandbox"},
}


def imports_of(package: str) -> dict[str, set[str]]:
    """Every module a package's files import (top-level names), lazy imports included."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_it_must_not(package: str) -> None:
    modules = imports_of(package)
    assert len(modules) > 3  # the scan found the package's files
    broken = {
        path: sorted(name for name in names if name.split(".")[0] in FORBIDDEN[package])
        for path, names in modules.items()
    }
    assert {path: names for path, names in broken.items() if names} == {}


def test_the_scan_sees_lazy_imports() -> None:
    assert "adapters.console" in imports_of("imagebot")["imagebot/running.py"]
