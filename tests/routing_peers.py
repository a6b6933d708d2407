"""Debian's mosquitto for the routing tests, on this suite's loopback address 127.0.4.1."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOST = "127.0.4.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Mosquitto:
    """Debian's mosquitto on a fixed port, persistent (so the subscriber's session and its
    queued messages survive a restart)."""

    def __init__(self, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work, self.port = work, free_port()
        self.conf = work / "mosquitto.conf"
        self.conf.write_text("\n".join([
            f"listener {self.port} {HOST}", "user root", "allow_anonymous true",
            "persistence true", f"persistence_location {work}/", "autosave_interval 1",
            "log_type error", f"log_dest file {work / 'mosquitto.log'}"]) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

        def up() -> bool:
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_for(up, 10, "mosquitto")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
