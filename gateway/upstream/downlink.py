"""Federation, child side: calls from the parent for the identities in our scope.

On every connection of the upstream link (the forwarder's session, one per parent) the
downlink subscribes to ``$iothub/gateway/down/#`` and serves what arrives there, answering on
``$iothub/gateway/up/...`` over the same connection (the grammar and the parent's half are in
:mod:`gateway.hub.federated`; federation.md §2, IoT Hub ref §5):

* a direct method with more gateways to pass (``via`` not empty) goes on to the next one,
  with the time that is left (our own :class:`~gateway.hub.federated.Federation`);
* with none left it is invoked here, on the device's or module's own connection (or a
  sensor's bridge): the hub's :meth:`~gateway.hub.methods.MethodService.call`. An identity not
  connected answers 404 ``DeviceNotOnline`` at once, a silent one 504 when the time is up.

Our own identity is known upstream by the link's device id; calls for its modules are turned
into calls for the modules of the local gateway. At most ``max_calls`` calls run at once;
beyond that the parent gets 503 at once rather than a queue growing without bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Final, TypeVar

from gateway.errors import GatewayError, NotFoundError, RemoteProtocolError, UpstreamError
from gateway.hub.federated import (
    DOWN_PREFIX,
    DOWNLINK_FILTER,
    DownlinkFilter,
    DownMethod,
    Federation,
    Hops,
    is_down_twin,
    parse_down,
    parse_down_identity,
    parse_down_twin,
    status_of,
    up_lifecycle_topic,
    up_method_topic,
    up_reported_topic,
    up_resync_topic,
    up_settled_topic,
    up_state_topic,
)
from gateway.hub.c2dfed import down_c2d_topic, parse_down_c2d
from gateway.hub.methods import MethodService
from gateway.hub.twinsvc import TwinService
from gateway.mqtt.packets import Publish
from gateway.upstream.c2dmirror import C2DMirror
from gateway.upstream.configpush import ConfigPush
from gateway.upstream.idmirror import IdentityMirror
from gateway.upstream.link import Session
from gateway.upstream.reported import ReportedQueue

log = logging.getLogger(__name__)

BATCH: Final = 64  # upward messages of one kind in flight at once (reported patches, C2D outcomes)
T = TypeVar("T")


class Downlink:
    def __init__(self, methods: MethodService, federation: Federation | None, *,
                 local_gateway: str, twins: TwinService | None = None,
                 reported: ReportedQueue | None = None, identities: IdentityMirror | None = None,
                 c2d: C2DMirror | None = None, config: ConfigPush | None = None,
                 refresh: float = 300.0, max_calls: int = 256) -> None:
        self.methods = methods
        self.config = config
        self.c2d = c2d
        self.identities = identities
        self.refresh = refresh
        self.reported = reported
        self.twins = twins
        self.federation = federation
        self.session: Session | None = None
        self._ordered: asyncio.Queue[Callable[[], Awaitable[None]]] = asyncio.Queue(10_000)
        self.owner = "the parent hub"
        if federation is not None:
            federation.child_ready = self._child_ready
            if reported is not None:
                federation.send_reported = reported.add
            if identities is not None:
                federation.is_mirrored = lambda d, m: (d, m) in identities.owned \
                    or d in identities.applying
            if c2d is not None:
                federation.send_settled = c2d.completed
            federation.send_state = self._state
            federation.send_lifecycle = self._lifecycle
        self._states: dict[tuple[str, str | None], tuple[bool, str | None]] = {}
        # lifecycle changes not yet acknowledged by the parent (the latest per identity)
        self._lifecycles: dict[tuple[str, str | None], tuple[bool, str | None]] = {}
        self._upstream_id = ""
        self.local_gateway = local_gateway
        self.max_calls = max_calls
        self.calls = 0  # served since start (status, tests)
        self._running: set[asyncio.Task[None]] = set()

    def attach(self, session: Session, upstream_id: str, owner: str = "the parent hub") -> None:
        """Serve ``session`` (a fresh connection to the parent) until it is lost. ``owner``
        names the parent in mirrored twins (``$metadata.$owner``)."""
        link = session.link
        self.session = session
        self.owner = owner
        link.on_publish = lambda packet: self._received(session, upstream_id, packet)
        self._upstream_id = upstream_id
        subscribed = link.subscribe(DOWNLINK_FILTER)
        subscribed.add_done_callback(_log_subscribe)
        session.lost.add_done_callback(lambda _: self._cancel())
        self._ordered = asyncio.Queue(10_000)  # a fresh one per connection
        for (device_id, module_id), (connected, path) in self._states.items():
            self._send_state(session, device_id, module_id, connected, path)
        for (device_id, module_id), (created, path) in list(self._lifecycles.items()):
            self._send_lifecycle(session, device_id, module_id, created, path)
        if self.config is not None:
            self.config.owner = owner
            self.config.attach(session)
        jobs = [self._apply_ordered(upstream_id), self._refresh(session)]
        if self.c2d is not None:
            jobs.append(self._flush_settled(session, upstream_id))
        if self.reported is not None:
            jobs.append(self._flush_reported(session, upstream_id))
        for job in jobs:
            task = asyncio.get_running_loop().create_task(job, name="downlink")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _flush_settled(self, session: Session, upstream_id: str) -> None:
        """Send C2D outcomes up, up to :data:`BATCH` at once, each marked sent on its PUBACK
        (one transaction per batch); then wait for more."""
        mirror = self.c2d
        assert mirror is not None
        up = partial(self._upward_id, upstream_id)
        await _flush_batches(session, "c2d outcomes", mirror.changed, lambda: [
            (up_settled_topic(up(d), m, st), b"", ((d, m), st))
            for (d, m), st in mirror.unsent()], mirror.sent)

    async def _apply_ordered(self, upstream_id: str) -> None:
        """Identity and C2D messages, one at a time in arrival order (a parent before its
        child; a device's messages in the order sent)."""
        queue = self._ordered
        while True:
            job = await queue.get()
            await job()

    def _enqueue(self, job: Callable[[], Awaitable[None]], what: str) -> None:
        try:
            self._ordered.put_nowait(job)
        except asyncio.QueueFull:  # the next refresh / lock lapse brings it again
            log.warning("downlink: backlog full; one %s dropped", what)

    async def _refresh(self, session: Session) -> None:
        """Every ``refresh`` seconds ask for the full state (identities and twins) again."""
        while not session.lost.done():
            await asyncio.sleep(self.refresh)
            session.send(up_resync_topic(()), b"").add_done_callback(_ignore)

    async def _flush_reported(self, session: Session, upstream_id: str) -> None:
        """Send the coalesced reported patches, one per identity and up to :data:`BATCH` at
        once, each dropped from the queue on its PUBACK (one transaction per batch); then
        wait for more."""
        queue = self.reported
        assert queue is not None
        up = partial(self._upward_id, upstream_id)
        await _flush_batches(session, "reported patches", queue.changed, lambda: [
            (up_reported_topic(up(d), m), json.dumps(patch, separators=(",", ":")).encode(),
             ((d, m), gen)) for (d, m), patch, gen in queue.items()], queue.sent)

    def _upward_id(self, upstream_id: str, device_id: str) -> str:
        """The id the parent knows ``device_id`` by (our own device is our upstream id)."""
        return upstream_id if device_id == self.local_gateway else device_id

    def _cancel(self) -> None:
        for task in list(self._running):
            task.cancel()

    def _received(self, session: Session, upstream_id: str, packet: Publish) -> None:
        if not packet.topic.startswith(DOWN_PREFIX):
            if self.config is not None and self.config.wants(packet.topic):  # our own twin
                self._enqueue(partial(self.config.received, session, packet.topic,
                                      packet.payload), "configuration")
            return  # a twin response to the status report and the like
        if is_down_twin(packet.topic):
            self._twin(upstream_id, packet)
            return
        op = parse_down_identity(packet.topic)
        if op is not None:
            if self.identities is not None:
                self._enqueue(partial(self.identities.handle, op, packet.payload, upstream_id),
                              f"identity {op}")
            return
        c2d = parse_down_c2d(packet.topic)
        if c2d is not None:
            device_id, via = c2d
            if via and self.federation is not None:  # for further down: passed on, in order
                self._enqueue(partial(self._pass_c2d, device_id, via, packet.payload), "c2d")
            elif not via and self.c2d is not None and device_id:
                self._enqueue(partial(self.c2d.accept, device_id, packet.payload), "c2d")
            return
        try:
            call = parse_down(packet.topic)
        except (GatewayError, RemoteProtocolError) as exc:
            log.warning("downlink: ignoring a malformed request: %s", exc)
            return
        if len(self._running) >= self.max_calls:
            session.send(up_method_topic(call.rid, 503, "ServerBusy"),
                         json.dumps(f"over {self.max_calls} calls at once").encode())
            return
        task = asyncio.get_running_loop().create_task(
            self._serve(session, upstream_id, call, packet.payload), name="downlink-call")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _pass_c2d(self, device_id: str, via: tuple[str, ...], payload: bytes) -> None:
        """A C2D message for further down, passed on after the identity messages that came
        before it: a device created at the top just before the send reaches the next hop
        (pushed by our registry) before its message does, so the hop nearest it can queue it."""
        assert self.federation is not None
        conn = self.federation.targets.target(via[0], DownlinkFilter)
        if conn is not None:
            conn.publish(down_c2d_topic(device_id, via[1:]), payload, 0)

    def _state(self, device_id: str, module_id: str | None, connected: bool,
               path: str | None) -> None:
        """Connection state of an identity the parent holds: sent now if linked; the latest
        of each is sent again on every (re)connection (the parent sees it while it missed
        it). One entry per identity."""
        self._states[(device_id, module_id)] = (connected, path)
        session = self.session
        if session is not None and not session.lost.done():
            self._send_state(session, device_id, module_id, connected, path)

    def _send_state(self, session: Session, device_id: str, module_id: str | None,
                    connected: bool, path: str | None) -> None:
        device = self._upward_id(self._upstream_id, device_id)
        session.send(up_state_topic(device, module_id, connected, path),
                     b"").add_done_callback(_ignore)

    def _lifecycle(self, device_id: str, module_id: str | None, created: bool,
                   path: str | None) -> None:
        """An identity here (or behind us: ``path``) was created or deleted: sent now if
        linked, else on the next connection; kept until the parent acknowledges it."""
        if device_id == self.local_gateway and module_id is None:
            return  # ourselves: our own identity lives at the parent
        self._lifecycles[(device_id, module_id)] = (created, path)
        log.debug("lifecycle up: %s%s %s", device_id, f"/{module_id}" if module_id else "",
                  "created" if created else "deleted")
        session = self.session
        if session is not None and not session.lost.done():
            self._send_lifecycle(session, device_id, module_id, created, path)

    def _send_lifecycle(self, session: Session, device_id: str, module_id: str | None,
                        created: bool, path: str | None) -> None:
        device = self._upward_id(self._upstream_id, device_id)
        key, sent = (device_id, module_id), (created, path)

        def acked(done: asyncio.Future[Any]) -> None:
            if not done.cancelled() and done.exception() is None \
                    and self._lifecycles.get(key) == sent:
                del self._lifecycles[key]

        session.send(up_lifecycle_topic(device, module_id, created, path),
                     b"").add_done_callback(acked)

    def _child_ready(self, path: str) -> None:
        """A child gateway's downlink is back here: ask our parent to resend what it owns
        behind it (patches made while that link was down)."""
        session = self.session
        if session is not None and not session.lost.done():
            session.send(up_resync_topic(tuple(path.split(";"))), b"").add_done_callback(_ignore)

    def _twin(self, upstream_id: str, packet: Publish) -> None:
        try:
            down = parse_down_twin(packet.topic)
            state = json.loads(packet.payload)
            version, patch, desired = state["version"], state["patch"], state["desired"]
            if not isinstance(version, int) or not isinstance(desired, dict) or not (
                    patch is None or isinstance(patch, dict)):
                raise ValueError("bad twin state")
        except (GatewayError, RemoteProtocolError, ValueError, KeyError, TypeError) as exc:
            log.warning("downlink: ignoring a malformed twin state: %s", exc)
            return
        if down.via:
            if self.federation is not None:
                self.federation.forward_twin(Hops(down.via[0], down.via[1:]), down,
                                             packet.payload)
            return
        if self.twins is None:
            return
        device = self.local_gateway if down.device_id == upstream_id else down.device_id
        task = asyncio.get_running_loop().create_task(self._mirror(
            device, down.module_id, version, patch, desired), name="downlink-twin")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _mirror(self, device_id: str, module_id: str | None, version: int,
                      patch: dict[str, Any] | None, desired: dict[str, Any]) -> None:
        assert self.twins is not None
        try:
            for attempt in range(10):  # the identity itself may still be on its way
                try:
                    twin = await self.twins.mirror(device_id, module_id, version=version,
                                                   patch=patch, desired=desired,
                                                   owner=self.owner)
                    break
                except NotFoundError:
                    if attempt == 9:
                        raise
                    await asyncio.sleep(0.2)
        except GatewayError as exc:
            log.warning("downlink: desired state for %s%s not applied: %s", device_id,
                        f"/{module_id}" if module_id else "", exc)
            return
        if twin is not None:
            log.debug("downlink: desired $version %d applied to %s", version, device_id)

    async def _serve(self, session: Session, upstream_id: str, call: DownMethod,
                     payload: bytes) -> None:
        self.calls += 1
        try:
            if call.via:
                if self.federation is None:
                    raise GatewayError("this hub does not route calls to child gateways")
                status, answer = await self.federation.invoke(
                    Hops(call.via[0], call.via[1:]), call, payload)
                body = json.dumps(answer, separators=(",", ":")).encode()
            else:
                device = self.local_gateway if call.device_id == upstream_id else call.device_id
                try:
                    value: Any = json.loads(payload) if payload.strip() else None
                except ValueError:
                    value = None
                status, body = await self.methods.call(  # the answer as JSON text
                    device, call.module_id, call.name, payload, call.response_timeout,
                    call.connect_timeout, value)
            topic = up_method_topic(call.rid, status)
        except GatewayError as exc:
            topic = up_method_topic(call.rid, status_of(exc), exc.code or type(exc).__name__)
            body = json.dumps(str(exc)).encode()
        log.debug("downlink: %s for %s -> %s", call.name, call.device_id, topic)
        sent = session.send(topic, body)
        sent.add_done_callback(_ignore)


async def _flush_batches(session: Session, kind: str, changed: asyncio.Event,
                         pending: Callable[[], list[tuple[str, bytes, T]]],
                         sent: Callable[[list[T]], Awaitable[None]]) -> None:
    """While the link lasts: send what ``pending`` gives, :data:`BATCH` at a time, telling
    ``sent`` the tokens acknowledged after each batch; then wait for ``changed``."""
    while not session.lost.done():
        changed.clear()
        items = pending()
        for start in range(0, len(items), BATCH):
            batch = items[start:start + BATCH]
            acked, whole = await _send_batch(session, batch)
            await sent(acked)
            log.debug("downlink: %s up batch=%d acked=%d", kind, len(batch), len(acked))
            if not whole:
                return
        await _changed_or_lost(changed, session)


async def _send_batch(session: Session, items: Sequence[tuple[str, bytes, T]]
                      ) -> tuple[list[T], bool]:
    """Publish ``(topic, payload, token)`` items all at once (QoS 1, pipelined on the link;
    the parent handles each on its own and acknowledges each once durable) and wait for
    every PUBACK: the tokens acknowledged, and whether all were (False: the link went)."""
    futures = [session.send(topic, payload) for topic, payload, _ in items]
    results = await asyncio.gather(*futures, return_exceptions=True)
    acked = [token for (_, _, token), result in zip(items, results, strict=True)
             if result is None]
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, UpstreamError):
            log.warning("downlink: an upward message failed: %r", result)
    return acked, len(acked) == len(items)


async def _changed_or_lost(changed: asyncio.Event, session: Session) -> None:
    waiter: asyncio.Future[Any] = asyncio.ensure_future(changed.wait())
    await asyncio.wait({waiter, session.lost}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()


def _log_subscribe(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("downlink subscription failed: %s", future.exception())


def _ignore(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # a lost link: the parent answers 404 for us
