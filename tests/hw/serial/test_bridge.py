"""The serial bridge against real pty pairs: decoding, counters, unplug/replug, apply, methods."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ConfigError
from hw.bridge import Bridge
from hw.hotplug import Callback, MatchRule, UsbSerialDevice
from hw.readings import Reading
from hw.serial.bridge import SerialBridge
from hw.serial.nmea import with_checksum
from hw.serial.port import LinkSettings, SerialPort
from tests import waiting
from tests.hw.serial.ptys import PtyDevice
from tests.waiting import eventually

GGA = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
GGA_BAD = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,546.4,M,46.9,M,,*47\r\n"
GGA_NO_CHECKSUM = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,\r\n"
RMC = b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A\r\n"
GSV = b"$GPGSV,3,1,11,03,03,111,00,04,15,270,00,06,01,010,00,13,06,292,00*74\r\n"
FAST = {"reconnectMin": 0.01, "reconnectMax": 0.05}


class Collector:
    """A list-collecting ``emit``; ``gate`` (when set) makes it block like a slow runtime."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[Reading]]] = []
        self.gate: asyncio.Event | None = None
        self.calls = 0

    async def __call__(self, sensor: str, readings: Sequence[Reading]) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        self.batches.append((sensor, list(readings)))

    def names(self, index: int) -> list[str]:
        return [r.name for r in self.batches[index][1]]


class CountingOpener:
    """The real opener, remembering every port it opened."""

    def __init__(self) -> None:
        self.opened: list[SerialPort] = []

    def __call__(self, path: str, settings: LinkSettings) -> SerialPort:
        port = SerialPort.open(path, settings)
        self.opened.append(port)
        return port

    def count(self, path: Path) -> int:
        return sum(p.path == str(path) for p in self.opened)


@contextlib.asynccontextmanager
async def running(bridge: SerialBridge, emit: Collector) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(bridge.run(emit))
    try:
        yield task
    finally:
        await waiting.stop(task)


@pytest.fixture
def gps(tmp_path: Path) -> Iterator[PtyDevice]:
    dev = PtyDevice(tmp_path / "by-id" / "usb-u-blox_AG_u-blox_7_GNSS-if00").plug()
    yield dev
    dev.close()


@pytest.fixture
def meter(tmp_path: Path) -> Iterator[PtyDevice]:
    dev = PtyDevice(tmp_path / "by-id" / "usb-FTDI_FT232R_USB_UART_A000-if00-port0").plug()
    yield dev
    dev.close()


def port_status(bridge: SerialBridge, name: str = "gps") -> dict[str, Any]:
    status: dict[str, Any] = bridge.status()["ports"][name]
    return status


def test_serial_bridge_satisfies_the_bridge_protocol() -> None:
    bridge: Bridge = SerialBridge()
    assert bridge.name == "serial"
    assert set(bridge.methods) == {"listPorts", "resetCounters"}


async def test_nmea_with_bad_checksums_is_counted_and_skipped_not_forwarded(gps: PtyDevice) -> None:
    bridge = SerialBridge(clock=lambda: 1_700_000_000.0)
    bridge.apply({"ports": {"gps": {"path": str(gps.link), "sensor": "truck-7"}}})
    emit = Collector()
    async with running(bridge, emit):
        await eventually(lambda: port_status(bridge)["connected"], what="port open")
        gps.send(GGA + GGA_BAD + RMC[:30])
        gps.send(RMC[30:] + GGA_NO_CHECKSUM + GSV + b"garbage\r\n")
        await eventually(lambda: port_status(bridge)["counts"]["lines"] == 6, what="6 lines")
        await eventually(lambda: len(emit.batches) == 2, what="2 batches")
        await asyncio.sleep(0.02)
    assert [sensor for sensor, _ in emit.batches] == ["truck-7", "truck-7"]
    assert emit.names(0)[:3] == ["utcTime", "fixQuality", "satellites"]
    assert emit.names(1)[:2] == ["utcDateTime", "fixValid"]
    altitudes = [r.value for _, batch in emit.batches for r in batch if r.name == "altitude"]
    assert altitudes == [545.4]  # the corrupted 546.4 never left the bridge
    status = port_status(bridge)
    assert status["counts"] == {
        "lines": 6, "decoded": 2, "ignored": 1, "readings": 15, "badChecksum": 2, "malformed": 1,
        "oversize": 0, "dropped": 0, "reconnects": 0,
    }
    assert status["lastLine"] == "garbage"
    assert status["lastLineAt"] == "2023-11-14T22:13:20.000Z"
    assert status["lastDecodeError"].startswith("not an NMEA sentence")
    assert status["device"] == gps.slave_name
    assert status["path"] == str(gps.link)
    assert status["state"] == "stopped"  # after run() ended


async def test_unplug_and_replug_recover_without_restarting(
    gps: PtyDevice, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hw.serial.bridge")
    opener = CountingOpener()
    bridge = SerialBridge(opener=opener)
    bridge.apply({"ports": {"gps": {"path": str(gps.link), **FAST}}})
    emit = Collector()
    async with running(bridge, emit) as task:
        await eventually(lambda: port_status(bridge)["connected"], what="port open")
        gps.send(GGA)
        await eventually(lambda: len(emit.batches) == 1)
        first_device = port_status(bridge)["device"]

        gps.unplug()  # the pty's master closes and the by-id link disappears
        await eventually(lambda: port_status(bridge)["state"] == "down", what="port down")
        await asyncio.sleep(0.3)  # several reopen attempts fail meanwhile
        status = port_status(bridge)
        assert not status["connected"]
        assert "read failed" in status["lastError"] or "end of file" in status["lastError"]
        attempts = len(opener.opened)

        gps.plug()  # a new pty behind the same link: the adapter is back
        await eventually(lambda: port_status(bridge)["connected"], what="port recovered")
        gps.send(RMC)
        await eventually(lambda: len(emit.batches) == 2, what="data after replug")
        assert not task.done()
        status = port_status(bridge)
        assert status["counts"]["reconnects"] == 1
        assert status["device"] == gps.slave_name
        assert first_device is not None
    assert attempts == 1  # failed opens raise, so only successful ones are counted here
    assert emit.names(1)[0] == "utcDateTime"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("down" in m for m in messages) == 1, messages  # logged once, not per retry
    assert sum("recovered" in m for m in messages) == 1, messages


async def test_a_port_absent_at_start_is_opened_when_it_appears(tmp_path: Path) -> None:
    dev = PtyDevice(tmp_path / "by-id" / "usb-late-if00")
    bridge = SerialBridge()
    bridge.apply({"ports": {"gps": {"path": str(dev.link), **FAST}}})
    emit = Collector()
    try:
        async with running(bridge, emit):
            await eventually(lambda: port_status(bridge)["state"] == "down")
            assert "cannot open" in port_status(bridge)["lastError"]
            dev.plug()
            await eventually(lambda: port_status(bridge)["connected"], what="late port open")
            dev.send(GGA)
            await eventually(lambda: len(emit.batches) == 1)
            assert port_status(bridge)["counts"]["reconnects"] == 0  # first open, not a reconnect
    finally:
        dev.close()


async def test_apply_restarts_only_what_changed(gps: PtyDevice, meter: PtyDevice) -> None:
    opener = CountingOpener()
    bridge = SerialBridge(opener=opener)
    gps_cfg = {"path": str(gps.link), **FAST}
    meter_cfg = {"path": str(meter.link), "format": "jsonl", **FAST}
    bridge.apply({"ports": {"gps": gps_cfg, "meter": meter_cfg}})
    emit = Collector()
    async with running(bridge, emit):
        await eventually(lambda: all(p["connected"] for p in bridge.status()["ports"].values()))
        gps_task = bridge._ports["gps"].task

        # The same document again: nothing happens.
        bridge.apply({"ports": {"gps": gps_cfg, "meter": meter_cfg}})
        # The meter's baud rate changes: only the meter is reopened.
        bridge.apply({"ports": {"gps": gps_cfg, "meter": {**meter_cfg, "baud": 115200}}})
        await eventually(lambda: opener.count(meter.link) == 2, what="meter reopened")
        await eventually(lambda: port_status(bridge, "meter")["connected"])
        assert opener.count(gps.link) == 1
        assert bridge._ports["gps"].task is gps_task
        assert not opener.opened[1]._handle.is_open  # the meter's first port was closed

        # The gps's decoding changes: same open port, new decoder, counters kept.
        gps.send(GGA)
        await eventually(lambda: len(emit.batches) == 1)
        bridge.apply({"ports": {
            "gps": {**gps_cfg, "format": "delimited", "sensor": "csv",
                    "decoder": {"columns": ["a", "b"], "fields": {"b": {"unit": "V"}}}},
            "meter": {**meter_cfg, "baud": 115200},
        }})
        gps.send(b"1,2.5\r\n")
        await eventually(lambda: len(emit.batches) == 2)
        sensor, batch = emit.batches[1]
        stamp = batch[0].acquired
        assert (sensor, batch) == ("csv", [Reading("csv", "a", 1, None, stamp),
                                           Reading("csv", "b", 2.5, "V", stamp)])
        assert opener.count(gps.link) == 1 and bridge._ports["gps"].task is gps_task
        assert port_status(bridge)["counts"]["lines"] == 2

        # The meter is removed: its port is closed; the gps goes on.
        meter_port = opener.opened[-1]
        bridge.apply({"ports": {"gps": {**gps_cfg, "format": "delimited", "sensor": "csv",
                                        "decoder": {"columns": ["a", "b"]}}}})
        await eventually(lambda: not meter_port._handle.is_open, what="meter closed")
        assert set(bridge.status()["ports"]) == {"gps"}
        assert bridge._ports["gps"].task is gps_task


async def test_invalid_config_raises_and_the_previous_one_stays(gps: PtyDevice) -> None:
    bridge = SerialBridge()
    bridge.apply({"ports": {"gps": {"path": str(gps.link)}}})
    emit = Collector()
    async with running(bridge, emit):
        await eventually(lambda: port_status(bridge)["connected"])
        with pytest.raises(ConfigError) as info:
            bridge.apply({"ports": {"gps": {"path": str(gps.link), "baud": "fast"}}})
        assert info.value.path == "ports.gps.baud"
        gps.send(GGA)
        await eventually(lambda: len(emit.batches) == 1)
        assert port_status(bridge)["connected"]


async def test_a_slow_emit_drops_the_oldest_batches_and_counts_them(gps: PtyDevice) -> None:
    bridge = SerialBridge(queue_size=2)
    bridge.apply({"ports": {"gps": {"path": str(gps.link)}}})
    emit = Collector()
    emit.gate = asyncio.Event()
    async with running(bridge, emit):
        await eventually(lambda: port_status(bridge)["connected"])
        gps.send(with_checksum("GPVTG,1.0,T,,M,,N,,K,A") + b"\r\n")
        await eventually(lambda: emit.calls == 1, what="emit blocked on the first batch")
        for course in range(2, 7):
            gps.send(with_checksum(f"GPVTG,{course}.0,T,,M,,N,,K,A") + b"\r\n")
        await eventually(lambda: port_status(bridge)["counts"]["lines"] == 6)
        assert port_status(bridge)["counts"]["dropped"] == 3
        emit.gate.set()
        await eventually(lambda: len(emit.batches) == 3)
    assert [batch[0].value for _, batch in emit.batches] == [1.0, 5.0, 6.0]


async def test_a_silent_port_is_reopened_after_the_silence_timeout(gps: PtyDevice) -> None:
    opener = CountingOpener()
    bridge = SerialBridge(opener=opener)
    bridge.apply({"ports": {"gps": {"path": str(gps.link), "silenceTimeout": 0.1, **FAST}}})
    emit = Collector()
    async with running(bridge, emit):
        await eventually(lambda: port_status(bridge)["counts"]["reconnects"] >= 1, what="reopen")
        assert "nothing received" in port_status(bridge)["lastError"]
        await eventually(lambda: port_status(bridge)["connected"])
        gps.send(GGA)
        await eventually(lambda: len(emit.batches) == 1)


async def test_disabled_ports_are_not_opened(gps: PtyDevice) -> None:
    opener = CountingOpener()
    bridge = SerialBridge(opener=opener)
    bridge.apply({"ports": {"gps": {"path": str(gps.link), "enabled": False}}})
    async with running(bridge, Collector()):
        await asyncio.sleep(0.05)
        assert port_status(bridge)["state"] == "disabled"
        bridge.apply({"ports": {"gps": {"path": str(gps.link)}}})
        await eventually(lambda: port_status(bridge)["connected"])
    assert len(opener.opened) == 1


async def test_kernel_device_names_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hw.serial.bridge")
    bridge = SerialBridge()
    bridge.apply({"ports": {"gps": {"path": "/dev/ttyUSB97"}}})
    assert "replug" in port_status(bridge)["warning"]
    assert any("/dev/ttyUSB97 can name another adapter" in r.getMessage() for r in caplog.records)


async def test_methods_list_ports_and_reset_counters(gps: PtyDevice) -> None:
    bridge = SerialBridge()
    bridge.apply({"ports": {"gps": {"path": str(gps.link)}}})
    emit = Collector()
    async with running(bridge, emit):
        await eventually(lambda: port_status(bridge)["connected"])
        gps.send(GGA + GGA_BAD)
        await eventually(lambda: port_status(bridge)["counts"]["lines"] == 2)
        code, body = await bridge.methods["listPorts"](None)
        assert code == 200 and isinstance(body["ports"], list)
        reset = bridge.methods["resetCounters"]
        assert await reset({"port": "nope"}) == (404, {"error": "no port 'nope'"})
        assert await reset({"port": "gps"}) == (200, {"reset": ["gps"]})
        assert port_status(bridge)["counts"]["lines"] == 0
        gps.send(GGA)
        await eventually(lambda: port_status(bridge)["counts"]["decoded"] == 1)


async def test_run_twice_is_refused() -> None:
    bridge = SerialBridge()
    async with running(bridge, Collector()):
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError):
            await bridge.run(Collector())


# -- hotplug seam (a watcher fake; the udev one runs under umockdev in tests/hw/hotplug) --------


class FakeWatcher:
    def __init__(self, rules: Sequence[MatchRule], started: Callback, stopped: Callback) -> None:
        self.rules = tuple(rules)
        self.started = started
        self.stopped = stopped
        self.running = False

    def set_rules(self, rules: Sequence[MatchRule]) -> None:
        self.rules = tuple(rules)

    async def run(self) -> None:
        self.running = True
        await asyncio.get_running_loop().create_future()


def adapter(link: Path, serial: str = "A000") -> UsbSerialDevice:
    # The pty link stands in for the node; no by-id link, so stable_path is the node.
    return UsbSerialDevice(sys_path=f"/sys/devices/usb1/1-1/1-1:1.0/{serial}/tty/ttyUSB0",
                           dev_node=str(link), vendor_id="0403", model_id="6001",
                           serial=serial, interface="00", links=())


async def test_a_matched_port_runs_while_its_adapter_is_plugged_in(meter: PtyDevice) -> None:
    watchers: list[FakeWatcher] = []

    def factory(rules: Sequence[MatchRule], started: Callback, stopped: Callback) -> FakeWatcher:
        watchers.append(FakeWatcher(rules, started, stopped))
        return watchers[-1]

    bridge = SerialBridge(watcher_factory=factory)
    bridge.apply({"ports": {"meter": {"match": {"vendorId": "0403", "serial": "A000"},
                                      "format": "jsonl", **FAST}}})
    emit = Collector()
    async with running(bridge, emit):
        await eventually(lambda: watchers and watchers[0].running, what="watcher started")
        watcher = watchers[0]
        rule = MatchRule(name="meter", vendor_id="0403", serial="A000")
        assert watcher.rules == (rule,)
        assert port_status(bridge, "meter")["state"] == "waiting"

        device = adapter(meter.link)
        watcher.started(rule, device)
        await eventually(lambda: port_status(bridge, "meter")["connected"], what="opened")
        assert port_status(bridge, "meter")["path"] == str(meter.link)
        meter.send(b'{"t": 21.5}\n')
        await eventually(lambda: len(emit.batches) == 1)

        spare = PtyDevice(meter.link.parent / "usb-FTDI_FT232R_USB_UART_B111-if00-port0").plug()
        try:
            second = adapter(spare.link, serial="B111")
            watcher.started(rule, second)  # a second matching adapter: kept in reserve
            assert port_status(bridge, "meter")["path"] == str(meter.link)

            watcher.stopped(rule, device)  # the first one leaves: the port moves to the second
            await eventually(lambda: port_status(bridge, "meter")["path"] == str(spare.link))
            await eventually(lambda: port_status(bridge, "meter")["connected"], what="switched")
            spare.send(b'{"t": 22.0}\n')
            await eventually(lambda: len(emit.batches) == 2)

            watcher.stopped(rule, second)
            await eventually(lambda: port_status(bridge, "meter")["state"] == "waiting")
            assert port_status(bridge, "meter")["path"] is None
        finally:
            spare.close()

        bridge.apply({"ports": {"meter": {"match": {"vendorId": "0403"}, "format": "jsonl"}}})
        assert watcher.rules == (MatchRule(name="meter", vendor_id="0403"),)
        assert len(watchers) == 1


async def test_a_failing_watcher_is_retried_and_path_ports_keep_running(
    gps: PtyDevice, caplog: pytest.LogCaptureFixture
) -> None:
    runs = 0

    class BrokenWatcher(FakeWatcher):
        async def run(self) -> None:
            nonlocal runs
            runs += 1
            raise OSError(13, "Permission denied")

    bridge = SerialBridge(watcher_factory=BrokenWatcher, watcher_retry=(0.01, 0.02))
    bridge.apply({"ports": {"gps": {"path": str(gps.link)},
                            "meter": {"match": {"vendorId": "0403"}}}})
    emit = Collector()
    async with running(bridge, emit):
        await eventually(lambda: runs >= 3, what="watcher retried")
        gps.send(GGA)
        await eventually(lambda: len(emit.batches) == 1)
    assert sum("hotplug watcher failed" in r.getMessage() for r in caplog.records) == 1
