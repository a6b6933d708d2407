"""A Modbus meter from "new bus" to live values in the browser, against a pymodbus simulator
of an Eastron SDM120 (hw/modbus/simulate.py) and the real Modbus bridge as a hub module:
without touching a file. The clicks and typed fields are counted (the figure the README gives).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hw.modbus.simulate import SimulatedMeter
from tests.ui.conftest import base_url, start_hub
from tests.ui.ui import by_id, console_errors, login, shots, until

MODULES = '[modules.modbus]\nbridge = "modbus"\nstatus_interval = 1.0\n'


@contextlib.contextmanager
def serving(sim: SimulatedMeter) -> Iterator[SimulatedMeter]:
    """``sim`` served on its own event loop thread (the browser test is synchronous)."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def serve() -> None:
        async with sim:
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(30)
    yield sim
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)


@pytest.fixture
def meter() -> Iterator[SimulatedMeter]:
    with serving(SimulatedMeter("eastron-sdm120")) as sim:
        yield sim


class Counter:
    """Counts what the technician does: clicks (a choice in a list counts as one) and fields
    typed into."""

    def __init__(self, driver: Any) -> None:
        self.driver, self.clicks, self.typed = driver, 0, 0

    def click(self, id_: str) -> None:
        by_id(self.driver, id_).click()
        self.clicks += 1

    def click_css(self, css: str) -> None:
        until(lambda: self.driver.find_elements("css selector", css), 90, css)[0].click()
        self.clicks += 1

    def type(self, id_: str, text: str) -> None:
        field = by_id(self.driver, id_)
        field.clear()
        field.send_keys(text)
        self.typed += 1

    def choose(self, id_: str, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(by_id(self.driver, id_)).select_by_value(value)
        self.clicks += 1


def live_value(driver: Any, key: str) -> str | None:
    rows = driver.find_elements("css selector", f'#live tr[data-key="{key}"] td')
    return rows[2].text if len(rows) > 2 and rows[2].text else None


def test_modbus_meter_from_new_bus_to_live_values(tmp_path: Path, browser: Any,
                                                  artifacts: Path, meter: SimulatedMeter) -> None:
    hub = start_hub(tmp_path, MODULES)
    try:
        url = base_url(hub)
        login(browser, url)
        until(lambda: by_id(browser, "uptime").text not in ("", "…"), what="overview")
        browser.get(url + "/ui/sensors")
        by_id(browser, "buses")
        t = Counter(browser)
        # No bus yet: the new-bus form is open by itself ("new bus" costs no click), and the
        # scan starts when the bus is added.
        until(lambda: by_id(browser, "bus-form").is_displayed(), what="the new-bus form")
        t.type("bus-host", f"127.0.0.1:{meter.port}")
        t.click_css("#bus-form button[type=submit]")
        until(lambda: by_id(browser, "scan-box").is_displayed(), what="scan box")
        until(lambda: by_id(browser, "scan-progress").is_displayed(), what="visible progress")
        until(lambda: "scan done" in by_id(browser, "scan-text").text, 120, "scan done")
        shots(browser, artifacts, "modbus-scan")
        units = browser.find_elements("css selector", "#units button")
        # pymodbus's TCP server answers for every unit id (as many TCP devices do)
        assert "1" in [u.get_attribute("data-unit") for u in units]
        t.click_css('#units button[data-unit="1"]')
        until(lambda: by_id(browser, "unit-box").is_displayed(), what="unit box")
        until(lambda: len(browser.find_elements("css selector", "#profile option")) > 1,
              what="profiles")
        t.choose("profile", "eastron-sdm120")
        t.click_css("#save-form button[type=submit]")
        voltage = until(lambda: live_value(browser, "meter1/voltage"), 90, "live voltage")
        clicks, typed = t.clicks, t.typed
        print(f"\nModbus meter, new bus to live values: {clicks} clicks, {typed} typed fields")
        assert 220 < float(voltage.split()[0]) < 240 and voltage.endswith(" V")
        assert (clicks, typed) == (4, 1)
        shots(browser, artifacts, "modbus-live")
        # The bus state column follows the bridge's reported state (server-sent events).
        until(lambda: "up" in browser.find_element("css selector",
                                                   '#buses tr[data-bus="bus1"]').text,
              30, "bus state up")
        # The same unit, probed: every interpretation side by side (float32 ABCD reads volts).
        t.click_css("#probe-form button[type=submit]")
        rows = until(lambda: browser.find_elements("css selector", "#probe tbody tr"), 60,
                     "probe table")
        texts = [r.text for r in rows]
        assert any(x.startswith("float32 ABCD") and " 2" in x for x in texts), texts
        assert any(x.startswith("hex") for x in texts)
        # A map built row by row, each row test-read before saving.
        t.choose("profile", "")
        t.click("add-row")
        row = browser.find_element("css selector", "#map tbody tr")
        from selenium.webdriver.support.ui import Select

        row.find_element("css selector", ".m-name").clear()
        row.find_element("css selector", ".m-name").send_keys("volts")
        Select(row.find_element("css selector", ".m-type")).select_by_value("float32")
        row.find_element("css selector", ".m-unit").send_keys("V")
        row.find_element("css selector", "td button").click()
        tested = until(lambda: row.find_element("css selector", "output").text, 60, "test read")
        assert 220 < float(tested.split()[0]) < 240
        t.type("device-name", "meter2")
        t.click_css("#save-form button[type=submit]")
        until(lambda: live_value(browser, "meter2/volts"), 90, "meter2 live")
        shots(browser, artifacts, "modbus-map")
        assert console_errors(browser) == []
        twin = json.loads(hub.cli("twin", "show", "testhub.local", "--module", "modbus").stdout)
        desired = twin["properties"]["desired"]
        assert desired["buses"]["bus1"]["tcp"] == {"host": "127.0.0.1", "port": meter.port}
        assert desired["devices"]["meter1"]["profile"] == "eastron-sdm120"
        assert desired["devices"]["meter2"]["registers"]["volts"]["type"] == "float32"
    finally:
        hub.stop()
