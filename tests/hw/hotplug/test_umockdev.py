"""Hotplug under umockdev: the real pyudev watcher and serial bridge, fake /sys, /dev and uevents.

Each test runs a scenario of ``scenario.py`` in a child under ``umockdev-wrapper`` and asserts on
what it observed. Needs Debian's ``umockdev`` package; without it the tests skip, except under
``CI`` where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.hw.hotplug.testbed import available

REPO = Path(__file__).resolve().parents[3]
FTDI_BY_ID = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A000-if00-port0"
UBLOX_BY_ID = "/dev/serial/by-id/usb-u-blox_AG_-_www.u-blox.com_u-blox_7_-_GPS_GNSS_Receiver-if00"
CH340_BY_ID = "/dev/serial/by-id/usb-1a86_USB2.0-Serial-if00-port0"


def run_scenario(name: str, wrapper: bool = True) -> subprocess.CompletedProcess[str]:
    reason = available()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"umockdev is required under CI: {reason}")
        pytest.skip(reason)
    command = [sys.executable, "-m", "tests.hw.hotplug.scenario", name]
    if wrapper:
        command.insert(0, "umockdev-wrapper")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=60, env=env, check=False
    )


def observed(name: str) -> dict[str, Any]:
    result = run_scenario(name)
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def test_watcher_reports_present_plugged_and_pulled_adapters_by_rule() -> None:
    seen = observed("watcher")
    # The FTDI was plugged in before the watcher started: found by enumeration. ttyS0 is no
    # USB adapter and is never reported.
    assert seen["coldplug"] == [["started", "meter", "/dev/ttyUSB0", FTDI_BY_ID]]
    # The CH340 is present but no rule wants it; the repeated "add" of the GPS changed nothing.
    assert seen["present"] == ["/dev/ttyACM0", "/dev/ttyUSB0", "/dev/ttyUSB1"]
    assert seen["matched"] == {"/dev/ttyUSB0": "meter", "/dev/ttyACM0": "gps"}
    assert seen["events"] == [
        ["started", "meter", "/dev/ttyUSB0", FTDI_BY_ID],
        ["started", "gps", "/dev/ttyACM0", UBLOX_BY_ID],  # plugged in
        ["stopped", "gps", "/dev/ttyACM0"],  # pulled
        ["started", "gps", "/dev/ttyACM0", UBLOX_BY_ID],  # plugged in again
        # set_rules: the meter rule now names the CH340; the FTDI loses it.
        ["stopped", "meter", "/dev/ttyUSB0"],
        ["started", "meter", "/dev/ttyUSB1", CH340_BY_ID],
        # the watcher stops: everything it started is stopped
        ["stopped", "gps", "/dev/ttyACM0"],
        ["stopped", "meter", "/dev/ttyUSB1"],
    ]


def test_bridge_ports_follow_their_adapters_in_and_out() -> None:
    seen = observed("bridge")
    assert seen["meter_open"]["path"] == FTDI_BY_ID and seen["meter_open"]["state"] == "up"
    assert seen["gps_before"] == "waiting"
    assert seen["gps_open"]["path"] == UBLOX_BY_ID and seen["gps_open"]["state"] == "up"
    assert seen["gps_after_unplug"] == {"path": None, "connected": False, "state": "waiting"}
    assert seen["meter_during"] is True  # the other port never noticed
    assert seen["still_running"] is True
    sensors = [sensor for sensor, _ in seen["batches"]]
    assert sensors == ["meter", "gps", "gps"]
    assert seen["batches"][0][1] == [["t", 21.5, None], ["rh", 40, None]]
    gps = {name: value for name, value, _ in seen["batches"][2][1]}
    assert gps["latitude"] == pytest.approx(48.1173) and gps["altitude"] == 545.4
    assert {"device", "byId"} <= set(seen["list_ports"]["ports"][0])


def test_without_umockdev_the_scenario_cannot_run() -> None:
    result = run_scenario("watcher", wrapper=False)  # the negative control
    assert result.returncode != 0
    assert "umockdev-wrapper" in result.stderr
