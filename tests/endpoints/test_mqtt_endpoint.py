"""The mqtt endpoint against Debian's mosquitto, checked by a paho subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.endpoints.manager import EndpointManager, Tuning
from gateway.endpoints.spec import parse_endpoint
from gateway.hub.propbag import decode_bag
from gateway.pki import ensure_certificates
from gateway.store import Entry, MessageLog
from tests import waiting
from tests.endpoints.peers import HOST, Mosquitto, Subscriber, open_log, record
from tests.waiting import eventually

FAST = Tuning(backoff_initial=0.05, backoff_max=0.3, dead_after=3.0)


@contextlib.asynccontextmanager
async def running(manager: EndpointManager) -> AsyncIterator[EndpointManager]:
    task = asyncio.create_task(manager.run())
    try:
        yield manager
    finally:
        await waiting.stop(task)


def by_device(*devices: str):  # type: ignore[no-untyped-def]
    return lambda _name: (lambda entry: entry.device_id in devices)


def no_enrich(_name: str, _entry: Entry) -> dict[str, str]:
    return {}


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[MessageLog]:
    db, log = await open_log(tmp_path / "hub.db")
    yield log
    await db.close()


async def test_body_and_json_envelopes(tmp_path: Path, log: MessageLog) -> None:
    broker = Mosquitto(tmp_path / "broker", persist=False)
    broker.start()
    sub = Subscriber(broker.port).start()
    try:
        manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, tuning=FAST)
        specs = [
            parse_endpoint("raw", {"type": "mqtt", "url": broker.url, "qos": 1,
                                   "topic": "raw/{deviceId}/{moduleId}"}),
            parse_endpoint("doc", {"type": "mqtt", "url": broker.url, "qos": 0,
                                   "envelope": "json", "topic": "doc/{deviceId}"}),
        ]

        def select(name: str):  # type: ignore[no-untyped-def]
            return lambda e: name == "raw" or e.device_id == "d2"

        def enrich(name: str, entry: Entry) -> dict[str, str]:
            return {"site": "plant 7", "to": name} if name == "doc" else {"site": "p&7/#"}

        await manager.apply(specs, select, enrich)
        assert [h["healthStatus"] for h in manager.health()] == ["unknown", "unknown"]
        async with running(manager):
            await log.append([record("d1", 0), record("d2", 1, module="m/1"),
                              record("d2", 2, body=b"\xff\x00", content_type=None,
                                     app={"bare": None, "k": "v=1&2"})])
            await eventually(lambda: len(sub.messages) == 5, 10, "five messages")
            health = {h["endpointId"]: h for h in manager.health()}
        raw = [m for m in sub.messages if m.topic.startswith("raw/")]
        doc = [m for m in sub.messages if m.topic.startswith("doc/")]
        assert [m.topic.rsplit("/", 1)[0] for m in raw] == ["raw/d1/", "raw/d2/m/1", "raw/d2/"]
        assert raw[0].payload == b'{"device":"d1","i":0}' and raw[2].payload == b"\xff\x00"
        bag = dict(decode_bag(raw[0].topic.rsplit("/", 1)[1]))
        assert bag["i"] == "0" and bag["site"] == "p&7/#"  # enrichment, escaped in the bag
        assert bag["$.mid"] == "d1-0" and bag["$.ct"] == "application/json"
        assert bag["$.cdid"] == "d1"
        assert dict(decode_bag(raw[1].topic.rsplit("/", 1)[1]))["$.cmid"] == "m/1"
        bag2 = decode_bag(raw[2].topic.rsplit("/", 1)[1])
        assert ("bare", None) in bag2 and ("k", "v=1&2") in bag2

        assert [m.topic for m in doc] == ["doc/d2", "doc/d2"]
        first, second = (json.loads(m.payload) for m in doc)
        assert first["body"] == {"device": "d2", "i": 1}
        assert first["properties"] == {"i": "1", "site": "plant 7", "to": "doc"}
        system = first["systemProperties"]
        assert system["message_id"] == "d2-1" and system["content_type"] == "application/json"
        assert system["iothub-connection-device-id"] == "d2"
        assert system["iothub-connection-module-id"] == "m/1"
        assert system["iothub-enqueuedtime"] == 1_764_583_200_001
        assert system["x-opt-sequence-number"] == 2
        assert second["body"] == "/wA=" and second["bodyEncoding"] == "base64"
        assert second["properties"]["bare"] is None
        assert health["raw"]["healthStatus"] == "healthy" and health["raw"]["delivered"] == 3
        assert health["doc"]["delivered"] == 2 and health["doc"]["backlog"] == 0
        assert await log.get_cursor("endpoint/raw") == 3
    finally:
        sub.stop()
        broker.stop()


async def test_tls_with_ca_file_and_password(tmp_path: Path, log: MessageLog) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    ensure_certificates(certs, host_names=["broker.test"], addresses=[HOST])
    ca, cert, key = (str(certs / n) for n in ("ca.pem", "server.pem", "server.key"))
    broker = Mosquitto(tmp_path / "broker", tls=(ca, cert, key), users={"gw": "s3cret"},
                       persist=False)
    broker.start()
    sub = Subscriber(broker.port, tls_ca=ca, username="gw", password="s3cret").start()
    good = tmp_path / "pw"
    good.write_text("s3cret\n")
    bad = tmp_path / "bad"
    bad.write_text("wrong")
    try:
        manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, tuning=FAST)
        doc = {"type": "mqtt", "url": f"mqtts://{HOST}:{broker.port}", "topic": "t/{deviceId}",
               "caFile": ca, "username": "gw", "passwordFile": str(bad)}
        await manager.apply([parse_endpoint("tls", doc)], by_device("d1"), no_enrich)
        async with running(manager):
            await log.append([record("d1", i) for i in range(5)])
            health = await eventually(
                lambda: [h for h in manager.health("tls") if h["healthStatus"] == "unhealthy"],
                10, "unhealthy with a wrong password")
            assert "refused" in health[0]["lastError"].lower() or "not authori" in \
                health[0]["lastError"].lower(), health[0]["lastError"]
            assert health[0]["backlog"] == 5 and sub.messages == []
            await manager.apply([parse_endpoint("tls", {**doc, "passwordFile": str(good)})],
                                by_device("d1"), no_enrich)
            await eventually(lambda: len(sub.messages) == 5, 10, "messages over TLS")
            assert manager.health("tls")[0]["healthStatus"] == "healthy"
        assert [json.loads(m.payload)["i"] for m in sub.messages] == list(range(5))
    finally:
        sub.stop()
        broker.stop()


def first_occurrences(seen: list[tuple[str, int]]) -> dict[str, list[int]]:
    """Per device, the message numbers in the order they first arrived (at least once: a
    message whose PUBACK the outage swallowed comes again, later)."""
    out: dict[str, list[int]] = {}
    done: set[tuple[str, int]] = set()
    for key in seen:
        if key not in done:
            done.add(key)
            out.setdefault(key[0], []).append(key[1])
    return out


@pytest.mark.slow
async def test_broker_restart_loses_nothing_and_keeps_order(tmp_path: Path,
                                                           log: MessageLog) -> None:
    broker = Mosquitto(tmp_path / "broker", persist=True)
    broker.start()
    sub = Subscriber(broker.port, client_id="restart-sub").start()
    devices = ("d0", "d1", "d2")
    total = 300
    try:
        manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, tuning=FAST)
        spec = parse_endpoint("out", {"type": "mqtt", "url": broker.url, "envelope": "json",
                                      "topic": "out/{deviceId}", "maxInflight": 8})
        await manager.apply([spec], by_device(*devices), no_enrich)
        async with running(manager):

            async def produce() -> None:
                for i in range(total):
                    await log.append([record(devices[i % 3], i)])
                    await asyncio.sleep(0.005)

            producer = asyncio.create_task(produce())
            await eventually(lambda: len(sub.messages) >= 60, 20, "first messages")
            broker.stop()
            await eventually(lambda: manager.health("out")[0]["healthStatus"] == "unhealthy",
                             20, "endpoint notices the broker is gone")
            await asyncio.sleep(0.5)  # messages keep coming while the broker is down
            assert manager.health("out")[0]["backlog"] > 0
            broker.start()
            await producer
            await eventually(lambda: len({m.payload for m in sub.messages}) >= total, 30,
                             "every message after the restart")
            await eventually(lambda: manager.health("out")[0]["backlog"] == 0, 10, "acked")
            health = manager.health("out")[0]
        seen = [(json.loads(m.payload)["body"]["device"], json.loads(m.payload)["body"]["i"])
                for m in sub.messages]
        order = first_occurrences(seen)
        for k, device in enumerate(devices):
            assert order[device] == list(range(k, total, 3)), device
        assert health["healthStatus"] == "healthy" and health["retries"] >= 1
        assert health["delivered"] >= total and health["backlog"] == 0
        assert health["lastError"]
    finally:
        sub.stop()
        broker.stop()
