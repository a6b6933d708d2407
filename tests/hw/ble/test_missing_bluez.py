"""Without BlueZ, or without a system D-Bus at all, the BLE bridge says so in words (in its
status and one log line), does not power-cycle an adapter it cannot reach, and keeps trying."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from hw.ble.bridge import BleBridge
from tests import waiting
from tests.hw.ble.conftest import need_dbus_daemon
from tests.hw.ble.fakebluez import PrivateBus
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(60)


async def scan_error(caplog: pytest.LogCaptureFixture) -> tuple[str, dict[str, object]]:
    caplog.set_level(logging.WARNING, logger="hw.ble")
    bridge = BleBridge()
    bridge.apply({"sensors": {"tag": {"address": "CB:B8:33:4C:88:4F", "decoder": "ruuvi"}}})

    async def emit(sensor: str, readings: object) -> None:
        pass

    task = asyncio.create_task(bridge.run(emit))  # type: ignore[arg-type]
    try:
        error = await eventually(lambda: bridge.status()["scan"]["lastError"], 20,
                                 "the scan's error")
        await asyncio.sleep(0.3)
        return str(error), bridge.status()["scan"]
    finally:
        await waiting.stop(task)


async def test_no_system_bus_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    error, scan = await scan_error(caplog)
    assert "the system D-Bus is not reachable at unix:path=" in error, error
    assert "FileNotFoundError" not in error and "apt install dbus" in error
    assert scan["adapterResets"] == 0
    [line] = [r.getMessage() for r in caplog.records if "scan on hci0 failed" in r.getMessage()]
    assert "resetting" not in line


async def test_no_bluez_on_the_bus_is_named(monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    need_dbus_daemon()
    bus = PrivateBus().start()  # a system bus with nothing on it
    try:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        error, scan = await scan_error(caplog)
    finally:
        bus.stop()
    assert "BlueZ is not running" in error and "apt install bluez" in error, error
    assert "ServiceUnknown" not in error
    assert scan["adapterResets"] == 0
