"""The on-behalf-of stamp in front of the bag and the parent's dedupe with its gap check (pure
parts, and the log's ``append_once`` on a real SQLite file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.errors import StoreError
from gateway.hub.onbehalf import split_stamp
from gateway.hub.propbag import decode_bag
from gateway.store import Database, MessageLog, Record
from gateway.store.log import Entry
from gateway.upstream.wire import Encoder, Origin, encode

PROPS = json.dumps({"system": {"iothub-connection-device-id": "d1", "content-type": "a/b"},
                    "application": {"temp": "21", "sp ace": "x&y"}}, separators=(",", ":"))


def entry(seq: int, props: str = PROPS) -> Entry:
    return Entry(seq, "telemetry", "d1", None, 0, props, b"{}")


def test_stamp_goes_first_and_the_rest_is_the_same_for_every_message() -> None:
    enc = Encoder("e1")
    origin = Origin("d 1", None)
    t1 = enc.topic(entry(7), origin)
    t2 = enc.topic(entry(8), origin, prev=7)
    assert t1.startswith("devices/d%201/messages/events/$.gws=7&%24.ct=a%2Fb&%24.gwe=e1&")
    assert t2.startswith("devices/d%201/messages/events/$.gws=8&$.gwq=7&")
    s1, s2 = split_stamp(t1), split_stamp(t2)
    assert s1 is not None and s2 is not None
    assert s1[0] == s2[0]  # what the parent caches
    assert s1[1:] == (7, None, None) and s2[1:] == (8, 7, None)
    # the same properties as the general (slow) form, less the per-message id
    slow = dict(decode_bag(encode(entry(7), origin, epoch="e1", stamp=True)[0].split(
        "/messages/events/")[1]))
    fast = dict(decode_bag(t1.split("/messages/events/")[1]))
    assert slow.pop("$.mid") == "e1-7"
    assert slow == fast


def test_a_device_message_id_travels_in_front() -> None:
    props = json.dumps({"system": {"message-id": "m&1"}, "application": {}})
    t = Encoder("e1").topic(entry(3, props), Origin("d1", "mod"), route="$r2", prev=2)
    assert t.startswith("devices/d1/modules/mod/messages/events/$.gws=3&$.gwq=2&$.mid=m%261&")
    split = split_stamp(t)
    assert split is not None and split[1:] == (3, 2, "m&1")
    assert "%24.gwr=%24r2" in split[0] and ".mid" not in split[0]


@pytest.mark.parametrize("topic", [
    "devices/d/messages/events/a=1",
    "devices/d/messages/events/$.gws=x1&a=1",
    "devices/d/messages/events/$.gws=1",
    "devices/d/messages/events/$.gws=１&a",  # a non-ASCII digit
    "devices/d/messages/events/$.gws=1&$.gwq=&a",
    "devices/d/messages/events/$.gws=1&$.mid=&a",
    "devices/d/twin/x",
    "devices/d/messages/events/$.gws=&a",
    "devices/d/messages/events/$.gws=1&$.gwq=x&a",
    "devices/d/messages/events/$.gws=1&$.gwq=2",
    "devices/d/messages/events/$.gws=1&$.mid=m1",  # an id without its "&"
])
def test_anything_else_takes_the_general_path(topic: str) -> None:
    assert split_stamp(topic) is None


def _rec(seq: int, prev: int | None, key: str = "gw/d1", epoch: str = "e1") -> Record:
    return Record("telemetry", "d1", None, 0, "{}", str(seq).encode(), once=(key, epoch, seq, prev))


async def test_gap_check_refuses_a_message_whose_predecessor_is_missing(tmp_path: Path) -> None:
    db = Database(tmp_path / "log.sqlite")
    await db.open()
    log = MessageLog(db)
    await log.open()
    try:
        await log.append_once([_rec(1, None), _rec(2, 1)])
        # 3 failed somewhere (its body was refused); 4 comes with prev 3: refused whole
        with pytest.raises(StoreError, match="follows 3"):
            await log.append_once([_rec(4, 3)])
        # the resend in order goes through; a duplicate of 2 is dropped
        await log.append_once([_rec(2, 1), _rec(3, 2), _rec(4, 3)])
        # prev at or below the mark passes (the child knew less: a lost PUBACK, a restart)
        await log.append_once([_rec(5, 1), _rec(6, None)])
        # a new epoch starts afresh, whatever prev says
        await log.append_once([_rec(1, 9, epoch="e2")])
        entries, _ = await log.scan(0, 100)
        assert [e.body for e in entries] == [b"1", b"2", b"3", b"4", b"5", b"6", b"1"]
        assert log.deduplicated == 1
    finally:
        await db.close()
