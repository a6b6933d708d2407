"""The BLE bridge as a hub module, end to end: the hub's supervisor runs it as a process; it
talks to a BlueZ-compatible service on a private D-Bus (the fake in tests/hw/ble) through the
unmodified bleak; advertisements decode into module telemetry in the built-in endpoint."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.hubclient import HubClient
from hw.ble.decoders import BindKey, encode_bthome, mac_bytes
from hw.ble.profiles import load_profile
from tests import waiting
from tests.hubproc import HubProcess
from tests.hw.ble.fakebluez import FakeBluez, PrivateBus

GW = "testhub.local"
TAG = "CB:B8:33:4C:88:4F"
RUUVI = {f.name: f for f in load_profile("ruuvitag").frames}


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    return await waiting.eventually(check, timeout, what, interval=0.3, blocking=True)


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
            # A tag advertises about once a second: the bridge may have started scanning before
            # the sensor's desired properties reached it, and an advertisement heard then is
            # ignored, so keep advertising as the tag would.
            fake.advertise(TAG, manufacturer_data={0x0499: frame.payload})
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


PORCH = "54:48:E6:8F:80:A5"
KEY_HEX = "231d39c1d7cc1ab1aee224cd096db932"


async def test_encrypted_bthome_child_with_its_key_in_the_registry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A BTHome sensor translated to a child device; its bindkey lives only in the registry
    (set with the CLI from standard input). Without it the frames are counted as undecryptable
    and nothing is sent; once set, the bridge gets it over its own connection and the child's
    decrypted readings reach the built-in endpoint as the child's. The key never shows in a
    twin or a log."""
    if shutil.which("dbus-daemon") is None:
        pytest.fail("dbus-daemon is required (dev.sh installs it)")
    bus = PrivateBus().start()
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    fake = FakeBluez(bus.address, passive=True)
    await fake.start()
    hub = HubProcess(tmp_path / "data", host_name=GW,
                     extra_config='[modules.ble]\nbridge = "ble"\nstatus_interval = 0.5\n')
    key = BindKey.from_hex(KEY_HEX)
    counter = iter(range(1, 10_000))

    def advertise() -> None:
        frame = encode_bthome(bytes.fromhex("02ca0903bf13"), mac=mac_bytes(PORCH), key=key,
                              counter=next(counter))
        if PORCH in fake.devices:
            fake.advertise(PORCH, service_data={0xFCD2: frame})
        else:
            fake.add_device(PORCH, service_data={0xFCD2: frame})

    try:
        await asyncio.to_thread(hub.start)
        api = HubClient(hub.data_dir)
        await asyncio.to_thread(api.request, "PATCH", f"/twins/{GW}/modules/ble", {
            "properties": {"desired": {
                "sensors": {"porch": {"address": PORCH, "decoder": "bthome"}},
                "children": {"porch": {"deviceId": "porch-th"}}}}})
        await eventually(lambda: fake.scanning, 30, "the bridge to start scanning")

        def child_reported() -> dict[str, Any]:
            reported: dict[str, Any] = api.request("GET", "/twins/porch-th")["properties"]["reported"]
            return reported

        def failures() -> int:
            advertise()
            status = child_reported().get("status") or {}
            return int(status.get("decryptFailures") or 0)

        await eventually(failures, 30, "undecryptable frames counted in the child's twin")
        reported = child_reported()
        assert reported["status"].get("bindkey") is None and reported["status"]["packets"] == 0
        assert reported["bridge"] == {"module": "ble", "sensor": "porch"}

        def child_events() -> list[dict[str, Any]]:
            return [i["event"] for i in api.request("GET", "/messages/events", query={
                "start": "earliest", "deviceId": "porch-th", "kinds": "telemetry"})]

        assert child_events() == []
        out = await asyncio.to_thread(hub.cli, "device", "update", "porch-th", "--sensor-key",
                                      "-", input=KEY_HEX + "\n")
        assert json.loads(out.stdout)["sensorKey"] == KEY_HEX

        def decrypted() -> list[dict[str, Any]]:
            advertise()
            return child_events()

        [event, *_] = await eventually(decrypted, 30, "the child's decrypted readings")
        assert event["annotations"]["iothub-connection-device-id"] == "porch-th"
        values = {r["name"]: r["value"] for r in event["payload"]["readings"]}
        assert values["temperature"] == pytest.approx(25.06)
        assert values["humidity"] == pytest.approx(50.55)
        await eventually(lambda: child_reported()["status"]["bindkey"] == "set", 20,
                         "the child's status to show the key is set")
        twins = json.dumps([api.request("GET", "/twins/porch-th"),
                            api.request("GET", f"/twins/{GW}/modules/ble")])
        assert KEY_HEX not in twins
        assert KEY_HEX not in hub.log_text()

        # the key is taken away again: decryption stops, without restarting the bridge
        await asyncio.to_thread(hub.cli, "device", "update", "porch-th", "--clear-sensor-key")
        await eventually(lambda: child_reported()["status"].get("bindkey") is None, 20,
                         "the key to be withdrawn")
        assert hub.log_text().count("module started module=ble") == 1
    finally:
        await asyncio.to_thread(hub.stop)
        await fake.stop()
        bus.stop()
