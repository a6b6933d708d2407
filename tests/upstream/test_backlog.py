"""The forwarder's pure core (gateway/upstream/backlog.py) and the status bar."""

from __future__ import annotations

from collections import Counter

from gateway.cli_upstream import progress_line
from gateway.store.log import Entry
from gateway.upstream.backlog import STRIKES, Backlog
from gateway.upstream.wire import Origin

A, B, C = Origin("a", None), Origin("b", None), Origin("c", "m")


def entry(seq: int, device: str = "a") -> Entry:
    return Entry(seq, "telemetry", device, None, 1000 * seq, "{}", b"x")


def fill(backlog: Backlog, plan: list[tuple[int, Origin]], route: str = "r",
         priority: int = 0) -> None:
    for seq, origin in plan:
        backlog.offer(route, origin, entry(seq, origin.device_id), 10, priority)


def test_cursor_per_origin_moves_only_on_ack_and_never_replays_neighbours() -> None:
    b = Backlog()
    fill(b, [(1, A), (2, B), (3, A), (4, B)])
    sent = [b.take(0.0) for _ in range(4)]
    assert [(i.origin, i.seq) for i in sent if i] == [(A, 1), (B, 2), (A, 3), (B, 4)]
    assert b.acked(sent[1])  # B's 2 acked: B's cursor moves, A's does not
    assert {(r, o.device_id, s) for r, o, s in b.dirty()} == {("r", "b", 2)}
    lost = b.link_lost(1.0)
    assert lost is None
    # after the link drops only the unacknowledged go again, each origin in its own order
    again = [b.take(1.0) for _ in range(3)]
    assert sorted((i.origin.device_id, i.seq) for i in again if i) == [("a", 1), ("a", 3), ("b", 4)]
    assert [i.seq for i in again if i and i.origin == A] == [1, 3]
    assert b.floor() == 0  # A's 1 is not acked yet


def test_restart_skips_what_the_cursors_have() -> None:
    b = Backlog({("r", A): 3}, scan_pos=1)
    fill(b, [(2, A), (3, A), (4, A), (5, B)])
    assert [b.take(0.0).seq for _ in range(2)] == [4, 5]  # type: ignore[union-attr]


def test_failing_origin_is_set_aside_and_neighbours_go_on() -> None:
    b = Backlog()
    fill(b, [(1, A), (2, B), (3, B), (4, B), (5, B)])
    for attempt in range(STRIKES):  # the window full each time, A's the oldest in flight
        window = [b.take(float(attempt)) for _ in range(5)]
        assert {i.origin for i in window if i} == {A, B}
        held = b.link_lost(float(attempt))
    assert held is not None and held.origin == A
    items = [b.take(3.0) for _ in range(5)]
    assert [i.origin for i in items if i] == [B, B, B, B]  # A on hold, B unhindered
    for i in items:
        if i:
            b.acked(i)
    assert b.take(1000.0).origin == A  # type: ignore[union-attr]  # retried after the hold


def test_priority_classes_share_by_weight_without_starving() -> None:
    b = Backlog()
    for seq in range(1, 2001):
        b.offer("hi", A, entry(seq), 10, 0)
        b.offer("lo", B, entry(10_000 + seq, "b"), 10, 2)
    counts = Counter(b.take(0.0).route for _ in range(1000))  # type: ignore[union-attr]
    assert counts["lo"] > 0  # a low class still gets its share
    assert 3.5 < counts["hi"] / counts["lo"] < 4.5  # weight 2^(9-0) : 2^(9-2)


def test_parked_origin_leaves_memory_and_is_read_again_from_its_cursor() -> None:
    b = Backlog()
    fill(b, [(1, A), (2, A), (3, B)])
    q = b.queues[("r", A)]
    q.hold, q.hold_until = 60.0, 100.0
    assert b.park(10.0) == [q] and not q.pending and b.buffered == 1
    b.scan_pos = 5
    fill(b, [(4, A)])  # the scanner skips a parked queue
    assert not q.pending
    b.unpark(q, [], caught_up=False)
    from gateway.upstream.backlog import Item

    b.unpark(q, [Item("r", A, entry(s), 10) for s in (1, 2, 4)], caught_up=True)
    assert [i.seq for i in q.pending] == [1, 2, 4] and not q.parked


def test_progress_line() -> None:
    status = {"state": "connected", "backlog": 250}
    line = progress_line(status, 1000, 50.0, width=20)
    assert "[###############.....]" in line and "75.0%" in line and "5 s left" in line
    assert "50 msg/s" in line


# -- the live-first lane (segments) ---------------------------------------------------------------


def test_a_cut_sends_the_live_lane_first_each_lane_in_order_with_its_own_key() -> None:
    b = Backlog()
    b.live_first("r")
    fill(b, [(1, A), (2, B), (3, A), (4, B)])  # the backlog, built with the link down
    assert b.cut(["r"], at=4) == ["r"]
    fill(b, [(5, A), (6, A)])  # live, after the link came up
    sent = [b.take(0.0) for _ in range(6)]
    assert [(i.lane, i.seq) for i in sent if i][:2] == [("r@1", 5), ("r@1", 6)]
    assert sorted((i.lane, i.seq) for i in sent if i)[:4] == [("r", 1), ("r", 2), ("r", 3), ("r", 4)]
    # prev chains within a lane: the live lane's first message follows nothing
    assert [i.prev for i in sent if i and i.lane == "r@1"] == [None, 5]
    assert [i.prev for i in sent if i and i.origin == A and i.lane == "r"] == [None, 1]
    for i in sent:
        assert i is not None and b.acked(i)
    assert {(lane, o.device_id, s) for lane, o, s in b.dirty()} == {
        ("r", "a", 3), ("r", "b", 4), ("r@1", "a", 6)}


def test_a_segment_follows_from_the_sequence_across_restarts_and_is_forgotten_past_the_floor(
        ) -> None:
    b = Backlog()
    b.live_first("r")
    fill(b, [(1, A), (2, A)])
    b.cut(["r"], at=2)
    fill(b, [(3, A)])
    saved = b.lanes_json()
    assert saved == {"r": [[-1, 0], [2, 1]]}
    # a restart from the floor 0 with the cursors r/a=1 and r@1/a=3: 2 goes in the old lane
    again = Backlog({("r", A): 1, ("r@1", A): 3}, scan_pos=0, lanes=saved)
    fill(again, [(1, A), (2, A), (3, A), (4, A)])
    items = [again.take(0.0) for _ in range(3)]
    assert [(i.lane, i.seq) for i in items if i] == [("r@1", 4), ("r", 2)]
    for i in items:
        if i:
            again.acked(i)
    again.scan_pos = 4
    assert again.floor() == 4
    assert again.forget(again.floor()) == ["r"]  # the old segment is done: its slot is free
    assert again.lanes_json() == {"r": [[2, 1]]} and ("r", A) not in again.queues
    again.offer("r", A, entry(5), 10)
    assert again.queues[("r@1", A)].pending[0].seq == 5  # still the live lane
    assert again.cut(["r"], at=5) == ["r"]  # the next outage reuses slot 0, above its old end
    assert again.lanes_json() == {"r": [[2, 1], [5, 0]]}


def test_slots_are_bounded() -> None:
    from gateway.upstream.backlog import MAX_SEGMENTS

    b = Backlog()
    b.live_first("r")
    for at in range(1, 2 * MAX_SEGMENTS):
        fill(b, [(at, A)])
        b.cut(["r"], at)
    assert len(b.lanes["r"].segments) == MAX_SEGMENTS
    assert len({s.slot for s in b.lanes["r"].segments}) == MAX_SEGMENTS


def test_the_live_reader_offers_only_adopted_live_lanes_and_the_scanner_fills_the_rest() -> None:
    b = Backlog(scan_pos=0)
    b.live_first("r")
    b.cut(["r"], at=100)  # 100 messages of backlog, not read yet
    assert b.live_reading() and b.live_pos == 100
    assert not b.is_live("r", 100) and b.is_live("r", 101) and not b.is_live("other", 101)
    fill(b, [(101, A), (102, A)])  # the live reader
    b.live_pos = 102
    fill(b, [(1, A), (50, A), (101, A), (102, A), (103, A)])  # the scanner, all of it in order
    assert [i.seq for i in b.queues[("r@1", A)].pending] == [101, 102, 103]
    assert [i.seq for i in b.queues[("r", A)].pending] == [1, 50]
    b.scan_pos = 103
    assert not b.live_reading()  # the scanner has caught up
