"""sd_notify through systemd-python when installed, the built-in socket code otherwise."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gateway.notify import Notifier, _systemd_notify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


@pytest.mark.parametrize("use_systemd", [True, False])
def test_ready_status_watchdog_stopping(notify_socket: socket.socket, use_systemd: bool) -> None:
    notifier = Notifier(use_systemd=use_systemd)
    if use_systemd:
        if _systemd_notify() is None:
            pytest.skip("systemd-python is not installed")
        assert notifier.backend is not None
    else:
        assert notifier.backend is None
    assert notifier.watchdog_interval == 2.0
    assert notifier.ready("serving")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving"
    assert notifier.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert notifier.status("2 modules")
    assert notify_socket.recv(4096) == b"STATUS=2 modules"
    assert notifier.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_no_socket_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notifier = Notifier()
    assert notifier.watchdog_interval is None
    assert not notifier.ready("x")


def test_watchdog_meant_for_another_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert Notifier().watchdog_interval is None
