"""The service API's routing routes (``/routing/...``): routes, custom endpoints, enrichments,
the fallback route, endpoint health and route testing (IoT Hub ref §10). The shapes are IoT
Hub's routing JSON (``name``, ``source``, ``condition``, ``endpointNames``, ``isEnabled``)
plus edgeHub's ``route``, ``priority`` and ``timeToLiveSecs``; endpoints use the one endpoint
shape of :mod:`gateway.endpoints.spec` (secrets shown as ``***``).

``PUT`` creates or replaces; with ``If-None-Match: *`` it only creates (409 if the name is
taken), which is what ``gateway ... create`` sends. Every change applies live and is kept
across restarts; a refused one changes nothing.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.endpoints.spec import endpoint_json
from gateway.errors import ForbiddenError, InvalidRequestError
from gateway.routingsvc import RoutingService, state_json

if TYPE_CHECKING:
    from gateway.api.server import ServiceApi

READ, WRITE, SERVICE = "RegistryRead", "RegistryWrite", "ServiceConnect"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json")


async def _doc(request: web.Request) -> Any:
    if not request.can_read_body:
        raise InvalidRequestError("a JSON body is required")
    return await request.json()


def _object(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise InvalidRequestError("the body must be a JSON object")
    return doc


def _create_only(request: web.Request) -> bool:
    return request.headers.get("If-None-Match", "").strip() == "*"


class _Handlers:
    def __init__(self, routing: RoutingService) -> None:
        self.r = routing

    def _mark(self, kind: str, item: dict[str, Any]) -> dict[str, Any]:
        """``"owner": "parent"`` on an item a parent hub's configuration push set here."""
        name = item.get("key" if kind == "enrichment" else "name")
        if isinstance(name, str) and self.r.owner_of(kind, name) is not None:
            item["owner"] = "parent"
        return item

    def _local(self, kind: str, name: str) -> None:
        """Refuse a local change to an item the parent owns, naming the owner."""
        owner = self.r.owner_of(kind, name)
        if owner is not None:
            raise ForbiddenError(f"{kind} {name!r} belongs to {owner} (its configuration "
                                 "push sets it); change it there")

    async def get_routing(self, request: web.Request) -> web.Response:
        """The whole routing state: routes, endpoints, enrichments, the fallback route."""
        doc = state_json(self.r.state)
        for plural, kind in (("routes", "route"), ("endpoints", "endpoint"),
                             ("enrichments", "enrichment")):
            doc[plural] = [self._mark(kind, item) for item in doc[plural]]
        return _json(doc)

    async def list_routes(self, request: web.Request) -> web.Response:
        """List routes, in order."""
        return _json([self._mark("route", r.to_json()) for r in self.r.state.routes])

    async def get_route(self, request: web.Request) -> web.Response:
        """Get one route."""
        return _json(self._mark("route", self.r.get_route(request.match_info["name"]).to_json()))

    async def put_route(self, request: web.Request) -> web.Response:
        """Create or replace a route (an object, or {"route": "FROM ... WHERE ... INTO ..."})."""
        doc = await _doc(request)
        name = request.match_info["name"]
        self._local("route", name)
        created = self.r.state.route(name) is None
        route = await self.r.put_route(name, doc if isinstance(doc, str) else _object(doc),
                                       create_only=_create_only(request))
        return _json(route.to_json(), 201 if created else 200)

    async def patch_route(self, request: web.Request) -> web.Response:
        """Change some fields of a route (condition, endpointNames, isEnabled, priority, ...)."""
        self._local("route", request.match_info["name"])
        route = await self.r.patch_route(request.match_info["name"], _object(await _doc(request)))
        return _json(route.to_json())

    async def delete_route(self, request: web.Request) -> web.Response:
        """Delete a route."""
        self._local("route", request.match_info["name"])
        await self.r.delete_route(request.match_info["name"])
        return web.Response(status=204)

    async def put_fallback(self, request: web.Request) -> web.Response:
        """Enable or disable the fallback route: {"isEnabled": true|false}."""
        doc = _object(await _doc(request))
        enabled = doc.get("isEnabled")
        if not isinstance(enabled, bool):
            raise InvalidRequestError('the body must be {"isEnabled": true|false}')
        await self.r.set_fallback(enabled)
        return _json(state_json(self.r.state)["fallbackRoute"])

    async def test_route(self, request: web.Request) -> web.Response:
        """Route a made-up device message (not stored): which routes match, and why not."""
        return _json(self.r.test(_object(await _doc(request))))

    async def list_endpoints(self, request: web.Request) -> web.Response:
        """List custom endpoints (secrets shown as ***)."""
        return _json([self._mark("endpoint", endpoint_json(s))
                      for s in self.r.state.endpoints.values()])

    async def get_endpoint(self, request: web.Request) -> web.Response:
        """Get one custom endpoint (secrets shown as ***)."""
        return _json(self._mark("endpoint",
                                endpoint_json(self.r.get_endpoint(request.match_info["name"]))))

    async def put_endpoint(self, request: web.Request) -> web.Response:
        """Create or replace a custom endpoint (type mqtt, http or file)."""
        name = request.match_info["name"]
        self._local("endpoint", name)
        created = name not in self.r.state.endpoints
        spec = await self.r.put_endpoint(name, _object(await _doc(request)),
                                         create_only=_create_only(request))
        return _json(endpoint_json(spec), 201 if created else 200)

    async def delete_endpoint(self, request: web.Request) -> web.Response:
        """Delete a custom endpoint no route or enrichment uses."""
        self._local("endpoint", request.match_info["name"])
        await self.r.delete_endpoint(request.match_info["name"])
        return web.Response(status=204)

    async def endpoint_health(self, request: web.Request) -> web.Response:
        """Endpoint health as IoT Hub reports it (healthy, unhealthy, dead, unknown)."""
        return _json(self.r.health(request.match_info.get("name")))

    async def list_enrichments(self, request: web.Request) -> web.Response:
        """List message enrichments."""
        return _json([self._mark("enrichment", e.to_json()) for e in self.r.state.enrichments])

    async def put_enrichment(self, request: web.Request) -> web.Response:
        """Create or replace an enrichment: {"value": ..., "endpointNames": [...]}."""
        key = request.match_info["key"]
        self._local("enrichment", key)
        created = self.r.state.enrichment(key) is None
        item = await self.r.put_enrichment(key, _object(await _doc(request)),
                                           create_only=_create_only(request))
        return _json(item.to_json(), 201 if created else 200)

    async def delete_enrichment(self, request: web.Request) -> web.Response:
        """Delete an enrichment."""
        self._local("enrichment", request.match_info["key"])
        await self.r.delete_enrichment(request.match_info["key"])
        return web.Response(status=204)


def add_routing_routes(api: ServiceApi, routing: RoutingService) -> None:
    h = _Handlers(routing)
    r = api._route
    r("GET", "/routing", READ, h.get_routing)
    r("GET", "/routing/routes", READ, h.list_routes)
    r("GET", "/routing/routes/{name}", READ, h.get_route)
    r("PUT", "/routing/routes/{name}", WRITE, h.put_route)
    r("PATCH", "/routing/routes/{name}", WRITE, h.patch_route)
    r("DELETE", "/routing/routes/{name}", WRITE, h.delete_route)
    r("PUT", "/routing/fallback", WRITE, h.put_fallback)
    r("POST", "/routing/test", READ, h.test_route)
    r("GET", "/routing/endpoints", READ, h.list_endpoints)
    r("GET", "/routing/endpoints/{name}", READ, h.get_endpoint)
    r("PUT", "/routing/endpoints/{name}", WRITE, h.put_endpoint)
    r("DELETE", "/routing/endpoints/{name}", WRITE, h.delete_endpoint)
    r("GET", "/routing/health", READ, h.endpoint_health)
    r("GET", "/routing/health/{name}", READ, h.endpoint_health)
    r("GET", "/routing/enrichments", READ, h.list_enrichments)
    r("PUT", "/routing/enrichments/{key}", WRITE, h.put_enrichment)
    r("DELETE", "/routing/enrichments/{key}", WRITE, h.delete_enrichment)
