"""C2D queues (IoT Hub ref §3): limits, TTL, locks, delivery counts, feedback, durability.

Every test runs twice: on the real Database, and on one that runs each transaction body
twice (the first run rolled back), as the store does after a disk-full or I/O error; so the
bodies are shown to be pure transaction bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.errors import InvalidRequestError, MessageTooLargeError, NotFoundError
from gateway.hub.c2d import (
    C2DMessage,
    C2DMessageTooLargeError,
    C2DQueues,
    Feedback,
    LockLostError,
    QueueFullError,
)
from gateway.hub.messages import format_time
from gateway.hub.propbag import decode_bag
from gateway.store.db import Database

T = TypeVar("T")
T0 = 1_700_000_000.0
GEN = "gen-1"


class Clock:
    """A settable wall clock (seconds)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RerunDatabase(Database):
    """Runs every body twice in its transaction, rolling the first run back."""

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        def twice(conn: sqlite3.Connection) -> T:
            conn.execute("SAVEPOINT rerun")
            with contextlib.suppress(Exception):  # the second run raises it again
                fn(conn)
            conn.execute("ROLLBACK TO rerun")
            conn.execute("RELEASE rerun")
            return fn(conn)

        return super().submit(twice)


class Hub:
    """A Database and C2DQueues on one file, reopenable (a hub restart)."""

    def __init__(self, path: Path, db_class: type[Database], clock: Clock) -> None:
        self.path = path
        self.db_class = db_class
        self.clock = clock
        self.db = db_class(path)
        self.q = C2DQueues(self.db, clock=clock)

    async def open(self, **options: Any) -> C2DQueues:
        await self.db.open()
        self.q = C2DQueues(self.db, clock=self.clock, **options)
        await self.q.open()
        return self.q

    async def reopen(self, **options: Any) -> C2DQueues:
        await self.db.close()
        self.db = self.db_class(self.path)
        return await self.open(**options)


@pytest.fixture(params=[Database, RerunDatabase], ids=["once", "twice"])
async def hub(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Hub]:
    h = Hub(tmp_path / "hub.sqlite", request.param, Clock())
    await h.open()
    yield h
    await h.db.close()


async def send(q: C2DQueues, device: str = "dev1", body: bytes = b"hi", **props: Any) -> C2DMessage:
    return await q.send(device, body, properties=props, generation_id=GEN)


def extra(**props: str | None) -> dict[str, Any]:
    """Properties whose names are not identifiers (``iothub-ack``, ``a b``)."""
    return props


async def deliver(q: C2DQueues, device: str = "dev1") -> C2DMessage:
    message = await q.next_for_delivery(device)
    assert message is not None
    return message


async def all_feedback(q: C2DQueues) -> list[Feedback]:
    batch = await q.feedback_batch()
    if batch is None:
        return []
    token, records = batch
    await q.complete_feedback(token)
    return records


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat().replace("+00:00", "Z")


# -- send ---------------------------------------------------------------------------------------


async def test_send_applies_defaults_and_generates_a_message_id(hub: Hub) -> None:
    message = await send(hub.q)
    assert len(message.message_id) == 36  # a uuid4
    assert message.system == {
        "message-id": message.message_id,
        "to": "/devices/dev1/messages/devicebound",
    }
    assert (message.enqueued, message.expiry) == (T0, T0 + 3600)
    assert (message.delivery_count, message.ack, message.lock_token) == (0, "none", None)
    assert hub.q.pending("dev1") == 1
    assert hub.q.pending("dev2") == 0


async def test_send_maps_service_properties_to_system_and_application(hub: Hub) -> None:
    message = await send(
        hub.q, messageId="m1", correlationId="c1", userId="u1", contentType="application/json",
        contentEncoding="utf-8", expiryTimeUtc=iso(T0 + 600), **extra(**{"iothub-ack": "full"}),
        color="red", flag=None, to="/devices/other/messages/devicebound",
    )
    assert message.message_id == "m1"
    assert message.ack == "full"
    assert message.expiry == T0 + 600
    assert message.system == {
        "message-id": "m1",
        "to": "/devices/dev1/messages/devicebound",
        "correlation-id": "c1",
        "user-id": "u1",
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "absolute-expiry-time": format_time(T0 + 600),
    }
    assert message.application == {"color": "red", "flag": None}
    assert (await send(hub.q, ack="negative")).ack == "negative"


async def test_the_51st_pending_message_is_refused_with_queue_depth_exceeded(hub: Hub) -> None:
    for i in range(50):
        await send(hub.q, messageId=f"m{i}")
    await deliver(hub.q)  # locked messages still count
    with pytest.raises(QueueFullError) as caught:
        await send(hub.q, messageId="m50")
    assert isinstance(caught.value, InvalidRequestError)
    assert (caught.value.status, caught.value.code) == (403, "DeviceMaximumQueueDepthExceeded")
    assert hub.q.pending("dev1") == 50
    await send(hub.q, "dev2")  # the limit is per device
    message = await deliver(hub.q)
    await hub.q.complete("dev1", message.lock_token or "")
    await send(hub.q, messageId="m50")
    assert hub.q.pending("dev1") == 50


async def test_concurrent_sends_never_exceed_the_queue_depth(hub: Hub) -> None:
    results = await asyncio.gather(
        *(send(hub.q, messageId=f"m{i}") for i in range(60)), return_exceptions=True
    )
    assert sum(isinstance(r, C2DMessage) for r in results) == 50
    assert sum(isinstance(r, QueueFullError) for r in results) == 10
    assert hub.q.pending("dev1") == 50


async def test_expired_messages_do_not_count_against_the_queue_depth(hub: Hub) -> None:
    for i in range(50):
        await send(hub.q, messageId=f"m{i}", ack="negative", expiryTimeUtc=iso(T0 + 60))
    hub.clock.advance(60)
    await send(hub.q, messageId="fresh")
    assert hub.q.pending("dev1") == 1
    records = await all_feedback(hub.q)
    assert [r.status_code for r in records] == ["Expired"] * 50


async def test_oversize_message_is_refused_with_413(hub: Hub) -> None:
    await send(hub.q, body=b"x" * 65536)
    with pytest.raises(C2DMessageTooLargeError) as caught:
        await send(hub.q, body=b"x" * 65537)
    assert isinstance(caught.value, MessageTooLargeError)
    assert (caught.value.status, caught.value.code) == (413, "MessageTooLarge")
    with pytest.raises(C2DMessageTooLargeError):  # names and values of properties count
        await send(hub.q, body=b"x" * 65527, color="red!!")
    await send(hub.q, body=b"x" * 65527, color="red!")
    assert hub.q.pending("dev1") == 2


async def test_ttl_bounds(hub: Hub) -> None:
    assert (await send(hub.q, expiryTimeUtc=iso(T0 + 172800))).expiry == T0 + 172800
    with pytest.raises(InvalidRequestError, match="away"):
        await send(hub.q, expiryTimeUtc=iso(T0 + 172801))
    with pytest.raises(InvalidRequestError, match="past"):
        await send(hub.q, expiryTimeUtc=iso(T0))
    with pytest.raises(InvalidRequestError, match="ISO"):
        await send(hub.q, expiryTimeUtc="tomorrow")
    naive = datetime.fromtimestamp(T0 + 90, tz=UTC).replace(tzinfo=None).isoformat()
    assert (await send(hub.q, expiryTimeUtc=naive)).expiry == T0 + 90  # naive is UTC
    seven = format_time(T0 + 30.5)  # IoT Hub's seven fractional digits
    assert (await send(hub.q, expiryTimeUtc=seven)).expiry == T0 + 30.5
    assert hub.q.pending("dev1") == 3


@pytest.mark.parametrize(
    "props",
    [
        {"ack": "always"},
        {"iothub-ack": "yes"},
        {"messageId": "m" * 129},
        {"messageId": "é"},
        {"contentType": 5},
        {"color": 5},
        {"$.mid": "spoof"},
        {"color": "\ud800"},  # JSON can carry a lone surrogate; UTF-8 cannot
        {"\udfff": "x"},
        {"correlationId": "a\ud800"},
    ],
)
async def test_invalid_properties_are_refused(hub: Hub, props: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError):
        await hub.q.send("dev1", b"", properties=props, generation_id=GEN)
    assert hub.q.pending("dev1") == 0


def test_constructor_rejects_impossible_limits(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.sqlite")
    bads: list[dict[str, Any]] = [
        {"max_pending": 0},
        {"default_ttl": 3600, "max_ttl": 60},
        {"lock_seconds": 0},
        {"max_delivery_count": 0},
        {"feedback_ttl": 0},
    ]
    for bad in bads:
        with pytest.raises(ValueError):
            C2DQueues(db, **bad)


# -- the topic ----------------------------------------------------------------------------------


async def test_topic_bag_orders_and_percent_encodes_as_the_sdks_expect(hub: Hub) -> None:
    message = await send(
        hub.q, messageId="m 1", correlationId="c/1", contentType="application/json",
        contentEncoding="utf-8", expiryTimeUtc=iso(T0 + 600), ack="full",
        **extra(**{"a b": "x&y=z", "flag": None, "plus": "1+1"}),
    )
    stamp = format_time(T0 + 600).replace(":", "%3A")
    assert message.topic_bag() == (
        "%24.mid=m%201&%24.to=%2Fdevices%2Fdev1%2Fmessages%2Fdevicebound&%24.cid=c%2F1"
        f"&%24.ct=application%2Fjson&%24.ce=utf-8&%24.exp={stamp}&iothub-ack=full"
        "&a%20b=x%26y%3Dz&flag&plus=1%2B1"
    )
    topic = message.topic()
    assert topic.split("/")[:4] == ["devices", "dev1", "messages", "devicebound"]
    assert topic.split("/")[4] == message.topic_bag()  # the SDK takes segment 4 as the bag
    assert dict(decode_bag(topic.split("/")[4]))["a b"] == "x&y=z"


async def test_minimal_message_bag_carries_mid_to_and_ack(hub: Hub) -> None:
    message = await send(hub.q, messageId="m1")
    assert message.topic_bag() == (
        "%24.mid=m1&%24.to=%2Fdevices%2Fdev1%2Fmessages%2Fdevicebound&iothub-ack=none"
    )


SDK_PARSE = """
import json, sys
from azure.iot.device.iothub.models import Message
from azure.iot.device.iothub.pipeline import mqtt_topic_iothub
m = Message(b"")
mqtt_topic_iothub.extract_message_properties_from_topic(sys.argv[1], m)
print(json.dumps({"message_id": m.message_id, "correlation_id": m.correlation_id,
    "content_type": m.content_type, "content_encoding": m.content_encoding,
    "expiry_time_utc": m.expiry_time_utc, "ack": m.ack, "custom": m.custom_properties}))
"""


@pytest.mark.interop
async def test_azure_device_sdk_parses_the_topic(hub: Hub, azure_python: Path) -> None:
    message = await send(
        hub.q, messageId="m/1", correlationId="c 1", contentType="application/json",
        contentEncoding="utf-8", expiryTimeUtc=iso(T0 + 600), ack="positive",
        **extra(**{"k&=": "v/&=+", "flag": None}),
    )
    proc = await asyncio.create_subprocess_exec(
        str(azure_python), "-c", SDK_PARSE, message.topic(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out) == {
        "message_id": "m/1",
        "correlation_id": "c 1",
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "expiry_time_utc": format_time(T0 + 600),
        "ack": "positive",
        "custom": {"k&=": "v/&=+", "flag": None},
    }


# -- delivery, locks, completion ----------------------------------------------------------------


async def test_delivery_is_oldest_first_and_locks_each_message(hub: Hub) -> None:
    for i in range(3):
        await send(hub.q, messageId=f"m{i}", body=f"b{i}".encode())
    first = await deliver(hub.q)
    assert (first.message_id, first.body, first.delivery_count) == ("m0", b"b0", 1)
    assert first.lock_token and first.locked_until == T0 + 60
    second = await deliver(hub.q)
    assert second.message_id == "m1" and second.lock_token != first.lock_token
    await deliver(hub.q)
    assert await hub.q.next_for_delivery("dev1") is None  # all locked
    assert await hub.q.next_for_delivery("nobody") is None


async def test_concurrent_deliveries_hand_out_distinct_messages(hub: Hub) -> None:
    for i in range(5):
        await send(hub.q, messageId=f"m{i}")
    got = await asyncio.gather(*(hub.q.next_for_delivery("dev1") for _ in range(6)))
    ids = [m.message_id for m in got if m is not None]
    assert sorted(ids) == [f"m{i}" for i in range(5)] and got.count(None) == 1


async def test_deliverable_locks_up_to_limit_in_order(hub: Hub) -> None:
    assert await hub.q.deliverable("dev1") == []
    for i in range(4):
        await send(hub.q, messageId=f"m{i}")
    assert [m.message_id for m in await hub.q.deliverable("dev1", limit=2)] == ["m0", "m1"]
    rest = await hub.q.deliverable("dev1")
    assert [m.message_id for m in rest] == ["m2", "m3"]
    assert len({m.lock_token for m in rest}) == 2
    assert await hub.q.deliverable("dev1") == []


async def test_complete_removes_the_message_for_good(hub: Hub) -> None:
    await send(hub.q, messageId="m0")
    message = await deliver(hub.q)
    await hub.q.complete("dev1", message.lock_token or "")
    assert hub.q.pending("dev1") == 0
    hub.clock.advance(3000)
    await hub.q.expire()
    assert await hub.q.next_for_delivery("dev1") is None
    with pytest.raises(LockLostError) as caught:
        await hub.q.complete("dev1", message.lock_token or "")
    assert isinstance(caught.value, NotFoundError)
    assert (caught.value.status, caught.value.code) == (412, "DeviceMessageLockLost")


async def test_unknown_or_foreign_lock_tokens_are_refused(hub: Hub) -> None:
    await send(hub.q, messageId="m0")
    message = await deliver(hub.q)
    for settle in (hub.q.complete, hub.q.abandon, hub.q.reject):
        with pytest.raises(LockLostError):
            await settle("dev1", "no-such-token")
        with pytest.raises(LockLostError):
            await settle("dev2", message.lock_token or "")
    assert hub.q.pending("dev1") == 1


async def test_lock_expiry_redelivers_without_counting(hub: Hub) -> None:
    await send(hub.q, messageId="m0")
    first = await deliver(hub.q)
    assert first.delivery_count == 1
    hub.clock.advance(59.9)
    assert await hub.q.next_for_delivery("dev1") is None
    hub.clock.advance(0.1)
    again = await deliver(hub.q)
    assert (again.message_id, again.delivery_count) == ("m0", 1)
    assert again.lock_token != first.lock_token
    with pytest.raises(LockLostError):  # the first delivery's token was replaced
        await hub.q.complete("dev1", first.lock_token or "")
    await hub.q.complete("dev1", again.lock_token or "")
    assert hub.q.pending("dev1") == 0


async def test_a_late_puback_completes_a_message_not_yet_redelivered(hub: Hub) -> None:
    await send(hub.q, messageId="m0")
    message = await deliver(hub.q)
    hub.clock.advance(120)
    await hub.q.expire()  # the lock lapsed and was ended by the sweep
    await hub.q.complete("dev1", message.lock_token or "")
    assert await hub.q.next_for_delivery("dev1") is None


async def test_release_makes_locked_messages_deliverable_at_once_without_counting(
    hub: Hub,
) -> None:
    await send(hub.q, messageId="m0")
    await send(hub.q, messageId="m1")
    await hub.q.deliverable("dev1")
    assert await hub.q.release("dev1") == 2
    again = await hub.q.deliverable("dev1")
    assert [(m.message_id, m.delivery_count) for m in again] == [("m0", 1), ("m1", 1)]
    assert await hub.q.release("nobody") == 0


async def test_release_by_lock_token_ends_only_those_locks(hub: Hub) -> None:
    await send(hub.q, messageId="m0")
    await send(hub.q, messageId="m1")
    first, second = await hub.q.deliverable("dev1")
    assert await hub.q.release("dev1", [second.lock_token or ""]) == 1
    assert await hub.q.release("dev1", ["no-such-token"]) == 0
    [again] = await hub.q.deliverable("dev1")
    assert again.message_id == "m1" and again.lock_token != second.lock_token
    await hub.q.complete("dev1", first.lock_token or "")  # its lock held


async def test_abandon_requeues_and_the_next_delivery_counts(hub: Hub) -> None:
    await send(hub.q, messageId="m0")
    await send(hub.q, messageId="m1")
    first = await deliver(hub.q)
    await hub.q.abandon("dev1", first.lock_token or "")
    again = await deliver(hub.q)
    assert (again.message_id, again.delivery_count) == ("m0", 2)  # back at its place
    with pytest.raises(LockLostError):  # an abandoned token is spent
        await hub.q.complete("dev1", first.lock_token or "")


async def test_the_abandon_ending_the_last_allowed_delivery_dead_letters(hub: Hub) -> None:
    q = await hub.reopen(max_delivery_count=3)
    await send(q, messageId="m0", ack="negative")
    counts = []
    for _ in range(3):
        message = await deliver(q)
        counts.append(message.delivery_count)
        hub.clock.advance(61)  # a lapsed lock in between does not count
        message = await deliver(q)
        counts.append(message.delivery_count)
        await q.abandon("dev1", message.lock_token or "")
    assert counts == [1, 1, 2, 2, 3, 3]
    assert q.pending("dev1") == 0
    [record] = await all_feedback(q)
    assert (record.original_message_id, record.status_code) == ("m0", "DeliveryCountExceeded")


async def test_a_delivery_that_would_exceed_a_lowered_maximum_dead_letters(hub: Hub) -> None:
    await send(hub.q, messageId="m0", ack="full")
    await send(hub.q, messageId="m1")
    for _ in range(3):
        message = await deliver(hub.q)
        await hub.q.abandon("dev1", message.lock_token or "")
    q = await hub.reopen(max_delivery_count=3)
    message = await deliver(q)
    assert message.message_id == "m1"
    assert q.pending("dev1") == 1
    assert [r.status_code for r in await all_feedback(q)] == ["DeliveryCountExceeded"]


async def test_reject_dead_letters(hub: Hub) -> None:
    await send(hub.q, messageId="m0", ack="negative")
    message = await deliver(hub.q)
    await hub.q.reject("dev1", message.lock_token or "")
    assert hub.q.pending("dev1") == 0
    assert await hub.q.next_for_delivery("dev1") is None
    assert [r.status_code for r in await all_feedback(hub.q)] == ["Rejected"]


async def test_expiry_dead_letters_locked_and_unlocked_messages(hub: Hub) -> None:
    await send(hub.q, messageId="a", ack="full", expiryTimeUtc=iso(T0 + 30))
    await send(hub.q, messageId="b", ack="none", expiryTimeUtc=iso(T0 + 30))
    await send(hub.q, messageId="c", ack="negative")
    await send(hub.q, "dev2", messageId="d", ack="negative", expiryTimeUtc=iso(T0 + 31))
    locked = await deliver(hub.q)
    assert locked.message_id == "a"
    hub.clock.advance(29.9)
    assert await hub.q.expire() == 0
    hub.clock.advance(0.1)
    assert await hub.q.expire() == 2
    assert (hub.q.pending("dev1"), hub.q.pending("dev2")) == (1, 1)
    with pytest.raises(LockLostError):
        await hub.q.complete("dev1", locked.lock_token or "")
    hub.clock.advance(1)
    assert await hub.q.next_for_delivery("dev2") is None  # expired on the way, not delivered
    assert hub.q.pending("dev2") == 0
    records = await all_feedback(hub.q)
    assert [(r.original_message_id, r.status_code) for r in records] == [
        ("a", "Expired"), ("d", "Expired"),
    ]
    assert records[0].enqueued_time_utc == format_time(T0 + 30)


async def test_purge_empties_the_queue_with_purged_feedback(hub: Hub) -> None:
    await send(hub.q, messageId="m0", ack="full")
    await send(hub.q, messageId="m1", ack="positive")
    await send(hub.q, "dev2", messageId="m2")
    await deliver(hub.q)
    assert await hub.q.purge("dev1") == 2
    assert await hub.q.purge("dev1") == 0
    assert (hub.q.pending("dev1"), hub.q.pending("dev2")) == (0, 1)
    assert [(r.original_message_id, r.status_code) for r in await all_feedback(hub.q)] == [
        ("m0", "Purged"),
    ]


async def test_drop_device_removes_queue_and_pending_feedback_silently(hub: Hub) -> None:
    await send(hub.q, messageId="m0", ack="full")
    await send(hub.q, messageId="m1", ack="full")
    await send(hub.q, "dev2", messageId="m2", ack="full")
    message = await deliver(hub.q)
    await hub.q.complete("dev1", message.lock_token or "")  # feedback pending for dev1
    other = await deliver(hub.q, "dev2")
    await hub.q.complete("dev2", other.lock_token or "")
    assert await hub.q.drop_device("dev1") == 1
    assert hub.q.pending("dev1") == 0
    assert [(r.device_id, r.original_message_id) for r in await all_feedback(hub.q)] == [
        ("dev2", "m2"),
    ]


# -- feedback -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ack", "outcome", "expected"),
    [
        ("none", "complete", []),
        ("positive", "complete", ["Success"]),
        ("negative", "complete", []),
        ("full", "complete", ["Success"]),
        ("none", "reject", []),
        ("positive", "reject", []),
        ("negative", "reject", ["Rejected"]),
        ("full", "reject", ["Rejected"]),
    ],
)
async def test_feedback_follows_iothub_ack(
    hub: Hub, ack: str, outcome: str, expected: list[str]
) -> None:
    await send(hub.q, messageId="m0", ack=ack)
    message = await deliver(hub.q)
    await getattr(hub.q, outcome)("dev1", message.lock_token)
    assert [r.status_code for r in await all_feedback(hub.q)] == expected


async def test_feedback_record_has_the_documented_shape(hub: Hub) -> None:
    await send(hub.q, messageId="0987654321", ack="positive")
    message = await deliver(hub.q)
    hub.clock.advance(5)
    await hub.q.complete("dev1", message.lock_token or "")
    [record] = await all_feedback(hub.q)
    assert record.to_json() == {
        "originalMessageId": "0987654321",
        "enqueuedTimeUtc": format_time(T0 + 5),
        "statusCode": "Success",
        "description": "Success",
        "deviceId": "dev1",
        "deviceGenerationId": GEN,
    }


async def ack_many(q: C2DQueues, n: int, device: str = "dev1") -> None:
    for i in range(n):
        await send(q, device, messageId=f"m{i}", ack="positive")
        message = await deliver(q, device)
        await q.complete(device, message.lock_token or "")


async def test_feedback_batches_are_locked_and_bounded(hub: Hub) -> None:
    assert await hub.q.feedback_batch() is None
    await ack_many(hub.q, 5)
    first = await hub.q.feedback_batch(max_records=3)
    assert first is not None
    token, records = first
    assert [r.original_message_id for r in records] == ["m0", "m1", "m2"]
    second = await hub.q.feedback_batch()
    assert second is not None and [r.original_message_id for r in second[1]] == ["m3", "m4"]
    assert await hub.q.feedback_batch() is None  # everything is locked
    await hub.q.complete_feedback(token)
    with pytest.raises(LockLostError):
        await hub.q.complete_feedback(token)
    hub.clock.advance(60)  # the second batch's lock lapsed
    third = await hub.q.feedback_batch()
    assert third is not None and [r.original_message_id for r in third[1]] == ["m3", "m4"]
    with pytest.raises(LockLostError):  # replaced by the newer batch
        await hub.q.complete_feedback(second[0])
    with pytest.raises(InvalidRequestError):
        await hub.q.feedback_batch(max_records=0)


async def test_abandoned_feedback_returns_and_is_dropped_at_the_maximum(hub: Hub) -> None:
    q = await hub.reopen(feedback_max_delivery_count=2)
    await ack_many(q, 1)
    batch = await q.feedback_batch()
    assert batch is not None
    await q.abandon_feedback(batch[0])
    with pytest.raises(LockLostError):
        await q.abandon_feedback(batch[0])
    batch = await q.feedback_batch()
    assert batch is not None and batch[1][0].original_message_id == "m0"
    await q.abandon_feedback(batch[0])
    assert await q.feedback_batch() is None


async def test_feedback_expires_after_its_ttl(hub: Hub) -> None:
    q = await hub.reopen(feedback_ttl=600)
    await ack_many(q, 2)
    assert q.next_wakeup() == T0 + 600
    hub.clock.advance(599)
    batch = await q.feedback_batch()
    assert batch is not None and len(batch[1]) == 2
    hub.clock.advance(1)
    await q.expire()
    assert q.next_wakeup() is None
    assert await q.feedback_batch() is None


# -- wake-ups -----------------------------------------------------------------------------------


async def test_next_wakeup_tracks_the_earliest_expiry_and_lock(hub: Hub) -> None:
    assert hub.q.next_wakeup() is None
    await send(hub.q, messageId="m0")
    assert hub.q.next_wakeup() == T0 + 3600
    await send(hub.q, "dev2", messageId="m1", expiryTimeUtc=iso(T0 + 100))
    assert hub.q.next_wakeup() == T0 + 100
    hub.clock.advance(10)
    await deliver(hub.q)
    assert hub.q.next_wakeup() == T0 + 70  # the lock lapses first
    hub.clock.advance(60)
    await hub.q.expire()
    assert hub.q.next_wakeup() == T0 + 100  # the lapsed lock no longer wakes anyone
    hub.clock.advance(30)
    assert await hub.q.expire() == 1
    assert hub.q.next_wakeup() == T0 + 3600
    await hub.q.purge("dev1")
    assert hub.q.next_wakeup() is None


async def test_a_mass_sweep_works_in_chunks_and_misses_nothing(hub: Hub) -> None:
    devices = [f"dev{i}" for i in range(30)]
    await asyncio.gather(
        *(send(hub.q, d, messageId=f"{d}-{i}", ack="negative", expiryTimeUtc=iso(T0 + 600))
          for d in devices for i in range(40))
    )
    delivered = await asyncio.gather(*(hub.q.deliverable(d) for d in devices))
    assert sum(map(len, delivered)) == 1200
    hub.clock.advance(61)
    commits = hub.db.commits
    assert await hub.q.expire() == 0
    assert hub.db.commits - commits >= 2  # more than SWEEP_CHUNK locks ended
    assert hub.q.next_wakeup() == T0 + 600
    hub.clock.advance(600)
    commits = hub.db.commits
    assert await hub.q.expire() == 1200
    assert hub.db.commits - commits >= 2
    assert sum(hub.q.pending(d) for d in devices) == 0
    assert hub.q.next_wakeup() == T0 + 661 + 3600  # the feedback's expiry
    hub.clock.advance(3600)
    await hub.q.expire()
    assert hub.q.next_wakeup() is None
    assert await hub.q.feedback_batch() is None


# -- durability ---------------------------------------------------------------------------------


async def test_a_send_is_committed_when_it_returns(hub: Hub) -> None:
    await send(hub.q, messageId="m0", body=b"payload")
    other = sqlite3.connect(hub.path)
    try:
        rows = other.execute("SELECT message_id, body FROM c2d_messages").fetchall()
    finally:
        other.close()
    assert rows == [("m0", b"payload")]


async def test_queues_survive_a_restart(hub: Hub) -> None:
    await send(hub.q, messageId="m0", body=b"zero", contentType="text/plain", color="red")
    await send(hub.q, messageId="m1", body=b"one")
    await send(hub.q, "dev2", messageId="m2")
    q = await hub.reopen()
    assert (q.pending("dev1"), q.pending("dev2")) == (2, 1)
    assert q.next_wakeup() == T0 + 3600
    message = await deliver(q)
    assert (message.message_id, message.body) == ("m0", b"zero")
    assert message.system["content-type"] == "text/plain"
    assert message.application == {"color": "red"}
    assert message.expiry == T0 + 3600


async def test_a_completed_message_is_never_delivered_after_a_restart(hub: Hub) -> None:
    await send(hub.q, messageId="m0")
    await send(hub.q, messageId="m1")
    message = await deliver(hub.q)
    await hub.q.complete("dev1", message.lock_token or "")
    q = await hub.reopen()
    assert [m.message_id for m in await q.deliverable("dev1")] == ["m1"]


async def test_a_restart_releases_locks_keeping_counts_and_tokens(hub: Hub) -> None:
    await send(hub.q, messageId="m0")
    await send(hub.q, messageId="m1")
    first = await deliver(hub.q)
    await hub.q.abandon("dev1", first.lock_token or "")
    first = await deliver(hub.q)
    second = await deliver(hub.q)
    assert (first.delivery_count, second.delivery_count) == (2, 1)
    q = await hub.reopen()
    await q.complete("dev1", second.lock_token or "")  # a PUBACK that raced the restart
    again = await deliver(q)  # no lock period to wait out
    assert (again.message_id, again.delivery_count) == ("m0", 2)


async def test_feedback_survives_a_restart(hub: Hub) -> None:
    await ack_many(hub.q, 2)
    batch = await hub.q.feedback_batch(max_records=1)
    assert batch is not None
    q = await hub.reopen()
    await q.complete_feedback(batch[0])
    assert [r.original_message_id for r in await all_feedback(q)] == ["m1"]


# -- settle events (federation's one hook) -------------------------------------------------------


async def test_every_way_out_of_the_queue_is_reported_to_the_settle_hooks(hub: Hub) -> None:
    """Complete, reject, abandon (put back, then dead-lettered at the maximum), expiry and
    purge each reach ``settle_hooks`` once, after the commit, with the status the message
    left with; feedback reads change nothing."""
    q = await hub.reopen(max_delivery_count=2)
    events: list[tuple[str, str, str]] = []
    q.settle_hooks.append(events.extend)
    for mid in ("c", "r", "a"):
        await send(q, messageId=mid)
    await q.complete("dev1", (await deliver(q)).lock_token or "")
    await q.reject("dev1", (await deliver(q)).lock_token or "")
    await q.abandon("dev1", (await deliver(q)).lock_token or "")
    await q.abandon("dev1", (await deliver(q)).lock_token or "")  # the 2nd counted delivery
    assert events == [("dev1", "c", "Success"), ("dev1", "r", "Rejected"),
                      ("dev1", "a", "Abandoned"), ("dev1", "a", "DeliveryCountExceeded")]
    events.clear()
    await send(q, messageId="e", expiryTimeUtc=iso(hub.clock.now + 5))
    await send(q, messageId="p")
    hub.clock.advance(6)
    await q.expire()
    await q.purge("dev1")
    await all_feedback(q)
    assert events == [("dev1", "e", "Expired"), ("dev1", "p", "Purged")]
