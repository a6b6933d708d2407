"""Issue 16, the idle footprint: the service API's port listens from READY, but aiohttp and the
API's routes are loaded only with the first connection (gateway.api.lazy), which then works
as it always did, with the connections that came together with it."""

from __future__ import annotations

import asyncio
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.api.lazy import LazyApi
from gateway.hubclient import ApiError, HubClient
from tests.hubproc import HubProcess


def aiohttp_mapped(pid: int) -> bool:
    """Whether aiohttp's compiled modules (its HTTP parser, writer, WebSocket reader) are
    loaded in process ``pid`` (proc(5) maps): imported by ``aiohttp.web`` and its client."""
    return any("/aiohttp/" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def test_the_api_is_loaded_with_its_first_connection(hub: HubProcess) -> None:
    time.sleep(1.0)  # idle for a moment after READY: nothing loads it on its own
    assert not aiohttp_mapped(hub.pid), "an idle hub loaded aiohttp"
    assert "https service api listening" in hub.log_text()
    assert "https service api built" not in hub.log_text()
    # The port is listening (the kernel takes the connection into the backlog), and the first
    # requests, several at once, are all answered once the API is built.
    client = HubClient(hub.data_dir)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: client.request("GET", "/statistics/devices"),
                                range(4)))
    assert answers == [{"totalDeviceCount": 0, "enabledDeviceCount": 0,
                        "disabledDeviceCount": 0}] * 4
    assert aiohttp_mapped(hub.pid)  # the check above looks at the right thing
    assert hub.log_text().count("https service api built") == 1
    device = client.request("PUT", "/devices/lazy-1", {"deviceId": "lazy-1"})
    assert device["deviceId"] == "lazy-1"
    with pytest.raises(ApiError) as refused:  # authorized as ever
        client.request("GET", "/devices", headers={"Authorization": "SharedAccessSignature x"})
    assert refused.value.status == 401


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def test_an_api_that_cannot_be_built_stops_the_hub() -> None:
    """A build that fails is logged, its port refuses from then on, and ``run`` (a task of the
    hub's TaskGroup) raises it: the hub stops, as it did when the API failed at start."""
    def build(port: int) -> object:
        raise RuntimeError(f"no api on {port}")

    lazy = LazyApi(build)  # type: ignore[arg-type]
    await lazy.start("127.0.0.1", 0, None)
    runner = asyncio.ensure_future(lazy.run())
    with socket.create_connection(("127.0.0.1", lazy.port), timeout=5):
        with pytest.raises(RuntimeError, match="no api on"):
            await asyncio.wait_for(runner, 10)
    assert await _refused(lazy.port)
    assert lazy.api is None
    await lazy.stop()


async def test_stopped_before_any_connection_the_port_closes() -> None:
    built = []
    lazy = LazyApi(lambda port: built.append(port))  # type: ignore[arg-type, func-returns-value]
    await lazy.start("127.0.0.1", 0, None)
    await lazy.stop()
    assert await _refused(lazy.port)
    assert built == []
