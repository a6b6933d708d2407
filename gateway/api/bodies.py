"""Request and response bodies shared by the service API's route modules."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gateway.errors import InvalidRequestError


def json_response(data: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(data), content_type="application/json", headers=headers
    )


async def json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    data = await request.json(loads=json.loads)
    if not isinstance(data, dict):
        raise InvalidRequestError("the body must be a JSON object")
    return data


def if_match(request: web.Request) -> str | None:
    value = request.headers.get("If-Match")
    return value.strip() if value else None
