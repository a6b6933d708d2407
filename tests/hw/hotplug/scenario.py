"""Hotplug scenarios that run under ``umockdev-wrapper`` in a child process.

``python -m tests.hw.hotplug.scenario watcher|bridge`` builds a umockdev testbed, runs the real
pyudev watcher (and, for ``bridge``, the serial bridge reading the emulated ttys through their
``/dev/serial/by-id`` links), plugs and unplugs recorded adapters, and prints one JSON document
of what it observed. ``test_umockdev.py`` starts it and asserts on that document, so the test
process itself never runs under ``LD_PRELOAD``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from hw.hotplug import MatchRule, UsbSerialDevice, UsbSerialWatcher
from hw.readings import Reading
from hw.serial.bridge import SerialBridge
from tests.hw.hotplug.devices import CH340, FTDI_A000, TTYS0, UBLOX7, parse
from tests.hw.hotplug.testbed import Testbed
from tests.waiting import eventually as until

GGA = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"


def tty_path(record: str) -> str:
    return parse(record)[-1].sys_path


async def watcher_scenario(bed: Testbed) -> dict[str, Any]:
    events: list[list[str]] = []

    def started(rule: MatchRule, device: UsbSerialDevice) -> None:
        events.append(["started", rule.name, device.dev_node, device.stable_path])

    def stopped(rule: MatchRule, device: UsbSerialDevice) -> None:
        events.append(["stopped", rule.name, device.dev_node])

    bed.add(TTYS0)
    bed.add(FTDI_A000)  # present before the watcher starts: found by enumeration
    watcher = UsbSerialWatcher(
        [MatchRule(name="meter", vendor_id="0403", serial="A000"),
         MatchRule(name="gps", vendor_id="1546", model_id="01a7")],
        started=started, stopped=stopped,
    )
    task = asyncio.create_task(watcher.run())
    await until(lambda: len(events) == 1, what="coldplug")
    out: dict[str, Any] = {"coldplug": list(events)}

    bed.add(UBLOX7)
    await until(lambda: len(events) == 2, what="gps add")
    bed.uevent(tty_path(UBLOX7), "add")  # a repeated add
    bed.add(CH340)  # no rule for it
    await until(lambda: tty_path(CH340) in watcher.present, what="ch340 seen")
    out["present"] = sorted(d.dev_node for d in watcher.present.values())
    out["matched"] = {watcher.present[p].dev_node: r.name for p, r in watcher.matched.items()}

    bed.unplug(UBLOX7)
    await until(lambda: len(events) == 3, what="gps remove")
    bed.replug(UBLOX7)
    await until(lambda: len(events) == 4, what="gps replug")

    # New rules: the CH340 becomes the meter (by path, it has no serial), the FTDI nothing.
    watcher.set_rules([MatchRule(name="meter", vendor_id="1a86", model_id="7523"),
                       MatchRule(name="gps", vendor_id="1546", model_id="01a7")])
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    out["events"] = events
    return out


async def bridge_scenario(bed: Testbed) -> dict[str, Any]:
    batches: list[tuple[str, list[Reading]]] = []

    async def emit(sensor: str, readings: Sequence[Reading]) -> None:
        batches.append((sensor, list(readings)))

    bed.add(FTDI_A000)
    bridge = SerialBridge()
    bridge.apply({"ports": {
        "meter": {"match": {"vendorId": "0403", "serial": "A000"}, "format": "jsonl",
                  "reconnectMin": 0.01, "reconnectMax": 0.05},
        "gps": {"match": {"vendorId": "1546", "modelId": "01a7"}, "format": "nmea",
                "reconnectMin": 0.01, "reconnectMax": 0.05},
    }})

    def state(name: str) -> dict[str, Any]:
        port: dict[str, Any] = bridge.status()["ports"][name]
        return port

    out: dict[str, Any] = {}
    task = asyncio.create_task(bridge.run(emit))
    await until(lambda: state("meter")["connected"], what="meter open (coldplug)")
    out["meter_open"] = {k: state("meter")[k] for k in ("path", "device", "state")}
    out["gps_before"] = state("gps")["state"]
    os.write(bed.master_fd("/dev/ttyUSB0"), b'{"t": 21.5, "rh": 40}\n')
    await until(lambda: len(batches) == 1, what="meter reading")

    bed.add(UBLOX7)
    await until(lambda: state("gps")["connected"], what="gps open (hotplug)")
    out["gps_open"] = {k: state("gps")[k] for k in ("path", "device", "state")}
    os.write(bed.master_fd("/dev/ttyACM0"), GGA)
    await until(lambda: len(batches) == 2, what="gps reading")

    bed.unplug(UBLOX7)
    await until(lambda: state("gps")["state"] == "waiting", what="gps stopped")
    out["gps_after_unplug"] = {k: state("gps")[k] for k in ("path", "connected", "state")}
    out["meter_during"] = state("meter")["connected"]

    bed.replug(UBLOX7)
    await until(lambda: state("gps")["connected"], what="gps reopened")
    os.write(bed.master_fd("/dev/ttyACM0"), GGA)
    await until(lambda: len(batches) == 3, what="gps reading after replug")
    out["still_running"] = not task.done()

    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    out["batches"] = [[sensor, [[r.name, r.value, r.unit] for r in rs]] for sensor, rs in batches]
    out["list_ports"] = (await bridge.methods["listPorts"](None))[1]
    return out


SCENARIOS = {"watcher": watcher_scenario, "bridge": bridge_scenario}


def main() -> None:
    warnings.simplefilter("error")  # as pytest's filterwarnings = error
    bed = Testbed()
    try:
        result = asyncio.run(asyncio.wait_for(SCENARIOS[sys.argv[1]](bed), 30))
    finally:
        bed.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
