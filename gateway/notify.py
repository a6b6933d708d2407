"""systemd's notify protocol (sd_notify(3)): READY=1, WATCHDOG=1, STATUS=, STOPPING=1.

A datagram to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Without the
variable (not run by systemd) every call is a no-op. Sent through systemd-python's
``systemd.daemon.notify`` when it is installed (Debian's python3-systemd in the image), else by
the few lines below, so the hub runs the same with or without it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable


def _systemd_notify() -> Callable[[str], bool] | None:
    try:
        from systemd import daemon  # type: ignore[import-not-found,attr-defined,unused-ignore]
    except ImportError:
        return None
    notify: Callable[[str], bool] = daemon.notify
    return notify


class Notifier:
    def __init__(self, address: str | None = None, *, use_systemd: bool = True) -> None:
        from_env = address is None
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        # systemd.daemon.notify reads $NOTIFY_SOCKET itself, so it serves only that address.
        self.backend = _systemd_notify() if use_systemd and from_env else None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2_000_000 if usec.isdigit() and ours else None

    def send(self, *lines: str) -> bool:
        if not self.address:
            return False
        if self.backend is not None:
            return bool(self.backend("\n".join(lines)))
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

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")
