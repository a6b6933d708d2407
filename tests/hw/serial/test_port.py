"""The pyserial shell over real pty pairs: open by link, read on the loop, unplug, names."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import DeviceError
from hw.serial.port import (
    LinkSettings,
    SerialPort,
    list_ports,
    stable_aliases,
    unstable_name_warning,
)
from tests.hw.serial.ptys import PtyDevice


@pytest.fixture
def device(tmp_path: Path) -> Iterator[PtyDevice]:
    dev = PtyDevice(tmp_path / "by-id" / "usb-Test_GPS_0001-if00").plug()
    yield dev
    dev.close()


async def test_open_by_link_resolves_the_device_and_reads_on_the_loop(device: PtyDevice) -> None:
    port = SerialPort.open(str(device.link), LinkSettings(baud=4800))
    try:
        assert port.path == str(device.link)
        assert port.device == device.slave_name
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        read = asyncio.create_task(port.read())
        await asyncio.sleep(0.05)
        assert not read.done() and ticks > 5  # waiting for bytes does not block the loop
        device.send(b"$GPGGA,1\r\n")
        assert await asyncio.wait_for(read, 2) == b"$GPGGA,1\r\n"
        task.cancel()
        port.write(b"PING\r\n")
        await asyncio.sleep(0.01)
        assert device.received() == b"PING\r\n"
    finally:
        port.close()


async def test_input_sent_before_open_is_dropped(device: PtyDevice) -> None:
    device.send(b"stale\n")
    port = SerialPort.open(str(device.link))
    try:
        device.send(b"fresh\n")
        assert await asyncio.wait_for(port.read(), 2) == b"fresh\n"
    finally:
        port.close()


async def test_unplug_fails_the_pending_read_with_a_device_error(device: PtyDevice) -> None:
    port = SerialPort.open(str(device.link))
    try:
        read = asyncio.create_task(port.read())
        await asyncio.sleep(0.02)
        device.unplug()
        with pytest.raises(DeviceError) as info:
            await asyncio.wait_for(read, 2)
        assert info.value.device_id.endswith("usb-Test_GPS_0001-if00")
    finally:
        port.close()


def test_opening_a_missing_or_busy_port_is_a_device_error(
    device: PtyDevice, tmp_path: Path
) -> None:
    with pytest.raises(DeviceError, match="cannot open") as info:
        SerialPort.open(str(tmp_path / "nope"))
    assert info.value.device_id == str(tmp_path / "nope")
    first = SerialPort.open(str(device.link))
    try:
        with pytest.raises(DeviceError, match="cannot open"):
            SerialPort.open(str(device.link))  # exclusive: two bridges never share a port
    finally:
        first.close()
    SerialPort.open(str(device.link)).close()  # free again


def test_kernel_names_get_a_warning_pointing_at_the_stable_link(tmp_path: Path) -> None:
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    (by_id / "usb-FTDI_FT232R_USB_UART_A000-if00-port0").symlink_to("/dev/ttyUSB3")
    assert stable_aliases("/dev/ttyUSB3", by_id) == [
        str(by_id / "usb-FTDI_FT232R_USB_UART_A000-if00-port0")]
    warning = unstable_name_warning("/dev/ttyUSB3", by_id)
    assert warning is not None and "usb-FTDI_FT232R_USB_UART_A000-if00-port0" in warning
    other = unstable_name_warning("/dev/ttyACM0", by_id)
    assert other is not None and "match rule" in other
    assert unstable_name_warning(str(by_id / "x"), by_id) is None
    assert unstable_name_warning("/dev/ttyS0", by_id) is None  # on-board UARTs keep their names
    assert stable_aliases("/dev/ttyUSB3", tmp_path / "missing") == []


def test_list_ports_describes_each_port() -> None:
    ports = list_ports()
    assert isinstance(ports, list)
    for entry in ports:
        assert entry["device"].startswith("/dev/")
        assert set(entry) <= {"device", "byId", "vendorId", "modelId", "serial", "manufacturer",
                              "product", "location"}


def _open_fds_on(path: str | None) -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == path
        except OSError:
            pass
    return count


def test_close_is_idempotent_and_releases_the_descriptor(device: PtyDevice) -> None:
    before = _open_fds_on(device.slave_name)
    port = SerialPort.open(str(device.link))
    assert _open_fds_on(device.slave_name) == before + 1
    port.close()
    port.close()
    assert _open_fds_on(device.slave_name) == before
