"""``gateway demo`` runs the whole flow on embedded defaults and shows live messages."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.hubproc import REPO


def test_demo_shows_messages_from_every_simulated_device() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--duration", "7"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stdout.splitlines() if "#" in l and "{" in l]
    for device in ("boiler-room-thermostat", "pump-3-vibration", "main-energy-meter"):
        rows = [l for l in lines if device in l]
        assert len(rows) >= 2, f"no live messages from {device}:\n{result.stdout}"
        json.loads(rows[0][rows[0].index("{"): rows[0].rindex("}") + 1])
    assert "hub ready" in result.stdout
    assert ">> direct method getStatus on pump-3-vibration: 200" in result.stdout
    # the simulated meter and GPS come through the real Modbus and serial bridges
    out = result.stdout.splitlines()
    assert any("modbus:main-meter" in l and "voltage=" in l for l in out), result.stdout
    # ... and the GPS is a child device of the gateway: its readings are filed as its own
    assert any("site-gps (child)" in l and "latitude=" in l for l in out), result.stdout
    assert '"firmware": "3.2.1"' in result.stdout
    # the upstream: a parent hub shows the telemetry arriving with its origin identities
    assert any("parent plant-hub: +" in l and "boiler-room-thermostat" in l for l in out), \
        result.stdout
    # three levels: the top reaches a device two gateways down, a method and a desired patch
    assert ">> top corp-hub: direct method getStatus on pump-3-vibration (through plant-hub): 200" \
        in result.stdout, result.stdout
    assert any(">> top corp-hub: desired sampleSeconds=5" in l and "now at the leaf" in l
               for l in out), result.stdout
