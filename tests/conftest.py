"""Shared fixtures: hubs as real subprocesses, and the Azure SDK virtual environment."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hubproc import REPO, HubProcess

AZURE_VENV = Path(os.environ.get("AZURE_VENV", REPO / ".venv-azure"))
# azure-iot-hub 2.7.0 imports six without declaring it.
AZURE_PACKAGES = ["azure-iot-device==2.14.0", "azure-iot-hub==2.7.0", "six",
                  "azure-eventhub==5.15.1", "azure-storage-blob==12.31.1"]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    """A fresh hub on ephemeral ports, in its own data directory."""
    proc = HubProcess(tmp_path / "data").start()
    yield proc
    proc.stop()


def ensure_azure_venv() -> Path:
    """The Azure SDKs pin paho-mqtt < 2, so they live in their own venv (made once, reused)."""
    python = AZURE_VENV / "bin" / "python"
    marker = AZURE_VENV / ".installed"
    AZURE_VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(str(AZURE_VENV) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists() or marker.read_text() != " ".join(AZURE_PACKAGES):
            subprocess.run([sys.executable, "-m", "venv", str(AZURE_VENV)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", *AZURE_PACKAGES], check=True)
            marker.write_text(" ".join(AZURE_PACKAGES))
    return python


@pytest.fixture(scope="session")
def azure_python() -> Path:
    return ensure_azure_venv()
