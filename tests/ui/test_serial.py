"""Serial on the Sensors screen: choose a port and a format, see the decoded lines live (an
NMEA GPS on one end of a socat pty pair, the real serial bridge on the other)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from hw.serial.nmea import with_checksum
from tests.hw.modbus.peers import require_socat
from tests.ui.conftest import base_url, start_hub
from tests.ui.test_upstream import Loop
from tests.ui.ui import by_id, console_errors, login, shots, until


def test_serial_port_and_format_to_live_lines(tmp_path: Path, browser: Any,
                                             artifacts: Path) -> None:
    require_socat()
    from tests.hw.modbus.peers import pty_pair

    loop = Loop()
    pair = pty_pair(tmp_path)
    a, b = loop.run(pair.__aenter__())
    hub = start_hub(tmp_path, '[modules.serial]\nbridge = "serial"\nstatus_interval = 1.0\n')
    stop = threading.Event()

    def feed() -> None:
        gga = with_checksum("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,")
        with open(a, "wb", buffering=0) as tty:
            while not stop.is_set():
                tty.write(gga + b"\r\n")
                time.sleep(0.3)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        url = base_url(hub)
        login(browser, url)
        until(lambda: by_id(browser, "uptime").text not in ("", "…"), what="overview")
        browser.get(url + "/ui/sensors")
        until(lambda: browser.find_elements("css selector", "#serial-port option"), what="ports")
        by_id(browser, "serial-path").send_keys(b)
        sensor = by_id(browser, "serial-sensor")
        sensor.clear()
        sensor.send_keys("gps")
        by_id(browser, "serial-form").submit()  # NMEA, 9600 baud: the defaults
        row = until(lambda: [r.text for r in browser.find_elements(
            "css selector", '#live tr[data-key="gps/latitude"]') if r.text], 60, "decoded, live")
        assert "48.117" in row[0], row
        shots(browser, artifacts, "serial-live")
        assert console_errors(browser) == []
    finally:
        stop.set()
        hub.stop()
        feeder.join(5)
        loop.run(pair.__aexit__(None, None, None))
        loop.close()
