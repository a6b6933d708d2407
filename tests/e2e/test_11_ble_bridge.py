"""The BLE bridge as a hub module, end to end: the hub's supervisor runs it as a process; it
talks to a BlueZ-compatible service on a private D-Bus (the fake in tests/hw/ble) through the
unmodified bleak; advertisements decode into module telemetry in the built-in endpoint."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.hubclient import HubClient
from hw.ble.profiles import load_profile
from tests.hubproc import HubProcess
from tests.hw.ble.fakebluez import FakeBluez, PrivateBus

GW = "testhub.local"
TAG = "CB:B8:33:4C:88:4F"
RUUVI = {f.name: f for f in load_profile("ruuvitag").frames}


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await asyncio.to_thread(check)
        if result:
            return result
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


async def test_ruuvi_advertisements_reach_the_built_in_endpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("dbus-daemon") is None:
        pytest.fail("dbus-daemon is required (dev.sh installs it)")
    bus = PrivateBus().start()
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)  # inherited by the bridge
    fake = FakeBluez(bus.address, passive=True)
    await fake.start()
    hub = HubProcess(tmp_path / "data", host_name=GW,
                     extra_config='[modules.ble]\nbridge = "ble"\nstatus_interval = 1.0\n')
    try:
        await asyncio.to_thread(hub.start)
        api = HubClient(hub.data_dir)
        await asyncio.to_thread(api.request, "PATCH", f"/twins/{GW}/modules/ble", {
            "properties": {"desired": {"sensors": {"tag": {"address": TAG, "profile": "ruuvitag"}}}}})
        await eventually(lambda: fake.scanning, 30, "the bridge to start scanning")
        frame = RUUVI["valid data"]
        fake.add_device(TAG, name="Ruuvi 884F", manufacturer_data={0x0499: frame.payload})

        def tag_events() -> list[dict[str, Any]]:
            batch = api.request("GET", "/messages/events", query={
                "start": "earliest", "deviceId": GW, "kinds": "telemetry", "limit": "100"})
            return [i["event"] for i in batch if i["event"]["module"] == "ble"]

        [event, *_] = await eventually(tag_events, 30, "Ruuvi readings")
        assert event["annotations"]["iothub-connection-module-id"] == "ble"
        body = event["payload"]
        assert body["sensor"] == "tag"
        values = {r["name"]: r["value"] for r in body["readings"]}
        for name, expected in frame.expected.items():
            assert values[name] == pytest.approx(expected), name
        status = await eventually(
            lambda: api.request("GET", f"/twins/{GW}/modules/ble")["properties"]["reported"]
            .get("status", {}).get("sensors", {}).get("tag", {}).get("packets"),
            20, "the sensor's packet count in the module twin")
        assert status >= 1
    finally:
        await asyncio.to_thread(hub.stop)
        await fake.stop()
        bus.stop()
