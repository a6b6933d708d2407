"""Service API routes of the upstream link (what ``gateway upstream`` calls)::

    GET    /upstream          the settings in force, key redacted (null: none)
    PUT    /upstream          set them (connectionString | x509+hub+device | enrollment: the
                              gateway registers at a provisioning service first; caFile, host,
                              port)
    DELETE /upstream          clear them
    GET    /upstream/status   the status object (README "Connect to a parent hub")
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.errors import ConfigError, InvalidRequestError
from gateway.upstream import enroll
from gateway.upstream import settings as link_settings
from gateway.upstream.service import Upstream

if TYPE_CHECKING:
    from gateway.api.server import ServiceApi


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json")


def add_upstream_routes(api: ServiceApi, upstream: Upstream) -> None:
    async def get_upstream(request: web.Request) -> web.Response:
        """The upstream link's settings (the key is not shown)."""
        return _json(upstream.show())

    async def put_upstream(request: web.Request) -> web.Response:
        """Set the upstream link (applies at once, persisted)."""
        try:
            body = await request.json()
        except ValueError:
            raise InvalidRequestError("the body must be JSON") from None
        if not isinstance(body, dict):
            raise InvalidRequestError("the body must be a JSON object")
        if "enrollment" in body:  # gateway/upstream/enroll.py: register, then use the answer
            await upstream.set(await enroll.from_request(body, upstream.data_dir))
            return _json(upstream.show())
        try:
            settings = link_settings.from_request(body)
        except ConfigError as exc:
            raise InvalidRequestError(str(exc)) from None
        await upstream.set(settings)
        return _json(upstream.show())

    async def delete_upstream(request: web.Request) -> web.Response:
        """Clear the upstream link."""
        await upstream.set(None)
        return web.Response(status=204)

    async def upstream_status(request: web.Request) -> web.Response:
        """The upstream link's state, backlog and counters."""
        return _json(upstream.status())

    api.add_route("GET", "/upstream", "ServiceConnect", get_upstream)
    api.add_route("PUT", "/upstream", "RegistryWrite", put_upstream)
    api.add_route("DELETE", "/upstream", "RegistryWrite", delete_upstream)
    api.add_route("GET", "/upstream/status", "ServiceConnect", upstream_status)
