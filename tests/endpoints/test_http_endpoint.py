"""The http endpoint against a local aiohttp collector: batches, headers, TLS, 5xx and 429
retried, other 4xx dead-lettered."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.endpoints.manager import EndpointManager, Tuning
from gateway.endpoints.spec import parse_endpoint
from gateway.pki import ensure_certificates
from gateway.store import Entry, MessageLog
from tests.endpoints.peers import open_log, record
from tests.endpoints.test_mqtt_endpoint import running
from tests.waiting import eventually

FAST = Tuning(backoff_initial=0.05, backoff_max=0.3, dead_after=3.0)
HOST = "127.0.5.2"


class Collector:
    """Answers each POST with ``answer(body)`` and keeps what it accepted (2xx)."""

    def __init__(self, answer: Callable[[Any], int] = lambda _body: 200) -> None:
        self.answer = answer
        self.requests: list[tuple[int, Any, dict[str, str]]] = []
        self.accepted: list[Any] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        status = self.answer(body)
        self.requests.append((status, body, dict(request.headers)))
        if 200 <= status < 300:
            self.accepted.append(body)
        return web.Response(status=status, text="" if status < 300 else "no thanks")

    def messages(self) -> list[Any]:
        return [m for body in self.accepted for m in (body if isinstance(body, list) else [body])]


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[MessageLog]:
    db, log = await open_log(tmp_path / "hub.db")
    yield log
    await db.close()


async def serve(collector: Collector, context: ssl.SSLContext | None = None
                ) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_post("/in", collector.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


def everything(_name: str):  # type: ignore[no-untyped-def]
    return lambda _e: True


def enrich(_name: str, _entry: Entry) -> dict[str, str]:
    return {"via": "http"}


async def test_batches_headers_and_order(tmp_path: Path, log: MessageLog) -> None:
    collector = Collector()
    server, port = await serve(collector)
    try:
        manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, tuning=FAST)
        spec = parse_endpoint("c", {"type": "http", "url": f"http://{HOST}:{port}/in",
                                    "batch": 10, "headers": {"Authorization": "Bearer t0k",
                                                             "X-Site": "7"}})
        one = parse_endpoint("one", {"type": "http", "url": f"http://{HOST}:{port}/in"})
        await manager.apply([spec, one], lambda n: lambda e: n == "c" or e.device_id == "d0",
                            enrich)
        async with running(manager):
            await log.append([record(f"d{i % 2}", i) for i in range(25)])
            await eventually(lambda: len(collector.messages()) == 25 + 13, 10, "all posts")
            health = manager.health("c")[0]
        arrays = [body for _s, body, _h in collector.requests if isinstance(body, list)]
        objects = [body for _s, body, _h in collector.requests if isinstance(body, dict)]
        assert [len(a) for a in arrays] == [10, 10, 5]
        assert [m["body"]["i"] for a in arrays for m in a] == list(range(25))
        assert [m["body"]["i"] for m in objects] == list(range(0, 25, 2))
        assert arrays[0][0]["properties"] == {"i": "0", "via": "http"}
        assert arrays[0][0]["systemProperties"]["iothub-connection-device-id"] == "d0"
        headers = next(h for _s, b, h in collector.requests if isinstance(b, list))
        assert headers["Authorization"] == "Bearer t0k" and headers["X-Site"] == "7"
        assert headers["Content-Type"] == "application/json"
        assert health["healthStatus"] == "healthy" and health["delivered"] == 25
    finally:
        await server.cleanup()


async def test_5xx_and_429_are_retried_in_order(tmp_path: Path, log: MessageLog) -> None:
    answers = iter([503, 429, 500])
    collector = Collector(lambda _body: next(answers, 200))
    server, port = await serve(collector)
    try:
        manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, tuning=FAST)
        spec = parse_endpoint("c", {"type": "http", "url": f"http://{HOST}:{port}/in",
                                    "batch": 4})
        await manager.apply([spec], everything, enrich)
        async with running(manager):
            await log.append([record("d", i) for i in range(6)])
            await eventually(lambda: len(collector.messages()) == 6, 10, "delivered")
            health = manager.health("c")[0]
        statuses = [s for s, _b, _h in collector.requests]
        assert statuses == [503, 429, 500, 200, 200]
        first_four = [[m["body"]["i"] for m in b] for _s, b, _h in collector.requests[:4]]
        assert first_four == [[0, 1, 2, 3]] * 4  # the same batch again, nothing skipped
        assert [m["body"]["i"] for m in collector.messages()] == list(range(6))
        assert health["retries"] == 3 and health["deadLettered"] == 0
        assert "HTTP 500" in health["lastError"] and health["healthStatus"] == "healthy"
    finally:
        await server.cleanup()


async def test_other_4xx_is_dead_lettered_and_counted(tmp_path: Path, log: MessageLog) -> None:
    collector = Collector(lambda body: 400 if body["body"]["i"] % 3 == 0 else 200)
    server, port = await serve(collector)
    try:
        manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, tuning=FAST)
        spec = parse_endpoint("c", {"type": "http", "url": f"http://{HOST}:{port}/in"})
        await manager.apply([spec], everything, enrich)
        async with running(manager):
            await log.append([record("d", i) for i in range(9)])
            await eventually(lambda: manager.health("c")[0]["backlog"] == 0, 10, "drained")
            health = manager.health("c")[0]
        assert [m["body"]["i"] for m in collector.messages()] == [1, 2, 4, 5, 7, 8]
        assert health["deadLettered"] == 3 and health["delivered"] == 6
        assert health["retries"] == 0 and "HTTP 400" in health["lastError"]
        assert len(collector.requests) == 9  # each refused message posted once
    finally:
        await server.cleanup()


async def test_https_with_ca_file_and_a_down_collector(tmp_path: Path, log: MessageLog) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    ensure_certificates(certs, host_names=["collector.test"], addresses=[HOST])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    collector = Collector()
    manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, tuning=FAST)
    server, port = await serve(collector, context)
    await server.cleanup()  # the collector is down: the port is known but refuses
    spec = parse_endpoint("s", {"type": "http", "url": f"https://{HOST}:{port}/in",
                                "caFile": str(certs / "ca.pem")})
    await manager.apply([spec], everything, enrich)
    async with running(manager):
        await log.append([record("d", i) for i in range(3)])
        await eventually(lambda: manager.health("s")[0]["retries"] >= 2, 10, "retrying")
        assert manager.health("s")[0]["healthStatus"] == "unhealthy"
        app = web.Application()
        app.router.add_post("/in", collector.handle)
        server = web.AppRunner(app)
        await server.setup()
        await web.TCPSite(server, HOST, port, ssl_context=context).start()
        try:
            await eventually(lambda: len(collector.messages()) == 3, 10, "delivered over TLS")
            assert manager.health("s")[0]["healthStatus"] == "healthy"
        finally:
            await server.cleanup()
    assert [m["body"]["i"] for m in collector.messages()] == [0, 1, 2]


async def test_a_refused_batch_is_split_so_only_the_bad_message_is_lost(
        tmp_path: Path, log: MessageLog) -> None:
    def answer(body: Any) -> int:
        return 422 if any(m["body"]["i"] == 3 for m in body) else 200

    collector = Collector(answer)
    server, port = await serve(collector)
    try:
        manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, tuning=FAST)
        spec = parse_endpoint("c", {"type": "http", "url": f"http://{HOST}:{port}/in",
                                    "batch": 5})
        await manager.apply([spec], everything, enrich)
        async with running(manager):
            await log.append([record("d", i) for i in range(8)])
            await eventually(lambda: manager.health("c")[0]["backlog"] == 0, 10, "drained")
            health = manager.health("c")[0]
        assert [m["body"]["i"] for m in collector.messages()] == [0, 1, 2, 4, 5, 6, 7]
        assert [len(b) for _s, b, _h in collector.requests] == [5, 1, 1, 1, 1, 1, 3]
        assert health["deadLettered"] == 1 and health["delivered"] == 7
        assert "HTTP 422" in health["lastError"]
    finally:
        await server.cleanup()
