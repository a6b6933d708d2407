"""The manager's life cycle (cursors, live reconfiguration, delete, health states) and the
runner's pieces (backoff, acknowledgement prefix)."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.endpoints.envelope import Delivery
from gateway.endpoints.manager import EndpointManager, Tuning
from gateway.endpoints.runner import Backoff, Progress
from gateway.endpoints.spec import parse_endpoint
from gateway.errors import InvalidRequestError, NotFoundError
from gateway.hub.drops import EnrichedDrops
from gateway.hub.messages import message_from_stored, message_size
from gateway.store import Entry, MessageLog, Record
from tests.endpoints.peers import Mosquitto, Subscriber, free_port, open_log, record
from tests.endpoints.test_files import read_jsonl
from tests.endpoints.test_mqtt_endpoint import running
from tests.waiting import eventually


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[MessageLog]:
    db, log = await open_log(tmp_path / "hub.db")
    yield log
    await db.close()


def no_enrich(_name: str, _entry: Entry) -> dict[str, str]:
    return {}


def test_backoff_is_jittered_capped_exponential() -> None:
    backoff = Backoff(1.0, 8.0, random.Random(7))
    delays = [backoff.next() for _ in range(8)]
    for n, delay in enumerate(delays):
        top = min(2.0**n, 8.0)
        assert top / 2 <= delay <= top
    assert len(set(delays)) == len(delays)
    backoff.reset()
    assert backoff.next() <= 1.0


def test_progress_moves_over_the_settled_prefix_only() -> None:
    batch = [Delivery(i, "telemetry", "d", None, 0, b"", {}, {}) for i in (3, 5, 9, 10)]
    progress = Progress(batch)
    progress.ack(1)
    progress.ack(3)
    assert progress.prefix == 0
    progress.dead_letter(0, "refused")
    assert progress.prefix == 2 and not progress.complete
    progress.ack_through(4)
    assert progress.complete and (progress.delivered, progress.dead) == (3, 1)


async def test_cursor_life_cycle_and_live_reselection(tmp_path: Path, log: MessageLog) -> None:
    await log.append([record("old", i) for i in range(5)])  # before the endpoint existed
    out = tmp_path / "out"
    spec = parse_endpoint("arch", {"type": "file", "path": str(out)})
    manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path,
                              tuning=Tuning(backoff_initial=0.05, backoff_max=0.2))
    wanted = {"a"}
    await manager.apply([spec], lambda _n: lambda e: e.device_id in wanted, no_enrich)
    assert await log.get_cursor("endpoint/arch") == 5  # starts at the end, pinned
    assert log._cursors["endpoint/arch"] == (5, True)
    with pytest.raises(InvalidRequestError):
        await manager.apply([spec, spec], lambda _n: lambda _e: True, no_enrich)
    with pytest.raises(NotFoundError):
        manager.health("nope")
    async with running(manager):
        await log.append([record("a", 0), record("b", 1)])
        await eventually(lambda: manager.health("arch")[0]["delivered"] == 1, 10, "a only")
        wanted.add("b")  # select is asked again for every batch
        await log.append([record("a", 2), record("b", 3)])
        await eventually(lambda: manager.health("arch")[0]["delivered"] == 3, 10, "a and b")
        # A changed spec restarts the runner and keeps the cursor.
        await manager.apply([parse_endpoint("arch", {"type": "file", "path": str(out),
                                                     "rollBytes": 100})],
                            lambda _n: lambda _e: True, no_enrich)
        await log.append([record("c", 4)])
        await eventually(lambda: manager.health("arch")[0]["backlog"] == 0, 10, "c")
        # Leaving the set stops the endpoint but keeps its cursor (and what it pins).
        await manager.apply([], lambda _n: lambda _e: True, no_enrich)
        assert manager.health() == []
        await log.append([record("a", 5)])
        assert await log.get_cursor("endpoint/arch") == 10
        await manager.apply([spec], lambda _n: lambda _e: True, no_enrich)
        await eventually(lambda: manager.health("arch")[0]["delivered"] == 1, 10, "resumed")
        await manager.delete("arch")
        assert await log.get_cursor("endpoint/arch") is None and manager.health() == []
    assert [line["body"]["i"] for line in read_jsonl(out)] == [0, 2, 3, 4, 5]


async def test_health_goes_unhealthy_then_dead_and_keeps_everything(tmp_path: Path,
                                                                    log: MessageLog) -> None:
    port = free_port()  # nobody listens
    spec = parse_endpoint("m", {"type": "mqtt", "url": f"mqtt://127.0.5.1:{port}",
                                "topic": "t"})
    manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path,
                              tuning=Tuning(backoff_initial=0.05, backoff_max=0.1,
                                            dead_after=0.6))
    await manager.apply([spec], lambda _n: lambda _e: True, no_enrich)
    assert manager.health("m")[0]["healthStatus"] == "unknown"
    async with running(manager):
        await log.append([record("d", i) for i in range(4)])
        await eventually(lambda: manager.health("m")[0]["healthStatus"] == "unhealthy", 10,
                         "unhealthy")
        health = await eventually(
            lambda: [h for h in manager.health("m") if h["healthStatus"] == "dead"], 10, "dead")
    assert health[0]["backlog"] == 4 and health[0]["retries"] >= 2
    assert health[0]["lastError"] and health[0]["lastErrorTime"].endswith("Z")
    assert await log.get_cursor("endpoint/m") == 0  # nothing given up while dead


def big_record(device: str, i: int, size: int) -> Record:
    """A record of ``size`` bytes as IoT Hub counts them (ref §2.4)."""
    small = record(device, i)
    message = message_from_stored(small.props, b"")
    room = size - message_size(b"", message.system, message.application)
    return record(device, i, body=b'"' + b"x" * (room - 2) + b'"')


async def test_a_message_enrichments_push_over_256_kb_is_dropped_for_that_endpoint_only(
        tmp_path: Path, log: MessageLog, caplog: pytest.LogCaptureFixture) -> None:
    """IoT Hub ref §10.4: the enriched endpoints' far sides get the messages before and after
    it, in order; the endpoint without enrichments gets all three; health counts the drop,
    the cursors move past it, and it is logged once."""
    broker = Mosquitto(tmp_path / "broker", persist=False)
    broker.start()
    sub = Subscriber(broker.port).start()
    try:
        drops = EnrichedDrops()
        manager = EndpointManager(log, hub_name="hub1", data_dir=tmp_path, drops=drops,
                                  tuning=Tuning(backoff_initial=0.05, backoff_max=0.2))
        specs = [parse_endpoint("broker", {"type": "mqtt", "url": broker.url, "topic": "t"}),
                 parse_endpoint("archive", {"type": "file", "path": str(tmp_path / "a")}),
                 parse_endpoint("plain", {"type": "file", "path": str(tmp_path / "p")})]

        def enrich(name: str, _entry: Entry) -> dict[str, str]:
            return {} if name == "plain" else {"site": "p" * 128, "line": "l" * 128}  # +264

        await manager.apply(specs, lambda _n: lambda _e: True, enrich)
        big = big_record("d1", 1, 262_000)
        message = message_from_stored(big.props, big.body)
        assert message_size(big.body, message.system, message.application) == 262_000
        with caplog.at_level("WARNING", logger="gateway.hub.drops"):
            async with running(manager):
                await log.append([record("d1", 0), big, record("d1", 2)])
                await eventually(lambda: len(sub.messages) == 2, 10, "two messages")
                await eventually(lambda: all(h["backlog"] == 0 for h in manager.health()), 10,
                                 "every endpoint past the three")
                health = {h["endpointId"]: h for h in manager.health()}
                await log.append([record("d1", 3)])  # and on: no redelivery, no loop
                await eventually(lambda: len(sub.messages) == 3, 10, "the next one")
        assert [json.loads(m.payload)["i"] for m in sub.messages] == [0, 2, 3]
        assert [line["body"]["i"] for line in read_jsonl(tmp_path / "a")] == [0, 2, 3]
        plain = read_jsonl(tmp_path / "p")
        assert [line["systemProperties"]["x-opt-sequence-number"] for line in plain] == [1, 2, 3,
                                                                                      4]
        assert len(plain[1]["body"]) == len(big.body) - 2
        for name in ("broker", "archive"):
            assert health[name]["deadLettered"] == 1 and health[name]["delivered"] == 2
            assert health[name]["lastError"] == ("dropped seq 2 of d1: 262264 bytes enriched, "
                                                 "over 262144")
            assert health[name]["healthStatus"] == "healthy"
            assert await log.get_cursor(f"endpoint/{name}") == 4
        assert health["plain"]["deadLettered"] == 0 and health["plain"]["delivered"] == 3
        assert drops.counts == {"broker": 1, "archive": 1}
        logged = sorted(r.getMessage() for r in caplog.records)
        assert logged == [
            f"endpoint {name}: dropped seq=2 device=d1 size=262264: over the 262144-byte limit"
            " once enriched (IoT Hub ref §10.4)" for name in ("archive", "broker")]
    finally:
        sub.stop()
        broker.stop()
