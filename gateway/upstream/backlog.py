"""The forwarder's sans-I/O core: one queue per (route, origin identity), fair service, cursors.

federation.md §0.1 fact 2: a single offset per queue turns one device's failure into
everyone's. Here every (route, origin) has its own cursor (the highest sequence acknowledged by
the parent, all before it in that queue too), its own FIFO and its own in-flight list, so:

* a PUBACK advances only its own queue's cursor (nothing of a neighbour is ever replayed);
* per-origin order holds: a queue's messages go out in log order, and after a lost link the
  in-flight ones go back to the front of their own queue, in order;
* an origin the parent keeps refusing (the link drops while its message is the oldest in
  flight, three times without an ack in between) is set aside with a growing pause while the
  others go on; set aside long, its messages leave memory (``parked``) and are read again from
  its own cursor when it is retried.

Service: priority classes share the link by weight (stride scheduling: a class of weight w gets
w/sum of the sends while it has work, so a low class is never starved, unlike edgeHub's restart
at priority 0, fact 7); inside a class, origins take turns (round robin).

Nothing here does I/O or reads a clock: the shell passes ``now`` (monotonic seconds).

The live-first lane (a route's ``live_first`` option; :class:`Lanes`). Sending new messages
ahead of the backlog would break the parent's one high-water mark per (gateway, route, origin):
a live message raises it, and the older backlog is then dropped as a duplicate. So a route's
log is cut into **segments**: when the link comes up with a backlog, the route records a
boundary B (the log's last sequence) durably before anything above it is sent. A segment is
(B_i, B_i+1]; the newest, (B_k, inf), is the live lane. Each (segment, origin) is its own queue
with its own cursor and its own dedupe key at the parent: the segment's *lane* name,
``route@slot``, travels as the stamp's route (``$.gwr``), so the parent keeps a mark per
(gateway, origin, lane) and needs nothing new. A message's segment follows from its sequence and
the recorded boundaries, so it never changes lane, across restarts too; ``prev`` (the gap check)
chains within a lane. Service: the live lane first, then the older segments, oldest first
(ranks inside each priority class; origins take turns within a rank).

A segment whose every message is done (the durable floor passed its end) is forgotten: its
cursors are deleted and its slot is free again. A slot is reused only above its old segment's
end, so every sequence of the new segment is above the parent's mark for that key (the old
segment's last stored message): the parent's dedupe table holds at most ``MAX_SEGMENTS`` keys per
(gateway, route, origin) however many outages there are. At most ``MAX_SEGMENTS`` segments per
route: with every slot taken, a link-up cuts nothing and new messages join the newest segment.
Slot 0 is the route's own name (what a route without the option uses). (Naming a lane by its
boundary, ``@B_i``, as first planned, would leave the parent one mark per outage, forever.)
While a backlog segment exists (``segmented``) the shell keeps the last places of its QoS window
for live lanes (``take(live_only=True)``), so a live message never waits for a full window.

The scanner reads the log in order from the floor; while it is below a live lane, a second
reader (the shell's) reads from the lane's boundary and offers only live-lane messages (the
routes it ``adopted``). Both offer every message of a queue in order and a queue takes only
sequences above the last it took, so a queue always holds a gapless run of its messages.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from gateway.store.log import Entry
from gateway.upstream.wire import Origin

STRIKES = 3  # drops of the link with this origin oldest in flight, before it is set aside
HOLD_MIN = 5.0
HOLD_MAX = 600.0
PARK_AFTER = 30.0  # set aside this long: its messages leave memory
MAX_SEGMENTS = 8  # per live-first route (slots 0..7)
LIVE = -1  # the rank of a live lane: served before every other queue of its class
LIVE_HEADROOM = 4  # the live reader may fill the buffer by a further 1/this of it


def lane_name(route: str, slot: int) -> str:
    """The lane's name: its cursor key here and its dedupe key's route at the parent (route
    names cannot hold ``@``)."""
    return route if slot == 0 else f"{route}@{slot}"


class Item:
    """One message in a queue; ``queue`` is set when it joins one."""

    __slots__ = ("entry", "lane", "origin", "prev", "queue", "route", "seq", "size")

    def __init__(self, route: str, origin: Origin, entry: Entry, size: int) -> None:
        self.route = route
        self.lane = route  # the queue's lane, set when it joins one
        self.origin = origin
        self.entry = entry
        self.size = size
        self.seq = entry.seq
        self.prev: int | None = None  # set by take: the seq sent before it in its queue
        self.queue: OriginQueue | None = None


QueueKey = tuple[str, Origin]  # (lane, origin)


@dataclass(slots=True, eq=False)
class OriginQueue:
    route: str
    origin: Origin
    priority: int
    acked: int = 0  # cursor: every message of this queue up to here is at the parent
    queued_upto: int = 0  # highest seq ever put in this queue (re-reads ignore older ones)
    pending: deque[Item] = field(default_factory=deque)
    inflight: deque[Item] = field(default_factory=deque)
    done: set[int] = field(default_factory=set)  # acknowledged out of order (not expected)
    strikes: int = 0
    hold_until: float = 0.0
    hold: float = 0.0
    parked: bool = False
    dirty: bool = False
    sent: int = 0
    chain: int | None = None  # last seq the parent acknowledged in this run (not moved by drops)
    singles: int = 0  # sent alone and not acknowledged yet, on this link (packing waits)
    lane: str = ""  # the segment's lane name (the route's own name without segments)
    rank: int = 0  # service order inside the class: LIVE, then older segments first
    ringed: bool = False  # in its class's ready ring (Backlog._ready)

    def __post_init__(self) -> None:
        if not self.lane:
            self.lane = self.route

    @property
    def key(self) -> QueueKey:
        return (self.lane, self.origin)

    def head_seq(self) -> int | None:
        if self.inflight:
            return self.inflight[0].seq
        if self.pending:
            return self.pending[0].seq
        return None


@dataclass(slots=True)
class Segment:
    low: int  # the boundary it starts above (-1: from the start of the log)
    slot: int

    def to_json(self) -> list[int]:
        return [self.low, self.slot]


class Lanes:
    """The segments of one live-first route, oldest first (pure)."""

    def __init__(self, route: str, segments: list[Segment] | None = None) -> None:
        self.route = route
        self.segments = segments or [Segment(-1, 0)]
        self._index()

    def _index(self) -> None:
        self.lows = [s.low for s in self.segments]
        self.names = [lane_name(self.route, s.slot) for s in self.segments]
        # (lane name, rank) per segment: what a queue of it is keyed and served by
        self.slots = [(name, self.rank(i)) for i, name in enumerate(self.names)]

    def of(self, seq: int) -> int:
        """The index of the segment ``seq`` belongs to."""
        return max(0, bisect_left(self.lows, seq) - 1)

    def rank(self, index: int) -> int:
        return LIVE if index == len(self.segments) - 1 else self.segments[index].low + 1

    @property
    def live_low(self) -> int:
        return self.segments[-1].low

    def cut(self, at: int) -> bool:
        """A new live lane above ``at``; False when every slot is taken (or nothing is above
        the newest boundary)."""
        if len(self.segments) >= MAX_SEGMENTS or at <= self.segments[-1].low:
            return False
        used = {s.slot for s in self.segments}
        self.segments.append(Segment(at, min(set(range(MAX_SEGMENTS)) - used)))
        self._index()
        return True

    def forget(self, floor: int) -> list[str]:
        """Drop the segments wholly at or below ``floor`` (durable); their lane names."""
        gone = []
        while len(self.segments) > 1 and self.segments[1].low <= floor:
            gone.append(self.names[0])
            self.segments.pop(0)
            self._index()
        return gone

    def to_json(self) -> list[list[int]]:
        return [s.to_json() for s in self.segments]


class _Class:
    """One priority class: a ring of ready queues per rank, served lowest rank first."""

    __slots__ = ("pass_", "rings", "stride", "_by_rank")

    def __init__(self, priority: int) -> None:
        self.stride = 1.0 / (1 << (9 - priority))
        self.pass_ = 0.0
        self.rings: list[deque[OriginQueue]] = []  # in rank order
        self._by_rank: dict[int, deque[OriginQueue]] = {}

    def ring(self, rank: int) -> deque[OriginQueue]:
        ring = self._by_rank.get(rank)
        if ring is None:
            ring = self._by_rank[rank] = deque()
            self._order()
        return ring

    def drop_ring(self, rank: int) -> None:
        if rank in self._by_rank and not self._by_rank[rank]:
            del self._by_rank[rank]
            self._order()

    def _order(self) -> None:
        self.rings = [self._by_rank[r] for r in sorted(self._by_rank)]

    @property
    def ready(self) -> bool:
        return any(self.rings)

    def prune(self) -> None:
        """Forget the empty rings (those of finished segments; made again when needed)."""
        if any(not ring for ring in self.rings):
            self._by_rank = {r: ring for r, ring in self._by_rank.items() if ring}
            self._order()

    def live_rings(self) -> list[deque[OriginQueue]]:
        ring = self._by_rank.get(LIVE)
        return [ring] if ring else []


class Backlog:
    """In-memory view of what is still to go up; the shell feeds it and persists cursors."""

    def __init__(self, cursors: dict[QueueKey, int] | None = None, *, scan_pos: int = 0,
                 max_buffer: int = 50_000, lanes: dict[str, list[list[int]]] | None = None
                 ) -> None:
        self.queues: dict[QueueKey, OriginQueue] = {}
        self.origins: set[Origin] = set()  # of every queue (several lanes may share one)
        self._cursors = dict(cursors or {})
        self.scan_pos = scan_pos  # every log entry up to here has been offered
        self.max_buffer = max_buffer
        self.buffered = 0  # pending + in flight, in memory
        self.buffered_bytes = 0
        self.inflight = 0
        self._classes: dict[int, _Class] = {}
        self.lanes: dict[str, Lanes] = {
            route: Lanes(route, [Segment(int(low), int(slot)) for low, slot in segs])
            for route, segs in (lanes or {}).items()}
        # the live reader: every message of an adopted route's live lane up to live_pos has
        # been offered; it reads while live_pos is above scan_pos
        self.adopted: set[str] = {r for r, lanes in self.lanes.items()
                                  if len(lanes.segments) > 1 and lanes.live_low > scan_pos}
        self.live_pos = min((self.lanes[r].live_low for r in self.adopted), default=scan_pos)
        self.segmented = False  # some route has a live lane and a backlog segment
        self._segments_changed()

    # -- feeding -----------------------------------------------------------------------------

    def queue(self, route: str, origin: Origin, priority: int = 0,
              seq: int | None = None) -> OriginQueue:
        """The queue of (route, origin) that ``seq`` belongs to (the newest lane if None)."""
        lanes = self.lanes.get(route)
        if lanes is None:
            lane, rank = route, 0
        elif seq is None:
            lane, rank = lanes.slots[-1]
        else:  # Lanes.of, inline: once per message the scanner offers
            index = bisect_left(lanes.lows, seq) - 1
            lane, rank = lanes.slots[index if index > 0 else 0]
        key = (lane, origin)
        q = self.queues.get(key)
        if q is None:
            start = self._cursors.pop(key, 0)
            q = OriginQueue(route, origin, priority, acked=start, queued_upto=start, lane=lane,
                            rank=rank)
            self.queues[key] = q
            self.origins.add(origin)
        return q

    def offer(self, route: str, origin: Origin, entry: Entry, size: int,
              priority: int = 0) -> bool:
        """Queue ``entry`` unless its queue's cursor or an earlier read already has it (or
        the queue is parked: it will be read again). True if it was queued."""
        q = self.queue(route, origin, priority, entry.seq)
        if entry.seq <= q.queued_upto or q.parked:
            return False
        q.queued_upto = entry.seq
        item = Item(route, origin, entry, size)
        item.queue = q
        item.lane = q.lane
        q.pending.append(item)
        self.buffered += 1
        self.buffered_bytes += size
        if not q.ringed:
            self._ready(q)
        return True

    def full(self) -> bool:
        return self.buffered >= self.max_buffer

    def live_full(self) -> bool:
        """Full for the live reader too (it has a headroom above :meth:`full`)."""
        return self.buffered >= self.max_buffer + self.max_buffer // LIVE_HEADROOM

    def _ready(self, q: OriginQueue) -> None:
        if not q.ringed and q.pending:
            cls = self._classes.get(q.priority)
            if cls is None:
                cls = self._classes[q.priority] = _Class(q.priority)
                active = [c.pass_ for c in self._classes.values() if c.ready]
                cls.pass_ = min(active, default=0.0)
            elif not cls.ready:  # a class coming back starts level with the others
                cls.pass_ = max(cls.pass_, min(
                    (c.pass_ for c in self._classes.values() if c.ready), default=cls.pass_))
            cls.ring(q.rank).append(q)
            q.ringed = True

    # -- lanes (live-first) --------------------------------------------------------------------

    def live_first(self, route: str) -> Lanes:
        """Segments for ``route`` from now on (idempotent): what its ``live_first`` starts."""
        lanes = self.lanes.get(route)
        if lanes is None:
            lanes = self.lanes[route] = Lanes(route)
            for q in self.queues.values():  # its one lane is the live lane now
                if q.route == route:
                    self._rerank(q, LIVE)
        return lanes

    def backlogged(self, route: str) -> bool:
        """Does ``route`` have messages in memory that the parent has not acknowledged?"""
        return any(q.pending or q.inflight for q in self.queues.values() if q.route == route)

    def cut(self, routes: list[str], at: int) -> list[str]:
        """The link came up: each of ``routes`` (live-first, with a backlog) starts a new live
        lane above ``at`` (the log's last seq). Returns the routes cut: the caller makes that
        durable (:meth:`lanes_json`) before sending anything of the new lanes."""
        done = []
        for route in routes:
            lanes = self.live_first(route)
            before = len(lanes.segments)
            if not lanes.cut(at):
                continue
            done.append(route)
            newest = lanes.names[-1]
            for q in self.queues.values():  # the old live lane is backlog now
                if q.route == route and q.lane != newest:
                    self._rerank(q, lanes.rank(lanes.names.index(q.lane)))
            assert len(lanes.segments) == before + 1
        self._segments_changed()
        if done and at > self.scan_pos:
            if self.live_pos <= self.scan_pos:  # the reader was idle: it starts at the cut
                self.adopted.clear()
                self.live_pos = at
            self.adopted.update(done)  # above live_pos: nothing of theirs was read yet
        return done

    def live_reading(self) -> bool:
        """Is the live reader ahead of the scanner (so needed)? Ends its adoptions if not."""
        if self.live_pos > self.scan_pos and self.adopted:
            return True
        self.adopted.clear()
        return False

    def is_live(self, route: str, seq: int) -> bool:
        """For the live reader: is ``seq`` of ``route`` in a live lane it adopted?"""
        return route in self.adopted and seq > self.lanes[route].live_low

    def reach(self, q: OriginQueue) -> int:
        """How far the log has been offered to ``q`` (a parked queue's re-read stops here)."""
        if q.route in self.adopted and q.rank == LIVE:
            return max(self.scan_pos, self.live_pos)
        return self.scan_pos

    def forget(self, floor: int) -> list[str]:
        """Segments wholly at or below the durable ``floor`` go (their queues are empty);
        returns their lane names (the caller deletes their cursors)."""
        gone: list[str] = []
        for lanes in self.lanes.values():
            gone += lanes.forget(floor)  # the others keep their ranks (the newest stays LIVE)
        if gone:
            self._segments_changed()
            dead = set(gone)
            for key in [k for k in self.queues if k[0] in dead]:
                q = self.queues.pop(key)
                self.buffered -= len(q.pending) + len(q.inflight)
                self.buffered_bytes -= sum(i.size for i in (*q.pending, *q.inflight))
                self.inflight -= len(q.inflight)
                self._unring(q)
            for key in [k for k in self._cursors if k[0] in dead]:
                del self._cursors[key]
            for cls in self._classes.values():
                cls.prune()
        return gone

    def _segments_changed(self) -> None:
        self.segmented = any(len(lanes.segments) > 1 for lanes in self.lanes.values())

    def lanes_json(self) -> dict[str, list[list[int]]]:
        return {route: lanes.to_json() for route, lanes in self.lanes.items()}

    def _unring(self, q: OriginQueue) -> None:
        if q.ringed:
            cls = self._classes[q.priority]
            ring = cls.ring(q.rank)
            for i, other in enumerate(ring):
                if other is q:
                    del ring[i]
                    break
            cls.drop_ring(q.rank)
            q.ringed = False

    def _rerank(self, q: OriginQueue, rank: int) -> None:
        if q.rank != rank:
            self._unring(q)
            q.rank = rank
            self._ready(q)

    # -- sending -----------------------------------------------------------------------------

    def take(self, now: float, allowed: set[Origin] | None = None,
             paced: set[str] | None = None, live_only: bool = False) -> Item | None:
        """The next message to send, or None. ``allowed``: when given, only these origins
        (those registered on this connection so far); ``paced``: routes over their bandwidth
        cap just now; ``live_only``: only from live lanes (the window's reserve for them)."""
        if len(self._classes) == 1:
            classes: list[_Class] | tuple[_Class, ...] = tuple(self._classes.values())
        else:
            classes = sorted((c for c in self._classes.values() if c.ready),
                             key=lambda c: c.pass_)
        for cls in classes:
            for ring in cls.live_rings() if live_only else cls.rings:  # live, then oldest
                for _ in range(len(ring)):
                    q = ring[0]
                    if not q.pending:
                        ring.popleft()
                        q.ringed = False
                        continue
                    ring.rotate(-1)
                    if q.hold_until > now or (allowed is not None and q.origin not in allowed) \
                            or (paced and q.route in paced):
                        continue
                    item = q.pending.popleft()
                    item.prev = q.inflight[-1].seq if q.inflight else q.chain
                    q.inflight.append(item)
                    self.inflight += 1
                    cls.pass_ += cls.stride
                    return item
        return None

    def take_next(self, item: Item) -> Item | None:
        """The next message of ``item``'s queue after it, taken the same way (packing), or
        None when that queue has nothing more waiting."""
        q = item.queue
        if q is None or not q.pending or not q.inflight or q.inflight[-1] is not item:
            return None
        nxt = q.pending.popleft()
        nxt.prev = item.seq
        q.inflight.append(nxt)
        self.inflight += 1
        return nxt

    def untake(self, item: Item) -> None:
        """Put back the message :meth:`take` just returned (it was not sent after all)."""
        q = item.queue or self.queues[(item.lane, item.origin)]
        if q.inflight and q.inflight[-1] is item:
            q.inflight.pop()
            q.pending.appendleft(item)
            self.inflight -= 1
            self._ready(q)

    def waiting(self, now: float) -> Iterator[OriginQueue]:
        """Queues with something to send that are not on hold."""
        for cls in self._classes.values():
            for ring in cls.rings:
                for q in ring:
                    if q.pending and q.hold_until <= now:
                        yield q

    def acked(self, item: Item) -> bool:
        """The parent acknowledged ``item``; True if its queue's cursor moved."""
        q = item.queue or self.queues[(item.lane, item.origin)]
        moved = False
        if q.inflight and q.inflight[0] is item and not q.done:  # in order: the usual case
            q.inflight.popleft()
            q.acked = q.chain = item.seq
            q.sent += 1
            self.inflight -= 1
            self.buffered -= 1
            self.buffered_bytes -= item.size
            q.dirty = True
            q.strikes = 0
            q.hold = 0.0
            return True
        q.done.add(item.seq)
        while q.inflight and q.inflight[0].seq in q.done:
            head = q.inflight.popleft()
            q.done.discard(head.seq)
            q.acked = q.chain = head.seq
            q.sent += 1
            self.inflight -= 1
            self.buffered -= 1
            self.buffered_bytes -= head.size
            moved = True
        if moved:
            q.dirty = True
            q.strikes = 0
            q.hold = 0.0
        return moved

    def link_lost(self, now: float) -> OriginQueue | None:
        """The connection dropped: every in-flight message goes back to the front of its own
        queue, in order. The origin oldest in flight gets a strike; returns its queue if that
        set it aside."""
        oldest: OriginQueue | None = None
        oldest_seq = 0
        for q in self.queues.values():
            if not q.inflight:
                continue
            if oldest is None or q.inflight[0].seq < oldest_seq:
                oldest, oldest_seq = q, q.inflight[0].seq
            self.inflight -= len(q.inflight)
            q.pending.extendleft(reversed(q.inflight))
            q.inflight.clear()
            q.done.clear()
            q.singles = 0
            self._ready(q)
        if oldest is None:
            return None
        oldest.strikes += 1
        if oldest.strikes < STRIKES:
            return None
        oldest.hold = min(HOLD_MAX, max(HOLD_MIN, oldest.hold * 2))
        oldest.hold_until = now + oldest.hold
        oldest.strikes = 0
        return oldest

    def origin_lost(self, origin: Origin, now: float, *, strike: bool = True) -> bool:
        """One origin's own connection dropped (identity mode): its in-flight messages go back
        to the front of its queues; a strike when it had any. True if that set it aside."""
        held = False
        for q in self.queues.values():
            if q.origin != origin or not q.inflight:
                continue
            self.inflight -= len(q.inflight)
            q.pending.extendleft(reversed(q.inflight))
            q.inflight.clear()
            q.done.clear()
            self._ready(q)
            if strike:
                q.strikes += 1
                if q.strikes >= STRIKES:
                    q.hold = min(HOLD_MAX, max(HOLD_MIN, q.hold * 2))
                    q.hold_until = now + q.hold
                    q.strikes = 0
                    held = True
        return held

    # -- parking (a long-refused origin leaves memory) -----------------------------------------

    def park(self, now: float) -> list[OriginQueue]:
        """When memory is full, drop the in-memory messages of origins on a long hold; they
        are read again from their cursor when retried (:meth:`unpark`)."""
        parked = []
        for q in self.queues.values():
            if q.hold >= PARK_AFTER and q.hold_until > now and not q.parked and not q.inflight:
                self.buffered -= len(q.pending)
                self.buffered_bytes -= sum(i.size for i in q.pending)
                q.pending.clear()
                q.parked = True
                q.queued_upto = q.acked
                parked.append(q)
        return parked

    def unpark(self, q: OriginQueue, entries: list[Item], caught_up: bool) -> None:
        """Feed a parked queue from its own re-read; ``caught_up``: the re-read has reached
        :attr:`scan_pos`, so the queue takes the scanner's entries again."""
        lanes = self.lanes.get(q.route)
        for item in entries:
            if item.seq > q.queued_upto and (
                    lanes is None or lanes.names[lanes.of(item.seq)] == q.lane):
                item.queue = q
                item.lane = q.lane
                q.pending.append(item)
                q.queued_upto = item.seq
                self.buffered += 1
                self.buffered_bytes += item.size
        if caught_up:
            q.parked = False
            q.queued_upto = max(q.queued_upto, self.reach(q))
        self._ready(q)

    # -- dropping by policy --------------------------------------------------------------------

    def drop_pending(self, q: OriginQueue, count: int) -> list[Item]:
        """Remove up to ``count`` of the oldest unsent messages of ``q`` (TTL, byte cap); the
        cursor moves past them when nothing older is in flight."""
        gone: list[Item] = []
        while q.pending and len(gone) < count:
            item = q.pending.popleft()
            gone.append(item)
            self.buffered -= 1
            self.buffered_bytes -= item.size
        if gone and not q.inflight:
            q.acked = max(q.acked, gone[-1].seq)
            q.dirty = True
        return gone

    # -- cursors -------------------------------------------------------------------------------

    def floor(self) -> int:
        """Every entry up to here is done for every queue: where a restart may start reading
        (and what the store may delete). Parked queues hold it at their cursor."""
        low = self.scan_pos
        for q in self.queues.values():
            head = q.head_seq()
            if head is not None:
                low = min(low, head - 1)
            elif q.parked:
                low = min(low, q.acked)
        return low

    def dirty(self) -> list[tuple[str, Origin, int]]:
        """(lane, origin, cursor) of the queues whose cursor moved since the last call."""
        out = []
        for q in self.queues.values():
            if q.dirty:
                q.dirty = False
                out.append((q.lane, q.origin, q.acked))
        return out

    def oldest_ms(self) -> int | None:
        heads = [q.inflight[0].entry.enqueued_ms if q.inflight else q.pending[0].entry.enqueued_ms
                 for q in self.queues.values() if q.inflight or q.pending]
        return min(heads, default=None)
