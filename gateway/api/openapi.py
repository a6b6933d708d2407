"""The service API's OpenAPI 3.0 document, generated from the routes actually registered (so
it cannot drift from the code): path, method, the shared-access right each route needs, and the
handler's first docstring line as its summary."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from gateway import __version__
from gateway.routing.model import ROUTE_SCHEMA

RouteInfo = tuple[str, str, str, Callable[..., Any]]  # method, path, right, handler
_BODIES = {"put_route": "Route", "patch_route": "Route"}  # request bodies with a schema

_ERRORS = {
    "400": "malformed request or a limit broken",
    "401": "missing, malformed, expired or wrongly signed SharedAccessSignature",
    "403": "the policy lacks the right this route needs",
    "404": "no such identity (or the device is not online, for methods)",
}


def document(routes: Iterable[RouteInfo]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for method, route_path, right, handler in routes:
        path = re.sub(r"{(\w+):[^}]+}", r"{\1}", route_path)  # aiohttp's {name:regex}
        operation_id = handler.__name__
        if operation_id in seen:  # the same handler on a device path and a module path
            operation_id += "_" + "_".join(p for p in re.split(r"[/{}]+", path) if p
                                           and not p.endswith("_id"))
        seen.add(operation_id)
        doc = (handler.__doc__ or "").strip().splitlines()
        summary = doc[0].strip() if doc else handler.__name__.replace("_", " ")
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", path)
        ]
        params.append({"name": "api-version", "in": "query", "required": False,
                       "schema": {"type": "string"},
                       "description": "accepted with any value, e.g. 2021-04-12"})
        op: dict[str, Any] = {
            "operationId": operation_id,
            "summary": summary,
            "description": f"Requires the `{right}` right.",
            "parameters": params,
            "responses": {"200": {"description": "success",
                                  "content": {"application/json": {"schema": {}}}},
                          **{code: {"description": text, "content": {"application/json": {
                              "schema": {"$ref": "#/components/schemas/Error"}}}}
                             for code, text in _ERRORS.items()}},
        }
        if method in ("PUT", "PATCH", "POST"):
            schema = ({"$ref": f"#/components/schemas/{_BODIES[operation_id]}"}
                      if operation_id in _BODIES else {"type": "object"})
            op["requestBody"] = {"required": method != "POST",
                                 "content": {"application/json": {"schema": schema}}}
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "Edge gateway service API", "version": __version__,
                 "description": "IoT Hub's service REST shapes for identities, twins and "
                                "methods, plus the gateway's own routes for C2D and the "
                                "built-in endpoint."},
        "servers": [{"url": "/"}],
        "security": [{"sas": []}],
        "components": {
            "securitySchemes": {"sas": {
                "type": "apiKey", "in": "header", "name": "Authorization",
                "description": "SharedAccessSignature sr={host}&sig=...&se=...&skn={policy}"}},
            "schemas": {"Error": {"type": "object", "properties": {
                "Message": {"type": "string"}, "ExceptionMessage": {"type": "string"}}},
                "Route": ROUTE_SCHEMA},
        },
        "paths": paths,
    }
