"""An RTU meter of unknown line speed, in the browser: the technician adds a serial bus at a
guess (19200), the scan sweeps the baud rates ticked, the meter answers at 9600 only
(tests/hw/modbus/linespeed.py gives the pty line a speed), taking that unit sets the bus to
9600, and its values arrive; the bus state column follows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hw.modbus.simulate import SimulatedMeter
from tests.hw.modbus.linespeed import LineSpeed
from tests.ui.conftest import base_url, start_hub
from tests.ui.test_modbus import MODULES, Counter, live_value, serving
from tests.ui.ui import by_id, console_errors, login, shots, until


@pytest.fixture
def rtu_meter() -> Iterator[tuple[LineSpeed, SimulatedMeter]]:
    """An SDM120 over RTU at 9600 baud behind a line that passes only 9600 baud."""
    with LineSpeed(9600) as line, serving(
            SimulatedMeter("eastron-sdm120", serial=line.server_device, baud=9600)) as sim:
        yield line, sim


def test_rtu_scan_sweeps_baud_rates_and_takes_the_one_that_answers(
        tmp_path: Path, browser: Any, artifacts: Path,
        rtu_meter: tuple[LineSpeed, SimulatedMeter]) -> None:
    line, _ = rtu_meter
    hub = start_hub(tmp_path, MODULES)
    try:
        url = base_url(hub)
        login(browser, url)
        until(lambda: by_id(browser, "uptime").text not in ("", "…"), what="overview")
        browser.get(url + "/ui/sensors")
        until(lambda: by_id(browser, "bus-form").is_displayed(), what="the new-bus form")
        t = Counter(browser)
        t.choose("bus-kind", "serial")
        until(lambda: by_id(browser, "bus-path").is_displayed(), what="serial fields")
        t.type("bus-path", line.device)
        t.type("bus-baud", "19200")  # a guess: the meter is at 9600
        t.click_css("#bus-form button[type=submit]")
        until(lambda: by_id(browser, "scan-serial").is_displayed(), what="serial settings")
        ticked = {c.get_attribute("value") for c in browser.find_elements(
            "css selector", ".scan-baud:checked, .scan-parity:checked")}
        assert ticked == {"9600", "19200", "E", "N"}
        # A pty cannot carry parity (tests/hw/modbus/linespeed.py): parity none only.
        t.click_css('.scan-parity[value="E"]')
        t.type("scan-units", "1-2")
        t.click("scan-start")
        until(lambda: "scan done" in by_id(browser, "scan-text").text, 120, "scan done")
        shots(browser, artifacts, "modbus-rtu-sweep")
        found = [(b.get_attribute("data-unit"), b.get_attribute("data-baud"))
                 for b in browser.find_elements("css selector", "#units button")]
        assert ("1", "9600") in found and all(baud == "9600" for _, baud in found), found
        assert line.dropped > 0  # 19200 was tried, and nothing answered it
        t.click_css('#units button[data-unit="1"][data-baud="9600"]')
        until(lambda: "9600 8N1" in browser.find_element(
            "css selector", '#buses tr[data-bus="bus1"]').text, 30, "bus set to 9600")
        until(lambda: len(browser.find_elements("css selector", "#profile option")) > 1,
              what="profiles")
        t.choose("profile", "eastron-sdm120")
        t.click_css("#save-form button[type=submit]")
        voltage = until(lambda: live_value(browser, "meter1/voltage"), 90, "live voltage")
        assert 220 < float(voltage.split()[0]) < 240
        row = until(lambda: [r for r in browser.find_elements(
            "css selector", '#buses tr[data-bus="bus1"]') if " up" in r.text], 30, "bus up")
        assert "9600 8N1" in row[0].text
        print(f"\nRTU meter of unknown speed, new bus to live values: {t.clicks} clicks, "
              f"{t.typed} typed fields")
        shots(browser, artifacts, "modbus-rtu-live")
        assert console_errors(browser) == []
        twin = json.loads(hub.cli("twin", "show", "testhub.local", "--module", "modbus").stdout)
        serial = twin["properties"]["desired"]["buses"]["bus1"]["serial"]
        assert (serial["port"], serial["baud"], serial["parity"]) == (line.device, 9600, "N")
        # Removing the bus (confirmed) removes its sensors with it.
        browser.find_element("css selector", '#buses tr[data-bus="bus1"] .bus-remove').click()
        browser.switch_to.alert.accept()
        until(lambda: not browser.find_elements("css selector", '#buses tr[data-bus="bus1"]'),
              30, "bus gone from the list")
        desired = json.loads(hub.cli("twin", "show", "testhub.local", "--module",
                                     "modbus").stdout)["properties"]["desired"]
        assert "bus1" not in desired.get("buses", {}) and "meter1" not in desired.get(
            "devices", {})
        assert console_errors(browser) == []
    finally:
        hub.stop()
