"""Map the gateway's error tree to IoT Hub-shaped HTTP errors, in one place.

IoT Hub answers errors with a JSON body ``{"Message": "ErrorCode:<code>;<text>",
"ExceptionMessage": ...}`` and an ``iothub-errorcode`` header (ref §5.2); clients mostly look at
the status, so the status is what must be right.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    GatewayError,
    GatewayTimeoutError,
    InvalidRequestError,
    NotFoundError,
    PreconditionFailedError,
    StoreError,
)

_STATUS: list[tuple[type[GatewayError], int, str]] = [
    (AuthError, 401, "IotHubUnauthorizedAccess"),
    (ForbiddenError, 403, "IotHubUnauthorizedAccess"),
    (NotFoundError, 404, "DeviceNotFound"),
    (ConflictError, 409, "DeviceAlreadyExists"),
    (PreconditionFailedError, 412, "PreconditionFailed"),
    (InvalidRequestError, 400, "ArgumentInvalid"),
    (GatewayTimeoutError, 504, "GatewayTimeout"),
    (StoreError, 503, "ServerBusy"),
]


def error_response(status: int, code: str, message: str) -> web.Response:
    body = {"Message": f"ErrorCode:{code};{message}", "ExceptionMessage": message}
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/json",
        headers={"iothub-errorcode": code},
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        for cls, status, code in _STATUS:
            if isinstance(exc, cls):
                status = getattr(exc, "status", status)
                return error_response(status, exc.code or code, str(exc))
        return error_response(500, "ServerError", str(exc))
    except json.JSONDecodeError as exc:
        return error_response(400, "ArgumentInvalid", f"malformed JSON body: {exc}")
    except web.HTTPException as exc:
        if exc.status not in (404, 405) or request.match_info.http_exception is None:
            raise
        return no_route(request, exc)


ID_RULE = "ids are 1-128 ASCII letters, digits or -.+%_#*?!(),:=@$' and cannot contain '/'"


def no_route(request: web.Request, exc: web.HTTPException) -> web.Response:
    """The router's "404: Not Found" / "405: Method Not Allowed" in IoT Hub's error shape,
    saying why: under ``/devices`` and ``/twins`` the usual cause is an invalid device id
    (``a/b`` adds a path segment)."""
    message = f"no route for {request.method} {request.path}"
    if request.path.startswith(("/devices/", "/twins/")):
        message = f"invalid device id or path: {message}; device and module {ID_RULE}"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        message += f"; this path takes {', '.join(sorted(exc.allowed_methods))}"
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    response = error_response(exc.status, "InvalidRoute" if exc.status == 404 else
                              "MethodNotAllowed", message)
    if headers:
        response.headers.update(headers)
    return response
