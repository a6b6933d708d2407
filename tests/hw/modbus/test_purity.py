"""The import rule (aesthetics.md §3): pure modules import no I/O, and pymodbus is imported by
hw/modbus/client.py alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[3] / "hw" / "modbus"
PURE = ("registers.py", "schedule.py", "config.py")
IO = {"asyncio", "socket", "serial", "pymodbus", "sqlite3", "threading", "subprocess"}


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_do_no_io(name: str) -> None:
    assert not imports(PACKAGE / name) & IO


def test_only_client_imports_pymodbus() -> None:
    users = sorted(p.name for p in PACKAGE.glob("*.py") if "pymodbus" in imports(p))
    # simulate.py is not part of the bridge: it is the simulated meter (a pymodbus server)
    # that gateway demo and the tests talk to.
    assert users == ["client.py", "simulate.py"]
