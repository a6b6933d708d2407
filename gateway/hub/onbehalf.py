"""On-behalf-of: a child gateway sends its devices' telemetry over its own connection.

A device created with ``--edge`` (``capabilities.iotEdge``) may act for the identities in its
scope (IoT Hub ref §14.1, §14.3; federation.md §2 "For us"): its children (``parentScopes``
holds its ``deviceScope``) and its own modules. Over its single authenticated MQTT connection it

* registers an origin before sending for it: PUBLISH ``$iothub/gateway/register/{d}`` or
  ``$iothub/gateway/register/{d}/{m}`` (ids percent-encoded); the PUBACK comes once the identity
  exists here (created as a child of the gateway, authentication ``none``: it can only ever
  be reached through the gateway), so registering is idempotent and costs one round trip;
* publishes the origin's telemetry on the origin's own topic, ``devices/{d}[/modules/{m}]/
  messages/events/{bag}``, the bag carrying the child's stamp: ``$.gwe`` (the child's store
  epoch), ``$.gws`` (the child's log sequence, increasing per origin), ``$.gwr`` (the child's
  upstream route, when not the default one: each route has its own cursor and order) and
  ``$.gwp`` (gateways the message already passed, nearest the origin first), and ``$.gwq``
  (the sequence of the message the child sent before it in the same queue: the gap check).

The per-message parts come first, at a fixed position: ``{base}$.gws={seq}&[$.gwq={prev}&]
[$.mid={id}&]{rest}`` (:func:`split_stamp`). Everything in ``{rest}`` is the same for every
message of an origin with the same properties, so the parent prepares it once per gateway and
caches it (:class:`OnBehalf` ``templates``, emptied on any registry change); without ``$.mid``
the message id is ``{epoch}-{seq}``, stable across resends. A bag with the stamp elsewhere
is still understood (parsed whole, per message).

This hub stamps the **origin** as ``iothub-connection-device-id``/``-module-id`` and records the
path in ``iothub-gateway-path`` (``gwA;gwB``: every gateway from the origin up). The stamp
becomes the row's dedupe key (gateway, origin) -> (epoch, seq): the log drops anything at or
below the durable high-water mark in the very transaction that appends the rest
(:mod:`gateway.store.dedupe`), so a resend after a lost PUBACK is never stored twice.

Why on-behalf-of and not one connection per identity towards our own parent: connections do not
add up per layer (nested IoT Edge: 2 children x 100 clients = 202 connections at the parent),
one TLS session and one window carry every origin, and the dedupe key needs the gateway's
identity anyway. Towards Azure IoT Hub, which knows no such scheme over MQTT, the forwarder
opens one connection per identity instead (federation.md §3.3).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from gateway.errors import ConflictError, ForbiddenError, GatewayError
from gateway.hub.propbag import decode_component, encode_component
from gateway.hub.registry import Device, Registry
from gateway.tasks import TaskSet

log = logging.getLogger(__name__)

EPOCH_KEY: Final = "$.gwe"
SEQ_KEY: Final = "$.gws"
PATH_KEY: Final = "$.gwp"
ROUTE_KEY: Final = "$.gwr"  # the child's upstream route, when not the default one
GATEWAY_PATH: Final = "iothub-gateway-path"
"""System property: the gateways a message came through, nearest the origin first."""
PREV_KEY: Final = "$.gwq"  # the child's previous sequence in the same queue (gap check)
REGISTER_PREFIX: Final = "$iothub/gateway/register/"
_EVENTS: Final = "/messages/events/"
_SEQ_HEAD: Final = "$.gws="
_PREV_HEAD: Final = "$.gwq="
_MID_HEAD: Final = "$.mid="
PACK_HEAD: Final = "$.gwk="  # a pack: ``{base}$.gwk={count}&...``, the readings in the body
_FRAME: Final = struct.Struct(">HI")  # per reading in a pack: bag length, body length


def pack_count(topic: str) -> int | None:
    """The number of readings if ``topic`` is a pack's, else None."""
    at = topic.find(_EVENTS)
    if at < 0 or not topic.startswith(PACK_HEAD, at + len(_EVENTS)):
        return None
    start = at + len(_EVENTS) + len(PACK_HEAD)
    end = topic.find("&", start)
    digits = topic[start:end] if end >= 0 else topic[start:]
    return int(digits) if digits.isascii() and digits.isdigit() and 0 < int(digits) < 65536 \
        else None


def pack_frame(bag: str, body: bytes) -> bytes:
    """One reading in a pack's body: its own bag (stamp, message id, properties), its body."""
    raw = bag.encode()
    return _FRAME.pack(len(raw), len(body)) + raw + body


def unpack_frames(payload: bytes, count: int) -> list[tuple[str, bytes]]:
    """The (bag, body) readings of a pack; ForbiddenError unless exactly ``count`` frames."""
    out: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(payload):
        if pos + _FRAME.size > len(payload):
            raise ForbiddenError("malformed pack: truncated frame header")
        nbag, nbody = _FRAME.unpack_from(payload, pos)
        pos += _FRAME.size
        end = pos + nbag + nbody
        if end > len(payload):
            raise ForbiddenError("malformed pack: truncated frame")
        try:
            bag = payload[pos:pos + nbag].decode()
        except UnicodeDecodeError:
            raise ForbiddenError("malformed pack: a bag is not UTF-8") from None
        out.append((bag, payload[pos + nbag:end]))
        pos = end
    if len(out) != count:
        raise ForbiddenError(f"malformed pack: {len(out)} readings, the topic says {count}")
    return out


@dataclass(frozen=True, slots=True)
class Pack:
    """A prepared pack topic: ``base`` is the origin's ``devices/.../messages/events/``."""

    base: str
    count: int


def is_stamped(topic: str) -> bool:
    """Does the telemetry topic's bag start with the forwarder's stamp (:func:`split_stamp`)?
    A gateway's own messages forwarded from its store carry one, like its children's."""
    at = topic.find(_EVENTS)
    return at >= 0 and topic.startswith(_SEQ_HEAD, at + len(_EVENTS))


def split_stamp(topic: str) -> tuple[str, int, int | None, str | None] | None:
    """``(topic without the per-message parts, seq, prev, message id)`` of a telemetry topic
    whose bag starts with the stamp, ``$.gws={seq}&[$.gwq={prev}&][$.mid={id}&]`` (ASCII
    digits, a non-empty id), else None (then it is parsed the general way). Called for every
    message a child gateway forwards: string searches, no regular expression."""
    at = topic.find(_EVENTS)
    if at < 0:
        return None
    start = at + len(_EVENTS)
    if not topic.startswith(_SEQ_HEAD, start):
        return None
    end = topic.find("&", start + len(_SEQ_HEAD))
    digits = topic[start + len(_SEQ_HEAD):end]
    if end < 0 or not digits.isdigit() or not digits.isascii():
        return None
    seq = int(digits)
    pos = end + 1
    prev = None
    if topic.startswith(_PREV_HEAD, pos):
        end = topic.find("&", pos + len(_PREV_HEAD))
        digits = topic[pos + len(_PREV_HEAD):end]
        if end < 0 or not digits.isdigit() or not digits.isascii():
            return None  # an empty or malformed previous sequence
        prev = int(digits)
        pos = end + 1
    mid = None
    if topic.startswith(_MID_HEAD, pos):
        end = topic.find("&", pos + len(_MID_HEAD))
        if end <= pos + len(_MID_HEAD):
            return None  # an empty or unterminated message id
        mid = decode_component(topic[pos + len(_MID_HEAD):end])
        if not mid:
            return None
        pos = end + 1
    return topic[:start] + topic[pos:], seq, prev, mid


def register_topic(device_id: str, module_id: str | None) -> str:
    topic = REGISTER_PREFIX + encode_component(device_id)
    return topic + (f"/{encode_component(module_id)}" if module_id else "")


@dataclass(frozen=True, slots=True)
class RegisterOrigin:
    """A prepared registration request of ``gateway`` for ``device_id[/module_id]``."""

    gateway: Device
    device_id: str
    module_id: str | None


def origin_of(topic: str) -> tuple[str, str | None]:
    """The identity a ``devices/{d}[/modules/{m}]/...`` topic names (ids percent-decoded)."""
    parts = topic.split("/", 4)
    if len(parts) < 3 or parts[0] != "devices" or not parts[1]:
        raise ForbiddenError(f"topic not allowed: {topic!r}")
    device_id = decode_component(parts[1])
    if parts[2] == "modules" and len(parts) >= 4 and parts[3]:
        return device_id, decode_component(parts[3])
    return device_id, None


def is_own_topic(topic: str, device_id: str, module_id: str | None) -> bool:
    """Cheap test: does ``topic`` belong to the connected identity itself (or is it not a
    ``devices/`` topic at all)? Only the rest needs the on-behalf-of checks."""
    if not topic.startswith("devices/"):
        return not topic.startswith(REGISTER_PREFIX)
    own = f"devices/{device_id}/"
    if not topic.startswith(own):
        return False
    rest = topic[len(own):]
    if module_id is None:
        return not rest.startswith("modules/")
    return rest.startswith(f"modules/{module_id}/")


class OnBehalf:
    """Scope checks and origin registration for edge devices acting for their identities."""

    def __init__(self, registry: Registry, tasks: TaskSet, *, enabled: bool = True,
                 max_templates: int = 4096) -> None:
        self.registry = registry
        self.tasks = tasks
        self.enabled = enabled
        self.registered = 0
        # (gateway, topic without the stamp) -> what the hub prepared for it (scope checked):
        # any registry change may change a scope or an identity, so it empties the cache
        self.templates: dict[tuple[str, str], object] = {}
        self.max_templates = max_templates
        registry.add_listener(self._forget, updates=True)

    def _forget(self, event: str, identity: object) -> None:
        self.templates.clear()

    def remember(self, key: tuple[str, str], template: object) -> None:
        if len(self.templates) >= self.max_templates:
            self.templates.clear()
        self.templates[key] = template

    def is_gateway(self, device_id: str, module_id: str | None) -> bool:
        """May this identity act for others at all? (Everyone else gets the usual refusal.)"""
        device = self.registry.get_device(device_id)
        return (self.enabled and module_id is None and device is not None and device.iot_edge
                and bool(device.device_scope))

    def gateway(self, device_id: str, module_id: str | None) -> Device:
        """The connected identity as a gateway that may act for others, or ForbiddenError."""
        device = self.registry.get_device(device_id)
        if (not self.enabled or module_id is not None or device is None or not device.iot_edge
                or not device.device_scope):
            raise ForbiddenError(f"{device_id} may not act for other identities")
        return device

    def in_scope(self, gateway: Device, device_id: str) -> bool | None:
        """True: ``device_id`` is the gateway or one of its children; None: unknown here."""
        if device_id == gateway.device_id:
            return True
        device = self.registry.get_device(device_id)
        if device is None:
            return None
        return gateway.device_scope in device.parent_scopes

    def check(self, gateway: Device, device_id: str, module_id: str | None) -> str:
        """The generation id of the origin, after checking it is known and in scope."""
        scoped = self.in_scope(gateway, device_id)
        if not scoped:
            raise ForbiddenError(
                f"{gateway.device_id} may not act for {device_id!r}"
                + (" (not registered: send $iothub/gateway/register first)" if scoped is None
                   else " (not in its scope)"))
        if module_id is None:
            device = self.registry.get_device(device_id)
            assert device is not None
            return device.generation_id
        module = self.registry.get_module(device_id, module_id)
        if module is None:
            raise ForbiddenError(f"{gateway.device_id} may not act for unregistered module "
                                 f"{device_id}/{module_id}")
        return module.generation_id

    def prepare_register(self, gateway: Device, topic: str) -> RegisterOrigin:
        parts = topic[len(REGISTER_PREFIX):].split("/")
        if not 1 <= len(parts) <= 2 or not all(parts):
            raise ForbiddenError(f"malformed registration topic {topic!r}")
        ids = [decode_component(p) for p in parts]
        if self.in_scope(gateway, ids[0]) is False:
            raise ForbiddenError(
                f"{gateway.device_id} may not act for {ids[0]!r} (not in its scope)")
        return RegisterOrigin(gateway, ids[0], ids[1] if len(ids) == 2 else None)

    def register(self, request: RegisterOrigin) -> asyncio.Future[None]:
        """Create the origin here (if missing) as the gateway's child; resolves when durable."""
        if self.in_scope(request.gateway, request.device_id) and (
                request.module_id is None
                or self.registry.get_module(request.device_id, request.module_id) is not None):
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return self.tasks.spawn(self._create(request), "register-origin")

    async def _create(self, request: RegisterOrigin) -> None:
        gateway = request.gateway
        scope = gateway.device_scope
        if request.device_id != gateway.device_id:
            await _ignore_conflict(lambda: self.registry.put_device(
                {"deviceId": request.device_id, "authentication": {"type": "none"},
                 "parentScopes": [scope], "deviceScope": scope, "status": "enabled"},
                device_id=request.device_id, if_match=None))
            if not self.in_scope(gateway, request.device_id):
                raise GatewayError(
                    f"{request.device_id!r} exists outside {gateway.device_id}'s scope")
        module_id = request.module_id
        if module_id is not None:
            await _ignore_conflict(lambda: self.registry.put_module(
                {"deviceId": request.device_id, "moduleId": module_id,
                 "authentication": {"type": "none"}},
                device_id=request.device_id, module_id=module_id, if_match=None))
        self.registered += 1
        log.info("registered origin %s%s for gateway %s", request.device_id,
                 f"/{request.module_id}" if request.module_id else "", gateway.device_id)


async def _ignore_conflict(put: Callable[[], Awaitable[object]]) -> None:
    try:
        await put()
    except ConflictError:  # registered concurrently: fine
        pass
