"""Runs the custom endpoints: one :class:`~gateway.endpoints.runner.Runner` task per endpoint,
started, stopped and reconfigured live by :meth:`EndpointManager.apply`.

The manager knows nothing of routes: ``select(name)`` says which log entries endpoint
``name`` takes and ``enrich(name, entry)`` what it adds to their application properties
(IoT Hub ref §10.4); both are asked again for every batch, so a route change needs no
restart of the endpoint. Cursors (``endpoint/{name}``, pinned) outlive :meth:`apply`: an
endpoint that leaves the set stops where it was; :meth:`delete` forgets its cursor too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway.endpoints.runner import Health, Runner, Sink, Tuning, cursor_name
from gateway.endpoints.spec import (
    EndpointSpec,
    FileEndpointSpec,
    HttpEndpointSpec,
    MqttEndpointSpec,
)
from gateway.errors import InvalidRequestError, NotFoundError
from gateway.hub.drops import EnrichedDrops
from gateway.hub.messages import MAX_TELEMETRY_BYTES
from gateway.store.log import Entry, MessageLog

__all__ = ["EndpointManager", "Tuning"]

log = logging.getLogger(__name__)

SelectFor = Callable[[str], Callable[[Entry], bool]]
EnrichFor = Callable[[str, Entry], Mapping[str, str]]


def _nothing(_entry: Entry) -> bool:
    return False


class EndpointManager:
    def __init__(self, log_: MessageLog, *, hub_name: str, data_dir: Path,
                 host_name: str | None = None, tuning: Tuning | None = None,
                 max_message_bytes: int = MAX_TELEMETRY_BYTES,
                 drops: EnrichedDrops | None = None) -> None:
        """``max_message_bytes`` is the hub's message size limit, which an endpoint's
        enrichments may not push a message over (IoT Hub ref §10.4); ``drops`` counts the
        messages dropped so (shared with the hub's other readers)."""
        self.log = log_
        self.hub_name = hub_name
        self.host_name = host_name or hub_name
        self.data_dir = data_dir
        self.tuning = tuning or Tuning()
        self.max_message_bytes = max_message_bytes
        self.drops = drops if drops is not None else EnrichedDrops()
        self._specs: dict[str, EndpointSpec] = {}
        self._health: dict[str, Health] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._select: SelectFor = lambda _name: _nothing
        self._enrich: EnrichFor = lambda _name, _entry: {}
        self._group: asyncio.TaskGroup | None = None
        self._lock = asyncio.Lock()

    # -- configuration -----------------------------------------------------------------------

    async def apply(self, specs: Sequence[EndpointSpec], select: SelectFor,
                    enrich: EnrichFor) -> None:
        """Make ``specs`` the running set: start new endpoints (a new cursor starts at the
        log's end, created before this returns, so nothing appended afterwards is missed),
        restart changed ones (keeping their cursor), stop the ones not listed (keeping their
        cursor; see :meth:`delete`). ``select``/``enrich`` take effect at the next batch."""
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise InvalidRequestError("endpoint names must be unique")
        async with self._lock:
            self._select, self._enrich = select, enrich
            wanted = {spec.name: spec for spec in specs}
            for name in list(self._specs):
                if wanted.get(name) != self._specs[name]:
                    await self._stop(name)
                    del self._specs[name]
            for name, spec in wanted.items():
                if name in self._specs:
                    continue
                health = self._health.get(name)
                if health is None or health.kind != spec.type:
                    health = self._health[name] = Health(name, spec.type, self.tuning.dead_after)
                health.ok = None
                runner = self._runner(spec, health)
                if await runner.ensure_cursor() and isinstance(spec, FileEndpointSpec):
                    await asyncio.to_thread(runner.sink.forget)  # type: ignore[attr-defined]
                self._specs[name] = spec
                if self._group is not None:
                    self._start(name)
            for name in list(self._health):
                if name not in wanted:
                    del self._health[name]

    async def delete(self, name: str) -> None:
        """Stop endpoint ``name`` if it runs and delete its cursor (retention no longer keeps
        messages for it). No error if there is nothing to delete."""
        async with self._lock:
            if name in self._specs:
                await self._stop(name)
                del self._specs[name]
            self._health.pop(name, None)
            await self.log.delete_cursor(cursor_name(name))

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run every endpoint until cancelled (the app owns this in its TaskGroup)."""
        try:
            async with asyncio.TaskGroup() as group:
                async with self._lock:
                    self._group = group
                    for name in self._specs:
                        self._start(name)
                await asyncio.Event().wait()
        finally:
            self._group = None
            self._tasks.clear()

    def _sink(self, spec: EndpointSpec) -> Sink:
        # Each kind's client library (aiomqtt, aiohttp's client, fastavro) is imported with
        # the first endpoint of that kind, not at every start (footprint).
        if isinstance(spec, MqttEndpointSpec):
            from gateway.endpoints.mqtt import MqttSink

            return MqttSink(spec, client_id=spec.client_id or f"{self.hub_name}-{spec.name}")
        if isinstance(spec, HttpEndpointSpec):
            from gateway.endpoints.http import HttpSink

            return HttpSink(spec, user_agent=f"edge-gateway/{self.hub_name}")
        if isinstance(spec, FileEndpointSpec):
            from gateway.endpoints.files import FileSink

            return FileSink(spec, hub_name=self.hub_name)
        raise AssertionError(spec)  # pragma: no cover

    def _runner(self, spec: EndpointSpec, health: Health) -> Runner:
        name = spec.name
        return Runner(
            self.log, name, self._sink(spec), health,
            select=lambda: self._select(name),
            enrich=lambda: lambda entry: self._enrich(name, entry),
            host_name=self.host_name, tuning=self.tuning,
            max_message_bytes=self.max_message_bytes, drops=self.drops,
        )

    def _start(self, name: str) -> None:
        assert self._group is not None
        runner = self._runner(self._specs[name], self._health[name])
        self._tasks[name] = self._group.create_task(runner.run(), name=f"endpoint {name}")

    async def _stop(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    # -- health ------------------------------------------------------------------------------

    def health(self, name: str | None = None) -> list[dict[str, Any]]:
        """IoT Hub's endpoint health (``endpointId``, ``healthStatus``: healthy, unhealthy,
        dead or unknown) with counters, the backlog and the last error; one endpoint or all,
        in name order. NotFoundError for an unknown name."""
        if name is not None and name not in self._health:
            raise NotFoundError(f"endpoint {name!r} not found")
        names = [name] if name is not None else sorted(self._health)
        last = self.log.last_seq
        return [self._health[n].json(last) for n in names]
