"""Direct methods: the service invokes a method on a device or module (IoT Hub ref §5).

The hub publishes ``$iothub/methods/POST/{name}/?$rid={rid}`` at QoS 0 to the target's live
connection (it must hold a ``$iothub/methods/POST/#`` subscription), and correlates the
device's ``$iothub/methods/res/{status}/?$rid={rid}`` by connection and request id. The caller
gets ``(status, payload)``; an unreachable target is 404 ``DeviceNotOnline`` (after waiting up
to ``connectTimeoutInSeconds``), a silent one 504 (after ``responseTimeoutInSeconds``).
Method requests are not queued for offline devices (ref §1.6).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import orjson

from gateway.errors import GatewayTimeoutError, InvalidRequestError, NotFoundError
from gateway.hub.addresses import MethodRequestsFilter, MethodResponse, method_request_topic
from gateway.hub.children import ChildDirectory
from gateway.hub.federated import DownMethod, Federation

log = logging.getLogger(__name__)

MAX_PAYLOAD = 128 * 1024  # request and response JSON each (ref §5.2)
FORBIDDEN_NAME_CHARS = set('$()<>@,;:\\"/[]?={} \t')


class DeviceNotOnlineError(NotFoundError):
    code = "DeviceNotOnline"


class MethodTimeoutError(GatewayTimeoutError):
    code = "GatewayTimeout"


class _Targets(Protocol):
    async def wait_target(self, client_id: str, kind: type, timeout: float) -> Any: ...


def _seconds(body: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequestError(f"{key} must be an integer from {low} to {high}, not {value!r}")
    return value


def payload_json(value: Any) -> bytes:
    """A method request's payload as the device gets it: the compact JSON ``json`` writes
    (non-ASCII escaped), by orjson wherever that is the same text, byte for byte. Where it
    may not be, ``json`` writes it, as it always did: orjson writes NaN and Infinity as
    ``null``, non-ASCII as UTF-8 and DEL unescaped, spells floats below 1e-4 ``0.00001`` and
    ``1e-7`` (``json``: ``1e-05``, ``1e-07``; every other float as ``json`` does), and refuses
    what it cannot encode (integers beyond 64 bits, lone surrogates)."""
    try:
        text = orjson.dumps(value)
    except TypeError:
        text = b""
    if not text or not text.isascii() or b"\x7f" in text or b"null" in text \
            or b"e-" in text or b"0.0000" in text:
        return json.dumps(value, separators=(",", ":")).encode()
    return text


def response_json(body: bytes) -> bytes:
    """A device's method response as the JSON text of the answer's ``payload``: the body
    itself when it is JSON (checked by orjson, not rebuilt: no second JSON round trip on
    the way to the back end), else what ``json`` makes of it (NaN, odd encodings), else the
    text as a JSON string (a device answering plain text still gets its answer through);
    empty is ``null``."""
    text = body.strip()
    if not text:
        return b"null"
    try:
        orjson.loads(text)
        return text
    except ValueError:
        pass
    decoded = text.decode("utf-8", errors="replace")
    try:
        return json.dumps(json.loads(decoded), separators=(",", ":")).encode()
    except ValueError:
        return json.dumps(decoded).encode()


def _expire(future: asyncio.Future[Any], timeout: float, client_id: str) -> None:
    if not future.done():
        future.set_exception(MethodTimeoutError(
            f"timed out waiting {timeout:g} s for the response from {client_id}"))


class MethodService:
    def __init__(self, targets: _Targets, children: ChildDirectory | None = None) -> None:
        self._targets = targets
        self._children = children
        self._pending: dict[tuple[str, str], asyncio.Future[tuple[int, bytes]]] = {}
        self._rids = itertools.count(1)
        self.federation: Federation | None = None  # identities behind child gateways

    async def invoke(self, device_id: str, module_id: str | None,
                     body: Mapping[str, Any]) -> tuple[int, Any]:
        """Run one invocation; ``body`` is the REST request (ref §5.2)."""
        status, payload = await self.invoke_raw(device_id, module_id, body)
        return status, json.loads(payload)

    async def invoke_raw(self, device_id: str, module_id: str | None,
                         body: Mapping[str, Any]) -> tuple[int, bytes]:
        """:meth:`invoke`, the answer's payload as JSON text (:func:`response_json`)."""
        name = body.get("methodName")
        if not isinstance(name, str) or not name or FORBIDDEN_NAME_CHARS & set(name) \
                or not name.isascii() or not name.isprintable():
            raise InvalidRequestError(f"methodName is missing or not allowed: {name!r}")
        response_timeout = _seconds(body, "responseTimeoutInSeconds", 30, 5, 300)
        connect_timeout = _seconds(body, "connectTimeoutInSeconds", 0, 0, 300)
        payload = payload_json(body.get("payload"))
        if len(payload) > MAX_PAYLOAD:
            raise InvalidRequestError(f"method payload of {len(payload)} bytes is over 128 KB")
        return await self.call(device_id, module_id, name, payload, float(response_timeout),
                               float(connect_timeout), body.get("payload"))

    async def call(self, device_id: str, module_id: str | None, name: str, payload: bytes,
                   response_timeout: float, connect_timeout: float,
                   value: Any = None) -> tuple[int, bytes]:
        """Invoke a checked call: the status and the answer's payload as JSON text
        (:func:`response_json`); timeouts in seconds, fractions allowed (a hop further down a
        federation gets what is left, :mod:`gateway.hub.federated`)."""
        client_id = f"{device_id}/{module_id}" if module_id else device_id
        if self.federation is not None:
            hops = self.federation.hops(device_id, module_id)
            if hops is not None and await self._targets.wait_target(
                    client_id, MethodRequestsFilter, 0) is None:  # behind a child gateway
                status, answer = await self.federation.invoke(hops, DownMethod(
                    rid="", name=name, device_id=device_id, module_id=module_id, via=(),
                    response_timeout=response_timeout, connect_timeout=connect_timeout),
                    payload)
                return status, json.dumps(answer, separators=(",", ":")).encode()
        child = self._children.lookup(device_id) if self._children and not module_id else None
        if child is not None:  # a sensor's child device: reached through its bridge
            client_id = f"{child.gateway_id}/{child.module_id}"
            extra = dict(value) if isinstance(value, Mapping) else {"value": value}
            payload = json.dumps({**extra, "sensor": child.sensor}, separators=(",", ":")).encode()
        conn = await self._targets.wait_target(client_id, MethodRequestsFilter, connect_timeout)
        if conn is None:
            raise DeviceNotOnlineError(
                f"{client_id} is not connected with a method subscription "
                f"(waited {connect_timeout:g} s)")
        rid = format(next(self._rids), "x")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        self._pending[(client_id, rid)] = future
        # A timer on the answer's own future, not asyncio.wait_for (which adds a future, a
        # callback and a cancellation per call on the method hot path).
        timer = loop.call_later(response_timeout, _expire, future, response_timeout, client_id)
        try:
            conn.publish(method_request_topic(name, rid), payload, 0)
            log.debug("method invoked client_id=%r method=%s rid=%s", client_id, name, rid)
            return await future
        finally:
            timer.cancel()
            self._pending.pop((client_id, rid), None)

    def handle_response(self, client_id: str, address: MethodResponse, body: bytes) -> None:
        """A device answered; late or unknown answers are dropped (logged at debug)."""
        future = self._pending.pop((client_id, address.rid), None)
        if future is None or future.done():
            log.debug("method response for no pending request client_id=%r rid=%s",
                      client_id, address.rid)
            return
        if len(body) > MAX_PAYLOAD:
            future.set_exception(InvalidRequestError("method response over 128 KB"))
            return
        future.set_result((address.status, response_json(body)))
