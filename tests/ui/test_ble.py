"""BLE on the Sensors screen against the fake BlueZ on a private D-Bus (tests/hw/ble): the
live list shows advertising sensors with their decoded values and signal strength; an
encrypted BTHome sensor is added with its bindkey (kept in the registry, not in a twin) and
its decrypted readings appear live."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hw.ble.decoders import BindKey, encode_bthome, mac_bytes
from hw.ble.profiles import load_profile
from tests.hw.ble.fakebluez import FakeBluez, PrivateBus
from tests.ui.conftest import base_url, start_hub
from tests.ui.test_upstream import Loop
from tests.ui.ui import by_id, console_errors, login, shots, until

TAG = "CB:B8:33:4C:88:4F"
PORCH = "54:48:E6:8F:80:A5"
KEY_HEX = "231d39c1d7cc1ab1aee224cd096db932"


@pytest.fixture
def bluez(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeBluez, Loop]]:
    if shutil.which("dbus-daemon") is None:
        pytest.fail("dbus-daemon is required (dev.sh installs it)")
    bus = PrivateBus().start()
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)  # inherited by the bridge
    loop = Loop()
    async def make() -> FakeBluez:  # it binds to the running loop
        fake = FakeBluez(bus.address, passive=True)
        await fake.start()
        return fake

    fake = loop.run(make())
    yield fake, loop
    loop.run(fake.stop())
    loop.close()
    bus.stop()


def test_ble_live_list_and_add_encrypted_bthome(tmp_path: Path, browser: Any, artifacts: Path,
                                               bluez: tuple[FakeBluez, Loop]) -> None:
    fake, loop = bluez
    hub = start_hub(tmp_path, '[modules.ble]\nbridge = "ble"\nstatus_interval = 1.0\n')
    key = BindKey.from_hex(KEY_HEX)
    counter = iter(range(1, 100_000))
    stop = threading.Event()

    async def advertise() -> None:
        ruuvi = {f.name: f for f in load_profile("ruuvitag").frames}["valid data"]
        fake.add_device(TAG, name="Ruuvi 884F", manufacturer_data={0x0499: ruuvi.payload})
        while not stop.is_set():
            frame = encode_bthome(bytes.fromhex("02ca0903bf13"), mac=mac_bytes(PORCH), key=key,
                                  counter=next(counter))
            if PORCH in fake.devices:
                fake.advertise(PORCH, service_data={0xFCD2: frame})
            else:
                fake.add_device(PORCH, name="porch", service_data={0xFCD2: frame})
            await asyncio.sleep(0.5)

    try:
        url = base_url(hub)
        login(browser, url)
        until(lambda: by_id(browser, "uptime").text not in ("", "…"), what="overview")
        until(lambda: fake.scanning, 30, "the bridge to scan")
        feeder = asyncio.run_coroutine_threadsafe(advertise(), loop.loop)
        browser.get(url + "/ui/sensors")
        assert not by_id(browser, "modbus").is_displayed()  # no Modbus bridge here

        def listed() -> dict[str, str] | None:
            rows = browser.find_elements("css selector", "#ble-list tbody tr")
            found = {r.find_elements("css selector", "td")[0].text: r.text for r in rows}
            return found if TAG in found and PORCH in found else None

        found = until(listed, 60, "both sensors in the live list")
        assert "temperature" in found[TAG] and "dBm" in found[TAG]
        assert "encrypted" in found[PORCH]
        shots(browser, artifacts, "ble-list")
        browser.find_element("css selector", f'#ble-list button[data-address="{PORCH}"]').click()
        by_id(browser, "ble-name").clear()
        by_id(browser, "ble-name").send_keys("porch")
        by_id(browser, "ble-bindkey").send_keys(KEY_HEX)
        by_id(browser, "ble-form").submit()
        until(lambda: "added" in by_id(browser, "status").text, 30, "added")
        value = until(lambda: [r.text for r in browser.find_elements(
            "css selector", '#live tr[data-key="porch/temperature"]')], 60, "decrypted, live")
        assert "25.06" in value[0] or "°C" in value[0] or "Cel" in value[0], value
        shots(browser, artifacts, "ble-added")
        assert console_errors(browser) == []
        twin = hub.cli("twin", "show", "testhub.local", "--module", "ble").stdout
        assert KEY_HEX not in twin and "porch" in json.loads(twin)["properties"]["desired"][
            "sensors"]
        stop.set()
        feeder.result(10)
    finally:
        stop.set()
        hub.stop()
