"""Interop fixtures: one hub on the SDK's fixed port 8883 (the Azure SDK has no port option,
IoT Hub ref §15.3 pitfall 1), shared by the interop tests of a session."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hubproc import HubProcess

SDK_DIR = Path(__file__).parent / "sdk"


@pytest.fixture(scope="session")
def iot_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    proc = HubProcess(tmp_path_factory.mktemp("interop") / "data", host_name="interop-hub.example",
                      tls_port=8883).start()
    yield proc
    proc.stop()


def run_sdk(python: Path, script: str, args: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    """Run an SDK script in the Azure venv; return its last JSON line."""
    result = subprocess.run(
        [str(python), str(SDK_DIR / script), json.dumps(args)],
        capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
