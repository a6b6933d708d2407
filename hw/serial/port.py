"""The serial port shell: the only module that imports pyserial.

pyserial opens and configures the tty (termios line settings, an exclusive ``flock`` so two
bridges never share a port). Reads then go straight to the file descriptor, which the event loop
watches (``loop.add_reader``): no thread, no polling, and no ``select()`` (pyserial's own
``read`` uses it, which fails for descriptors above ``FD_SETSIZE``). An unplugged adapter, a
closed pty or a vanished ``/dev/serial/by-id`` link surfaces as :class:`gateway.errors.DeviceError`
naming the configured path; the caller reopens it with backoff.

Ports should be named by their stable links (``/dev/serial/by-id/usb-FTDI_..-if00-port0``);
:func:`unstable_name_warning` explains the fix when a config names ``/dev/ttyUSB0``.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import termios
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import serial  # type: ignore[import-untyped]
from serial.tools import list_ports as _list_ports  # type: ignore[import-untyped]

from gateway.errors import DeviceError

__all__ = [
    "BY_ID",
    "LinkSettings",
    "SerialPort",
    "list_ports",
    "stable_aliases",
    "unstable_name_warning",
]

BY_ID = Path("/dev/serial/by-id")
READ_SIZE = 4096

Parity = Literal["N", "E", "O", "M", "S"]

_UNSTABLE = re.compile(r"/dev/tty(?:USB|ACM)\d+")


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkSettings:
    """Line settings (ignored by ptys, which have no baud rate)."""

    baud: int = 9600
    data_bits: Literal[5, 6, 7, 8] = 8
    parity: Parity = "N"
    stop_bits: float = 1  # 1, 1.5 or 2


class SerialPort:
    """An open serial port read without blocking the event loop."""

    __slots__ = ("_fd", "_handle", "_ready", "_watching", "device", "path")

    def __init__(self, handle: serial.Serial, path: str, device: str) -> None:
        self._handle = handle
        self._fd: int = handle.fileno()
        self._ready = asyncio.Event()
        self._watching = False
        self.path = path  # as configured
        self.device = device  # what it resolved to when opened (/dev/ttyUSB0)

    @classmethod
    def open(cls, path: str, settings: LinkSettings = LinkSettings()) -> SerialPort:
        """Open ``path`` exclusively, drop stale input, and return it. Raises DeviceError."""
        handle = serial.Serial()
        handle.port = path
        handle.baudrate = settings.baud
        handle.bytesize = settings.data_bits
        handle.parity = settings.parity
        handle.stopbits = settings.stop_bits
        handle.timeout = 0
        handle.exclusive = True
        try:
            handle.open()
            handle.reset_input_buffer()
            _nonblocking_with_vmin(handle.fileno())
        except (serial.SerialException, OSError, ValueError, termios.error) as exc:
            handle.close()
            raise DeviceError(f"cannot open: {_reason(exc)}", device_id=path) from None
        return cls(handle, path, os.path.realpath(path))

    async def read(self) -> bytes:
        """The next bytes received (at least one). Raises DeviceError when the device is gone."""
        while True:
            self._ready.clear()
            try:
                data = os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                pass
            except OSError as exc:  # EIO: adapter unplugged, pty master closed
                raise DeviceError(f"read failed: {_reason(exc)}", device_id=self.path) from None
            else:
                if data:
                    return data
                raise DeviceError("device disconnected (end of file)", device_id=self.path)
            if not self._watching:
                asyncio.get_running_loop().add_reader(self._fd, self._ready.set)
                self._watching = True
            await self._ready.wait()

    def write(self, data: bytes) -> None:
        """Queue ``data`` for sending (small commands; the tty buffers them)."""
        try:
            self._handle.write(data)
        except (serial.SerialException, OSError) as exc:
            raise DeviceError(f"write failed: {_reason(exc)}", device_id=self.path) from None

    def close(self) -> None:
        if self._watching:
            self._watching = False
            try:
                asyncio.get_running_loop().remove_reader(self._fd)
            except RuntimeError:  # no running loop: the loop is gone and with it the reader
                pass
        self._handle.close()


def _nonblocking_with_vmin(fd: int) -> None:
    """pyserial leaves VMIN=0, where a read with nothing buffered returns ``b""`` just as a
    hung-up tty does. With VMIN=1 and O_NONBLOCK an empty buffer is ``EAGAIN``, so ``b""``
    means end of file: the adapter is gone (POSIX termios, "Non-Canonical Mode Input")."""
    attrs = termios.tcgetattr(fd)
    attrs[6][termios.VMIN] = 1
    attrs[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    # fcntl rather than os.set_blocking, which uses ioctl(FIONBIO): not every tty driver (nor
    # umockdev's emulation) implements that ioctl.
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


def _reason(exc: BaseException) -> str:
    """A short reason: pyserial repeats the path and the errno in its messages."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    if isinstance(exc, serial.SerialException) and exc.args and isinstance(exc.args[0], int):
        return f"[Errno {exc.args[0]}] {os.strerror(exc.args[0])}"
    return str(exc)


def stable_aliases(device: str, directory: Path = BY_ID) -> list[str]:
    """The links in ``directory`` (``/dev/serial/by-id``) that resolve to ``device``."""
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return []
    target = os.path.realpath(device)
    return [str(p) for p in entries if os.path.realpath(p) == target]


def unstable_name_warning(path: str, directory: Path = BY_ID) -> str | None:
    """A warning when ``path`` is a kernel name that changes with plug order (``ttyUSB0``,
    ``ttyACM1``), naming the stable link to use instead when one exists; else ``None``."""
    if not _UNSTABLE.fullmatch(path):
        return None
    aliases = stable_aliases(path, directory)
    hint = f"use {aliases[0]}" if aliases else f"use a link in {directory} or a match rule"
    return f"{path} can name another adapter after a replug or reboot; {hint}"


def list_ports(directory: Path = BY_ID) -> list[dict[str, Any]]:
    """Serial ports present, with their stable link and USB identity (a port picker)."""
    aliases: dict[str, str] = {}
    try:
        for link in sorted(directory.iterdir()):
            aliases.setdefault(os.path.realpath(link), str(link))
    except OSError:
        pass
    out: list[dict[str, Any]] = []
    for info in sorted(_list_ports.comports(), key=lambda i: i.device):
        entry: dict[str, Any] = {"device": info.device, "byId": aliases.get(info.device)}
        if info.vid is not None and info.pid is not None:
            entry["vendorId"] = f"{info.vid:04x}"
            entry["modelId"] = f"{info.pid:04x}"
        for key, value in (
            ("serial", info.serial_number),
            ("manufacturer", info.manufacturer),
            ("product", info.product),
            ("location", info.location),
        ):
            if value:
                entry[key] = value
        out.append(entry)
    return out
