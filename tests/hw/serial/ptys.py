"""A serial device on the far side of a pty pair, reachable through a stable-looking link.

``plug()`` makes a pty pair and points ``link`` (standing in for ``/dev/serial/by-id/...``) at
its slave; ``unplug()`` closes the master, so reads on the slave fail the way they do when a USB
adapter is pulled, and removes the link, as udev does. Ptys do not emulate baud rate, parity or
modem lines (appliance.md §3.1).
"""

from __future__ import annotations

import os
import tty
from pathlib import Path


class PtyDevice:
    def __init__(self, link: Path) -> None:
        self.link = link
        self.master: int | None = None
        self._slave: int | None = None
        self.slave_name: str | None = None

    def plug(self) -> PtyDevice:
        assert self.master is None, "already plugged"
        master, slave = os.openpty()
        tty.setraw(master)
        self.master, self._slave = master, slave
        self.slave_name = os.ttyname(slave)
        self.link.parent.mkdir(parents=True, exist_ok=True)
        self.link.symlink_to(self.slave_name)
        return self

    def unplug(self) -> None:
        assert self.master is not None, "not plugged"
        self.link.unlink()
        os.close(self.master)
        if self._slave is not None:
            os.close(self._slave)
        self.master = self._slave = None

    def send(self, data: bytes) -> None:
        assert self.master is not None, "not plugged"
        os.write(self.master, data)

    def received(self, size: int = 4096) -> bytes:
        assert self.master is not None, "not plugged"
        os.set_blocking(self.master, False)
        try:
            return os.read(self.master, size)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        if self.master is not None:
            self.unplug()


