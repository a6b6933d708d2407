"""Identity mode (towards Azure IoT Hub): one MQTT connection per origin identity.

IoT Hub knows nothing of our on-behalf-of scheme and multiplexes identities only over AMQP, so
over MQTT each origin needs its own connection with its own credentials (federation.md §0.1
fact 4, §3.3): the device's own key from our registry, or a token minted from a DeviceConnect
policy of the parent. Connections are opened lazily (when an origin has something to send),
staggered by a token bucket (``connect_rate``, S1 allows 100 new connections/s), closed when idle
(``idle_close``), and each keeps at most ``max_inflight`` (16, IoT Hub's Receive Maximum) QoS 1
publishes in flight. A connection that fails holds back only its own origin. A route's
bandwidth cap holds over all the connections together (one :class:`Pacer` for the pump).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from gateway.errors import UpstreamError
from gateway.upstream import wire
from gateway.upstream.backlog import Item
from gateway.upstream.link import Backoff, Session, open_session
from gateway.upstream.policy import Pacer
from gateway.upstream.wire import Origin

if TYPE_CHECKING:
    from gateway.upstream.forwarder import Forwarder

log = logging.getLogger(__name__)

Credentials = Callable[[Origin], tuple[str | None, str | None]]
"""origin -> (key, policy name or None); (None, None) when it has no SAS key here."""


class TokenBucket:
    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self.rate = max(0.1, rate)
        self.tokens = self.rate
        self.clock = clock
        self.stamp = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass
class _Conn:
    origin: Origin
    backoff: Backoff
    session: Session | None = None
    connecting: asyncio.Task[None] | None = None
    inflight: dict[asyncio.Future[None], Item] = field(default_factory=dict)
    last_used: float = 0.0
    retry_at: float = 0.0


class IdentityPump:
    def __init__(self, forwarder: Forwarder, credentials: Credentials) -> None:
        self.fw = forwarder
        self.credentials = credentials
        self.conns: dict[Origin, _Conn] = {}
        self.opened = 0  # connections opened, for tests and status

    async def run(self) -> None:
        fw, cfg = self.fw, self.fw.cfg
        backlog = fw.backlog
        limiter = TokenBucket(cfg.connect_rate, fw.clock)
        pacer = Pacer(fw.policy, fw.clock)  # the routes' caps over all the connections
        loop = asyncio.get_running_loop()
        fw.link.set("connecting")
        try:
            while True:
                now = fw.clock()
                self._reap(now)
                allowed = {o for o, c in self.conns.items() if c.session is not None
                           and len(c.inflight) < cfg.max_inflight}
                pacer.turn()
                while allowed:
                    item = backlog.take(now, allowed, pacer.paced)
                    if item is None:
                        break
                    if not pacer.admit(item.route, item.size):  # a metered link: wait
                        backlog.untake(item)
                        continue
                    c = self.conns[item.origin]
                    assert c.session is not None
                    topic, payload = wire.encode(item.entry, item.origin, epoch=fw.epoch,
                                                 stamp=False, route=item.route)
                    task = c.session.send(topic, payload)
                    c.inflight[task] = item
                    c.last_used = now
                    task.add_done_callback(partial(self._done, c, c.session))
                    if len(c.inflight) >= cfg.max_inflight:
                        allowed.discard(item.origin)
                for q in list(backlog.waiting(now)):
                    if q.origin not in self.conns:
                        self.conns[q.origin] = _Conn(q.origin, Backoff(
                            cfg.reconnect_min, cfg.reconnect_max))
                    c = self.conns[q.origin]
                    if c.session is None and c.connecting is None and c.retry_at <= now:
                        if not limiter.take():
                            break  # staggered: the rest wait for the bucket
                        c.connecting = loop.create_task(self._connect(c))
                fw._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05 if pacer.paced else 0.2):
                        await fw._wake.wait()
        finally:
            for c in self.conns.values():
                if c.connecting is not None:
                    c.connecting.cancel()
                if c.session is not None:
                    await self._drop(c, strike=False)

    def _done(self, c: _Conn, session: Session, task: asyncio.Future[None]) -> None:
        item = c.inflight.pop(task, None)
        if item is None or session.ended or task.cancelled() or task.exception() is not None:
            return
        fw = self.fw
        fw.backlog.acked(item)
        fw.link.sent += 1
        fw._count_sent(item.route)
        fw._wake.set()

    async def _connect(self, c: _Conn) -> None:
        fw, cfg = self.fw, self.fw.cfg
        await asyncio.sleep(random.uniform(0, 1 / max(0.1, cfg.connect_rate)))  # jitter
        key, policy = self.credentials(c.origin)
        try:
            if key is None:
                raise UpstreamError(f"no SAS key for {c.origin.client_id} to connect with")
            session = await open_session(
                fw.settings, origin=c.origin, key=key, policy=policy, window=cfg.max_inflight,
                keepalive=cfg.keepalive, token_ttl=cfg.token_ttl, ack_timeout=cfg.ack_timeout,
                clock=fw.clock)
            if not self._any_open() and not await fw._cut_lanes():  # the link comes up
                await session.close()
                raise UpstreamError("the live lane's boundary could not be stored")
        except UpstreamError as exc:
            delay = c.backoff.next()
            c.retry_at = fw.clock() + delay
            fw.link.set("disconnected" if not self._any_open() else "connected", str(exc))
            log.warning("upstream %s: %s (retry in %.1f s)", c.origin.client_id, exc, delay)
            return
        finally:
            c.connecting = None
        c.session = session
        c.last_used = fw.clock()
        self.opened += 1
        fw.link.connects += 1
        fw.link.set("connected")
        session.lost.add_done_callback(lambda _: fw._wake.set())
        fw._wake.set()

    def _any_open(self) -> bool:
        return any(c.session is not None for c in self.conns.values())

    def _reap(self, now: float) -> None:
        """Lost connections give their in-flight back; idle ones close; tokens due renew."""
        for c in self.conns.values():
            s = c.session
            if s is None:
                continue
            if s.lost.done():
                reason = s.lost.result()
                self.fw.link.last_error = f"{c.origin.client_id}: {reason}"
                c.retry_at = now + c.backoff.next()
                asyncio.get_running_loop().create_task(self._drop(c, strike=True))
            elif not c.inflight and (now - c.last_used > self.fw.cfg.idle_close
                                     or now >= s.renew_at):
                asyncio.get_running_loop().create_task(self._drop(c, strike=False))
            elif s.acked:
                c.backoff.reset()

    async def _drop(self, c: _Conn, *, strike: bool) -> None:
        session, c.session = c.session, None
        if session is None:
            return
        session.ended = True
        for task in c.inflight:
            task.cancel()
        c.inflight.clear()
        if self.fw.backlog.origin_lost(c.origin, self.fw.clock(), strike=strike):
            log.warning("upstream: origin %s keeps failing; set aside", c.origin.client_id)
        await session.close()
