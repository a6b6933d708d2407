"""The bridge's ``scan`` at other serial settings than the bus's: a meter at 9600 baud on a bus
configured for 19200 answers only at 9600 (tests/hw/modbus/linespeed.py gives the pty line a
speed); the bus polls again at its own settings afterwards; bad settings are refused."""

from __future__ import annotations

from functools import partial
from typing import Any

from hw.modbus.bridge import ModbusBridge
from hw.modbus.simulate import SimulatedMeter
from tests import waiting
from tests.hw.modbus.linespeed import LineSpeed
from tests.hw.modbus.peers import require_socat, running

until = partial(waiting.eventually, interval=0.02)


def bus(device: str, baud: int) -> dict[str, Any]:
    return {"serial": {"port": device, "baud": baud, "parity": "N"}, "timeout": 0.3}


async def test_scan_finds_a_unit_at_its_baud_rate_only_then_the_bus_resumes() -> None:
    require_socat()  # the RTU tests' requirement; this line needs only ptys
    with LineSpeed(9600) as line:
        async with SimulatedMeter("eastron-sdm120", serial=line.server_device, baud=9600):
            bridge = ModbusBridge()
            bridge.apply({"buses": {"line": bus(line.device, 19200)}, "devices": {
                "meter": {"bus": "line", "unit": 1, "profile": "eastron-sdm120",
                          "interval": 0.3}}})
            async with running(bridge) as got:
                await until(lambda: bridge.status()["buses"].get("line", {}).get("state")
                            == "up")
                scan = bridge.methods["scan"]
                status, at_own = await scan({"bus": "line", "units": "1", "seconds": 20})
                assert status == 200 and at_own["answered"] == [], at_own
                assert "baud" not in at_own  # the bus's own setting: the live path
                status, at_9600 = await scan({"bus": "line", "units": "1", "baud": 9600,
                                              "seconds": 20})
                assert status == 200, at_9600["error"]
                assert (at_9600["baud"], at_9600["parity"]) == (9600, "N")
                assert [a["unit"] for a in at_9600["answered"]] == [1]
                assert at_9600["answered"][0]["kind"] == "value"
                # The bus is back at 19200 (its runner restarted), still hearing nothing.
                await until(lambda: bridge.status()["buses"].get("line", {}).get("state")
                            == "up", 10)
                assert bridge.status()["buses"]["line"]["link"].endswith("@19200/8N1")
                status, same = await scan({"bus": "line", "units": "1", "baud": 19200,
                                           "parity": "N"})
                assert status == 200 and same["answered"] == [] and "baud" not in same
                # The technician takes 9600: the meter's readings arrive.
                bridge.apply({"buses": {"line": bus(line.device, 9600)}, "devices": {
                    "meter": {"bus": "line", "unit": 1, "profile": "eastron-sdm120",
                              "interval": 0.3}}})
                await until(lambda: any(s == "meter" for s, _ in got), 20)
                for bad, path in (({"baud": 12}, "baud"), ({"parity": "X"}, "parity"),
                                  ({"baud": "9600"}, "baud")):
                    status, body = await scan({"bus": "line", "units": "1", **bad})
                    assert status == 400 and path in body["error"], body
    assert line.dropped > 0 and line.passed > 0


async def test_baud_and_parity_are_refused_on_a_tcp_bus() -> None:
    async with SimulatedMeter("eastron-sdm120") as meter:
        bridge = ModbusBridge()
        bridge.apply({"buses": {"t": {"tcp": {"host": "127.0.0.1", "port": meter.port}}}})
        async with running(bridge):
            await until(lambda: "t" in bridge.status()["buses"])
            status, body = await bridge.methods["scan"]({"bus": "t", "units": "1",
                                                         "baud": 9600})
    assert status == 400 and "only a serial bus" in body["error"]
