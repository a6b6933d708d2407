"""The device HTTP API: IoT Hub's device REST for clients that cannot hold an MQTT connection
(IoT Hub ref §2, §3.2). ``api-version`` is accepted with any value, or none (ref §16.2).

Routes (``deviceBound`` is also accepted as ``devicebound``, the Java and C SDKs' spelling):

* ``POST /devices/{id}/messages/events`` (and ``/devices/{id}/modules/{m}/messages/events``):
  one telemetry message; the body is the message body. 204 once the message is committed,
  as MQTT's PUBACK (DESIGN "One telemetry message", step 6); 413 over 256 KB (ref §2.4).
* ``GET /devices/{id}/messages/deviceBound``: the next C2D message, locked (ref §3.2). 204
  when there is none; else 200 with the body and the message in headers (:func:`c2d_headers`),
  the lock token as ``ETag: "<token>"``.
* ``DELETE /devices/{id}/messages/deviceBound/{etag}``: complete (204); with ``?reject``
  reject (204). ``POST /devices/{id}/messages/deviceBound/{etag}/abandon``: abandon (204).
  An unknown, settled or superseded lock token is 412 ``DeviceMessageLockLost``.

Authorization, as for MQTT's CONNECT (ref §7.1, §7.2, §8): a device or module SAS token in
``Authorization`` whose ``sr`` is ``{host}/devices/{id}[/modules/{m}]`` (or a DeviceConnect
policy token, the gateway pattern); without ``Authorization``, the client certificate of the
TLS handshake. A token for one identity never opens another's routes.

Telemetry headers -> system properties (names as the Azure SDKs' HTTP transports send them):
``iothub-messageid``, ``iothub-correlationid``, ``iothub-userid``, ``iothub-contenttype`` (else
``Content-Type``), ``iothub-contentencoding`` (else ``Content-Encoding``),
``iothub-messageschema``, ``iothub-creationtimeutc``/``iothub-creation-time-utc``,
``iothub-expiry``, ``iothub-interface-id``; ``iothub-app-{name}`` -> application property
``{name}``. The plain HTTP headers are taken only when they describe the message: a
``Content-Type`` of ``application/octet-stream`` (what HTTP clients send for "bytes") and an
HTTP transfer coding in ``Content-Encoding`` (``gzip``..., which aiohttp has already undone)
are ignored. The message is then stamped and sized by the hub exactly as an MQTT message with
the same properties (ref §2.5).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

from aiohttp import web

from gateway.api.errors import error_response
from gateway.broker.devicetls import peer_certificate_chain
from gateway.errors import AuthError, MessageTooLargeError
from gateway.hub.addresses import Telemetry
from gateway.hub.auth import Principal
from gateway.hub.hub import PreparedTelemetry
from gateway.hub.messages import format_time
from gateway.hub.propbag import encode_bag

if TYPE_CHECKING:
    from gateway.hub.c2d import C2DMessage, C2DQueues
    from gateway.hub.hub import Hub

__all__ = ["APP_PREFIX", "add_device_routes", "c2d_headers", "telemetry_pairs"]

APP_PREFIX: Final = "iothub-app-"
"""Header prefix of application properties, both directions."""

API_VERSION: Final = "2020-09-30"
"""Stands in the username the request is authenticated under (its value is not checked)."""

PREPARED_CACHE: Final = 1024
"""Prepared property sets kept (identity + headers -> stored properties); cleared when full."""

# Request header (lower case) -> the property-bag key an MQTT device would use (ref §2.3).
_SYSTEM_HEADERS: Final[Mapping[str, str]] = {
    "iothub-messageid": "$.mid",
    "iothub-correlationid": "$.cid",
    "iothub-userid": "$.uid",
    "iothub-contenttype": "$.ct",
    "iothub-contentencoding": "$.ce",
    "iothub-messageschema": "$.schema",
    "iothub-creationtimeutc": "$.ctime",
    "iothub-creation-time-utc": "$.ctime",
    "iothub-expiry": "$.exp",
    "iothub-interface-id": "$.ifid",
}
_GENERIC_TYPES: Final = frozenset({"application/octet-stream", "binary/octet-stream"})
_HTTP_CODINGS: Final = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd", "compress",
                                  "identity"})


def telemetry_pairs(headers: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The property-bag pairs (ref §2.2, §2.3) an HTTP telemetry request's headers stand for:
    system keys (``$.mid``...) first, then ``iothub-app-*`` as application properties in the
    order sent. See the module doc for the names."""
    system: dict[str, str] = {}
    application: list[tuple[str, str | None]] = []
    content_type = content_encoding = None
    for name, value in headers.items():
        lower = name.lower()
        key = _SYSTEM_HEADERS.get(lower)
        if key is not None:
            system.setdefault(key, value)
        elif lower.startswith(APP_PREFIX):
            if len(name) > len(APP_PREFIX):
                application.append((name[len(APP_PREFIX):], value))
        elif lower == "content-type":
            content_type = value.strip()
        elif lower == "content-encoding":
            content_encoding = value.strip()
    media = (content_type or "").partition(";")[0].strip().lower()
    if content_type and "$.ct" not in system and media not in _GENERIC_TYPES:
        system["$.ct"] = content_type
    coding = (content_encoding or "").lower()
    if content_encoding and "$.ce" not in system and coding not in _HTTP_CODINGS:
        system["$.ce"] = content_encoding
    return [*system.items(), *application]


# C2D system property -> response header (ref §3.1 names; the SDKs' HTTP transports read these).
_C2D_HEADERS: Final = (
    ("message-id", "iothub-messageid"),
    ("correlation-id", "iothub-correlationid"),
    ("user-id", "iothub-userid"),
    ("to", "iothub-to"),
    ("content-type", "Content-Type"),
    ("content-encoding", "Content-Encoding"),
)


def _header_value(value: str) -> str:
    """Header values must be printable ASCII here; anything else travels percent-encoded."""
    if value.isascii() and value.isprintable():
        return value
    return quote(value, safe=" !\"#$&'()*+,/:;<=>?@[\\]^`{|}~")


def c2d_headers(message: C2DMessage) -> dict[str, str]:
    """The response headers of a received C2D message: ``ETag`` (the quoted lock token),
    ``iothub-messageid``, ``iothub-correlationid``, ``iothub-userid``, ``iothub-to``,
    ``iothub-expiry``, ``iothub-enqueuedtime``, ``iothub-deliverycount``, ``iothub-ack``,
    ``Content-Type``, ``Content-Encoding`` and ``iothub-app-{name}`` per application
    property (ref §3.1, §3.2)."""
    assert message.lock_token is not None
    system = message.system
    headers = {"ETag": f'"{message.lock_token}"'}
    for name, header in _C2D_HEADERS:
        value = system.get(name)
        if value is not None:
            headers[header] = _header_value(value)
    headers["iothub-expiry"] = system.get("absolute-expiry-time") or format_time(message.expiry)
    headers["iothub-enqueuedtime"] = format_time(message.enqueued)
    headers["iothub-deliverycount"] = str(message.delivery_count)
    headers["iothub-ack"] = message.ack
    for key, app_value in message.application.items():
        headers[APP_PREFIX + key] = _header_value(app_value or "")
    return headers


class DeviceApi:
    """Handlers of the device routes; :func:`add_device_routes` registers them."""

    def __init__(self, hub: Hub, *, clock: Callable[[], float] = time.time) -> None:
        self.hub = hub
        self.clock = clock
        # As MQTT connections cache per topic: devices repeat the same properties.
        self._prepared: dict[tuple[str, str, str, str | None, str], PreparedTelemetry] = {}

    # -- authentication ------------------------------------------------------------------------

    def authenticate(self, request: web.Request, device_id: str,
                     module_id: str | None = None) -> Principal:
        """The identity the request's credentials prove, which must be ``device_id`` (and
        ``module_id``): the checks of MQTT's CONNECT, with the path as the username."""
        authorization = request.headers.get("Authorization")
        chain: list[bytes] | None = None
        if not authorization:
            chain = peer_certificate_chain(request.transport)
            if not chain:
                raise AuthError("missing Authorization header and no client certificate")
        ids = device_id if module_id is None else f"{device_id}/{module_id}"
        return self.hub.authenticator.authenticate_mqtt(
            client_id=ids, username=f"{self.hub.host_name}/{ids}/?api-version={API_VERSION}",
            password=authorization.encode() if authorization else None,
            peer_cert_chain=chain, now=self.clock(),
        )

    # -- telemetry (ref §2) --------------------------------------------------------------------

    async def send_event(self, request: web.Request) -> web.StreamResponse:
        info = request.match_info
        principal = self.authenticate(request, info["device_id"], info.get("module_id"))
        limit = self.hub.max_message_bytes
        if request.content_length is not None and request.content_length > limit:
            return _too_large(f"message body of {request.content_length} bytes is over the "
                              f"{limit}-byte limit")
        body = await request.read()
        prepared = self._prepare(principal, encode_bag(telemetry_pairs(request.headers)))
        try:
            record = self.hub.telemetry_record(prepared, body)
        except MessageTooLargeError as exc:
            return _too_large(str(exc))
        await self.hub.append([record])
        return web.Response(status=204)

    def _prepare(self, principal: Principal, bag: str) -> PreparedTelemetry:
        """The hub's stamping of a message with ``bag`` from ``principal`` (ref §2.5)."""
        key = (principal.client_id, principal.generation_id, principal.auth_type,
               principal.policy, bag)
        prepared = self._prepared.get(key)
        if prepared is None:
            topic = Telemetry(principal.device_id, principal.module_id, bag).topic
            prepared = self.hub.prepare_publish(principal, topic)
            assert isinstance(prepared, PreparedTelemetry)
            if len(self._prepared) >= PREPARED_CACHE:
                self._prepared.clear()
            self._prepared[key] = prepared
        return prepared

    # -- cloud-to-device (ref §3.2) ------------------------------------------------------------

    def _queues(self) -> C2DQueues:
        return self.hub.c2d.queues

    async def receive(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["device_id"]
        self.authenticate(request, device_id)
        message = await self._queues().next_for_delivery(device_id)
        if message is None:
            return web.Response(status=204)
        return web.Response(status=200, body=message.body, headers=c2d_headers(message))

    async def complete(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["device_id"]
        self.authenticate(request, device_id)
        token = _lock_token(request)
        reject = request.query.get("reject")
        if reject is not None and reject.lower() not in ("false", "0"):
            await self._queues().reject(device_id, token)
        else:
            await self._queues().complete(device_id, token)
        return web.Response(status=204)

    async def abandon(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["device_id"]
        self.authenticate(request, device_id)
        await self._queues().abandon(device_id, _lock_token(request))
        self.hub.c2d.pump(device_id)  # deliverable again, to an MQTT session too
        return web.Response(status=204)


def _lock_token(request: web.Request) -> str:
    return request.match_info["etag"].strip().strip('"')


def _too_large(text: str) -> web.Response:
    return error_response(413, "MessageTooLarge", text)


def add_device_routes(app: web.Application, hub: Hub, *,
                      clock: Callable[[], float] = time.time) -> DeviceApi:
    """Register the device HTTP API on ``app`` (paths in the module doc)."""
    api = DeviceApi(hub, clock=clock)
    router = app.router
    router.add_post("/devices/{device_id}/messages/events", api.send_event)
    router.add_post("/devices/{device_id}/modules/{module_id}/messages/events", api.send_event)
    for bound in ("deviceBound", "devicebound"):
        base = f"/devices/{{device_id}}/messages/{bound}"
        router.add_get(base, api.receive, allow_head=False)
        router.add_delete(base + "/{etag}", api.complete)
        router.add_post(base + "/{etag}/abandon", api.abandon)
    return api

