"""Fixtures for the BLE tests: a private D-Bus with the fake BlueZ on it.

bleak reads ``DBUS_SYSTEM_BUS_ADDRESS`` when it connects, and keeps one BlueZ manager per event
loop; pytest-asyncio gives each test its own loop, so each test gets its own bus and manager.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator

import pytest

from tests.hw.ble.fakebluez import FakeBluez, PrivateBus


def need_dbus_daemon() -> None:
    """Skip without dbus-daemon, but only outside CI: under CI=true the tests must run."""
    if shutil.which("dbus-daemon") is None and not os.environ.get("CI"):
        pytest.skip("dbus-daemon not installed (Debian package dbus-daemon)")


async def _fake(monkeypatch: pytest.MonkeyPatch, *, passive: bool) -> AsyncIterator[FakeBluez]:
    need_dbus_daemon()
    bus = PrivateBus().start()
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    fake = FakeBluez(bus.address, passive=passive)
    try:
        await fake.start()
        yield fake
    finally:
        await fake.stop()
        bus.stop()


@pytest.fixture
async def fake_bluez(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeBluez]:
    """BlueZ with advertisement monitors (passive scanning available)."""
    async for fake in _fake(monkeypatch, passive=True):
        yield fake


@pytest.fixture
async def old_bluez(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeBluez]:
    """BlueZ without AdvertisementMonitorManager1 (no --experimental): active scanning only."""
    async for fake in _fake(monkeypatch, passive=False):
        yield fake
