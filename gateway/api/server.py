"""The HTTPS service API: IoT Hub's REST shapes for identities (ref §9.1), and the built-in
endpoint's readers.

Every request is authorized by a shared-access-policy SAS token in the ``Authorization``
header (ref §7.2); each route names the right it needs. ``api-version`` is accepted with any
non-empty value (ref §16.2).

Built-in endpoint (our own routes; IoT Hub exposes it over AMQP as an Event Hub):

* ``GET /messages/events?consumerGroup=G&start=latest|earliest|checkpoint|SEQ&deviceId=D``
  ``&kinds=telemetry,connectionState&stream=true`` streams newline-delimited JSON, one message
  per line, until the client goes away; without ``stream=true`` it long-polls for up to
  ``waitSeconds`` and returns a JSON array of at most ``limit`` messages.
* ``POST /messages/events/checkpoint`` ``{"consumerGroup": G, "seq": N}`` records a consumer
  group's position, so ``start=checkpoint`` resumes after it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.api import openapi
from gateway.api.bodies import finite_json_response, if_match, json_body, json_response
from gateway.api.certificates import CertificateRoutes
from gateway.api.device_http import add_device_routes
from gateway.api.errors import error_middleware
from gateway.api.events import entry_json, message_json
from gateway.api.limits import Deadlines
from gateway.api.query import float_query, int_query
from gateway.api.ws import add_websocket_route
from gateway.broker.devicetls import DeviceTls
from gateway.broker.listener import Admission, Listener, listening_socket
from gateway.errors import InvalidRequestError, NotFoundError
from gateway.hub.auth import Authenticator, ServicePrincipal
from gateway.hub.hub import Hub
from gateway.hub.messages import format_time as iso_time
from gateway.hub.policies import ALL_RIGHTS
from gateway.hub.registry import Registry
from gateway.store.log import MessageLog

if TYPE_CHECKING:
    from OpenSSL import SSL

    from gateway.broker.broker import Broker
    from gateway.routingsvc import RoutingService

log = logging.getLogger(__name__)

READ, WRITE, SERVICE = "RegistryRead", "RegistryWrite", "ServiceConnect"
PRINCIPAL = web.AppKey("principal", ServicePrincipal)


_json, _body, _if_match = json_response, json_body, if_match



class ServiceApi:
    """Routes and handlers; :meth:`start` binds the HTTPS listener."""

    def __init__(
        self,
        *,
        host_name: str,
        registry: Registry,
        authenticator: Authenticator,
        log: MessageLog,
        hub: Hub,
        broker: Broker | None = None,
        routing: RoutingService | None = None,
        clock: Callable[[], float] = time.time,
        events_page_bytes: int = 1 << 20,
    ) -> None:
        self.hub = hub
        self.events_page_bytes = events_page_bytes
        self.routing = routing
        self.host_name = host_name
        self.registry = registry
        self.authenticator = authenticator
        self.log = log
        self.clock = clock
        self.app = web.Application(middlewares=[error_middleware], client_max_size=1 << 20)
        self._routes: list[tuple[str, str, str,
                                 Callable[[web.Request], Awaitable[web.StreamResponse]]]] = []
        r = self._route
        r("GET", "/devices", READ, self.list_devices)
        r("GET", "/devices/{device_id}", READ, self.get_device)
        r("PUT", "/devices/{device_id}", WRITE, self.put_device)
        r("DELETE", "/devices/{device_id}", WRITE, self.delete_device)
        r("GET", "/devices/{device_id}/modules", READ, self.list_modules)
        r("GET", "/devices/{device_id}/modules/{module_id}", READ, self.get_module)
        r("PUT", "/devices/{device_id}/modules/{module_id}", WRITE, self.put_module)
        r("DELETE", "/devices/{device_id}/modules/{module_id}", WRITE, self.delete_module)
        r("GET", "/sharedAccessPolicies/{name}", ALL_RIGHTS, self.get_policy)
        r("GET", "/messages/events", SERVICE, self.read_events)
        r("POST", "/messages/events/checkpoint", SERVICE, self.checkpoint)
        r("GET", "/statistics/devices", READ, self.device_statistics)
        r("GET", "/openapi.json", READ, self.openapi)
        for method, path, right, handler in CertificateRoutes(registry).routes():
            r(method, path, right, handler)
        r("POST", "/devices/{device_id}/messages/deviceBound", SERVICE, self.send_c2d)
        r("DELETE", "/devices/{device_id}/commands", SERVICE, self.purge_c2d)
        r("GET", "/messages/serviceBound/feedback", SERVICE, self.receive_feedback)
        r("DELETE", "/messages/serviceBound/feedback/{lock}", SERVICE, self.complete_feedback)
        r("POST", "/messages/serviceBound/feedback/{lock}/abandon", SERVICE, self.abandon_feedback)
        for base in ("/twins/{device_id}", "/twins/{device_id}/modules/{module_id}"):
            r("GET", base, READ, self.get_twin)
            r("PATCH", base, SERVICE, self.patch_twin)
            r("PUT", base, SERVICE, self.replace_twin)
            r("POST", base + "/methods", SERVICE, self.invoke_method)
        if routing is not None:
            from gateway.api.routing_api import add_routing_routes

            add_routing_routes(self, routing)
        # Device-facing routes authenticate devices themselves (not _route's policy token):
        # the device HTTP API, and MQTT over WebSocket (its CONNECT authenticates).
        add_device_routes(self.app, hub, clock=clock)
        if broker is not None:
            add_websocket_route(self.app, broker)
        self._runner: web.AppRunner | None = None
        self._listener: Listener | None = None
        self.port = 0

    def _route(self, method: str, path: str, right: str,
               handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
        async def guarded(request: web.Request) -> web.StreamResponse:
            principal = self.authenticator.authenticate_service(
                request.headers.get("Authorization"), now=self.clock()
            )
            Authenticator.require(principal, right)
            Authenticator.require_path(principal, request.path)
            return await handler(request)

        self.app.router.add_route(method, path, guarded)
        self._routes.append((method, path, right, handler))

    def add_route(self, method: str, path: str, right: str,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
        """Register a policy-guarded route from another component (before :meth:`start`)."""
        self._route(method, path, right, handler)

    async def start(self, host: str, port: int,
                    ssl_context: ssl.SSLContext | SSL.Context | DeviceTls | None, *,
                    admission: Admission | None = None, header_timeout: float = 10.0,
                    body_timeout: float = 60.0) -> None:
        """Serve on ``host:port`` through our own accept loop (gateway.broker.listener): the
        connection caps of ``admission`` and the deadlines of gateway.api.limits apply. A
        :class:`DeviceTls` (or a pyOpenSSL context) puts the hub's own TLS layer in front
        (gateway.broker.tls: X.509 clients judged by the identity check, every refused
        handshake logged)."""
        sock = listening_socket(host, port)
        try:
            await self.serve(sock, ssl_context, admission=admission,
                             header_timeout=header_timeout, body_timeout=body_timeout)
        except BaseException:
            sock.close()
            raise
        log.info("https service api listening port=%s", self.port)

    async def serve(self, sock: socket.socket,
                    ssl_context: ssl.SSLContext | SSL.Context | DeviceTls | None, *,
                    admission: Admission | None = None, header_timeout: float = 10.0,
                    body_timeout: float = 60.0) -> None:
        """:meth:`start` on a socket already listening (gateway.api.lazy hands its own over,
        with whatever connections wait in its backlog); the API owns ``sock`` from here."""
        deadlines = Deadlines(header_timeout, body_timeout)
        self.app.middlewares.insert(0, deadlines.middleware)
        # Open event streams end at once on shutdown instead of holding it for a minute.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        timeout = header_timeout or 60.0
        factory: Callable[[], asyncio.BaseProtocol] = server
        plain_tls = None
        if isinstance(ssl_context, DeviceTls):
            device_tls = ssl_context
            factory = lambda: device_tls.protocol(timeout, server)  # noqa: E731
        elif ssl_context is None or isinstance(ssl_context, ssl.SSLContext):
            plain_tls = ssl_context
        else:  # a pyOpenSSL context
            from gateway.broker.tls import TlsServerProtocol

            tls = ssl_context
            factory = lambda: TlsServerProtocol(tls, timeout, server)  # noqa: E731
        self._listener = Listener(
            sock, factory, admission or Admission(1 << 30, 1 << 30),
            name="https", ssl_context=plain_tls, handshake_timeout=timeout,
            wrap=deadlines.wrap)
        self._listener.start()
        self.port = int(self._listener.port)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- identities (ref §9.1) ---------------------------------------------------------------

    def _device_json(self, device: Any) -> dict[str, Any]:
        return device.to_json(  # type: ignore[no-any-return]
            cloud_to_device_message_count=self.hub.c2d.queues.pending(device.device_id))

    async def list_devices(self, request: web.Request) -> web.Response:
        """List device identities (top=N limits the count)."""
        top = int_query(request, "top", -1)
        devices = [self._device_json(d) for d in self.registry.devices()]
        if top >= 0:
            devices = devices[:top]
        return _json(devices)

    async def get_device(self, request: web.Request) -> web.Response:
        """Get one device identity."""
        device_id = request.match_info["device_id"]
        device = self.registry.get_device(device_id)
        if device is None:
            raise NotFoundError(f"device {device_id!r} not found")
        return _json(self._device_json(device))

    async def put_device(self, request: web.Request) -> web.Response:
        """Create or update a device identity (If-Match to update)."""
        device, _ = await self.registry.put_device(
            await _body(request), device_id=request.match_info["device_id"],
            if_match=_if_match(request),
        )
        return _json(self._device_json(device))

    async def delete_device(self, request: web.Request) -> web.Response:
        """Delete a device identity and its modules."""
        await self.registry.delete_device(request.match_info["device_id"],
                                          if_match=_if_match(request))
        return web.Response(status=204)

    async def list_modules(self, request: web.Request) -> web.Response:
        """List a device's module identities."""
        device_id = request.match_info["device_id"]
        if self.registry.get_device(device_id) is None:
            raise NotFoundError(f"device {device_id!r} not found")
        return _json([self._module_json(m) for m in self.registry.modules(device_id)])

    def _module_json(self, module: Any) -> dict[str, Any]:
        """The module identity; ``"owner": "parent"`` when a parent hub's configuration push
        lists it (its desired properties are the parent's: gateway.upstream.modulepush)."""
        doc: dict[str, Any] = module.to_json()
        if self.hub.twins.configured_owner(module.device_id, module.module_id) is not None:
            doc["owner"] = "parent"
        return doc

    async def get_module(self, request: web.Request) -> web.Response:
        """Get one module identity."""
        device_id, module_id = request.match_info["device_id"], request.match_info["module_id"]
        module = self.registry.get_module(device_id, module_id)
        if module is None:
            raise NotFoundError(f"module {device_id}/{module_id} not found")
        return _json(self._module_json(module))

    async def put_module(self, request: web.Request) -> web.Response:
        """Create or update a module identity."""
        module, _ = await self.registry.put_module(
            await _body(request), device_id=request.match_info["device_id"],
            module_id=request.match_info["module_id"], if_match=_if_match(request),
        )
        return _json(module.to_json())

    async def delete_module(self, request: web.Request) -> web.Response:
        """Delete a module identity."""
        await self.registry.delete_module(
            request.match_info["device_id"], request.match_info["module_id"],
            if_match=_if_match(request),
        )
        return web.Response(status=204)

    async def get_policy(self, request: web.Request) -> web.Response:
        """Get a shared access policy and its keys."""
        name = request.match_info["name"]
        policy = self.registry.get_policy(name)
        if policy is None:
            raise NotFoundError(f"shared access policy {name!r} not found")
        return _json({
            "keyName": policy.name,
            "primaryKey": policy.primary_key,
            "secondaryKey": policy.secondary_key,
            "rights": ", ".join(sorted(policy.rights)),
        })

    async def openapi(self, request: web.Request) -> web.Response:
        """This document: the service API in OpenAPI 3.0."""
        return _json(openapi.document(self._routes))

    async def device_statistics(self, request: web.Request) -> web.Response:
        """Count devices, enabled and disabled."""
        devices = self.registry.devices()
        return _json({
            "totalDeviceCount": len(devices),
            "enabledDeviceCount": sum(d.status == "enabled" for d in devices),
            "disabledDeviceCount": sum(d.status != "enabled" for d in devices),
        })

    # -- twins and methods (ref §4.2, §5.2, §9.2) ----------------------------------------------

    def _twin_identity(self, device_id: str, module_id: str | None) -> dict[str, Any]:
        if module_id is None:
            device = self.registry.get_device(device_id)
            if device is None:
                raise NotFoundError(f"device {device_id!r} not found")
            d = self._device_json(device)
            return {
                "deviceEtag": d["etag"], "status": d["status"], "statusReason": d["statusReason"],
                "statusUpdateTime": d["statusUpdatedTime"], "connectionState": d["connectionState"],
                "lastActivityTime": d["lastActivityTime"],
                "cloudToDeviceMessageCount": d["cloudToDeviceMessageCount"],
                "authenticationType": d["authentication"]["type"],
                "x509Thumbprint": d["authentication"]["x509Thumbprint"],
                "capabilities": d["capabilities"], "deviceScope": d["deviceScope"],
                "parentScopes": d["parentScopes"],
            }
        module = self.registry.get_module(device_id, module_id)
        if module is None:
            raise NotFoundError(f"module {device_id}/{module_id} not found")
        m = module.to_json()
        return {
            "deviceEtag": m["etag"], "connectionState": m["connectionState"],
            "lastActivityTime": m["lastActivityTime"],
            "cloudToDeviceMessageCount": m["cloudToDeviceMessageCount"],
            "authenticationType": m["authentication"]["type"],
            "x509Thumbprint": m["authentication"]["x509Thumbprint"],
        }

    @staticmethod
    def _ids(request: web.Request) -> tuple[str, str | None]:
        return request.match_info["device_id"], request.match_info.get("module_id")

    async def get_twin(self, request: web.Request) -> web.Response:
        """Get a device or module twin."""
        device_id, module_id = self._ids(request)
        identity = self._twin_identity(device_id, module_id)
        twin = await self.hub.twins.twin(device_id, module_id)
        view = twin.service_view(identity)
        owner = self.hub.twins.configured_owner(device_id, module_id)
        if owner is not None:  # a module the parent's configuration push lists (modulepush)
            view["properties"]["desired"].setdefault("$metadata", {}).setdefault(
                "$owner", owner)
        return finite_json_response(view)  # twin values are finite (twins.validate_patch)

    async def _write_twin(self, request: web.Request, *, replace: bool) -> web.Response:
        device_id, module_id = self._ids(request)
        identity = self._twin_identity(device_id, module_id)
        twin = await self.hub.twins.service_update(
            device_id, module_id, await _body(request), if_match=_if_match(request),
            replace=replace)
        return finite_json_response(twin.service_view(identity))

    async def patch_twin(self, request: web.Request) -> web.Response:
        """Patch tags and desired properties (JSON merge patch, null deletes)."""
        return await self._write_twin(request, replace=False)

    async def replace_twin(self, request: web.Request) -> web.Response:
        """Replace tags and desired properties."""
        return await self._write_twin(request, replace=True)

    async def invoke_method(self, request: web.Request) -> web.Response:
        """Invoke a direct method and wait for the device's answer."""
        device_id, module_id = self._ids(request)
        if (self.registry.get_device(device_id) if module_id is None
                else self.registry.get_module(device_id, module_id)) is None:
            self._twin_identity(device_id, module_id)  # raises the 404
        status, payload = await self.hub.methods.invoke_raw(device_id, module_id,
                                                            await _body(request))
        # the device's JSON goes out as it came (no second JSON round trip)
        return web.Response(body=b'{"status":%d,"payload":%s}' % (status, payload),
                            content_type="application/json", charset="utf-8")

    # -- cloud-to-device (our routes; IoT Hub's service SDK sends C2D over AMQP, ref §9.4) --

    async def send_c2d(self, request: web.Request) -> web.Response:
        """Queue a cloud-to-device message for a device.

        ``{"body": text | "bodyBase64": b64, "properties": {messageId, correlationId, userId,
        contentType, contentEncoding, expiryTimeUtc, ack, <application property>: str}}``."""
        data = await _body(request)
        if "bodyBase64" in data:
            try:
                body = base64.b64decode(data["bodyBase64"], validate=True)
            except (ValueError, TypeError):
                raise InvalidRequestError("bodyBase64 is not base64") from None
        elif isinstance(data.get("body", ""), str):
            body = data.get("body", "").encode()
        else:
            raise InvalidRequestError("body must be a string (or use bodyBase64)")
        properties = data.get("properties") or {}
        if not isinstance(properties, dict):
            raise InvalidRequestError("properties must be an object")
        message = await self.hub.c2d.send(request.match_info["device_id"], body, properties)
        return _json({"messageId": message.message_id, "deviceId": message.device_id,
                      "expiryTimeUtc": iso_time(message.expiry),
                      "pending": self.hub.c2d.queues.pending(message.device_id)}, status=201)

    async def purge_c2d(self, request: web.Request) -> web.Response:
        """Drop every queued cloud-to-device message of a device."""
        device_id = request.match_info["device_id"]
        if self.registry.get_device(device_id) is None:
            raise NotFoundError(f"device {device_id!r} not found")
        purged = await self.hub.c2d.queues.purge(device_id)
        return _json({"deviceId": device_id, "totalMessagesPurged": purged})

    async def receive_feedback(self, request: web.Request) -> web.Response:
        """Take a batch of C2D delivery feedback records (ETag is the lock)."""
        wait = float_query(request, "waitSeconds", 0.0, maximum=60.0)
        deadline = time.monotonic() + wait
        while True:
            batch = await self.hub.c2d.queues.feedback_batch()
            if batch is not None or time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
        if batch is None:
            return web.Response(status=204)
        lock, records = batch
        return _json([r.to_json() for r in records], headers={"ETag": f'"{lock}"'})

    async def complete_feedback(self, request: web.Request) -> web.Response:
        """Complete (consume) a feedback batch by its lock token."""
        await self.hub.c2d.queues.complete_feedback(request.match_info["lock"].strip('"'))
        return web.Response(status=204)

    async def abandon_feedback(self, request: web.Request) -> web.Response:
        """Give a feedback batch back for a later reader."""
        await self.hub.c2d.queues.abandon_feedback(request.match_info["lock"].strip('"'))
        return web.Response(status=204)

    # -- built-in endpoint -------------------------------------------------------------------

    async def _start_seq(self, group: str, start: str) -> int:
        if start == "latest":
            return self.log.last_seq
        if start == "earliest":
            return 0
        if start == "checkpoint":
            return await self.log.get_cursor(f"events/{group}") or 0
        try:
            return int(start)
        except ValueError:
            raise InvalidRequestError(
                f"start must be latest, earliest, checkpoint or a sequence number, not {start!r}"
            ) from None

    async def read_events(self, request: web.Request) -> web.StreamResponse:
        """Read the built-in endpoint: a batch, or a newline-delimited JSON stream."""
        q = request.query
        group = q.get("consumerGroup", "$Default")
        after = await self._start_seq(group, q.get("start", "latest"))
        device_id = q.get("deviceId") or None
        kinds = {k for k in q.get("kinds", "").split(",") if k} or None
        limit = int_query(request, "limit", 500, minimum=1, maximum=5000)
        if q.get("stream", "").lower() != "true":
            wait = float_query(request, "waitSeconds", 0.0, maximum=60.0)
            if wait and self.log.last_seq <= after:
                await self.log.wait_beyond(after, wait)
            entries = await self.log.read(after, limit, device_id=device_id, kinds=kinds,
                                          where=self._to_events(),
                                          max_bytes=self.events_page_bytes)
            return _json([j for j in map(self._event_json, entries) if j is not None])
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            with self.hub.reading_events(kinds):  # twin changes are recorded while it reads
                await self._stream(response, group, after, limit, device_id, kinds)
        except ConnectionResetError:
            pass  # the reader went away: nothing to report
        return response

    async def _stream(self, response: web.StreamResponse, group: str, after: int, limit: int,
                      device_id: str | None, kinds: set[str] | None) -> None:
        """Write entries as they commit; a heartbeat line every 15 s of silence."""
        await response.write(b"")
        while True:
            entries, after = await self.log.scan(after, limit, device_id=device_id, kinds=kinds,
                                                 where=self._to_events(),
                                                 max_bytes=self.events_page_bytes)
            if entries:
                lines = "".join(json.dumps(j) + "\n" for j in map(self._event_json, entries)
                                if j is not None)
                del entries  # one page in memory at a time (api.events_page_bytes)
                await response.write(lines.encode())
                del lines
            if after < self.log.last_seq:  # a full page: more is there already
                continue
            # Wait for a commit; send a heartbeat line now and then so a client notices a dead
            # hub and a proxy keeps the stream open.
            if not await self.log.wait_beyond(after, 15.0):
                await response.write(b"\n")

    def _to_events(self) -> Callable[[Any], bool] | None:
        """Only what went to the built-in endpoint (by a route or the fallback route)."""
        return self.routing.select("events") if self.routing is not None else None

    def _event_json(self, entry: Any) -> dict[str, Any] | None:
        """The entry as the built-in endpoint shows it, with the ``events`` enrichments; None
        when they push it over the hub's size limit: IoT Hub drops it for this endpoint (ref
        §10.4), so the reader moves on past it (:meth:`RoutingService.events_message`)."""
        if self.routing is None:
            return entry_json(entry, self.host_name)
        message = self.routing.events_message(entry)
        return message_json(entry, message) if message is not None else None

    async def checkpoint(self, request: web.Request) -> web.Response:
        """Record a consumer group's position in the built-in endpoint."""
        body = await _body(request)
        group, seq = body.get("consumerGroup", "$Default"), body.get("seq")
        if not isinstance(group, str) or not group or not isinstance(seq, int) or seq < 0:
            raise InvalidRequestError("body must be {\"consumerGroup\": str, \"seq\": int >= 0}")
        await self.log.set_cursor(f"events/{group}", seq)
        return _json({"consumerGroup": group, "seq": seq})

