"""Request and response bodies shared by the service API's route modules.

Request bodies are parsed by orjson, several times faster than ``json``, when they are UTF-8
(RFC 8259 §8.1; no other charset declared). What orjson refuses goes through ``json`` exactly
as before (``request.json()``), so a body orjson cannot take but ``json`` can (``NaN``,
``Infinity``, lone surrogates) still parses the same, and a malformed one fails with
``json``'s own message (gateway.api.errors: 400 ``malformed JSON body: ...``). orjson reads
integers beyond 64 bits as floats, where ``json`` keeps them exact: a body with a run of 20
digits (or a minus and 19) goes to ``json`` too.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
from aiohttp import web

from gateway.errors import InvalidRequestError

_UTF8 = frozenset({"utf-8", "utf8"})
_LONG_INTEGER = re.compile(rb"\d{20}|-\d{19}")  # possibly beyond orjson's 64 bits


def json_response(data: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(data), content_type="application/json", headers=headers
    )


def finite_json_response(data: Any, status: int = 200,
                         headers: dict[str, str] | None = None) -> web.Response:
    """:func:`json_response` by orjson, for documents without non-finite floats (orjson writes
    NaN as ``null``, ``json`` as ``NaN``), such as twins (every section value passed
    ``twins.validate_patch``: floats finite). The same tree, compact, non-ASCII as UTF-8;
    what orjson cannot encode (non-string keys, integers beyond 64 bits) goes through
    ``json``, as before."""
    try:
        body = orjson.dumps(data)
    except TypeError:
        body = json.dumps(data).encode()
    return web.Response(status=status, body=body, content_type="application/json",
                        charset="utf-8", headers=headers)


async def json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    data: Any = None
    parsed = False
    if request.charset is None or request.charset.lower() in _UTF8:
        raw = await request.read()
        if _LONG_INTEGER.search(raw) is None:
            try:
                data, parsed = orjson.loads(raw), True
            except orjson.JSONDecodeError:
                pass
    if not parsed:
        data = await request.json(loads=json.loads)  # as ever: its result, or its error
    if not isinstance(data, dict):
        raise InvalidRequestError("the body must be a JSON object")
    return data


def if_match(request: web.Request) -> str | None:
    value = request.headers.get("If-Match")
    return value.strip() if value else None
