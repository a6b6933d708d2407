"""The Modbus bridge against pymodbus servers over TCP: several units on one connection, one
of them dead; goldens, polling rates, writes, reconfiguration, transitions logged once."""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ConfigError
from hw.modbus.bridge import ModbusBridge, stable_name_for
from hw.modbus.client import Transport
from hw.modbus.profiles import ProfileLibrary
from hw.modbus.registers import Table
from tests import waiting
from tests.hw.modbus.peers import (
    first_goldens,
    free_port,
    golden_tables,
    latest,
    running,
    tcp_peer,
)

until = partial(waiting.eventually, interval=0.02)

LIB = ProfileLibrary()
PLAIN = {"holding": {0: list(range(100, 120))}, "coil": {0: [False] * 8}}


def tcp_bus(port: int, **extra: Any) -> dict[str, Any]:
    return {"tcp": {"host": "127.0.0.1", "port": port}, "timeout": 0.3,
            "breaker": {"threshold": 1, "backoff": 1.0, "max_backoff": 1.0}, **extra}


def inline(unit: int, interval: float = 0.2, **registers: Any) -> dict[str, Any]:
    return {"bus": "plc", "unit": unit, "interval": interval,
            "registers": registers or {"r0": {"address": 0}}}


def device_state(bridge: ModbusBridge, device: str) -> str | None:
    state = bridge.status()["devices"].get(device, {}).get("state")
    return str(state) if state else None


def write_state(bridge: ModbusBridge, point: str) -> str | None:
    entry = bridge.status()["writes"].get("a", {}).get(point, {})
    return entry.get("state") if entry.get("value") != -21.5 or point != "setpoint" else None


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def test_profiles_decode_their_goldens_from_live_devices(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hw.modbus")
    profiles = {1: "eastron-sdm120", 2: "eastron-sdm630", 4: "transmitter-4-20ma-waveshare-ai8"}
    devices = {u: golden_tables(LIB(p).goldens) for u, p in profiles.items()}
    devices[3] = PLAIN
    async with tcp_peer(devices, dead={3}) as peer:
        bridge = ModbusBridge()
        bridge.apply({"buses": {"plc": tcp_bus(peer.port)}, "devices": {
            **{f"d{u}": {"bus": "plc", "unit": u, "profile": p, "interval": 0.5}
               for u, p in profiles.items()},
            "ghost": inline(3)}})
        async with running(bridge) as got:
            await until(lambda: {s for s, _ in got} >= {"d1", "d2", "d4"})
            await until(lambda: device_state(bridge, "ghost") == "down")
            await until(lambda: peer.requests.get(3, 0) >= 2, timeout=3)
            status = bridge.status()
    for unit, name in profiles.items():
        assert latest(got, f"d{unit}") == first_goldens(LIB(name).goldens), name
    readings = {r.name: r for s, rs in got if s == "d1" for r in rs}  # type: ignore[attr-defined]
    assert readings["voltage"].unit == "V" and readings["power_factor"].unit is None
    assert "ghost" not in {s for s, _ in got}
    assert len(messages(caplog, "unit 3 down")) == 1  # probed again, logged once
    ghost = status["devices"]["ghost"]
    assert ghost["state"] == "down" and ghost["errors"] >= 1 and "retry_at" in ghost
    assert ghost["last_error"] == "no response within 0.3 s"
    d1 = status["devices"]["d1"]
    assert d1["state"] == "up" and d1["source"] == "profile:eastron-sdm120"
    assert d1["last_read"].endswith("Z") and d1["latency_ms"] is not None
    bus = status["buses"]["plc"]
    assert bus["state"] == "up" and bus["connects"] == 1 and bus["timeouts"] >= 1
    assert bus["tx_bytes"] > 0 and bus["rx_bytes"] > 0


async def test_a_dead_unit_does_not_slow_its_neighbours() -> None:
    async with tcp_peer({1: PLAIN, 2: PLAIN, 3: PLAIN}, dead={3}) as peer:
        bridge = ModbusBridge()
        bridge.apply({"buses": {"plc": tcp_bus(peer.port)},
                      "devices": {"a": inline(1), "b": inline(2), "dead": inline(3)}})
        async with running(bridge) as got:
            await until(lambda: any(s == "a" for s, _ in got))
            start = len(got)
            await asyncio.sleep(3.0)
            window = got[start:]
    polls = {s: sum(1 for name, _ in window if name == s) for s in ("a", "b", "dead")}
    # 3 s at 0.2 s = 15 polls each; the dead unit's 0.3 s timeouts (once per second, its
    # breaker's back-off) must not cost the others more than a poll or two.
    assert polls["a"] >= 13 and polls["b"] >= 13, polls
    assert polls["dead"] == 0
    assert peer.requests.get(3, 0) <= 5


async def test_direct_methods_write_the_servers_registers_and_coils() -> None:
    async with tcp_peer({1: PLAIN, 3: PLAIN}, dead={3}) as peer:
        bridge = ModbusBridge()
        writable = {"address": 0, "type": "int16", "writable": True}
        bridge.apply({"buses": {"plc": tcp_bus(peer.port)}, "devices": {
            "a": inline(1, r0={"address": 0}, w5={**writable, "address": 5},
                        w10={**writable, "address": 10, "type": "float32"},
                        w12={**writable, "address": 12}, w500={**writable, "address": 500},
                        c2={"table": "coil", "address": 2, "type": "bool", "writable": True}),
            "dead": inline(3, interval=5, w0=writable)}})
        write_register, write_coil = (bridge.methods["write_register"],
                                      bridge.methods["write_coil"])
        async with running(bridge):
            await until(lambda: bridge.status()["buses"].get("plc", {}).get("state") == "up")
            assert await write_register({"bus": "plc", "unit": 1, "address": 5, "value": 4242}) \
                == (200, {"bus": "plc", "unit": 1, "address": 5, "value": 4242})
            assert await peer.get(1, "holding", 5) == [4242]
            status, _ = await write_register({"bus": "plc", "unit": 1, "address": 10,
                                              "value": [1, 2, 3]})
            assert status == 200 and await peer.get(1, "holding", 10, 3) == [1, 2, 3]
            assert (await write_coil({"bus": "plc", "unit": 1, "address": 2, "value": True}))[0] \
                == 200
            assert await peer.get(1, "coil", 0, 4) == [0, 0, 1, 0]
            status, body = await write_register({"bus": "plc", "unit": 1, "address": 500,
                                                 "value": 1})
            assert status == 502 and body["exception_code"] == 2
            status, body = await write_register({"bus": "plc", "unit": 3, "address": 0,
                                                 "value": 1})
            assert status == 504 and body["error"] == "no response within 0.3 s"
            assert (await write_register({"bus": "nope", "unit": 1, "address": 0,
                                          "value": 1}))[0] == 404
            for bad in ({"bus": "plc", "unit": 1, "address": 0, "value": 70000},
                        {"bus": "plc", "unit": 1, "address": 0, "value": True},
                        {"bus": "plc", "unit": 1, "address": -1, "value": 1},
                        {"bus": "plc", "unit": 1, "value": 1},
                        {"bus": "plc", "unit": 1, "address": 0},
                        {"bus": "plc", "unit": 1, "address": 0, "value": 1, "x": 0},
                        "write it"):
                assert (await write_register(bad))[0] == 400, bad
            assert (await write_coil({"bus": "plc", "unit": 1, "address": 0, "value": 1}))[0] \
                == 400
            # registers and coils not marked writable are refused before the bus is touched
            for payload, kind in (({"address": 0, "value": 1}, "holding register 0"),
                                  ({"address": 12, "value": [1, 2]}, "holding register 13"),
                                  ({"address": 6, "value": 1}, "holding register 6")):
                status, body = await write_register({"bus": "plc", "unit": 1, **payload})
                assert status == 403 and body["error"].startswith(kind), body
                assert "not writable" in body["error"] and "bus 'plc'" in body["error"]
            status, body = await write_register({"bus": "plc", "unit": 2, "address": 5,
                                                 "value": 1})  # unit 2 has no map at all
            assert status == 403, body
            status, body = await write_coil({"bus": "plc", "unit": 1, "address": 3,
                                             "value": True})
            assert status == 403 and body["error"].startswith("coil 3 of unit 1"), body
            assert await peer.get(1, "holding", 0) == [100] and await peer.get(1, "coil", 3) == [0]
            assert peer.requests.get(2, 0) == 0  # nothing went on the wire for unit 2


async def test_desired_writes_are_applied_once_and_reported() -> None:
    async with tcp_peer({1: PLAIN}) as peer:
        bridge = ModbusBridge()
        registers = {"setpoint": {"address": 3, "type": "int16", "scale": 0.1,
                                  "writable": True},
                     "pump": {"table": "coil", "address": 1, "writable": True},
                     "bad": {"address": 300, "writable": True}}
        config: dict[str, Any] = {"buses": {"plc": tcp_bus(peer.port)},
                                  "devices": {"a": inline(1, interval=0.3, **registers)},
                                  "writes": {"a": {"setpoint": -21.5, "pump": True}}}
        bridge.apply(config)
        async with running(bridge):
            await until(lambda: write_state(bridge, "pump") == "done")
            assert await peer.get(1, "holding", 3) == [0x10000 - 215]
            assert await peer.get(1, "coil", 1) == [1]
            config["writes"] = {"a": {"setpoint": 19.0, "pump": True, "bad": 1}}
            bridge.apply(config)
            await until(lambda: write_state(bridge, "bad") == "error")
            await until(lambda: write_state(bridge, "setpoint") == "done")
            assert await peer.get(1, "holding", 3) == [190]
            writes = bridge.status()["writes"]["a"]
    assert writes["bad"]["error"] == "exception 2 (illegal data address)"
    assert writes["setpoint"]["value"] == 19.0 and writes["setpoint"]["at"].endswith("Z")


async def test_apply_restarts_only_what_changed() -> None:
    async with tcp_peer({1: PLAIN, 2: PLAIN}) as peer:
        bridge = ModbusBridge()
        config: dict[str, Any] = {"buses": {"plc": tcp_bus(peer.port)},
                                  "devices": {"a": inline(1)}}
        bridge.apply(config)
        async with running(bridge) as got:
            await until(lambda: len(got) >= 3)
            runner = bridge._runners["plc"]
            config["devices"]["b"] = inline(2)
            bridge.apply(config)
            await until(lambda: any(s == "b" for s, _ in got))
            assert bridge._runners["plc"] is runner  # same connection, same loop
            status = bridge.status()
            assert status["buses"]["plc"]["connects"] == 1
            assert status["devices"]["a"]["polls"] >= 3  # counters survived
            with pytest.raises(ConfigError):
                bridge.apply({**config, "devices": {"a": {"bus": "plc", "unit": "one"}}})
            assert set(bridge.config.devices) == {"a", "b"}  # the old config stays
            config["buses"]["plc"] = tcp_bus(peer.port, timeout=0.4)
            bridge.apply(config)
            await until(lambda: bridge._runners.get("plc") not in (None, runner))
            await until(lambda: bridge.status()["buses"]["plc"]["state"] == "up")
            bridge.apply({})
            await until(lambda: not bridge.status()["buses"])
            assert bridge.status() == {"buses": {}, "devices": {}, "writes": {}}


async def test_a_silent_unit_that_comes_back_is_logged_once_each_way(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hw.modbus")
    async with tcp_peer({1: PLAIN, 3: PLAIN}, dead={3}) as peer:
        bridge = ModbusBridge()
        bus = tcp_bus(peer.port, breaker={"threshold": 2, "backoff": 0.2, "max_backoff": 0.2})
        bridge.apply({"buses": {"plc": bus}, "devices": {"a": inline(1), "c": inline(3)}})
        async with running(bridge) as got:
            await until(lambda: device_state(bridge, "c") == "down")
            await until(lambda: peer.requests.get(3, 0) >= 4)
            peer.dead.clear()
            await until(lambda: any(s == "c" for s, _ in got))
            await until(lambda: device_state(bridge, "c") == "up")
    assert len(messages(caplog, "unit 3 down")) == 1
    assert len(messages(caplog, "unit 3 recovered")) == 1
    assert not [r for r in caplog.records if r.name.startswith("pymodbus")
                and r.levelno >= logging.ERROR]


class AnswerOverCancel(Transport):
    """A pymodbus transport that, like 3.11's ``asyncio.wait_for`` when an answer and a cancel
    arrive together, returns the answer and drops the cancel."""

    reading = False
    dropped = 0

    async def read(self, table: Table, unit: int, address: int,
                   count: int) -> list[int] | list[bool]:
        answer = asyncio.ensure_future(super().read(table, unit, address, count))
        AnswerOverCancel.reading = True
        try:
            return await asyncio.shield(answer)
        except asyncio.CancelledError:
            AnswerOverCancel.dropped += 1
            return await answer
        finally:
            AnswerOverCancel.reading = False


async def test_a_bus_stops_when_the_modbus_client_drops_a_cancel() -> None:
    async with tcp_peer({1: PLAIN}) as peer:
        bridge = ModbusBridge(transport_factory=AnswerOverCancel)
        bridge.apply({"buses": {"plc": tcp_bus(peer.port)},
                      "devices": {"a": inline(1, interval=0.01)}})
        task = asyncio.create_task(bridge.run(lambda sensor, readings: asyncio.sleep(0)))
        await until(lambda: device_state(bridge, "a") == "up" and AnswerOverCancel.reading)
        await waiting.stop(task, within=3)  # the cancel lands in a read, which drops it
    assert AnswerOverCancel.dropped == 1


async def test_a_refused_connection_is_a_bus_down_that_recovers(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hw.modbus")
    port = free_port()
    bridge = ModbusBridge()
    bridge.apply({"buses": {"plc": tcp_bus(port)},
                  "devices": {"a": inline(1, r0={"address": 0, "writable": True})}})
    async with running(bridge) as got:
        await until(lambda: bridge.status()["buses"].get("plc", {}).get("state") == "down")
        status, body = await bridge.methods["write_register"](
            {"bus": "plc", "unit": 1, "address": 0, "value": 1})
        assert status == 503 and "down" in body["error"]
        async with tcp_peer({1: PLAIN}, port=port):  # the server appears: the bus comes up
            await until(lambda: any(s == "a" for s, _ in got), timeout=8)
    assert len(messages(caplog, "bus down")) == 1
    assert len(messages(caplog, "bus recovered")) == 1


def test_unstable_serial_names_are_warned_about(caplog: pytest.LogCaptureFixture,
                                                tmp_path: Path) -> None:
    bridge = ModbusBridge()
    bridge.apply({"buses": {"b": {"serial": {"port": "/dev/ttyUSB7"}}}})
    (warning,) = messages(caplog, "unstable serial port name")
    assert "/dev/ttyUSB7" in warning and "/dev/serial/by-id/" in warning
    caplog.clear()
    bridge.apply({"buses": {"b": {"serial": {"port": "/dev/ttyUSB7"}}}})  # unchanged: quiet
    bridge.apply({"buses": {"b": {"serial": {"port": "/dev/serial/by-id/usb-x"}}}})
    assert not messages(caplog, "unstable")
    target = tmp_path / "ttyUSB0"
    target.touch()
    (tmp_path / "by-id").mkdir()
    (tmp_path / "by-id" / "usb-FTDI_FT232R_A1B2-if00-port0").symlink_to(target)
    assert stable_name_for(str(target), tmp_path / "by-id") \
        == str(tmp_path / "by-id" / "usb-FTDI_FT232R_A1B2-if00-port0")
    assert stable_name_for("/dev/ttyUSB9", tmp_path / "none") is None


async def test_reads_and_scans_on_the_live_bus_keep_polling_going() -> None:
    """A technician probes and scans through the running bridge: the requests share the bus
    with polling, and scanning absent units opens no circuit breaker."""
    devices = {1: {"holding": {0: [0x4366, 0x6666]}, "input": {3: [7]}}, 2: PLAIN}
    async with tcp_peer(devices, dead={4, 5}) as peer:
        bridge = ModbusBridge()
        bridge.apply({"buses": {"plc": tcp_bus(peer.port)},
                      "devices": {"a": inline(1), "b": inline(2)}})
        read, scan = bridge.methods["read_registers"], bridge.methods["scan"]
        async with running(bridge) as got:
            await until(lambda: bridge.status()["buses"].get("plc", {}).get("state") == "up")
            status, body = await read({"bus": "plc", "unit": 1, "address": 0, "count": 2,
                                       "interpret": True})
            assert status == 200 and body["values"] == [0x4366, 0x6666]
            (f32,) = [r for r in body["interpretations"]
                      if r["type"] == "float32" and r["order"] == "ABCD"]
            assert f32["values"][0] == "230.4"
            assert await read({"bus": "plc", "unit": 1, "address": 3, "table": "input"}) == (
                200, {"bus": "plc", "unit": 1, "address": 3, "table": "input", "values": [7]})
            assert (await read({"bus": "plc", "unit": 4, "address": 0}))[0] == 504
            assert (await read({"bus": "plc", "unit": 1, "address": 900}))[0] == 502
            for bad in ({"bus": "plc", "unit": 1, "count": 126}, {"bus": "plc", "unit": 1,
                        "table": "eeprom"}, {"bus": "plc", "unit": 1, "value": 1}):
                assert (await read(bad))[0] == 400, bad
            start = len(got)
            status, body = await scan({"bus": "plc", "units": "1-2,4-5"})
            polled = {s for s, _ in got[start:]}
            states = (device_state(bridge, "a"), device_state(bridge, "b"))
            assert (await scan({"bus": "plc", "units": "0-3"}))[0] == 400
            late, partial = await scan({"bus": "plc", "units": [4, 5], "seconds": 0.001})
        assert status == 200, body
        assert [(a["unit"], a["kind"]) for a in body["answered"]] == [(1, "value"), (2, "value")]
        assert body["asked"] == 4 and body["complete"] is True
        assert polled == {"a", "b"}  # polling went on during the scan
        assert states == ("up", "up")
        assert late == 200 and partial["complete"] is False  # stopped at its time budget
