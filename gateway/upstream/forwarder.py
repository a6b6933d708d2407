"""The forwarder: the ``$upstream`` endpoint's reader of the log, and the pump to the parent.

One scanner reads the log in order from the floor cursor and offers every entry that
``select`` puts on an upstream route to the :class:`~gateway.upstream.backlog.Backlog` (a
queue per (route, origin)); the pump keeps up to ``window`` QoS 1 publishes in flight on the
link and moves a queue's cursor only on the parent's PUBACK. It fills the window in bursts
of a quarter, a loop turn apart: sent in one write, a whole window reaches the parent as one
group commit and comes back as one run of PUBACKs, so each side would wait while the other
works; in bursts the parent commits one while the next arrives; a flusher persists the cursors
and the floor a few times a second. Towards a parent that is this software (mode
``gateway``), one connection carries every origin on our behalf and each message carries the
dedupe stamp (:mod:`gateway.hub.onbehalf`), so the parent stores each exactly once.

A live-first route (``live_first``) gets a new lane when the link comes up with a backlog
(:meth:`Forwarder._cut_lanes`, stored before anything is sent); while the scanner is below it,
the live reader (:meth:`Forwarder._scan_live`) reads the new messages so that they go first,
and the last ``LIVE_RESERVE`` places of the window are theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from gateway.config import UpstreamConfig
from gateway.errors import StoreError, UpstreamError, UpstreamRefusedError
from gateway.hub.onbehalf import pack_frame, register_topic
from gateway.hub.quota import next_midnight
from gateway.store.db import Database
from gateway.store.log import Entry, MessageLog
from gateway.upstream import wire
from gateway.upstream.backlog import Backlog, Item, OriginQueue
from gateway.upstream.clock import AgeClock, boot_id
from gateway.upstream.cursors import FLOOR_CURSOR, CursorStore
from gateway.upstream.identity import Credentials, IdentityPump
from gateway.upstream.link import Backoff, Session, open_session
from gateway.upstream.policy import Pacer, RoutePolicy
from gateway.upstream.settings import LinkSettings

log = logging.getLogger(__name__)

SCAN_CHUNK = 2000
QUOTA_CONNACK = 3  # "server unavailable": a parent of ours whose daily quota is used up
FLUSH_INTERVAL = 0.25
LIVE_RESERVE = 16  # places of the window kept for live lanes while their backlog drains
BURSTS = 4  # the window goes out in bursts of a quarter, a loop turn apart (see _pump)
BURST_MIN = 32


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class RouteCounters:
    sent: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class LinkState:
    state: str = "disconnected"  # connected|connecting|disconnected|throttled|paused
    since: float = field(default_factory=time.time)
    last_error: str = ""
    sent: int = 0
    connects: int = 0
    routes: dict[str, RouteCounters] = field(default_factory=dict)

    def set(self, state: str, error: str | None = None) -> None:
        if state != self.state:
            self.state = state
            self.since = time.time()
        if error is not None:
            self.last_error = error


class Forwarder:
    """Store-and-forward to one parent. ``run`` until cancelled; ``status`` at any time.

    ``select`` names the upstream route of an entry (None: not forwarded) by its ``kind`` and
    ``routes`` only: the scanner asks it once per distinct pair in a chunk it reads."""

    def __init__(self, log_: MessageLog, db: Database, settings: LinkSettings,
                 cfg: UpstreamConfig, *, local_gateway: str,
                 select: Callable[[Entry], str | None],
                 policy_of: Callable[[str], RoutePolicy],
                 clock: Callable[[], float] = time.monotonic, boot: str | None = None,
                 refuse: Callable[[str | None], None] | None = None,
                 data_dir: str | None = None,
                 credentials: Credentials | None = None,
                 on_session: Callable[[Session], None] | None = None) -> None:
        self.on_session = on_session  # the downlink serves each connection (downlink.py)
        self.log = log_
        self.cursors = CursorStore(db)
        self.settings = settings
        self.cfg = cfg
        self.local_gateway = local_gateway
        self.select = select
        self.policy_of = policy_of
        self.clock = clock
        self.boot = boot or boot_id()
        self.refuse = refuse or (lambda reason: None)
        self.credentials: Credentials = credentials or (lambda origin: (None, None))
        self.identity: IdentityPump | None = None
        self.data_dir = data_dir
        self._flushes = 0
        self._disk_over = 0  # bytes above the disk high-water mark at the last check
        self.ages = AgeClock(self.boot, [], [])
        self._dropped_saved: dict[str, dict[str, int]] = {}
        self.window = cfg.gateway_inflight if cfg.mode == "gateway" else cfg.max_inflight
        self._window_now = self.window  # halved when throttled, grows back per PUBACK
        self._sends = 0  # publishes sent on the current session
        self._session_acks = 0  # and acknowledged
        self.packs = 0  # packs acknowledged by the parent
        self.packed = 0  # readings in them
        self.backlog = Backlog(max_buffer=max(4 * self.window, 20_000))
        self.link = LinkState()
        self.epoch = ""
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._floor_saved = -1
        self._policies: dict[str, RoutePolicy] = {}
        self._lanes_cut = asyncio.Event()  # the live reader has work
        self._lanes_version = self._lanes_saved_version = 0  # cuts made, and made durable
        self._forgotten: list[str] = []  # lanes forgotten in memory, their cursors not deleted
        self.ready = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        self.epoch, cursors = await self.cursors.open()
        start = await self.log.get_cursor(FLOOR_CURSOR)
        if start is None:  # a new upstream: what arrives from now on (routes apply to new messages)
            start = self.log.last_seq
        self.backlog = Backlog(cursors, scan_pos=start, max_buffer=self.backlog.max_buffer,
                               lanes=await self.cursors.load_lanes())
        checkpoints, boots, dropped = await self.cursors.load_clock()
        for route, counts in dropped.items():
            self.link.routes.setdefault(route, RouteCounters()).dropped.update(counts)
        self._dropped_saved = {r: dict(c) for r, c in dropped.items()}
        self.ages = AgeClock(self.boot, checkpoints, boots)
        await self.cursors.save_clock(self.ages.start(self.log.last_seq, self.clock()), None)
        await self.log.set_cursor(FLOOR_CURSOR, min(start, self.log.last_seq), pin=True)
        self.ready.set()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._scan(), name="upstream-scan")
                tasks.create_task(self._scan_live(), name="upstream-scan-live")
                tasks.create_task(self._flush_loop(), name="upstream-flush")
                if self.cfg.mode == "identity":
                    self.identity = IdentityPump(self, self.credentials)
                    tasks.create_task(self.identity.run(), name="upstream-identities")
                else:
                    tasks.create_task(self._connect_loop(), name="upstream-link")
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._flush())

    def policy(self, route: str) -> RoutePolicy:
        p = self._policies.get(route)
        if p is None:
            p = self._policies[route] = self.policy_of(route)
            if p.live_first:
                self.backlog.live_first(route)
        return p

    # -- the scanner -------------------------------------------------------------------------

    async def _scan(self) -> None:
        backlog = self.backlog
        origins = wire.Origins(self.local_gateway, self.settings.device_id)
        while True:
            while backlog.full():
                for q in backlog.park(self.clock()):  # a long-refused origin leaves memory
                    log.warning("upstream: origin %s parked (re-read from its cursor later)",
                                q.origin.client_id)
                if not backlog.full():
                    break
                self._space.clear()
                try:
                    async with asyncio.timeout(1.0):
                        await self._space.wait()
                except TimeoutError:
                    pass
            read = await self._read(backlog.scan_pos, origins, live=False)
            if read is None:
                continue
            pos, count, _ = read
            backlog.scan_pos = pos
            if count:
                self._wake.set()
            if count < SCAN_CHUNK:
                await self.log.wait_beyond(pos, timeout=1.0)

    async def _scan_live(self) -> None:
        """The live reader (:mod:`gateway.upstream.backlog`, live-first lane): while the
        scanner is still below a live lane's boundary, read on from there and offer only the
        live lanes' messages, so they go up ahead of the backlog."""
        backlog = self.backlog
        origins = wire.Origins(self.local_gateway, self.settings.device_id)
        while True:
            if not backlog.live_reading():
                await self._lanes_cut.wait()
                self._lanes_cut.clear()
                continue
            if backlog.live_full():
                self._space.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await self._space.wait()
                continue
            read = await self._read(backlog.live_pos, origins, live=True)
            if read is None:
                continue
            pos, count, woke = read
            backlog.live_pos = max(backlog.live_pos, pos)
            if woke:
                self._wake.set()
            if count < SCAN_CHUNK:
                await self.log.wait_beyond(pos, timeout=1.0)

    async def _read(self, start: int, origins: wire.Origins,
                    live: bool) -> tuple[int, int, bool] | None:
        """One chunk of the log after ``start`` offered to the backlog (``live``: only the
        messages of the live lanes the live reader adopted): (the position reached, entries
        read, whether any was queued), or None when the read failed (after a pause)."""
        backlog = self.backlog
        try:
            entries, pos = await self.log.scan(start, SCAN_CHUNK)
        except StoreError as exc:  # a full disk fails reads in a failed group commit too
            log.error("upstream: reading the store failed: %s", exc)
            await asyncio.sleep(1.0)
            return None
        queued = False
        # the route and its priority per (kind, routes matched): ``select`` reads nothing
        # else of an entry, and the routes of a read are one tuple per distinct text
        # (gateway.store.log._entries), so a chunk asks once per kind of message
        chosen: dict[tuple[str, tuple[str, ...]], tuple[str | None, int]] = {}
        offer, origin_of = backlog.offer, origins.of
        for entry in entries:
            key = (entry.kind, entry.routes)
            found = chosen.get(key)
            if found is None:
                route = self.select(entry)
                found = chosen[key] = (route, self.policy(route).priority if route else 0)
            route = found[0]
            if route is None or live and not backlog.is_live(route, entry.seq):
                continue
            queued |= offer(route, origin_of(entry), entry, len(entry.body) + len(entry.props),
                            found[1])
        return pos, len(entries), queued

    async def _cut_lanes(self) -> bool:
        """The link is up: a live-first route with a backlog starts a new live lane above the
        log's last message, recorded durably before anything is sent. False if that could
        not be stored (then nothing may be sent)."""
        backlog = self.backlog
        if self._policies:
            self._policies.clear()  # a route changed live takes effect on this link
        routes = {q.route for q in backlog.queues.values()} | set(backlog.lanes)
        unread = self.log.last_seq - backlog.scan_pos > SCAN_CHUNK  # far behind: a backlog
        cut = [r for r in sorted(routes) if self.policy(r).live_first
               and (unread or backlog.backlogged(r))]
        done = backlog.cut(cut, self.log.last_seq)
        if done:
            log.info("upstream: live lane above %d for %s", self.log.last_seq, ",".join(done))
            self._lanes_version += 1
            self._lanes_cut.set()
        version = self._lanes_version
        if self._lanes_saved_version == version:
            return True
        try:
            await self.cursors.save_lanes(backlog.lanes_json(), self._forgotten)
            self._forgotten = []
        except StoreError as exc:
            log.error("upstream: the live lane's boundary was not stored: %s", exc)
            return False
        self._lanes_saved_version = max(self._lanes_saved_version, version)
        return self._lanes_saved_version == self._lanes_version

    # -- persistence -------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self._flush()
                now = self.clock()
                for q in [q for q in self.backlog.queues.values()
                          if q.parked and q.hold_until <= now]:
                    await self._reread(q)
            except StoreError as exc:
                log.error("upstream cursors not saved: %s", exc)

    def _counters(self, route: str) -> RouteCounters:
        counters = self.link.routes.get(route)
        if counters is None:
            counters = self.link.routes[route] = RouteCounters()
        return counters

    def _count_sent(self, route: str) -> None:
        self._counters(route).sent += 1
        if not self.backlog.full():
            self._space.set()

    def _drop(self, route: str, reason: str, count: int) -> None:
        if count:
            counters = self.link.routes.setdefault(route, RouteCounters())
            counters.dropped[reason] = counters.dropped.get(reason, 0) + count

    def _expire(self, now: float) -> None:
        """TTL by monotonic age (:mod:`gateway.upstream.clock`): the expired leave the queue
        at once and are counted as ``dropped.ttl``."""
        for q in self.backlog.queues.values():
            ttl = self.policy(q.route).ttl
            if ttl <= 0 or not q.pending:
                continue
            n = 0
            for item in q.pending:
                if self.ages.age(item.seq, now) <= ttl:
                    break
                n += 1
            if n:
                self.backlog.drop_pending(q, n)
                self._drop(q.route, "ttl", n)
        if not self.backlog.full():
            self._space.set()

    async def _disk_full(self) -> str | None:
        """Above the disk high-water mark? Space SQLite holds free for reuse counts as free."""
        if not self.data_dir or self.cfg.disk_high_water >= 1.0:
            return None
        try:
            st = await asyncio.to_thread(os.statvfs, self.data_dir)
        except OSError:
            return None
        total = st.f_blocks * st.f_frsize
        if not total:
            return None
        free = st.f_bavail * st.f_frsize + await self.log.reusable_bytes()
        used = 1 - free / total
        self._disk_over = max(0, int((used - self.cfg.disk_high_water) * total))
        if used > self.cfg.disk_high_water:
            return f"disk {used:.0%} full (high-water mark {self.cfg.disk_high_water:.0%})"
        return None

    async def _enforce_caps(self) -> None:
        """Byte cap per route and the disk high-water mark, by each route's ``when_full``:
        ``reject-new`` refuses new telemetry (no PUBACK), ``drop-oldest`` drops the oldest,
        ``thin`` keeps one message per origin per ``thin_interval`` first. Counted by reason."""
        disk = await self._disk_full()
        stats = self.log.stats()
        unscanned = max(0, stats.last_seq - self.backlog.scan_pos)
        avg = stats.bytes / stats.count if stats.count else 0
        by_route: dict[str, list[OriginQueue]] = {}
        for q in self.backlog.queues.values():
            by_route.setdefault(q.route, []).append(q)
        # the bytes in memory per route matter only with a byte cap or over the disk mark
        # (summing them walks every buffered message)
        if disk is None and not any(self.policy(r).max_bytes for r in by_route):
            by_route = {}  # nothing to enforce
        mem = {r: sum(i.size for q in qs for i in (*q.pending, *q.inflight))
               for r, qs in by_route.items()}
        total_mem = sum(mem.values()) or 1
        refusing: str | None = None
        evict_disk = False
        for route, qs in by_route.items():
            policy = self.policy(route)
            size = mem[route] + int(unscanned * avg * mem[route] / total_mem)
            over_cap = policy.max_bytes and size > policy.max_bytes
            if not over_cap and not disk:
                continue
            reason = disk or (f"upstream route {route} over its byte cap "
                              f"({size} > {policy.max_bytes})")
            if policy.when_full == "reject-new":
                refusing = reason
                continue
            if policy.when_full == "thin":
                size -= self._thin(route, qs, policy.thin_interval)
            if over_cap and size > policy.max_bytes:
                self._drop_oldest(route, qs, size - policy.max_bytes * 9 // 10)
            if disk:
                evict_disk = True
        if evict_disk:  # free room on the disk itself: the store's oldest go
            # down to 5 % of the disk below the mark, at least a tenth of what is stored
            st = await asyncio.to_thread(os.statvfs, self.data_dir or ".")
            need = self._disk_over + int(0.05 * st.f_blocks * st.f_frsize)
            rows, upto = await self.log.evict_oldest(max(need, stats.bytes // 10))
            if rows:
                log.warning("upstream: %s; %d oldest messages deleted", disk, rows)
                for q in self.backlog.queues.values():
                    n = sum(1 for i in q.pending if i.seq <= upto)
                    if n:
                        self.backlog.drop_pending(q, n)
                        self._drop(q.route, "full", n)
                if self.backlog.scan_pos < upto:
                    self.backlog.scan_pos = upto  # unread ones were counted by the store
        self.refuse(refusing)

    def _thin(self, route: str, qs: list[OriginQueue], interval: float) -> int:
        """Keep one pending message per origin per ``interval`` seconds; returns bytes freed."""
        freed = 0
        step = interval * 1000
        for q in qs:
            kept: deque[Item] = deque()
            last = None
            dropped = 0
            for item in q.pending:
                t = item.entry.enqueued_ms  # spacing only: a wall-clock jump thins less, never more
                if last is None or abs(t - last) >= step:
                    kept.append(item)
                    last = t
                else:
                    dropped += 1
                    freed += item.size
            if dropped:
                self.backlog.buffered -= dropped
                self.backlog.buffered_bytes -= sum(i.size for i in q.pending) - sum(
                    i.size for i in kept)
                q.pending = kept
                self._drop(route, "thinned", dropped)
        return freed

    def _drop_oldest(self, route: str, qs: list[OriginQueue], need: int) -> None:
        heads = [(q.pending[0].seq, id(q), q) for q in qs if q.pending]
        heapq.heapify(heads)
        freed = dropped = 0
        while heads and freed < need:
            _, _, q = heapq.heappop(heads)
            item = self.backlog.drop_pending(q, 1)[0]
            freed += item.size
            dropped += 1
            if q.pending:
                heapq.heappush(heads, (q.pending[0].seq, id(q), q))
        self._drop(route, "full", dropped)

    async def _reread(self, q: OriginQueue) -> None:
        """A parked queue's messages, read again from its own cursor up to the scanner."""
        pos = q.acked
        while True:
            entries, pos = await self.log.scan(pos, SCAN_CHUNK, device_id=q.origin.device_id
                                               if q.origin.device_id != self.settings.device_id
                                               else self.local_gateway)
            items = []
            for entry in entries:
                if self.select(entry) != q.route:
                    continue
                origin = wire.origin_of(entry, self.local_gateway, self.settings.device_id)
                if origin == q.origin:
                    items.append(Item(q.route, origin, entry, len(entry.body) + len(entry.props)))
            caught_up = pos >= self.backlog.reach(q)
            self.backlog.unpark(q, items, caught_up)
            if caught_up:
                log.info("upstream: origin %s back from parking", q.origin.client_id)
                self._wake.set()
                return

    async def _flush(self) -> None:
        now = self.clock()
        self._expire(now)
        self._flushes += 1
        if self._flushes % 4 == 0 or self._disk_over:  # about once a second; always when full
            await self._enforce_caps()
        row, boot = self.ages.checkpoint(self.log.last_seq, now)
        dropped = {r: dict(c.dropped) for r, c in self.link.routes.items() if c.dropped}
        changed = dropped != self._dropped_saved
        await self.cursors.save_clock([row] if row else [], boot,
                                      prune_below=self.ages.prune(self.backlog.floor()),
                                      dropped=dropped if changed else None)
        if changed:
            self._dropped_saved = dropped
        await self.cursors.save(self.backlog.dirty())
        floor = min(self.backlog.floor(), self.log.last_seq)
        if floor != self._floor_saved:
            await self.log.set_cursor(FLOOR_CURSOR, floor, pin=True)
            self._floor_saved = floor
        if self._lanes_saved_version == self._lanes_version and self.backlog.lanes:
            # segments whose every message is at the parent: below the durable floor
            self._forgotten += self.backlog.forget(self._floor_saved)
            if self._forgotten:
                await self.cursors.save_lanes(self.backlog.lanes_json(), self._forgotten)
                self._forgotten = []

    # -- the link ----------------------------------------------------------------------------

    async def _connect_loop(self) -> None:
        backoff = Backoff(self.cfg.reconnect_min, self.cfg.reconnect_max)
        throttled = False
        while True:
            self.link.set("throttled" if throttled else "connecting")
            try:
                session = await open_session(
                    self.settings, window=self.window, keepalive=self.cfg.keepalive,
                    token_ttl=self.cfg.token_ttl, ack_timeout=self.cfg.ack_timeout,
                    clock=self.clock)
            except UpstreamRefusedError as exc:
                if exc.connack != QUOTA_CONNACK:
                    self.link.set("throttled" if throttled else "disconnected", str(exc))
                    delay = backoff.next()
                    log.warning("upstream connect failed: %s (retry in %.1f s)", exc, delay)
                    await asyncio.sleep(delay)
                    continue
                await self._pause(str(exc))
                continue
            except UpstreamError as exc:
                self.link.set("throttled" if throttled else "disconnected", str(exc))
                delay = backoff.next()
                log.warning("upstream connect failed: %s (retry in %.1f s)", exc, delay)
                await asyncio.sleep(delay)
                continue
            if not await self._cut_lanes():
                await session.close()
                self.link.set("disconnected", "the live lane's boundary could not be stored")
                await asyncio.sleep(backoff.next())
                continue
            self.link.connects += 1
            self.link.set("throttled" if throttled else "connected")
            if self.on_session is not None:
                self.on_session(session)
            log.info("upstream connected host=%s port=%d as=%s", self.settings.host,
                     self.settings.port, self.settings.device_id)
            reason = await self._pump(session)
            if session.acked:
                backoff.reset()
            if reason == "renew":
                continue
            # the parent ended a session that carried publishes and acknowledged none of them:
            # IoT Hub's throttling (429) over MQTT is a closed connection (ref §13). Slow down:
            # half the window (it grows back by one per PUBACK), a longer pause; drop nothing.
            throttled = self._sends > 0 and self._session_acks == 0
            if throttled:
                self._window_now = max(1, self._window_now // 2)
                reason = f"throttled by the parent ({reason}); window {self._window_now}"
            self.link.set("throttled" if throttled else "disconnected", reason)
            delay = backoff.next()
            log.warning("upstream link down: %s (retry in %.1f s)", reason, delay)
            await asyncio.sleep(delay)

    async def _pause(self, reason: str) -> None:
        """The parent's daily quota is used up (IoT Hub 403002; CONNACK 3 from a parent that
        is this software): no reconnect loop, one attempt at the next 00:00 UTC, or earlier
        every ``paused_probe`` seconds. The wall clock is read in steps of at most a minute,
        so a clock set meanwhile is followed."""
        until = next_midnight(time.time())
        probe = time.monotonic() + max(1.0, self.cfg.paused_probe)  # never a loop
        self.link.set("paused", f"{reason}; paused until {_iso(until)}")
        log.warning("upstream paused until %s: %s", _iso(until), reason)
        while time.time() < until and time.monotonic() < probe:
            await asyncio.sleep(max(0.05, min(60.0, until - time.time(),
                                              probe - time.monotonic())))

    async def _pump(self, session: Session) -> str:
        """Send over ``session`` until it is lost (or due for a token renewal); returns why."""
        backlog = self.backlog
        registered: set[wire.Origin] = set()
        registering: dict[wire.Origin, asyncio.Future[None]] = {}
        inflight = [0]  # publishes without their PUBACK yet, on this session
        self._sends = self._session_acks = 0
        loop = asyncio.get_running_loop()
        stamp = self.cfg.mode == "gateway"
        encoder = wire.Encoder(self.epoch)
        woken = self._wake
        link = self.link

        def acked(tokens: list[Any]) -> None:  # a run of PUBACKs (never once the link is lost)
            count = len(tokens)
            inflight[0] -= count
            if session.ended:
                return
            session.acked += count
            self._session_acks += count
            if self._window_now < self.window:
                self._window_now = min(self.window, self._window_now + count)
            route: str | None = None
            counters = RouteCounters()
            sent = 0
            for token in tokens:
                if type(token) is Item:  # one message
                    if token.queue is not None:
                        token.queue.singles -= 1
                    backlog.acked(token)
                    if token.route is not route:
                        route = token.route
                        counters = self._counters(route)
                    counters.sent += 1
                    sent += 1
                    continue
                for one in token:  # a pack: every reading in it
                    backlog.acked(one)
                    self._counters(one.route).sent += 1
                sent += len(token)
                self.packs += 1
                self.packed += len(token)
            link.sent += sent
            if not backlog.full():
                self._space.set()
            if not woken.is_set():
                woken.set()

        def registered_cb(origin: wire.Origin, task: asyncio.Future[None]) -> None:
            registering.pop(origin, None)
            if not session.ended and not task.cancelled() and task.exception() is None:
                registered.add(origin)
                self._wake.set()

        renewing = False
        more = False  # the window has room after a burst
        pacer = Pacer(self.policy, self.clock)
        session.link.on_acks = acked
        lost = session.lost
        lost.add_done_callback(wake_on_loss := lambda _: woken.set())  # one waiter, not a task
        send = session.link.send_batched
        report = loop.create_task(self._report(session), name="upstream-report")
        try:
            while not session.lost.done():
                now = self.clock()
                if not renewing and now >= session.renew_at:
                    renewing = True
                if not renewing:
                    pacer.turn()
                    # with live lanes, the last LIVE_RESERVE places of the window are theirs
                    below = self._window_now - (LIVE_RESERVE if backlog.segmented else 0)
                    burst = 0
                    while inflight[0] < self._window_now:
                        if burst >= max(BURST_MIN, self._window_now // BURSTS):
                            more = True  # the rest of the window after a loop turn
                            break
                        item = backlog.take(now, registered if stamp else None, pacer.paced,
                                            live_only=inflight[0] >= below)
                        if item is None:
                            break
                        if not pacer.admit(item.route, item.size):  # a metered link: wait
                            backlog.untake(item)
                            continue
                        # pack only behind packs: a reading sent alone may still sit in the
                        # parent's batch when a pack (stored at once) arrives after it
                        if stamp and item.queue is not None and item.queue.pending and \
                                not item.queue.singles and self.policy(item.route).pack:
                            pack = self._pack(encoder, item)
                            if pack is not None:
                                # admit paid for the first reading only
                                pacer.charge(item.route, sum(one.size for one in pack[2][1:]))
                                if not send(pack[0], pack[1], pack[2]):
                                    for one in reversed(pack[2]):
                                        backlog.untake(one)
                                    break
                                inflight[0] += 1
                                self._sends += 1
                                burst += 1
                                continue
                        if stamp:
                            topic = encoder.topic(item.entry, item.origin, item.lane, item.prev)
                        else:
                            topic = wire.encode(item.entry, item.origin, epoch=self.epoch,
                                                stamp=False, route=item.route)[0]
                        if not send(topic, item.entry.body, item):
                            backlog.untake(item)
                            break
                        if item.queue is not None:
                            item.queue.singles += 1
                        inflight[0] += 1
                        self._sends += 1
                        burst += 1
                    if stamp and len(registering) < 64 and len(registered) < len(backlog.origins):
                        for q in backlog.waiting(now):
                            o = q.origin
                            if o not in registered and o not in registering:
                                t = session.send(register_topic(o.device_id, o.module_id),
                                                 b"")
                                registering[o] = t
                                t.add_done_callback(partial(registered_cb, o))
                                if len(registering) >= 64:
                                    break
                elif not inflight[0]:
                    return "renew"
                if more:  # let this burst go out (and acknowledgements in) first
                    more = False
                    await asyncio.sleep(0)
                    continue
                self._wake.clear()  # set by a PUBACK, the scanner, a registration, the loss
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05 if pacer.paced else 1.0):
                        await self._wake.wait()
            return session.lost.result()
        finally:
            session.ended = True
            lost.remove_done_callback(wake_on_loss)
            for fut in [*registering.values(), report]:
                fut.cancel()
            parked = backlog.link_lost(self.clock())
            if parked is not None:
                log.warning("upstream: origin %s keeps failing; set aside for %.0f s",
                            parked.origin.client_id, parked.hold)
            await session.close()

    def _pack(self, encoder: wire.Encoder,
              first: Item) -> tuple[str, bytes, list[Item]] | None:
        """The backlog of ``first``'s origin packed into one message of at most 4 KB (topic
        and body: IoT Hub bills per started 4 KB), or None when no second reading fits."""
        budget = wire.PACK_LIMIT - len(wire.pack_topic(first.origin, 65535, self.epoch))
        frame = pack_frame(encoder.bag(first.entry, first.origin, first.lane, first.prev),
                           first.entry.body)
        frames, items, size = [frame], [first], len(frame)
        while size < budget:
            nxt = self.backlog.take_next(items[-1])
            if nxt is None:
                break
            frame = pack_frame(encoder.bag(nxt.entry, nxt.origin, nxt.lane, nxt.prev),
                               nxt.entry.body)
            if size + len(frame) > budget:
                self.backlog.untake(nxt)
                break
            frames.append(frame)
            items.append(nxt)
            size += len(frame)
        if len(items) < 2 or size > budget:
            for one in reversed(items[1:]):
                self.backlog.untake(one)
            return None
        return wire.pack_topic(first.origin, len(items), self.epoch), b"".join(frames), items

    async def _report(self, session: Session) -> None:
        """The status, as the gateway's reported property ``upstream`` at the parent, at most
        every ``status_interval`` seconds (and at once on connecting)."""
        rid = 0
        while not session.ended:
            rid += 1
            status = self.status()
            status["routes"] = {name.lstrip("$") or name: r  # twin keys cannot start with $
                                for name, r in status["routes"].items()}
            body = json.dumps({"upstream": status}).encode()
            try:
                await session.publish(f"$iothub/twin/PATCH/properties/reported/?$rid=up{rid}", body)
            except UpstreamError:
                return
            await asyncio.sleep(max(1.0, self.cfg.status_interval))

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        backlog = self.backlog
        stats = self.log.stats()
        unscanned = max(0, stats.last_seq - backlog.scan_pos)  # not yet read: an estimate
        avg = (stats.bytes / stats.count) if stats.count else 0
        now = self.clock()
        per_route: dict[str, dict[str, Any]] = {}
        queues: dict[str, list[OriginQueue]] = {}
        for q in backlog.queues.values():
            queues.setdefault(q.route, []).append(q)
        oldest_all = 0.0
        for route in sorted(set(queues) | set(self.link.routes)):
            qs = queues.get(route, [])
            count = sum(len(q.pending) + len(q.inflight) for q in qs)
            nbytes = sum(i.size for q in qs for i in (*q.pending, *q.inflight))
            heads = [q.head_seq() for q in qs]
            oldest = max((self.ages.age(h, now) for h in heads if h is not None), default=0.0)
            oldest_all = max(oldest_all, oldest)
            counters = self.link.routes.get(route, RouteCounters())
            per_route[route] = {
                "backlog": count, "backlogBytes": nbytes, "oldestAgeSeconds": round(oldest, 3),
                "sent": counters.sent, "dropped": dict(counters.dropped),
                "origins": len({q.origin for q in qs}),
            }
            lanes = backlog.lanes.get(route)
            if lanes is not None:  # live-first: how many segments, and the live lane's backlog
                live = lanes.names[-1]
                per_route[route]["lanes"] = len(lanes.segments)
                per_route[route]["liveBacklog"] = sum(
                    len(q.pending) + len(q.inflight) for q in qs if q.lane == live)
        dropped: dict[str, int] = {"ttl": 0, "full": 0}
        for counters in self.link.routes.values():
            for reason, n in counters.dropped.items():
                dropped[reason] = dropped.get(reason, 0) + n
        byte_cap = stats.dropped_total.get("byte-cap", 0)
        if byte_cap:
            dropped["store-cap"] = byte_cap
        if unscanned:
            oldest_all = max(oldest_all, self.ages.age(backlog.scan_pos + 1, now))
        return {
            "state": self.link.state,
            "backlog": backlog.buffered + unscanned,
            "backlogBytes": backlog.buffered_bytes + int(unscanned * avg),
            "oldestAgeSeconds": round(oldest_all, 3),
            "sent": self.link.sent,
            "dropped": dropped,
            "lastError": self.link.last_error,
            "since": _iso(self.link.since),
            "packed": {"messages": self.packs, "readings": self.packed},
            "routes": per_route,
        }
