"""Interop fixtures: one hub on the SDKs' fixed ports, shared by the interop tests of a session.

The Azure device SDK dials 8883 (MQTT) and 443 (WebSocket); the service SDK calls
``https://{HostName}`` on 443 (IoT Hub ref §15.3 pitfall 1). Neither can be told another port,
so this hub binds 8883 and 443 and calls itself ``localhost``.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hubproc import HubProcess

SDK_DIR = Path(__file__).parent / "sdk"


@pytest.fixture(scope="session")
def iot_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    routes = ("[routes]\nsenderToReceiver = 'FROM /messages/modules/sender/outputs/out1 "
              "INTO BrokeredEndpoint(\"/modules/receiver/inputs/in1\")'\n")
    proc = HubProcess(tmp_path_factory.mktemp("interop") / "data", host_name="localhost",
                      tls_port=8883, api_port=443, extra_config=routes,
                      mqtt_bind="127.0.0.1").start()  # 127.0.0.1 only: other tests' hubs bind 127.0.x.y:8883
    yield proc
    proc.stop()


def run_sdk(python: Path, script: str, args: dict[str, Any], timeout: float = 120,
            env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run an SDK script in the Azure venv; return its last JSON line."""
    result = subprocess.run(
        [str(python), str(SDK_DIR / script), json.dumps(args)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    if result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def service(python: Path, hub: HubProcess, *ops: dict[str, Any]) -> list[dict[str, Any]]:
    """Service operations through the unmodified azure-iot-hub registry manager."""
    cs = hub.cli("policy", "connection-string", "iothubowner").stdout.strip()
    out = run_sdk(python, "service.py", {"connection_string": cs, "ops": list(ops)},
                  env={"REQUESTS_CA_BUNDLE": hub.ca_file})
    return out["results"]  # type: ignore[no-any-return]


class DeviceSession:
    """A long-lived SDK client in a subprocess: commands in on stdin, events out on stdout."""

    def __init__(self, python: Path, connection_string: str, ca_file: str, **options: Any) -> None:
        self.proc = subprocess.Popen(
            [str(python), str(SDK_DIR / "device_session.py"),
             json.dumps({"connection_string": connection_string, "ca_file": ca_file, **options})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.expect("ready", timeout=60)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.events.put(json.loads(line))

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def expect(self, key: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
                raise AssertionError(f"no {key!r} event from the SDK client in {timeout} s {err[-3000:]}")
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if "error" in event and key != "error":
                raise AssertionError(f"SDK client error: {event['error']}")
            if key in event:
                return event

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(cmd="exit")
                self.proc.wait(20)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
