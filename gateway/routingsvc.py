"""Routing management: the live routing state, kept in the hub's database, applied without a
restart to the hub's router, the module inputs and the custom endpoints (IoT Hub ref §10).

Every change goes the same way, whoever asks (the REST API under ``/routing``, the CLI
through it, ``gateway.toml`` at start): the new state is built and checked as a whole (names,
references, conditions compiled, IoT Hub's limits), committed as one row, and only then
swapped in, so a refused change leaves everything as it was.

``gateway.toml``'s ``[routes]``, ``[endpoints.*]``, ``[enrichments.*]`` and ``[routing]`` are the
starting state: applied on the first start, and again whenever the file's routing sections
change (what the file added or changed is set, what it dropped is removed); changes made
through the API stay otherwise, across restarts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final, Protocol

from gateway.endpoints.spec import EndpointSpec, endpoint_json, parse_endpoint
from gateway.errors import (
    ConfigError,
    ConflictError,
    InvalidRequestError,
    MessageTooLargeError,
    NotFoundError,
)
from gateway.hub.drops import EnrichedDrops
from gateway.hub.messages import Message, enriched, message_from_stored
from gateway.routing.message import MessageView, system_key
from gateway.routing.model import (
    EVENTS,
    UPSTREAM,
    EnrichmentSpec,
    RouteSpec,
    RoutingState,
    check_state,
    parse_enrichment,
    parse_module_input,
    parse_route,
    users_of,
)
from gateway.routing.router import TELEMETRY, Router
from gateway.store.db import Database, Migration

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.hub.hub import Hub
    from gateway.hub.modinputs import ModuleInputService
    from gateway.store.log import Entry

log = logging.getLogger(__name__)

MIGRATION: Final[Migration] = (
    "routing",
    ("CREATE TABLE routing_state(key TEXT PRIMARY KEY, doc TEXT NOT NULL) WITHOUT ROWID;",),
)
NO_UPSTREAM: Final = "no upstream set"  # what the forwarder's status says without a parent


def _upstream_health(up: Mapping[str, Any] | None) -> dict[str, Any]:
    """``$upstream`` as an endpoint: the forwarder's link state and backlog."""
    if up is None or up.get("lastError") == NO_UPSTREAM:
        return {"endpointId": UPSTREAM, "type": "upstream", "healthStatus": "unknown",
                "lastError": "no upstream set (gateway upstream set)"}
    state = up.get("state")
    status = "healthy" if state in ("connected", "throttled", "paused") else "unhealthy"
    return {"endpointId": UPSTREAM, "type": "upstream", "healthStatus": status,
            "lastError": up.get("lastError") or None, "linkState": state,
            "backlog": up.get("backlog"), "sent": up.get("sent")}


class Endpoints(Protocol):
    """What routing needs of the custom endpoints' runner
    (:class:`gateway.endpoints.manager.EndpointManager`)."""

    async def apply(self, specs: Sequence[EndpointSpec],
                    select: Callable[[str], Callable[[Entry], bool]],
                    enrich: Callable[[str, Entry], Mapping[str, str]]) -> None: ...
    async def delete(self, name: str) -> None: ...
    def health(self, name: str | None = None) -> list[dict[str, Any]]: ...


# -- the state as JSON (REST, the database, gateway.toml) --------------------------------------


def state_json(state: RoutingState, *, secrets: bool = False) -> dict[str, Any]:
    return {
        "routes": [r.to_json() for r in state.routes],
        "endpoints": [endpoint_json(s, secrets=secrets) for s in state.endpoints.values()],
        "enrichments": [e.to_json() for e in state.enrichments],
        "fallbackRoute": {"name": "$fallback", "source": "DeviceMessages", "condition": "true",
                          "endpointNames": [EVENTS], "isEnabled": state.fallback},
    }


def _route_doc(route: RouteSpec) -> dict[str, Any]:
    doc = route.to_json()
    doc.pop("route")
    return doc


def state_from_json(doc: Mapping[str, Any]) -> RoutingState:
    routes = tuple(parse_route(r["name"], _strip(r, "route")) for r in doc.get("routes", []))
    endpoints = {e["name"]: parse_endpoint(e["name"], e) for e in doc.get("endpoints", [])}
    enrichments = tuple(parse_enrichment(e["key"], e) for e in doc.get("enrichments", []))
    fallback = bool(doc.get("fallbackRoute", {}).get("isEnabled", True))
    state = RoutingState(routes, endpoints, enrichments, fallback)
    check_state(state)
    return state


def _strip(doc: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in keys}


def config_state(config: Config) -> RoutingState:
    """The routing state ``gateway.toml`` describes; ConfigError naming the key if it is bad."""
    path = "routes"
    try:
        routes = []
        for name, doc in config.routes:
            path = f"routes.{name}"
            routes.append(parse_route(name, doc))
        endpoints = {}
        for name, doc in config.endpoints:
            path = f"endpoints.{name}"
            endpoints[name] = parse_endpoint(name, doc)
        enrichments = []
        for key, doc in config.enrichments:
            path = f"enrichments.{key}"
            enrichments.append(parse_enrichment(key, doc))
        path = "routes"
        state = RoutingState(tuple(routes), endpoints, tuple(enrichments), config.routing.fallback)
        check_state(state)
    except InvalidRequestError as exc:
        raise ConfigError(str(exc), path=path) from None
    return state


def _merge(stored: RoutingState, old_file: RoutingState | None, new_file: RoutingState) -> RoutingState:
    """Apply a changed ``gateway.toml`` over the stored state: items it dropped since it was
    last applied go, items it has are set."""
    old = old_file or RoutingState(fallback=new_file.fallback)
    gone_routes = {r.name for r in old.routes} - {r.name for r in new_file.routes}
    routes = {r.name: r for r in stored.routes if r.name not in gone_routes}
    routes.update({r.name: r for r in new_file.routes})
    endpoints = {n: s for n, s in stored.endpoints.items()
                 if n not in set(old.endpoints) - set(new_file.endpoints)}
    endpoints.update(new_file.endpoints)
    gone_keys = {e.key for e in old.enrichments} - {e.key for e in new_file.enrichments}
    enrich = {e.key: e for e in stored.enrichments if e.key not in gone_keys}
    enrich.update({e.key: e for e in new_file.enrichments})
    fallback = new_file.fallback if new_file.fallback != old.fallback else stored.fallback
    return RoutingState(tuple(routes.values()), endpoints, tuple(enrich.values()), fallback)


class _TestTwin:
    def __init__(self, doc: Mapping[str, Any]) -> None:
        props = doc.get("properties") or {}
        self.tags = doc.get("tags") or {}
        self.desired = props.get("desired") or {}
        self.reported = props.get("reported") or {}
        for section in (self.tags, self.desired, self.reported):
            if not isinstance(section, dict):
                raise InvalidRequestError("twin must be {\"tags\": {...}, \"properties\": "
                                          "{\"desired\": {...}, \"reported\": {...}}}")


class RoutingService:
    """The one owner of the routing state (create with the parts it drives, then :meth:`open`)."""

    def __init__(self, db: Database, *, hub: Hub, inputs: ModuleInputService | None = None,
                 endpoints: Endpoints | None = None, drops: EnrichedDrops | None = None) -> None:
        """``drops`` counts the messages each endpoint did not get because its enrichments
        made them too large (IoT Hub ref §10.4), for :meth:`health`: the one the module
        inputs, the custom endpoints and the built-in endpoint's readers share."""
        self.db = db
        self.hub = hub
        self.inputs = inputs
        self.endpoints = endpoints
        self.drops = drops if drops is not None else EnrichedDrops()
        self.state = RoutingState()
        self.router = hub.router
        self._lock = asyncio.Lock()
        # the upstream forwarder's status (gateway.upstream.service.Upstream.status), set by
        # the composition root once the forwarder exists
        self.upstream_status: Callable[[], Mapping[str, Any]] | None = None
        # who owns a routing item (kind "route"|"endpoint"|"enrichment", name): a parent
        # hub's configuration push (gateway.upstream.configpush), or None (local); set by
        # the composition root
        self.owner_of: Callable[[str, str], str | None] = lambda kind, name: None

    # -- start ---------------------------------------------------------------------------------

    async def open(self, config: Config) -> None:
        await self.db.migrate(MIGRATION)
        rows = dict(await self.db.run(
            lambda conn: conn.execute("SELECT key, doc FROM routing_state").fetchall()))
        file_state = config_state(config)
        file_doc = json.dumps(state_json(file_state, secrets=True), sort_keys=True)
        try:
            stored = state_from_json(json.loads(rows["state"])) if "state" in rows else None
            old_file = state_from_json(json.loads(rows["file"])) if "file" in rows else None
        except (InvalidRequestError, ValueError, KeyError) as exc:
            raise ConfigError(f"the stored routing state cannot be read: {exc}") from None
        if stored is None:
            state = file_state
        elif rows.get("file") != file_doc:
            log.info("gateway.toml routing sections changed: applying them")
            state = _merge(stored, old_file, file_state)
        else:
            state = stored
        try:
            check_state(state)
        except InvalidRequestError as exc:
            raise ConfigError(f"routing: {exc}") from None
        await self._commit(state, file_doc=file_doc)

    # -- the one way to change -----------------------------------------------------------------

    async def _change(self, change: Callable[[RoutingState], RoutingState]) -> RoutingState:
        async with self._lock:
            state = change(self.state)
            check_state(state)
            await self._commit(state)
            return state

    async def _commit(self, state: RoutingState, *, file_doc: str | None = None) -> None:
        router = Router(state, hub_name=self.hub.host_name, twins=self.hub.twin_store.get,
                        twin_changes=self.hub.twin_store)
        rows = [("state", json.dumps(state_json(state, secrets=True)))]
        if file_doc is not None:
            rows.append(("file", file_doc))

        def store(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT INTO routing_state(key, doc) VALUES (?, ?) ON CONFLICT(key)"
                             " DO UPDATE SET doc = excluded.doc", rows)

        await self.db.run(store)
        dropped = set(self.state.endpoints) - set(state.endpoints)
        self.state, self.router = state, router
        self.hub.router = router
        if self.inputs is not None:
            await self.inputs.set_router(router)
        if self.endpoints is not None:
            await self.endpoints.apply(list(state.endpoints.values()), self.select, self.enrich)
            for name in dropped:
                await self.endpoints.delete(name)
        log.info("routing applied routes=%d endpoints=%d enrichments=%d fallback=%s",
                 len(state.routes), len(state.endpoints), len(state.enrichments), state.fallback)

    def select(self, endpoint: str) -> Callable[[Entry], bool]:
        return self.router.select(endpoint)

    def enrich(self, endpoint: str, entry: Entry) -> Mapping[str, str]:
        return self.router.enrich(endpoint, entry)

    def events_message(self, entry: Entry) -> Message | None:
        """``entry`` as the built-in endpoint's readers (REST, ``monitor-events``, AMQP) show
        it: the ``events`` enrichments applied (IoT Hub ref §10.4). None when they push it over
        the hub's message size limit: IoT Hub drops it for this endpoint, so the reader skips
        it and moves on; the drop is logged and counted once however many readers pass it
        (``gateway endpoint health events``)."""
        message = message_from_stored(entry.props, entry.body)
        try:
            return enriched(message, self.router.enrich(EVENTS, entry),
                            limit=self.hub.max_message_bytes)
        except MessageTooLargeError as exc:
            self.drops.drop(EVENTS, entry, exc)
            return None

    # -- routes --------------------------------------------------------------------------------

    def get_route(self, name: str) -> RouteSpec:
        route = self.state.route(name)
        if route is None:
            raise NotFoundError(f"route {name!r} not found")
        return route

    async def put_route(self, name: str, doc: str | Mapping[str, Any], *,
                        create_only: bool = False, update_only: bool = False) -> RouteSpec:
        route = parse_route(name, doc)

        def change(state: RoutingState) -> RoutingState:
            exists = state.route(name) is not None
            if create_only and (exists or any(r.name.lower() == name.lower() for r in state.routes)):
                raise ConflictError(f"route {name!r} exists already")
            if update_only and not exists:
                raise NotFoundError(f"route {name!r} not found")
            if exists:
                routes = tuple(route if r.name == name else r for r in state.routes)
            else:
                routes = (*state.routes, route)
            return replace(state, routes=routes)

        await self._change(change)
        return route

    async def patch_route(self, name: str, patch: Mapping[str, Any]) -> RouteSpec:
        doc = {**_route_doc(self.get_route(name)), **patch}
        if "route" in patch:
            doc = {k: v for k, v in doc.items()
                   if k not in ("source", "condition", "endpointNames", "endpoint")}
        return await self.put_route(name, doc, update_only=True)

    async def delete_route(self, name: str) -> None:
        self.get_route(name)
        await self._change(lambda s: replace(s, routes=tuple(r for r in s.routes if r.name != name)))

    async def set_fallback(self, enabled: bool) -> None:
        await self._change(lambda s: replace(s, fallback=enabled))

    # -- endpoints -----------------------------------------------------------------------------

    def get_endpoint(self, name: str) -> EndpointSpec:
        spec = self.state.endpoints.get(name)
        if spec is None:
            raise NotFoundError(f"endpoint {name!r} not found")
        return spec  # type: ignore[no-any-return]

    async def put_endpoint(self, name: str, doc: Mapping[str, Any], *,
                           create_only: bool = False) -> EndpointSpec:
        spec = parse_endpoint(name, doc)

        def change(state: RoutingState) -> RoutingState:
            if create_only and name in state.endpoints:
                raise ConflictError(f"endpoint {name!r} exists already")
            return replace(state, endpoints={**state.endpoints, name: spec})

        await self._change(change)
        return spec

    async def delete_endpoint(self, name: str) -> None:
        self.get_endpoint(name)

        def change(state: RoutingState) -> RoutingState:
            users = users_of(state, name)
            if users:
                raise ConflictError(f"endpoint {name!r} is still used by {', '.join(users)}")
            return replace(state, endpoints={n: s for n, s in state.endpoints.items() if n != name})

        await self._change(change)

    def health(self, name: str | None = None) -> list[dict[str, Any]]:
        """Endpoint health as IoT Hub reports it: the built-in ``events``, module inputs,
        ``$upstream`` (while routes use it) and the custom endpoints."""
        builtin: list[dict[str, Any]] = [
            {"endpointId": EVENTS, "type": "builtin", "healthStatus": "healthy", "lastError": None,
             **self.drops.health(EVENTS)}]
        used = {r.endpoint for r in self.state.routes}
        up = self.upstream_status() if self.upstream_status is not None else None
        if UPSTREAM in used or (up is not None and up.get("lastError") != NO_UPSTREAM):
            builtin.append(_upstream_health(up))
        for endpoint in sorted(used):
            target = parse_module_input(endpoint)
            if target is not None:
                live = self.inputs is not None and self.inputs.delivering(target[0])
                builtin.append({"endpointId": endpoint, "type": "moduleInput",
                                "healthStatus": "healthy" if live else "unknown",
                                "lastError": None if live else "module not connected (its "
                                "messages wait in the log)",
                                "module": target[0], "input": target[1],
                                **self.drops.health(endpoint)})
        if name is not None:
            for row in builtin:
                if row["endpointId"] == name:
                    return [row]
            if self.endpoints is None or name not in self.state.endpoints:
                raise NotFoundError(f"endpoint {name!r} not found")
            return self.endpoints.health(name)
        custom = self.endpoints.health() if self.endpoints is not None else []
        return builtin + custom

    # -- enrichments ---------------------------------------------------------------------------

    async def put_enrichment(self, key: str, doc: Mapping[str, Any], *,
                             create_only: bool = False) -> EnrichmentSpec:
        enrichment = parse_enrichment(key, doc)

        def change(state: RoutingState) -> RoutingState:
            exists = state.enrichment(key) is not None
            if create_only and exists:
                raise ConflictError(f"enrichment {key!r} exists already")
            if exists:
                items = tuple(enrichment if e.key == key else e for e in state.enrichments)
            else:
                items = (*state.enrichments, enrichment)
            return replace(state, enrichments=items)

        await self._change(change)
        return enrichment

    async def delete_enrichment(self, key: str) -> None:
        if self.state.enrichment(key) is None:
            raise NotFoundError(f"enrichment {key!r} not found")
        await self._change(lambda s: replace(
            s, enrichments=tuple(e for e in s.enrichments if e.key != key)))

    # -- testing -------------------------------------------------------------------------------

    def test(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """Route a made-up device message without storing it: every route, matched or not and
        why, and the endpoints it would reach (``POST /routing/test``); ``route``, a route
        document not saved yet, is tested as if it were (the web page's condition editor)."""
        body_value = doc.get("body", "")
        body = (body_value if isinstance(body_value, str) else json.dumps(body_value)).encode()
        app = doc.get("appProperties") or {}
        sys_in = doc.get("systemProperties") or {}
        if not isinstance(app, dict) or not isinstance(sys_in, dict) or not all(
                isinstance(v, str) for v in [*app.values(), *sys_in.values()]):
            raise InvalidRequestError("appProperties and systemProperties must map names to strings")
        device_id = doc.get("deviceId") or "testDevice"
        module_id = doc.get("moduleId") or None
        if not isinstance(device_id, str) or not (module_id is None or isinstance(module_id, str)):
            raise InvalidRequestError("deviceId and moduleId must be strings")
        system = {"content-type": "application/json", "content-encoding": "utf-8"}
        for name, value in sys_in.items():
            system[system_key(name.removeprefix("$"))] = value
        system["iothub-connection-device-id"] = device_id
        if module_id is not None:
            system["iothub-connection-module-id"] = module_id
        system["iothub-message-source"] = "Telemetry"
        twin_doc = doc.get("twin")
        if twin_doc is not None:
            if not isinstance(twin_doc, dict):
                raise InvalidRequestError("twin must be a JSON object")
            fixed = _TestTwin(twin_doc)
            twins: Any = lambda _d, _m: fixed  # noqa: E731
        else:
            twins = self.hub.twin_store.get
        view = MessageView(system, app, body, device_id=device_id, module_id=module_id,
                           enqueued_ms=int(self.hub.clock() * 1000), twins=twins)
        state = self.state
        candidate = doc.get("route")  # a route being written: tested with the others, not stored
        if candidate is not None:
            if not isinstance(candidate, dict) or not isinstance(candidate.get("name"), str):
                raise InvalidRequestError("route must be a route document with a name")
            spec = parse_route(candidate["name"], candidate)
            state = replace(state, routes=(*[r for r in state.routes if r.name != spec.name], spec))
        router = Router(state, hub_name=self.hub.host_name, twins=twins)
        return router.test(TELEMETRY, view)
