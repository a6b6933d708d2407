"""A serial line that has a line speed, made of two pty pairs and a relay thread.

A pty pair alone passes bytes at any baud rate, so a scan over baud rates finds a unit at every
one. Here the client (the bridge) opens :attr:`LineSpeed.device`; what it sends reaches the
server's end (:attr:`LineSpeed.server_device`, where a pymodbus RTU server listens) only while
the client's end is set to :attr:`baud`: Linux reports a pty slave's termios through its
master, so the relay sees the speed the client chose. A pty keeps no parity bit (the kernel
clears PARENB, and pyserial then refuses to open it with parity E or O), so only parity N can
be used on it and parity is not checked.
"""

from __future__ import annotations

import os
import select
import termios
import threading
import tty
from typing import Self


class LineSpeed:
    def __init__(self, baud: int) -> None:
        self.baud = baud
        self._speed = getattr(termios, f"B{baud}")
        self._a_master, self._a_slave = os.openpty()
        self._b_master, self._b_slave = os.openpty()
        for fd in (self._a_slave, self._b_slave):
            tty.setraw(fd)
        self.device = os.ttyname(self._a_slave)
        self.server_device = os.ttyname(self._b_slave)
        self.dropped = 0  # bytes sent at another speed (lost on the line)
        self.passed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._relay, daemon=True, name="linespeed")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for fd in (self._a_master, self._a_slave, self._b_master, self._b_slave):
            os.close(fd)

    def _relay(self) -> None:
        a, b = self._a_master, self._b_master
        while not self._stop.is_set():
            ready, _, _ = select.select([a, b], [], [], 0.05)
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    continue
                if fd == a:
                    if termios.tcgetattr(a)[4] == self._speed:
                        self.passed += len(data)
                        os.write(b, data)
                    else:
                        self.dropped += len(data)
                else:
                    os.write(a, data)
