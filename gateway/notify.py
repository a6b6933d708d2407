"""systemd's notify protocol (sd_notify(3)): READY=1, WATCHDOG=1, STATUS=, STOPPING=1.

A datagram to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Without the
variable (not run by systemd) every call is a no-op. Written here instead of importing
systemd-python so that the hub runs the same with or without it installed.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2_000_000 if usec.isdigit() and ours else None

    def send(self, *lines: str) -> bool:
        if not self.address:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto("\n".join(lines).encode(), target)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")
