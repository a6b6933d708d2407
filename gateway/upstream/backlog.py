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

Not built yet, the live-first lane, and how it must be done: sending new messages ahead of
the backlog breaks the parent's one high-water mark per (gateway, route, origin) (a live
message raises it; the older backlog is then dropped as a duplicate). The plan: *segments*.
When the link comes up with a backlog, the route records a boundary B (the scanner's position)
durably, before sending anything above it; each (route, origin) is then several queues, one per
segment (B_i, B_i+1], each with its own cursor and its own dedupe key at the parent (the key
gets ``@B_i``), so each lane is in order on its own and a message never changes lane (its
segment follows from its sequence and the recorded boundaries, across restarts). The newest
segment is the live lane and goes first; older segments drain behind it, oldest first; a
segment whose cursor passed its end is forgotten once the floor passed it. ``prev`` (the gap
check) then chains within a segment.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from gateway.store.log import Entry
from gateway.upstream.wire import Origin

STRIKES = 3  # drops of the link with this origin oldest in flight, before it is set aside
HOLD_MIN = 5.0
HOLD_MAX = 600.0
PARK_AFTER = 30.0  # set aside this long: its messages leave memory


class Item:
    """One message in a queue; ``queue`` is set when it joins one."""

    __slots__ = ("entry", "origin", "prev", "queue", "route", "seq", "size")

    def __init__(self, route: str, origin: Origin, entry: Entry, size: int) -> None:
        self.route = route
        self.origin = origin
        self.entry = entry
        self.size = size
        self.seq = entry.seq
        self.prev: int | None = None  # set by take: the seq sent before it in its queue
        self.queue: OriginQueue | None = None


QueueKey = tuple[str, Origin]


@dataclass(slots=True)
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

    @property
    def key(self) -> QueueKey:
        return (self.route, self.origin)

    def head_seq(self) -> int | None:
        if self.inflight:
            return self.inflight[0].seq
        if self.pending:
            return self.pending[0].seq
        return None


class _Class:
    __slots__ = ("pass_", "ready", "stride")

    def __init__(self, priority: int) -> None:
        self.stride = 1.0 / (1 << (9 - priority))
        self.pass_ = 0.0
        self.ready: deque[OriginQueue] = deque()


class Backlog:
    """In-memory view of what is still to go up; the shell feeds it and persists cursors."""

    def __init__(self, cursors: dict[QueueKey, int] | None = None, *, scan_pos: int = 0,
                 max_buffer: int = 50_000) -> None:
        self.queues: dict[QueueKey, OriginQueue] = {}
        self._cursors = dict(cursors or {})
        self.scan_pos = scan_pos  # every log entry up to here has been offered
        self.max_buffer = max_buffer
        self.buffered = 0  # pending + in flight, in memory
        self.buffered_bytes = 0
        self.inflight = 0
        self._classes: dict[int, _Class] = {}
        self._queued: set[QueueKey] = set()  # queues in a class's ready ring

    # -- feeding -----------------------------------------------------------------------------

    def queue(self, route: str, origin: Origin, priority: int = 0) -> OriginQueue:
        key = (route, origin)
        q = self.queues.get(key)
        if q is None:
            start = self._cursors.pop(key, 0)
            q = OriginQueue(route, origin, priority, acked=start, queued_upto=start)
            self.queues[key] = q
        return q

    def offer(self, route: str, origin: Origin, entry: Entry, size: int,
              priority: int = 0) -> bool:
        """Queue ``entry`` unless its queue's cursor or an earlier read already has it (or
        the queue is parked: it will be read again). True if it was queued."""
        q = self.queue(route, origin, priority)
        if entry.seq <= q.queued_upto or q.parked:
            return False
        q.queued_upto = entry.seq
        item = Item(route, origin, entry, size)
        item.queue = q
        q.pending.append(item)
        self.buffered += 1
        self.buffered_bytes += size
        self._ready(q)
        return True

    def full(self) -> bool:
        return self.buffered >= self.max_buffer

    def _ready(self, q: OriginQueue) -> None:
        if q.key not in self._queued and q.pending:
            cls = self._classes.get(q.priority)
            if cls is None:
                cls = self._classes[q.priority] = _Class(q.priority)
                active = [c.pass_ for c in self._classes.values() if c.ready]
                cls.pass_ = min(active, default=0.0)
            elif not cls.ready:  # a class coming back starts level with the others
                cls.pass_ = max(cls.pass_, min(
                    (c.pass_ for c in self._classes.values() if c.ready), default=cls.pass_))
            cls.ready.append(q)
            self._queued.add(q.key)

    # -- sending -----------------------------------------------------------------------------

    def take(self, now: float, allowed: set[Origin] | None = None,
             paced: set[str] | None = None) -> Item | None:
        """The next message to send, or None. ``allowed``: when given, only these origins
        (those registered on this connection so far); ``paced``: routes over their bandwidth
        cap just now."""
        if len(self._classes) == 1:
            classes: list[_Class] | tuple[_Class, ...] = tuple(self._classes.values())
        else:
            classes = sorted((c for c in self._classes.values() if c.ready),
                             key=lambda c: c.pass_)
        for cls in classes:
            ring = cls.ready
            for _ in range(len(ring)):
                q = ring[0]
                if not q.pending:
                    ring.popleft()
                    self._queued.discard(q.key)
                    continue
                ring.rotate(-1)
                if q.hold_until > now or (allowed is not None and q.origin not in allowed) or (
                        paced and q.route in paced):
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
        q = self.queues[(item.route, item.origin)]
        if q.inflight and q.inflight[-1] is item:
            q.inflight.pop()
            q.pending.appendleft(item)
            self.inflight -= 1
            self._ready(q)

    def waiting(self, now: float) -> Iterator[OriginQueue]:
        """Queues with something to send that are not on hold."""
        for cls in self._classes.values():
            for q in cls.ready:
                if q.pending and q.hold_until <= now:
                    yield q

    def acked(self, item: Item) -> bool:
        """The parent acknowledged ``item``; True if its queue's cursor moved."""
        q = item.queue or self.queues[(item.route, item.origin)]
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
        for item in entries:
            if item.seq > q.queued_upto:
                item.queue = q
                q.pending.append(item)
                q.queued_upto = item.seq
                self.buffered += 1
                self.buffered_bytes += item.size
        if caught_up:
            q.parked = False
            q.queued_upto = max(q.queued_upto, self.scan_pos)
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
        out = []
        for q in self.queues.values():
            if q.dirty:
                q.dirty = False
                out.append((q.route, q.origin, q.acked))
        return out

    def oldest_ms(self) -> int | None:
        heads = [q.inflight[0].entry.enqueued_ms if q.inflight else q.pending[0].entry.enqueued_ms
                 for q in self.queues.values() if q.inflight or q.pending]
        return min(heads, default=None)
