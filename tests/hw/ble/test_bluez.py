"""The BLE bridge end to end: the unmodified bleak against a fake BlueZ on a private D-Bus.

Covers discovery (passive, and the fallback to active), advertisement decoding through the
bridge, de-duplication, the adapter watchdog, GATT read and notify, config changes that restart
only what changed, the direct methods, and that a bindkey never leaks.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest

from hw.ble.bridge import BleBridge
from hw.ble.decoders import BindKey, DecoderKind, encode_bthome, mac_bytes
from hw.ble.profiles import load_profile
from hw.bridge import Bridge
from hw.readings import Reading
from tests import waiting
from tests.hw.ble.fakebluez import FakeBluez

pytestmark = pytest.mark.timeout(60)
eventually = partial(waiting.eventually, interval=0.02)

XIAOMI = {f.name: f for f in load_profile("xiaomi-lywsd03mmc").frames}
RUUVI = {f.name: f for f in load_profile("ruuvitag").frames}
KEY_HEX = "231d39c1d7cc1ab1aee224cd096db932"
KITCHEN = "A4:C1:38:12:34:56"
TAG = "CB:B8:33:4C:88:4F"
PORCH = "54:48:E6:8F:80:A5"
FRIDGE = "C0:FF:EE:00:00:01"
ENV, TEMP, HUM, PRES = 0x181A, 0x2A6E, 0x2A6F, 0x2A6D


class Collector:
    """A list-collecting ``emit``."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[Reading]]] = []

    async def __call__(self, sensor: str, readings: Sequence[Reading]) -> None:
        self.batches.append((sensor, list(readings)))

    def values(self, sensor: str) -> list[dict[str, Any]]:
        return [{r.name: r.value for r in rs} for s, rs in self.batches if s == sensor]


@asynccontextmanager
async def running(bridge: Bridge, fake: FakeBluez) -> AsyncIterator[Collector]:
    out = Collector()
    task = asyncio.create_task(bridge.run(out))
    try:
        await eventually(lambda: fake.scanning)
        yield out
    finally:
        await waiting.stop(task)


def config(**sensors: dict[str, Any]) -> dict[str, Any]:
    return {"sensors": sensors}


async def test_passive_scan_decodes_ruuvi_atc_and_encrypted_bthome(fake_bluez: FakeBluez) -> None:
    bridge: Bridge = BleBridge()  # mypy checks that BleBridge implements the protocol
    bridge.apply(config(
        tag={"address": TAG, "profile": "ruuvitag"},
        kitchen={"address": KITCHEN, "profile": "xiaomi-lywsd03mmc"},
        porch={"address": PORCH, "decoder": "bthome", "bindkey": KEY_HEX},
    ))
    async with running(bridge, fake_bluez) as out:
        # a device seen for the first time while scanning is an advertisement (InterfacesAdded)
        fake_bluez.add_device(TAG, name="Ruuvi 884F",
                              manufacturer_data={0x0499: RUUVI["valid data"].payload})
        fake_bluez.add_device(KITCHEN, name="ATC_123456",
                              service_data={ENV: XIAOMI["pvvx custom, room"].payload})
        fake_bluez.add_device(PORCH, service_data={
            0xFCD2: XIAOMI["BTHome v2 encrypted, bthome.io example"].payload})
        await eventually(lambda: len(out.batches) == 3)
        # and later ones are Device1 PropertiesChanged
        fake_bluez.advertise(KITCHEN, rssi=-71,
                             service_data={ENV: XIAOMI["atc1441, below zero"].payload})
        await eventually(lambda: len(out.values("kitchen")) == 2)
        # passive: one advertisement monitor with a pattern per format, no discovery session
        assert fake_bluez.calls.start_discovery == 0
        assert sorted(await fake_bluez.monitor_patterns(fake_bluez.calls.monitors[0])) == [
            (0, 0x16, b"\x1a\x18"), (0, 0x16, b"\xd2\xfc"), (0, 0xFF, b"\x99\x04")]
        assert bridge.status()["scan"]["scanMode"] == "passive"

    assert out.values("tag") == [RUUVI["valid data"].expected]
    assert out.values("kitchen") == [XIAOMI["pvvx custom, room"].expected,
                                     XIAOMI["atc1441, below zero"].expected]
    assert out.values("porch") == [{"temperature": 25.06, "humidity": 50.55}]
    reading = out.batches[0][1][0]
    assert reading.unit == "Cel" and reading.acquired > 1.7e9

    status = bridge.status()
    assert status["scan"]["scanMode"] is None  # stopped with the bridge
    kitchen = status["sensors"]["kitchen"]
    assert kitchen["packets"] == 2 and kitchen["rssi"] == -71 and kitchen["lastSeen"]
    assert status["sensors"]["porch"]["bindkey"] == "set"
    assert status["scan"]["advertisements"] >= 4


async def test_repeats_of_one_measurement_are_dropped_by_packet_counter(
        fake_bluez: FakeBluez) -> None:
    bridge = BleBridge()
    bridge.apply(config(kitchen={"address": KITCHEN, "decoder": "atc"}))
    room = XIAOMI["pvvx custom, room"].payload  # counter 42
    async with running(bridge, fake_bluez) as out:
        fake_bluez.add_device(KITCHEN, service_data={ENV: room})
        await eventually(lambda: len(out.batches) == 1)
        for rssi in (-61, -62, -63):  # BlueZ re-reports on every RSSI change
            fake_bluez.advertise(KITCHEN, rssi=rssi)
        newer = bytearray(room)
        newer[13] = 43  # the next measurement
        newer[6:8] = (2400).to_bytes(2, "little", signed=True)
        fake_bluez.advertise(KITCHEN, rssi=-64, service_data={ENV: bytes(newer)})
        await eventually(lambda: len(out.batches) == 2)
        await asyncio.sleep(0.1)
    assert [v["temperature"] for v in out.values("kitchen")] == [23.45, 24.0]
    s = bridge.status()["sensors"]["kitchen"]
    assert (s["packets"], s["duplicates"], s["rssi"]) == (2, 3, -64)


async def test_without_advertisement_monitors_falls_back_to_active_and_says_so_once(
        old_bluez: FakeBluez, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hw.ble")
    bridge = BleBridge()
    bridge.apply(config(tag={"address": TAG, "decoder": "ruuvi"}))
    async with running(bridge, old_bluez) as out:
        old_bluez.add_device(TAG, manufacturer_data={0x0499: RUUVI["valid data"].payload})
        await eventually(lambda: len(out.batches) == 1)
        assert bridge.status()["scan"]["scanMode"] == "active"
        bridge.apply(config(tag={"address": TAG, "decoder": "ruuvi"},
                            other={"address": KITCHEN, "decoder": "atc"}))  # scan restarts
        await eventually(lambda: old_bluez.calls.start_discovery == 2)
    assert old_bluez.calls.filters[0] == {"Transport": "le", "DuplicateData": False}
    fallbacks = [r for r in caplog.records if "falling back to active" in r.getMessage()]
    assert len(fallbacks) == 1
    assert bridge.status()["scan"]["passiveUnavailable"] is True


async def test_watchdog_restarts_a_silent_scan_then_power_cycles_the_adapter(
        fake_bluez: FakeBluez, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hw.ble")
    bridge = BleBridge()
    bridge.apply({"watchdogSeconds": 0.3,
                  "sensors": {"tag": {"address": TAG, "decoder": "ruuvi"}}})
    frame = bytearray(RUUVI["valid data"].payload)
    async with running(bridge, fake_bluez) as out:
        fake_bluez.add_device(TAG, manufacturer_data={0x0499: bytes(frame)})
        await eventually(lambda: len(out.batches) == 1)
        fake_bluez.wedge()  # still "scanning", reports nothing

        async def keep_advertising() -> None:
            seq = 1000
            while True:
                seq += 1
                frame[16:18] = seq.to_bytes(2, "big")
                fake_bluez.advertise(TAG, manufacturer_data={0x0499: bytes(frame)})
                await asyncio.sleep(0.05)

        sender = asyncio.create_task(keep_advertising())
        try:
            await eventually(lambda: fake_bluez.calls.powered == [False, True], timeout=10)
            await eventually(lambda: len(out.batches) >= 3, timeout=5)
        finally:
            sender.cancel()
    scan = bridge.status()["scan"]
    assert scan["scanRestarts"] == 1 and scan["adapterResets"] == 1
    assert len(fake_bluez.calls.monitors) >= 3  # first scan, restart, after the reset
    messages = [r.getMessage() for r in caplog.records]
    assert sum("restarting the scan" in m for m in messages) == 1
    assert sum("resetting the adapter" in m for m in messages) == 1
    assert sum("advertisements resumed" in m for m in messages) == 1


async def test_a_powered_off_adapter_is_power_cycled_and_the_scan_starts(
        fake_bluez: FakeBluez, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hw.ble")
    fake_bluez.adapter.powered = False  # RegisterMonitor/StartDiscovery answer NotReady
    bridge = BleBridge()
    bridge.apply(config(tag={"address": TAG, "decoder": "ruuvi"}))
    async with running(bridge, fake_bluez) as out:
        fake_bluez.add_device(TAG, manufacturer_data={0x0499: RUUVI["valid data"].payload})
        await eventually(lambda: out.batches)
    assert fake_bluez.calls.powered == [False, True]
    assert bridge.status()["scan"]["adapterResets"] == 1
    assert sum("scan on hci0 failed" in r.getMessage() for r in caplog.records) == 1


def env_sensor(fake: FakeBluez) -> None:
    fake.add_device(FRIDGE, name="EnvSensor", gatt=[(ENV, [
        (TEMP, (2150).to_bytes(2, "little", signed=True)),
        (HUM, (4550).to_bytes(2, "little")),
        (PRES, (1013250).to_bytes(4, "little")),
    ])])


async def test_gatt_notify_reads_then_follows_notifications_and_reconnects(
        fake_bluez: FakeBluez) -> None:
    bridge = BleBridge()
    bridge.apply(config(fridge={"address": FRIDGE, "gatt": {"mode": "notify",
                                                            "timeoutSeconds": 5}}))
    temp_uuid = f"0000{TEMP:04x}-0000-1000-8000-00805f9b34fb"
    async with running(bridge, fake_bluez) as out:
        env_sensor(fake_bluez)
        await eventually(lambda: len(out.batches) == 1)
        assert out.values("fridge") == [{"temperature": 21.5, "humidity": 45.5,
                                         "pressure": 1013.25}]
        dev = fake_bluez.devices[FRIDGE]
        await eventually(lambda: dev.chars[temp_uuid].notifying)
        dev.chars[temp_uuid].notify((-1805).to_bytes(2, "little", signed=True))
        await eventually(lambda: len(out.batches) == 2)
        assert out.values("fridge")[1] == {"temperature": -18.05}
        status = bridge.status()["sensors"]["fridge"]["gatt"]
        assert status["connected"] and status["notifications"] == 1

        dev.disconnect()  # the peripheral drops the link: the bridge reconnects and re-reads
        await eventually(lambda: fake_bluez.calls.connects == 2 and len(out.batches) == 3)
    assert out.values("fridge")[2]["temperature"] == -18.05


async def test_gatt_read_mode_polls_and_disconnects_between_reads(fake_bluez: FakeBluez) -> None:
    bridge = BleBridge()
    bridge.apply(config(fridge={"address": FRIDGE,
                                "gatt": {"mode": "read", "intervalSeconds": 0.2}}))
    async with running(bridge, fake_bluez) as out:
        env_sensor(fake_bluez)
        await eventually(lambda: len(out.batches) >= 3)
        reads = bridge.status()["sensors"]["fridge"]["gatt"]["reads"]
        # one connection per read, each closed by the bridge before the next
        assert fake_bluez.calls.connects >= reads >= 3
        assert fake_bluez.calls.disconnects >= reads - 1
    assert {"temperature": 21.5, "humidity": 45.5, "pressure": 1013.25} == out.values("fridge")[2]


async def test_gatt_failure_is_logged_once_and_recovery_once(
        fake_bluez: FakeBluez, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hw.ble")
    bridge = BleBridge()
    bridge.apply(config(fridge={"address": FRIDGE,
                                "gatt": {"mode": "read", "intervalSeconds": 0.1,
                                         "timeoutSeconds": 0.2}}))
    async with running(bridge, fake_bluez) as out:
        fake_bluez.add_device(FRIDGE)  # no GATT server yet: Connect fails
        await eventually(lambda: fake_bluez.calls.connects >= 2, timeout=10)
        assert bridge.status()["sensors"]["fridge"]["gatt"]["lastError"]
        fake_bluez.devices[FRIDGE].gatt = [(ENV, [(TEMP, b"\x66\x08")])]
        await eventually(lambda: out.batches, timeout=10)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("GATT failed" in m for m in messages) == 1
    assert sum("GATT recovered" in m for m in messages) == 1


async def test_apply_restarts_only_what_changed(fake_bluez: FakeBluez) -> None:
    bridge = BleBridge()
    doc = config(tag={"address": TAG, "decoder": "ruuvi"},
                 fridge={"address": FRIDGE, "gatt": {"mode": "notify"}})
    bridge.apply(doc)
    async with running(bridge, fake_bluez) as out:
        env_sensor(fake_bluez)
        await eventually(lambda: len(out.values("fridge")) == 1)
        scans = len(fake_bluez.calls.monitors)

        bridge.apply(json.loads(json.dumps(doc)))  # the same document again: nothing restarts
        await asyncio.sleep(0.3)
        assert len(fake_bluez.calls.monitors) == scans
        assert fake_bluez.calls.connects == 1

        doc["sensors"]["kitchen"] = {"address": KITCHEN, "decoder": "atc"}  # a new pattern
        bridge.apply(doc)
        await eventually(lambda: len(fake_bluez.calls.monitors) == scans + 1)
        await asyncio.sleep(0.2)
        assert fake_bluez.calls.connects == 1  # the GATT sensor kept its connection
        assert fake_bluez.devices[FRIDGE].connected

        doc["sensors"]["fridge"]["gatt"] = {"mode": "read", "intervalSeconds": 30}
        bridge.apply(doc)  # that sensor changed: its task restarts, the scan does not
        await eventually(lambda: fake_bluez.calls.connects == 2)
        assert len(fake_bluez.calls.monitors) == scans + 1


async def test_decrypt_failures_are_counted_logged_once_and_a_new_key_fixes_them(
        fake_bluez: FakeBluez, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hw.ble")
    wrong = "00112233445566778899aabbccddeeff"
    bridge = BleBridge()
    bridge.apply(config(porch={"address": PORCH, "decoder": "bthome", "bindkey": wrong}))
    key = BindKey.from_hex(KEY_HEX)

    def frame(counter: int) -> bytes:
        return encode_bthome(bytes.fromhex("02ca0903bf13"), mac=mac_bytes(PORCH), key=key,
                             counter=counter)

    async with running(bridge, fake_bluez) as out:
        fake_bluez.add_device(PORCH, service_data={0xFCD2: frame(1)})
        for c in (2, 3):
            await asyncio.sleep(0.05)
            fake_bluez.advertise(PORCH, service_data={0xFCD2: frame(c)})
        await eventually(lambda: bridge.status()["sensors"]["porch"]["decryptFailures"] == 3)
        assert out.batches == []
        bridge.apply(config(porch={"address": PORCH, "decoder": "bthome", "bindkey": KEY_HEX}))
        fake_bluez.advertise(PORCH, service_data={0xFCD2: frame(4)})
        await eventually(lambda: len(out.batches) == 1)
        # a replayed (older) frame is refused; the device's restart is acknowledged by a method
        fake_bluez.advertise(PORCH, service_data={0xFCD2: frame(2)})
        await eventually(lambda: bridge.status()["sensors"]["porch"]["replays"] == 1)
        assert await bridge.methods["reset_counter"]({"sensor": "porch"}) == (
            200, {"sensor": "porch"})
        fake_bluez.advertise(PORCH, service_data={0xFCD2: frame(2)})
        await eventually(lambda: len(out.batches) == 2)
    text = caplog.text + json.dumps(bridge.status())
    assert sum("cannot decrypt" in r.getMessage() for r in caplog.records) == 1
    assert KEY_HEX not in text and wrong not in text


async def test_methods_list_nearby_devices_and_read_gatt_once(fake_bluez: FakeBluez) -> None:
    bridge = BleBridge()
    bridge.apply(config(tag={"address": TAG, "decoder": "ruuvi"}, fridge={
        "address": FRIDGE, "gatt": {"mode": "read", "intervalSeconds": 3600}}))
    async with running(bridge, fake_bluez) as out:
        fake_bluez.add_device(KITCHEN, name="ATC_123456",
                              service_data={ENV: XIAOMI["atc1441, room"].payload})
        env_sensor(fake_bluez)
        await eventually(lambda: len(out.batches) == 1)
        status, body = await bridge.methods["nearby"]({})
        assert status == 200
        by_address = {d["address"]: d for d in body["devices"]}
        assert by_address[KITCHEN]["formats"] == ["atc1441"]
        assert by_address[KITCHEN]["sensor"] is None and by_address[KITCHEN]["name"]
        assert by_address[FRIDGE]["sensor"] == "fridge"

        status, body = await bridge.methods["read_gatt"]({"sensor": "fridge"})
        assert (status, body["values"]["temperature"]) == (200, {"value": 21.5, "unit": "Cel"})
        status, body = await bridge.methods["read_gatt"]({"address": "11:22:33:44:55:66",
                                                          "timeoutSeconds": 0.2})
        assert status == 504 and "not heard" in body["error"]
        assert (await bridge.methods["reset_counter"]({"sensor": "nope"}))[0] == 404
        assert (await bridge.methods["reset_counter"]([]))[0] == 400


async def test_registry_key_lookup_supplies_missing_bindkeys(fake_bluez: FakeBluez) -> None:
    looked_up: list[str] = []

    def keys(sensor: Any) -> BindKey | None:
        looked_up.append(sensor.name)
        return BindKey.from_hex(KEY_HEX)

    bridge = BleBridge(keys=keys)
    bridge.apply(config(porch={"address": PORCH, "decoder": [DecoderKind.BTHOME.value]}))
    async with running(bridge, fake_bluez) as out:
        fake_bluez.add_device(PORCH, service_data={
            0xFCD2: XIAOMI["BTHome v2 encrypted, bthome.io example"].payload})
        await eventually(lambda: out.batches)
    assert looked_up == ["porch"]
    assert out.values("porch") == [{"temperature": 25.06, "humidity": 50.55}]
