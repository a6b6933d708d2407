"""Module inputs: routed messages delivered to modules (IoT Hub ref §6.1, §6.3).

A module input is an endpoint like any other: a route names it as
``BrokeredEndpoint("/modules/{m}/inputs/{i}")``, the router stores the matching route names
with each message, and this reader selects the messages whose routes send them to the module.
Each target module input reads the durable message log from its own pinned cursor
(``inputs/{device}/{module}``), so a routed message is stored once, survives restarts and
waits for a module that is offline; retention keeps it until the cursor has passed. A module
connected with a ``devices/{d}/modules/{m}/inputs/#`` (or ``.../modules/{m}/#``) subscription
gets its messages at QoS 1 on ``devices/{d}/modules/{m}/inputs/{input}/{bag}`` with the origin in
``$.cdid``/``$.cmid``, in log order, at most ``window`` in flight; the cursor advances only over
acknowledged messages (at-least-once, like edgeHub's checkpointer).

A message that an input's enrichments push over the hub's message size limit is not published
to that input (IoT Hub ref §10.4: dropped for that endpoint only); the module's other inputs
and every other endpoint still get it, the cursor moves past it, and the drop is logged and
counted once (:class:`gateway.hub.drops.EnrichedDrops`, ``gateway endpoint health``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from gateway.errors import MessageTooLargeError
from gateway.hub.addresses import ModuleInputsFilter, module_input_topic
from gateway.hub.connections import Connection, Connections
from gateway.hub.drops import EnrichedDrops
from gateway.hub.messages import MAX_TELEMETRY_BYTES, enriched, message_from_stored, wire_pairs
from gateway.hub.propbag import encode_bag
from gateway.routing.model import module_input_endpoint
from gateway.routing.router import Router
from gateway.store.log import Entry, MessageLog
from gateway.tasks import TaskSet

if TYPE_CHECKING:
    from gateway.hub.registry import Registry

log = logging.getLogger(__name__)


def cursor_name(device_id: str, module_id: str) -> str:
    return f"inputs/{device_id}/{module_id}"


class ModuleInputService:
    def __init__(self, message_log: MessageLog, router: Router, *, broker: Connections,
                 registry: Registry, tasks: TaskSet, window: int = 50,
                 max_message_bytes: int = MAX_TELEMETRY_BYTES,
                 drops: EnrichedDrops | None = None) -> None:
        self.log = message_log
        self.router = router
        self.broker = broker
        self.registry = registry
        self.tasks = tasks
        self.window = window
        self.max_message_bytes = max_message_bytes
        self.drops = drops if drops is not None else EnrichedDrops()
        self._pumps: dict[str, _Pump] = {}
        self._subscribed: dict[str, Connection] = {}  # module connections with inputs/#

    def delivering(self, module_id: str) -> bool:
        """Whether a connection of ``module_id`` is subscribed to its inputs and being fed."""
        return any(p.module_id == module_id for p in self._pumps.values())

    async def set_router(self, router: Router) -> None:
        """Routes changed (live): newly targeted modules get a cursor (from now on) and, if
        connected and subscribed, their delivery starts."""
        self.router = router
        await self.open()
        for conn in list(self._subscribed.values()):
            self._start(conn)

    async def open(self) -> None:
        """Give every existing target module a cursor, so messages routed to it while it is
        offline (even before its first connection) wait for it."""
        for device in self.registry.devices():
            for module in self.registry.modules(device.device_id):
                await self._ensure_cursor(module.device_id, module.module_id)

    async def _ensure_cursor(self, device_id: str, module_id: str) -> None:
        if not self.router.targets_module(module_id):
            return
        name = cursor_name(device_id, module_id)
        if await self.log.get_cursor(name) is None:
            await self.log.set_cursor(name, self.log.last_seq, pin=True)

    def identity_changed(self, event: str, identity: Any) -> None:
        module_id = getattr(identity, "module_id", None)
        if module_id is None:
            return
        if event == "created":
            self.tasks.spawn(self._ensure_cursor(identity.device_id, module_id), "input-cursor")
        elif event == "deleted":
            name = cursor_name(identity.device_id, module_id)
            self.tasks.spawn(self.log.delete_cursor(name), "input-cursor-delete")

    # -- broker hooks ------------------------------------------------------------------------

    def on_ready(self, conn: Connection, kinds: set[type]) -> None:
        p = conn.principal
        if ModuleInputsFilter not in kinds or p is None or p.module_id is None:
            return
        self._subscribed[conn.client_id] = conn
        self._start(conn)

    def _start(self, conn: Connection) -> None:
        p = conn.principal
        assert p is not None and p.module_id is not None
        if conn.closed or not self.router.targets_module(p.module_id) \
                or conn.client_id in self._pumps:
            return
        pump = _Pump(self, conn, p.device_id, p.module_id)
        self._pumps[conn.client_id] = pump
        task = self.tasks.spawn(pump.run(), f"inputs {conn.client_id}")
        task.add_done_callback(lambda _: self._pumps.pop(conn.client_id, None)
                               if self._pumps.get(conn.client_id) is pump else None)
        pump.task = task

    def on_puback(self, conn: Connection, packet_id: int) -> None:
        pump = self._pumps.get(conn.client_id)
        if pump is not None and pump.conn is conn:
            pump.acked(packet_id)

    def on_closed(self, conn: Connection) -> None:
        if self._subscribed.get(conn.client_id) is conn:
            del self._subscribed[conn.client_id]
        pump = self._pumps.get(conn.client_id)
        if pump is not None and pump.conn is conn and pump.task is not None:
            pump.task.cancel()


class _Pump:
    """Delivery to one connected module, from its cursor."""

    def __init__(self, service: ModuleInputService, conn: Connection, device_id: str,
                 module_id: str) -> None:
        self.s = service
        self.conn = conn
        self.device_id = device_id
        self.module_id = module_id
        self.cursor = cursor_name(device_id, module_id)
        self.inflight: deque[tuple[int, int]] = deque()  # (seq, packet id), in order
        self.scanned = 0
        self.committed = 0
        self.poke = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def acked(self, packet_id: int) -> None:
        for i, (_, pid) in enumerate(self.inflight):
            if pid == packet_id:
                del self.inflight[i]
                self.poke.set()
                return

    async def run(self) -> None:
        log_ = self.s.log
        start = await log_.get_cursor(self.cursor)
        if start is None:
            start = log_.last_seq
            await log_.set_cursor(self.cursor, start, pin=True)
        self.scanned = self.committed = start
        try:
            while not self.conn.closed:
                await self._fill()
                await self._checkpoint()
                await self._wait()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._checkpoint())

    async def _fill(self) -> None:
        log_ = self.s.log
        while len(self.inflight) < self.s.window and not self.conn.closed:
            limit = self.s.window - len(self.inflight)
            entries, self.scanned = await log_.scan(self.scanned, limit, kinds={"telemetry"},
                                                    device_id=self.device_id)
            for entry in entries:
                self._deliver(entry)
            if len(entries) < limit:
                return

    def _deliver(self, entry: Entry) -> None:
        inputs = self.s.router.module_inputs(entry.routes, self.module_id)
        if not inputs:
            return
        message = message_from_stored(entry.props, entry.body)
        router = self.s.router
        for input_name in inputs:
            endpoint = module_input_endpoint(self.module_id, input_name)
            try:
                out = enriched(message, router.enrich(endpoint, entry),
                               limit=self.s.max_message_bytes)
            except MessageTooLargeError as exc:
                self.s.drops.drop(endpoint, entry, exc)
                continue
            bag = encode_bag(wire_pairs(out.system, out.application))
            topic = module_input_topic(self.device_id, self.module_id, input_name, bag)
            pid = self.conn.publish(topic, entry.body, 1)
            assert pid is not None
            self.inflight.append((entry.seq, pid))

    async def _checkpoint(self) -> None:
        done = self.inflight[0][0] - 1 if self.inflight else self.scanned
        if done > self.committed:
            await self.s.log.set_cursor(self.cursor, done, pin=True)
            self.committed = done

    async def _wait(self) -> None:
        if len(self.inflight) >= self.s.window:
            await self.poke.wait()
            self.poke.clear()
            return
        waiter = asyncio.ensure_future(self.s.log.wait_beyond(self.scanned, 30.0))
        poked = asyncio.ensure_future(self.poke.wait())
        try:
            await asyncio.wait({waiter, poked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            poked.cancel()
            self.poke.clear()

