"""Run a :class:`hw.bridge.Bridge` as a module of the hub.

The runtime connects to the local hub as the bridge's module identity (MQTT through
:mod:`gateway.client`, over the hub's unix socket or loopback listener), and:

* reads the module twin (``$iothub/twin/GET``) on every connection and gives its desired
  properties to :meth:`Bridge.apply`; later desired patches are merged into that copy of the
  twin's desired document (IoT Hub ref §4.3), whether the bridge accepted the previous one or
  not, and the whole document is applied again (the bridge restarts only what changed). A patch
  whose ``$version`` does not follow the copy's (a lost patch) makes it read the twin again.
  A refused document is reported in the reported property ``config`` and the last accepted one
  stays in force; ``config`` says exactly what runs: ``applied`` (the twin's document runs),
  ``version`` (the ``$version`` of the desired document that runs), ``desiredVersion`` (the
  twin's), ``error`` (why the twin's document was refused);
* publishes what the bridge emits as module telemetry at QoS 1 (one message per sensor per
  poll), through a bounded queue: while the hub is unreachable the bridge keeps polling and up
  to ``queue_size`` messages wait; beyond that ``emit`` blocks (back-pressure, nothing dropped);
* reports :meth:`Bridge.status` as the reported property ``status`` every ``status_interval``
  seconds when it changed, as a merge patch against what the twin holds (read with the twin on
  every connection): what the bridge no longer has (a removed bus or device) is patched to
  null, so it disappears from the twin instead of staying there as it was last seen;
* answers direct methods from :attr:`Bridge.methods` (404 for unknown names, 500 with the
  error for a failing one);
* reconnects with exponential backoff (1 s to 60 s, jittered); the bridge itself never stops;
* translates identities (:mod:`gateway.translation`): it subscribes to the hub's children
  document, sends the readings of each child sensor with ``gateway-child={deviceId}`` (the hub
  files them as that device's telemetry), merges each child twin's desired properties into
  that sensor's configuration (:meth:`Bridge.sensor_config_path`; a child whose properties
  the bridge refuses is reported and left out, the others apply), hands the children's
  registry sensor keys to :meth:`Bridge.set_secrets`, and reports each child's status
  (:meth:`Bridge.sensor_status`) into the child's twin. The bridge never sees ``children``.
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
from gateway.errors import ConfigError, RemoteProtocolError
from gateway.tasks import checkpoint
from gateway.translation import (
    CHILD_PROPERTY,
    CHILDREN_DOCUMENT_TOPIC,
    CHILDREN_FILTER,
    ChildSpec,
    child_reported_topic,
    merge_patch,
    overlay,
    parse_children,
    parse_document,
)
from hw.bridge import Bridge
from hw.readings import Reading, telemetry_body

log = logging.getLogger(__name__)

METHODS = "$iothub/methods/POST/"
DESIRED = "$iothub/twin/PATCH/properties/desired/"
RESPONSES = "$iothub/twin/res/"
FOLLOW_UP_S = 1.0  # a second status report this long after a configuration change


def strip_meta(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if not k.startswith("$")}


class ModuleRuntime:
    def __init__(self, bridge: Bridge, settings: ClientSettings, *, status_interval: float = 30.0,
                 queue_size: int = 1000) -> None:
        self.bridge = bridge
        self.settings = settings
        self.status_interval = status_interval
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(queue_size)
        self.twin_desired: dict[str, Any] = {}  # the twin's desired document, as last heard
        self.desired_version: int | None = None  # its $version
        self.desired: dict[str, Any] = {}  # the document that runs (last accepted)
        self.running_version: int | None = None  # its $version
        self._reread = asyncio.Event()  # a desired patch was lost: read the twin again
        self.connected = asyncio.Event()
        self._rids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[tuple[int, bytes]]] = {}
        self._last_status: dict[str, Any] = {}  # what the twin's reported properties hold
        self._config_error: str | None = None
        self._unsent: tuple[str, bytes] | None = None  # taken from the queue, not yet acked
        self._report_now = asyncio.Event()
        self._twin_read = False  # a first twin GET gave the desired properties
        self.child_specs: dict[str, ChildSpec] = {}  # the hub's children document
        self.children: dict[str, str] = {}  # sensor -> child device id, as applied
        self._child_errors: dict[str, str] = {}
        self._last_child: dict[str, Any] = {}  # device id -> last reported patch

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
            checkpoint()  # aiomqtt may have dropped a cancel (gateway.tasks.checkpoint)
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
        await client.subscribe([(f"{METHODS}#", 1), (f"{RESPONSES}#", 1), (f"{DESIRED}#", 1),
                                (CHILDREN_FILTER, 1)])
        log.debug("subscribed; reading the module twin")
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._incoming(client, tasks))
            await self._read_twin(client, reported=True)
            self._last_child.clear()
            await self._report(client)
            log.debug("configuration applied and status reported")
            self.connected.set()
            tasks.create_task(self._publisher(client))
            tasks.create_task(self._status_loop(client))
            tasks.create_task(self._reread_loop(client))

    async def _read_twin(self, client: aiomqtt.Client, *, reported: bool) -> None:
        """GET the module twin and apply its desired document whole; ``reported``: also take
        its reported properties as what the next status report is a patch against."""
        self._reread.clear()
        status, body = await self._twin_request(client, "$iothub/twin/GET/?$rid={rid}", b" ")
        log.debug("module twin read status=%s", status)
        if status != 200:
            raise aiomqtt.MqttError(f"twin GET answered {status}")
        twin = json.loads(body)
        desired = twin.get("desired", {})
        self.twin_desired = strip_meta(desired)
        self.desired_version = _version(desired)
        self._twin_read = True
        if reported:
            self._last_status = strip_meta(twin.get("reported", {}))
        self._apply()

    async def _reread_loop(self, client: aiomqtt.Client) -> None:
        while True:
            checkpoint()  # aiomqtt may have dropped a cancel (gateway.tasks.checkpoint)
            await self._reread.wait()
            log.info("desired patch out of sequence bridge=%s; reading the twin again",
                     self.bridge.name)
            await self._read_twin(client, reported=False)
            self._report_now.set()

    def _desired_patch(self, patch: dict[str, Any]) -> None:
        """A desired patch from the hub: merged into the twin's document, which is applied
        whole. A gap in ``$version`` means a patch was lost (they are sent at QoS 0)."""
        version = _version(patch)
        if version is not None and self.desired_version is not None \
                and version != self.desired_version + 1:
            if version > self.desired_version:
                self._reread.set()
            return
        self.twin_desired = merge_patch(self.twin_desired, strip_meta(patch))
        self.desired_version = version
        self._apply()
        self._report_now.set()

    async def _twin_request(self, client: aiomqtt.Client, template: str,
                            payload: bytes) -> tuple[int, bytes]:
        rid = str(next(self._rids))
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await client.publish(template.format(rid=rid), payload, qos=1)
            async with asyncio.timeout(30):
                return await fut
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
                self._desired_patch(json.loads(payload or b"{}"))
            elif topic == CHILDREN_DOCUMENT_TOPIC:
                self._children_document(payload)
            elif topic.startswith(METHODS):
                name = topic[len(METHODS):].split("/", 1)[0]
                rid = topic.split("$rid=", 1)[1]
                tasks.create_task(self._answer(client, name, rid, payload))

    async def _answer(self, client: aiomqtt.Client, name: str, rid: str, payload: bytes) -> None:
        status, answer = await self._method(name, payload)
        await client.publish(f"$iothub/methods/res/{status}/?$rid={rid}", json.dumps(answer),
                             qos=0)

    def _children_document(self, payload: bytes) -> None:
        try:
            specs = parse_document(payload)
        except RemoteProtocolError as exc:
            log.warning("children document ignored: %s", exc)
            return
        self.child_specs = specs
        self.children = {s: c.device_id for s, c in specs.items()}
        self.bridge.set_secrets({s: c.sensor_key for s, c in specs.items() if c.sensor_key})
        if self._twin_read:  # before the first twin GET there is nothing to apply yet
            self._apply()
            self._report_now.set()

    def _apply(self) -> None:
        """Apply the twin's desired document whole, with each child's desired properties
        merged into its sensor's configuration. A child whose properties the bridge refuses
        (the ConfigError names a key inside that sensor) is left out and reported; a refusal
        anywhere else refuses the whole document and the last accepted one stays in force."""
        candidate = self.twin_desired
        try:
            parse_children(candidate)
        except ConfigError as exc:
            self._refuse(exc)
            return
        base = {k: v for k, v in candidate.items() if k != "children"}
        paths: dict[str, tuple[str, ...]] = {}
        errors: dict[str, str] = {}
        for sensor, spec in self.child_specs.items():
            path = self.bridge.sensor_config_path(base, sensor)
            if path is None:
                if spec.desired:
                    errors[sensor] = f"no sensor {sensor!r} in the bridge's configuration"
            elif spec.desired:
                paths[sensor] = path
        while True:
            config = base
            for sensor, path in paths.items():
                config = overlay(config, path, self.child_specs[sensor].desired)
            try:
                self.bridge.apply(config)
                break
            except ConfigError as exc:
                culprit = next((s for s, path in paths.items()
                                if exc.path == ".".join(path)
                                or exc.path.startswith(".".join(path) + ".")), None)
                if culprit is None:
                    self._refuse(exc)
                    return
                errors[culprit] = str(exc)
                del paths[culprit]
                log.warning("child desired properties refused sensor=%s reason=%s", culprit, exc)
        self.desired = candidate
        self.running_version = self.desired_version
        self._child_errors = errors
        self._config_error = None

    def _refuse(self, exc: ConfigError) -> None:
        self._config_error = str(exc)
        log.warning("configuration refused bridge=%s reason=%s", self.bridge.name, exc)

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
            checkpoint()  # aiomqtt may have dropped a cancel (gateway.tasks.checkpoint)
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

    def reported(self) -> dict[str, Any]:
        """The reported properties as they should be: the bridge's status and exactly which
        configuration runs."""
        return {"status": self.bridge.status(), "config": {
            "applied": self._config_error is None and self.running_version is not None
            and self.running_version == self.desired_version,
            "version": self.running_version, "desiredVersion": self.desired_version,
            "error": self._config_error, "children": self._child_errors or None}}

    async def _report(self, client: aiomqtt.Client) -> None:
        reported = json.loads(json.dumps(self.reported(), default=str))
        patch = merge_diff(self._last_status, reported)
        if patch:
            code, _ = await self._twin_request(
                client, "$iothub/twin/PATCH/properties/reported/?$rid={rid}",
                json.dumps(patch).encode())
            if code >= 300:
                log.warning("reported properties refused status=%s", code)
            else:
                self._last_status = merge_patch(self._last_status, patch)
        await self._report_children(client)

    async def _report_children(self, client: aiomqtt.Client) -> None:
        """Each child's status and configuration outcome into its own twin (QoS 1: the hub
        acknowledges after the write), when it changed."""
        module = self.settings.connection.module_id
        for sensor, spec in self.child_specs.items():
            patch = {"status": self.bridge.sensor_status(sensor),
                     "config": {"error": self._child_errors.get(sensor)},
                     "bridge": {"module": module, "sensor": sensor}}
            if self._last_child.get(spec.device_id) == patch:
                continue
            await client.publish(child_reported_topic(spec.device_id),
                                 json.dumps(patch, default=str).encode(), qos=1)
            self._last_child[spec.device_id] = patch

    async def _status_loop(self, client: aiomqtt.Client) -> None:
        """Report the status every ``status_interval`` when it changed, at once after a
        configuration change, and again ``FOLLOW_UP_S`` later (what the change started by
        then: a new bus connected, a port opened) rather than a whole interval later."""
        follow_up = False
        while True:
            checkpoint()  # aiomqtt may have dropped a cancel (gateway.tasks.checkpoint)
            timeout = min(FOLLOW_UP_S, self.status_interval) if follow_up \
                else self.status_interval
            try:  # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancel
                async with asyncio.timeout(timeout):
                    await self._report_now.wait()
                follow_up = True
            except TimeoutError:
                follow_up = False
            self._report_now.clear()
            await self._report(client)


def _version(doc: Mapping[str, Any]) -> int | None:
    version = doc.get("$version")
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7396) that turns ``old`` into ``new``: keys ``new`` lacks
    (or holds as null, which a twin cannot store) become null. Pure."""
    patch: dict[str, Any] = {}
    for key, before in old.items():
        if before is not None and new.get(key) is None:
            patch[key] = None
    for key, value in new.items():
        if value is None:
            continue
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            inner = merge_diff(before, value)
            if inner:
                patch[key] = inner
        elif isinstance(value, Mapping):
            patch[key] = merge_diff({}, value)
        elif key not in old or before != value or type(before) is not type(value):
            patch[key] = value
    return patch
