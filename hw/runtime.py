"""Run a :class:`hw.bridge.Bridge` as a module of the hub.

The runtime connects to the local hub as the bridge's module identity (MQTT through
:mod:`gateway.client`, over the hub's unix socket or loopback listener), and:

* reads the module twin (``$iothub/twin/GET``) on every connection and gives its desired
  properties to :meth:`Bridge.apply`; later desired patches are merged into that document and
  applied again (the bridge restarts only what changed); a refused configuration is reported in
  the reported property ``config`` and the previous one stays in force;
* publishes what the bridge emits as module telemetry at QoS 1 (one message per sensor per
  poll), through a bounded queue: while the hub is unreachable the bridge keeps polling and up
  to ``queue_size`` messages wait; beyond that ``emit`` blocks (back-pressure, nothing dropped);
* reports :meth:`Bridge.status` as the reported property ``status`` every ``status_interval``
  seconds when it changed;
* answers direct methods from :attr:`Bridge.methods` (404 for unknown names, 500 with the
  error for a failing one);
* reconnects with exponential backoff (1 s to 60 s, jittered); the bridge itself never stops;
* translates identities: sensors listed in the desired ``children`` map are sent with the
  application property ``gateway-child={deviceId}`` and the hub files them as that child
  device's telemetry (:mod:`gateway.hub.children`); the bridge never sees that key.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any

import aiomqtt

from gateway.client import ClientSettings
from gateway.errors import ConfigError
from gateway.hub.children import CHILD_PROPERTY, parse_children
from hw.bridge import Bridge
from hw.readings import Reading, telemetry_body

log = logging.getLogger(__name__)

METHODS = "$iothub/methods/POST/"
DESIRED = "$iothub/twin/PATCH/properties/desired/"
RESPONSES = "$iothub/twin/res/"


def merge(doc: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """JSON merge patch (null deletes, objects merge, anything else replaces): how desired
    patches combine (IoT Hub ref §4.3)."""
    out = dict(doc)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def strip_meta(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if not k.startswith("$")}


class ModuleRuntime:
    def __init__(self, bridge: Bridge, settings: ClientSettings, *, status_interval: float = 30.0,
                 queue_size: int = 1000) -> None:
        self.bridge = bridge
        self.settings = settings
        self.status_interval = status_interval
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(queue_size)
        self.desired: dict[str, Any] = {}
        self.connected = asyncio.Event()
        self._rids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[tuple[int, bytes]]] = {}
        self._last_status: Any = None
        self._config_error: str | None = None
        self._unsent: tuple[str, bytes] | None = None  # taken from the queue, not yet acked
        self._report_now = asyncio.Event()
        self.children: dict[str, str] = {}  # sensor -> child device id

    async def emit(self, sensor: str, readings: Sequence[Reading]) -> None:
        if readings:
            await self.queue.put((sensor, telemetry_body(sensor, readings)))

    async def run(self) -> None:
        """Run the bridge and keep a hub connection for it, until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.bridge.run(self.emit), name=f"bridge {self.bridge.name}")
            tasks.create_task(self._connection_loop(), name="hub connection")

    async def _connection_loop(self) -> None:
        backoff = 1.0
        while True:
            try:
                async with self.settings.mqtt_client() as client:
                    backoff = 1.0
                    log.info("connected to the hub as %s", self.settings.client_id)
                    await self._session(client)
            except (aiomqtt.MqttError, OSError) as exc:
                log.warning("hub connection lost client_id=%s reason=%s; retrying in %.0f s",
                            self.settings.client_id, exc, backoff)
            finally:
                self.connected.clear()
                for fut in self._pending.values():
                    fut.cancel()
                self._pending.clear()
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, 60.0)

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.subscribe([(f"{METHODS}#", 1), (f"{RESPONSES}#", 1), (f"{DESIRED}#", 1)])
        log.debug("subscribed; reading the module twin")
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._incoming(client, tasks))
            status, body = await self._twin_request(client, "$iothub/twin/GET/?$rid={rid}", b" ")
            log.debug("module twin read status=%s", status)
            if status != 200:
                raise aiomqtt.MqttError(f"twin GET answered {status}")
            self._apply(strip_meta(json.loads(body).get("desired", {})), replace=True)
            await self._report(client, force=True)
            log.debug("configuration applied and status reported")
            self.connected.set()
            tasks.create_task(self._publisher(client))
            tasks.create_task(self._status_loop(client))

    async def _twin_request(self, client: aiomqtt.Client, template: str,
                            payload: bytes) -> tuple[int, bytes]:
        rid = str(next(self._rids))
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await client.publish(template.format(rid=rid), payload, qos=1)
            return await asyncio.wait_for(fut, 30)
        finally:
            self._pending.pop(rid, None)

    async def _incoming(self, client: aiomqtt.Client, tasks: asyncio.TaskGroup) -> None:
        """The one reader of the connection. It never awaits a twin request (whose answer
        only it can deliver): reports are signalled to the status loop, methods run as
        tasks of the session."""
        async for message in client.messages:
            topic = str(message.topic)
            payload = bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b""
            if topic.startswith(RESPONSES):
                status = int(topic[len(RESPONSES):].split("/", 1)[0])
                rid = topic.split("$rid=", 1)[1].split("&", 1)[0]
                fut = self._pending.get(rid)
                if fut is not None and not fut.done():
                    fut.set_result((status, payload))
            elif topic.startswith(DESIRED):
                patch = json.loads(payload or b"{}")
                self._apply(strip_meta(patch), replace=False)
                self._report_now.set()
            elif topic.startswith(METHODS):
                name = topic[len(METHODS):].split("/", 1)[0]
                rid = topic.split("$rid=", 1)[1]
                tasks.create_task(self._answer(client, name, rid, payload))

    async def _answer(self, client: aiomqtt.Client, name: str, rid: str, payload: bytes) -> None:
        status, answer = await self._method(name, payload)
        await client.publish(f"$iothub/methods/res/{status}/?$rid={rid}", json.dumps(answer),
                             qos=0)

    def _apply(self, desired: dict[str, Any], *, replace: bool) -> None:
        candidate = desired if replace else merge(self.desired, desired)
        try:
            children = parse_children(candidate)
            self.bridge.apply({k: v for k, v in candidate.items() if k != "children"})
        except ConfigError as exc:
            self._config_error = str(exc)
            log.warning("configuration refused bridge=%s reason=%s", self.bridge.name, exc)
            return
        self.desired = candidate
        self.children = children
        self._config_error = None

    async def _method(self, name: str, payload: bytes) -> tuple[int, Any]:
        method = self.bridge.methods.get(name)
        if method is None:
            return 404, {"error": f"no method {name!r}", "methods": sorted(self.bridge.methods)}
        try:
            return await method(json.loads(payload or b"null"))
        except Exception as exc:  # noqa: BLE001 - the caller gets the failure, the bridge lives
            log.warning("method failed bridge=%s method=%s reason=%s", self.bridge.name, name, exc)
            return 500, {"error": str(exc)}

    async def _publisher(self, client: aiomqtt.Client) -> None:
        while True:
            if self._unsent is None:
                self._unsent = await self.queue.get()
            sensor, body = self._unsent
            child = self.children.get(sensor)
            topic = self.settings.telemetry_topic(
                {CHILD_PROPERTY: child} if child else None,
                content_type="application/json", content_encoding="utf-8")
            # aiomqtt returns from a QoS 1 publish after the PUBACK: only then is it the hub's
            await client.publish(topic, body, qos=1)
            self._unsent = None

    async def _report(self, client: aiomqtt.Client, *, force: bool = False) -> None:
        status = self.bridge.status()
        reported = {"status": status, "config": {"error": self._config_error,
                                                 "applied": bool(self.desired)}}
        if not force and reported == self._last_status:
            return
        self._last_status = reported
        code, _ = await self._twin_request(
            client, "$iothub/twin/PATCH/properties/reported/?$rid={rid}",
            json.dumps(reported, default=str).encode())
        if code >= 300:
            log.warning("reported properties refused status=%s", code)

    async def _status_loop(self, client: aiomqtt.Client) -> None:
        """Report the status every ``status_interval`` when it changed, and at once after a
        configuration change."""
        while True:
            try:
                await asyncio.wait_for(self._report_now.wait(), self.status_interval)
                force = True
            except TimeoutError:
                force = False
            self._report_now.clear()
            await self._report(client, force=force)
