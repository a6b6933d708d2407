"""The Modbus bridge over RTU on a pty pair (socat): several units on one serial line, one of
them dead; the others keep their rate, goldens decode, a direct write changes the server."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

from hw.modbus.bridge import ModbusBridge
from hw.modbus.profiles import ProfileLibrary
from tests import waiting
from tests.hw.modbus.peers import first_goldens, golden_tables, latest, rtu_peer, running

until = partial(waiting.eventually, interval=0.02)

LIB = ProfileLibrary()
PLAIN = {"holding": {0: list(range(100, 120))}}


def serial_bus(device: str, baud: int = 19200) -> dict[str, Any]:
    return {"serial": {"port": device, "baud": baud, "parity": "N"}, "timeout": 0.3,
            "breaker": {"threshold": 1, "backoff": 1.0, "max_backoff": 1.0}}


async def test_several_units_on_one_line_with_one_dead(tmp_path: Path) -> None:
    sdm120, tt = LIB("eastron-sdm120"), LIB("transmitter-4-20ma-waveshare-ai8")
    devices = {1: golden_tables(sdm120.goldens), 2: golden_tables(tt.goldens), 3: PLAIN,
               4: PLAIN}
    async with rtu_peer(tmp_path, devices, dead={3}) as peer:
        bridge = ModbusBridge()
        bridge.apply({"buses": {"line": serial_bus(peer.device)}, "devices": {
            "meter": {"bus": "line", "unit": 1, "profile": "eastron-sdm120", "interval": 0.25},
            "tt": {"bus": "line", "unit": 2, "profile": tt.name, "interval": 0.25},
            "dead": {"bus": "line", "unit": 3, "interval": 0.25,
                     "registers": {"r": {"address": 0}}},
            "plain": {"bus": "line", "unit": 4, "interval": 0.25,
                      "registers": {"r": {"address": 0, "type": "uint32"},
                                    "w": {"address": 7, "writable": True}}}}})
        async with running(bridge) as got:
            await until(lambda: {s for s, _ in got} >= {"meter", "tt", "plain"})
            start = len(got)
            await asyncio.sleep(3.0)
            window = got[start:]
            status, body = await bridge.methods["write_register"](
                {"bus": "line", "unit": 4, "address": 7, "value": 31337})
            assert status == 200, body
            assert await peer.get(4, "holding", 7) == [31337]
            report = bridge.status()
    assert latest(got, "meter") == first_goldens(sdm120.goldens)
    assert latest(got, "tt") == first_goldens(tt.goldens)
    assert latest(got, "plain")["r"] == (100 << 16) + 101
    polls = {s: sum(1 for name, _ in window if name == s) for s in ("meter", "tt", "plain")}
    # 3 s at 0.25 s = 12 polls each; the meter needs 3 transactions, the transmitter 2.
    assert min(polls.values()) >= 10, polls
    assert not any(s == "dead" for s, _ in got)
    bus = report["buses"]["line"]
    assert bus["gap_ms"] == 2.005  # t3.5 at 19200 baud, 11-bit characters
    assert bus["link"].startswith("serial:") and bus["link"].endswith("@19200/8N1")
    assert 0 < bus["utilisation"] <= 1 and bus["timeouts"] >= 1
    assert report["devices"]["dead"]["state"] == "down"


async def test_rtu_writes_reach_the_right_unit_only(tmp_path: Path) -> None:
    async with rtu_peer(tmp_path, {1: PLAIN, 2: PLAIN}, baud=9600) as peer:
        bridge = ModbusBridge()
        bridge.apply({"buses": {"line": serial_bus(peer.device, 9600)},
                      "devices": {"a": {"bus": "line", "unit": 1, "interval": 0.5,
                                        "registers": {"r": {"address": 0}}},
                                  "b": {"bus": "line", "unit": 2, "interval": 5,
                                        "registers": {"set": {"address": 1, "type": "uint32",
                                                              "writable": True}}}}})
        async with running(bridge):
            await until(lambda: bridge.status()["buses"].get("line", {}).get("state") == "up")
            status, _ = await bridge.methods["write_register"](
                {"bus": "line", "unit": 2, "address": 1, "value": [7, 8]})
            assert status == 200
            assert bridge.status()["buses"]["line"]["gap_ms"] == 4.01
    assert await peer.get(2, "holding", 0, 3) == [100, 7, 8]
    assert await peer.get(1, "holding", 0, 3) == [100, 101, 102]


async def test_a_missing_serial_port_is_a_bus_down_not_a_crash(tmp_path: Path) -> None:
    bridge = ModbusBridge()
    bridge.apply({"buses": {"line": serial_bus(str(tmp_path / "ttyGONE"))},
                  "devices": {"a": {"bus": "line", "unit": 1, "registers": {"r": {"address": 0}}}}})
    async with running(bridge):
        await until(lambda: bridge.status()["buses"].get("line", {}).get("state") == "down")
        await asyncio.sleep(0.6)  # a reconnect attempt fails the same way
        bus = bridge.status()["buses"]["line"]
    assert "cannot connect" in bus["last_error"] and bus["connects"] == 0
