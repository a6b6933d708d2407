"""Cloud-to-device delivery over MQTT (IoT Hub ref §3): the durable queues of
:mod:`gateway.hub.c2d` meet live connections here.

A device holding ``devices/{id}/messages/devicebound/#`` gets its queue delivered at QoS 1 when
it subscribes, when it reconnects (the subscription survives in its session), and whenever a
message is sent to it; at most ``window`` messages are in flight per device. The device's
PUBACK completes a message (and writes its feedback); a connection that ends with messages
unacknowledged releases their locks, so they are delivered again on the next connection
(or the one that took the session over) without counting as an abandon. Locks that lapse
while a device is connected but silent, and messages that expire, are handled by one timer
loop woken at the queues' ``next_wakeup``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway.errors import NotFoundError
from gateway.hub.addresses import C2DFilter
from gateway.hub.c2d import C2DMessage, C2DQueues
from gateway.tasks import TaskSet

if TYPE_CHECKING:
    from gateway.hub.c2dfed import C2DForwarder
    from gateway.hub.connections import Connection, Connections
    from gateway.hub.registry import Registry

log = logging.getLogger(__name__)


class C2DService:
    def __init__(self, queues: C2DQueues, *, broker: Connections, registry: Registry,
                 tasks: TaskSet, window: int = 10) -> None:
        self.queues = queues
        self.broker = broker
        self.registry = registry
        self.tasks = tasks
        self.window = window
        # connection -> packet id -> lock token. Keyed by connection, not client id: packet ids
        # are per connection, and a replaced connection's PUBACKs must never complete
        # (or be mistaken for) its successor's deliveries.
        self._inflight: dict[Connection, dict[int, str]] = {}
        self._pumping: dict[str, bool] = {}  # device id -> "pump again when done"
        self.forwarder: C2DForwarder | None = None  # devices behind child gateways
        self._wake = asyncio.Event()

    # -- broker hooks ------------------------------------------------------------------------

    def on_ready(self, conn: Connection, kinds: set[type]) -> None:
        if C2DFilter in kinds:
            self.pump(conn.client_id)

    def on_puback(self, conn: Connection, packet_id: int) -> None:
        inflight = self._inflight.get(conn)
        token = inflight.pop(packet_id, None) if inflight else None
        if token is None:
            return
        device_id = conn.client_id

        async def complete() -> None:
            await self.queues.complete(device_id, token)  # federation hears it (settle_hooks)
            self.pump(device_id)

        self.tasks.spawn(complete(), f"c2d-complete {device_id}")

    def on_closed(self, conn: Connection) -> None:
        """Unacknowledged deliveries become deliverable again at once, and go to the device's
        connection if it has one already (it reconnected, or a new connection took the session
        over). Only this connection's locks end: a successor's deliveries keep theirs."""
        unacked = self._inflight.pop(conn, None)
        if not unacked:
            return
        device_id, tokens = conn.client_id, list(unacked.values())

        async def release() -> None:
            await self.queues.release(device_id, tokens)
            self.pump(device_id)

        self.tasks.spawn(release(), f"c2d-release {device_id}")

    # -- sending and delivering ---------------------------------------------------------------

    async def send(self, device_id: str, body: bytes, properties: Mapping[str, Any]) -> C2DMessage:
        device = self.registry.get_device(device_id)
        if device is None:
            raise NotFoundError(f"device {device_id!r} not found")
        message = await self.queues.send(device_id, body, properties=properties,
                                         generation_id=device.generation_id)
        self.pump(device_id)
        self._wake.set()
        return message

    def pump(self, device_id: str) -> None:
        """Deliver what is deliverable to ``device_id`` now, if it is connected and
        subscribed; coalesces concurrent requests into one running pump."""
        if self.forwarder is not None and self.broker.target(device_id, C2DFilter) is None \
                and self.forwarder.behind(device_id):  # its queue is handed down (c2dfed)
            self.tasks.spawn(self.forwarder.pump(device_id), f"c2d-forward {device_id}")
            return
        if device_id in self._pumping:
            self._pumping[device_id] = True
            return
        if self.broker.target(device_id, C2DFilter) is None:
            return
        self._pumping[device_id] = False
        self.tasks.spawn(self._pump(device_id), f"c2d-pump {device_id}")

    async def _pump(self, device_id: str) -> None:
        try:
            while True:
                conn = self.broker.target(device_id, C2DFilter)
                room = self.window - len(self._inflight.get(conn, ())) if conn else 0
                if room > 0:
                    for message in await self.queues.deliverable(device_id, limit=room):
                        # looked up again after the await: the connection may have changed
                        conn = self.broker.target(device_id, C2DFilter)
                        if conn is None or not conn.can_publish:
                            break  # its lock lapses or is released with the connection
                        pid = conn.publish(message.topic(), message.body, 1)
                        assert pid is not None and message.lock_token is not None
                        self._inflight.setdefault(conn, {})[pid] = message.lock_token
                if not self._pumping.get(device_id):
                    return
                self._pumping[device_id] = False
        finally:
            self._pumping.pop(device_id, None)

    # -- timers --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Sweep expiries and lapsed locks when due; redeliver lapsed locks to connected
        devices. Runs in the app's TaskGroup until cancelled."""
        while True:
            due = self.queues.next_wakeup()
            delay = 3600.0 if due is None else max(due - time.time(), 0.0)
            self._wake.clear()
            try:  # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancel
                async with asyncio.timeout(delay):
                    await self._wake.wait()
                continue  # something new was queued: recompute the next wake-up
            except TimeoutError:
                pass
            changed = await self.queues.expire()
            if changed:
                log.debug("c2d sweep changed=%s", changed)
            for client_id in list(self.broker.live):  # pump() skips non-subscribers at once
                self.pump(client_id)
            if self.forwarder is not None:  # lapsed locks behind gateways: hand down again
                for device_id in self.forwarder.devices():
                    self.pump(device_id)
