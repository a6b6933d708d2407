"""The accept loop of gateway.broker.listener: caps per address and in total, and running out
of file descriptors (logged once, accepting again as soon as a connection closes), on both
event loops the hub may run on."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from gateway.broker.listener import Admission, Listener, listening_socket

LOOPS: dict[str, Callable[[Coroutine[Any, Any, Any]], Any]] = {
    "asyncio": asyncio.run, "uvloop": uvloop.run}


class Echo(asyncio.Protocol):
    opened: list[Echo] = []
    total = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        Echo.opened.append(self)
        Echo.total += 1

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


def connect_from(address: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((address, 0))
    s.connect(("127.0.2.1", port))
    return s


def served(s: socket.socket) -> bool:
    """True if the listener kept the connection (it echoes), False if it closed it."""
    s.settimeout(5)
    try:
        s.sendall(b"x")
        return s.recv(1) == b"x"
    except (ConnectionResetError, BrokenPipeError, TimeoutError):
        return False


async def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("runner", LOOPS)
def test_caps_per_address_and_in_total(runner: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "gateway.broker.listener")
    Echo.opened = []

    async def main() -> None:
        admission = Admission(max_connections=25, max_per_address=10)
        listener = Listener(listening_socket("127.0.2.1", 0), Echo, admission, name="test")
        listener.start()
        port = int(listener.port)
        first = [connect_from("127.0.2.2", port) for _ in range(15)]
        kept = [await asyncio.to_thread(served, s) for s in first]
        assert kept.count(True) == 10 and admission.by_address == {"127.0.2.2": 10}
        others = [connect_from("127.0.2.3", port) for _ in range(10)]
        others += [connect_from("127.0.2.4", port) for _ in range(10)]
        kept = [await asyncio.to_thread(served, s) for s in others]
        assert kept.count(True) == 15 and admission.total == 25  # the total cap
        for s in first + others:
            s.close()
        await wait_for(lambda: admission.total == 0 and not admission.by_address)
        again = connect_from("127.0.2.2", port)
        assert await asyncio.to_thread(served, again)
        again.close()
        listener.close()

    LOOPS[runner](main())
    text = caplog.text
    assert text.count("per-address connection cap reached for 127.0.2.2") == 1  # once per burst
    assert "connection cap reached (25 open)" in text
    assert "accepting connections again from 127.0.2.2 (5 refused)" in text


@pytest.mark.parametrize("runner", LOOPS)
def test_out_of_descriptors_is_logged_once_and_accepting_resumes(
        runner: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "gateway.broker.listener")
    Echo.opened, Echo.total = [], 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    async def main() -> None:
        admission = Admission(max_connections=10_000, max_per_address=10_000)
        listener = Listener(listening_socket("127.0.2.1", 0), Echo, admission, name="test")
        listener.start()
        port = int(listener.port)
        clients = []
        for _ in range(30):
            s = socket.socket()
            s.bind(("127.0.2.5", 0))
            clients.append(s)
        highest = max(s.fileno() for s in clients)
        # Room for about 10 more descriptors: the listener can take 10 of the 30 coming.
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 10, hard))
        try:
            for s in clients:
                s.connect(("127.0.2.1", port))  # completes in the backlog, no accept needed
            await wait_for(lambda: Echo.total >= 5)
            await asyncio.sleep(0.3)  # it keeps hitting the limit meanwhile
            assert Echo.total < 30
            while Echo.total < 30:  # each closed connection lets the next one in at once
                proto = Echo.opened.pop(0)
                before = Echo.total
                proto.transport.close()
                await wait_for(lambda: Echo.total > before, timeout=1.0)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for s in clients:
            s.close()
        listener.close()

    LOOPS[runner](main())
    assert caplog.text.count("out of file descriptors listener=test") == 1
