"""The benches' load generator (tests/bench/loadgen.py) is the project's own: run it briefly,
as the benches do, against a hub and against Mosquitto with its defaults, so that it cannot rot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.hubclient import HubClient
from tests.bench.peers import LOADGEN, loadgen_credentials, start_mosquitto
from tests.hubproc import HubProcess

HOST = "bench.local"


def run(port: int, pid: int, *extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(LOADGEN), "--port", str(port), "--conns", "4", "--procs", "2",
         "--window", "10", "--msgs", "400", "--qos", "1", "--payload-size", "200",
         "--broker-pid", str(pid), "--timeout", "60", *extra],
        capture_output=True, text=True, timeout=120, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0 and lines, f"loadgen failed:\n{out.stdout}\n{out.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def test_loadgen_is_in_the_repository() -> None:
    assert LOADGEN.parent == Path(__file__).parent and LOADGEN.is_file()


def test_loadgen_against_the_hub_over_tls(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub", host_name=HOST, log_level="info").start()
    try:
        creds = loadgen_credentials(hub.data_dir, HOST, 4, tmp_path / "creds.tsv")
        result = run(hub.port("mqtt_tls_port"), hub.pid, "--cred-file", str(creds), "--tls",
                     "--ca-file", hub.ca_file, "--tls-server-name", "localhost")
        assert result["acked"] == 400 and result["errors"] == []
        assert result["msgs_per_s"] > 0 and result["broker_cpu_us_per_msg"] > 0
        assert result["lat_p99_ms"] >= result["lat_p50_ms"] > 0
        stored = HubClient(hub.data_dir).request("GET", "/messages/events", query={
            "start": "earliest", "kinds": "telemetry", "limit": "1000"})
        assert len(stored) == 400  # every PUBACK it counted is a stored message
        assert {e["event"]["origin"] for e in stored} == {f"dev-{i}" for i in range(4)}
    finally:
        hub.stop()


def test_loadgen_against_mosquitto_with_its_defaults(tmp_path: Path) -> None:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.fail("mosquitto is required (dev.sh installs it)")
    proc, port = start_mosquitto(tmp_path)
    try:
        assert "set_tcp_nodelay" not in (tmp_path / "mosquitto.conf").read_text()
        result = run(port, proc.pid)
        assert result["acked"] == 400 and result["errors"] == []
    finally:
        proc.terminate()
        proc.wait()
