"""Federation, parent side: reaching identities that live behind connected child gateways.

Nested IoT Edge (federation.md §2) routes a cloud call hop by hop, each edgeHub holding one
connection to its parent. We do the same over the child gateway's **one** upstream connection
(the one that carries its telemetry on behalf of its identities, :mod:`gateway.hub.onbehalf`):

* The child's link subscribes to ``$iothub/gateway/down/#`` (:data:`DOWNLINK_FILTER`; an
  ``--edge`` device only). It is its standing request "send me what is for my scope".
* A device whose parent chain (``parentScopes`` -> the edge device owning that scope, and so
  on up) reaches a gateway connected here is **online through that gateway**: a call for it goes
  to the topmost gateway of the chain, naming the target and the rest of the path::

      $iothub/gateway/down/methods/{name}/?$rid={rid}&d={d}[&m={m}]&via={g1;g2}&rt={ms}&ct={ms}

  ``via`` are the gateways still to pass (next first), ``rt``/``ct`` the milliseconds left of
  the caller's response and connect timeouts: each hop passes on what is left, minus a margin,
  so the hop nearest the device times out first and its 504 travels back up (IoT Hub ref §5.2).
* The child answers over the same connection, QoS 1::

      $iothub/gateway/up/methods/{status}/?$rid={rid}[&err={code}]

  with the device's response body, or (``err`` set) the error message of the hop that failed:
  ``DeviceNotOnline`` (404) when the device or a link further down is not there,
  ``GatewayTimeout`` (504) when the device did not answer in time.
* When the gateway's connection goes, every call waiting on it fails at once with 404
  ``DeviceNotOnline``: a link down on the way is never a timeout.

The grammar is pure (:func:`down_method_topic`, :func:`parse_down`, :func:`up_method_topic`,
:func:`parse_up`); :class:`Federation` is the thin stateful part the method service calls.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from gateway.errors import (
    ForbiddenError,
    GatewayError,
    GatewayTimeoutError,
    InvalidRequestError,
    NotFoundError,
)
from gateway.hub.propbag import decode_bag, decode_component, encode_bag, encode_component
from gateway.hub.registry import Device, Module, Registry
from gateway.hub.twins import Twin

log = logging.getLogger(__name__)

DOWNLINK_FILTER: Final = "$iothub/gateway/down/#"
DOWN_PREFIX: Final = "$iothub/gateway/down/"
UP_PREFIX: Final = "$iothub/gateway/up/"
_DOWN_METHODS: Final = DOWN_PREFIX + "methods/"
_UP_METHODS: Final = UP_PREFIX + "methods/"
HOP_MARGIN: Final = 0.25  # seconds each hop keeps for itself from the time left
MAX_DEPTH: Final = 8  # parent chains longer than this are refused (loops, misconfiguration)


class FederatedNotOnlineError(NotFoundError):
    code = "DeviceNotOnline"


class FederatedTimeoutError(GatewayTimeoutError):
    code = "GatewayTimeout"


@dataclass(frozen=True, slots=True)
class DownlinkFilter:
    """``$iothub/gateway/down/#``: a child gateway's subscription for its scope's traffic."""

    @property
    def topic(self) -> str:
        return DOWNLINK_FILTER


@dataclass(frozen=True, slots=True)
class Hops:
    """How to reach an identity: the gateway connected here first, then the rest."""

    first: str
    via: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DownMethod:
    """A method call arriving from our parent for an identity in our scope."""

    rid: str
    name: str
    device_id: str
    module_id: str | None
    via: tuple[str, ...]
    response_timeout: float  # seconds left
    connect_timeout: float


@dataclass(frozen=True, slots=True)
class UpMethod:
    """A child gateway's answer to a call we sent it."""

    rid: str
    status: int
    error: str | None


# -- pure grammar ------------------------------------------------------------------------------


def down_method_topic(call: DownMethod) -> str:
    pairs: list[tuple[str, str | None]] = [("$rid", call.rid), ("d", call.device_id)]
    if call.module_id is not None:
        pairs.append(("m", call.module_id))
    if call.via:
        pairs.append(("via", ";".join(call.via)))
    pairs.append(("rt", str(max(0, int(call.response_timeout * 1000)))))
    pairs.append(("ct", str(max(0, int(call.connect_timeout * 1000)))))
    return _DOWN_METHODS + encode_component(call.name) + "/?" + encode_bag(pairs)


def _ms(text: str | None) -> float:
    if text is None or not text.isdigit():
        raise ForbiddenError(f"bad timeout {text!r} in a downlink request")
    return int(text) / 1000


def parse_down(topic: str) -> DownMethod:
    """A request from the parent (what the child's link receives); ForbiddenError if malformed."""
    if not topic.startswith(_DOWN_METHODS):
        raise ForbiddenError(f"unknown downlink topic {topic!r}")
    name, sep, query = topic[len(_DOWN_METHODS):].partition("/?")
    params = dict(decode_bag(query)) if sep else {}
    rid, device_id = params.get("$rid"), params.get("d")
    if not name or not rid or not device_id:
        raise ForbiddenError(f"malformed downlink request {topic!r}")
    via = params.get("via")
    return DownMethod(rid=rid, name=decode_component(name), device_id=device_id,
                      module_id=params.get("m") or None,
                      via=tuple(v for v in via.split(";") if v) if via else (),
                      response_timeout=_ms(params.get("rt")),
                      connect_timeout=_ms(params.get("ct")))


def up_method_topic(rid: str, status: int, error: str | None = None) -> str:
    pairs: list[tuple[str, str | None]] = [("$rid", rid)]
    if error:
        pairs.append(("err", error))
    return _UP_METHODS + str(status) + "/?" + encode_bag(pairs)


def parse_up(topic: str) -> UpMethod:
    """A child gateway's answer (what the parent receives); ForbiddenError if malformed."""
    if not topic.startswith(_UP_METHODS):
        raise ForbiddenError(f"topic not allowed: {topic!r}")
    status_text, sep, query = topic[len(_UP_METHODS):].partition("/?")
    params = dict(decode_bag(query)) if sep else {}
    rid = params.get("$rid")
    try:
        status = int(status_text)
    except ValueError:
        raise ForbiddenError(f"status is not an integer in {topic!r}") from None
    if not rid:
        raise ForbiddenError(f"$rid missing in {topic!r}")
    return UpMethod(rid=rid, status=status, error=params.get("err") or None)


def error_for(status: int, code: str, message: str) -> GatewayError:
    """The error a hop further down reported, raised again here (same code, same status)."""
    if code == "DeviceNotOnline" or status == 404:
        return FederatedNotOnlineError(message)
    if code == "GatewayTimeout" or status == 504:
        return FederatedTimeoutError(message)
    error = GatewayError(message)
    error.code = code
    error.status = status  # type: ignore[attr-defined]  # the API answers with it
    return error


def status_of(exc: GatewayError) -> int:
    """The HTTP status a hop reports upwards for ``exc`` (the API's mapping, ref §5.2)."""
    for cls, status in ((NotFoundError, 404), (GatewayTimeoutError, 504),
                        (ForbiddenError, 403), (InvalidRequestError, 400)):
        if isinstance(exc, cls):
            return int(getattr(exc, "status", status))
    return int(getattr(exc, "status", 500))


_DOWN_TWIN: Final = DOWN_PREFIX + "twin/?"
_UP_RESYNC: Final = UP_PREFIX + "resync/?"


@dataclass(frozen=True, slots=True)
class DownTwin:
    """The owner's desired state of an identity in our scope (:mod:`gateway.hub.twinmirror`);
    the payload is ``{"version", "patch" (or null on a resend), "desired"}``."""

    device_id: str
    module_id: str | None
    via: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UpResync:
    """A child gateway asks for the desired state of everything behind ``via`` (a link further
    down came back, so patches may have been missed there)."""

    via: tuple[str, ...]


def down_twin_topic(device_id: str, module_id: str | None, via: tuple[str, ...]) -> str:
    pairs: list[tuple[str, str | None]] = [("d", device_id)]
    if module_id is not None:
        pairs.append(("m", module_id))
    if via:
        pairs.append(("via", ";".join(via)))
    return _DOWN_TWIN + encode_bag(pairs)


def parse_down_twin(topic: str) -> DownTwin:
    params = dict(decode_bag(topic[len(_DOWN_TWIN):]))
    device_id, via = params.get("d"), params.get("via")
    if not device_id:
        raise ForbiddenError(f"malformed downlink twin topic {topic!r}")
    return DownTwin(device_id, params.get("m") or None,
                    tuple(v for v in via.split(";") if v) if via else ())


def is_down_twin(topic: str) -> bool:
    return topic.startswith(_DOWN_TWIN)


_UP_REPORTED: Final = UP_PREFIX + "twin/reported/?"


@dataclass(frozen=True, slots=True)
class UpReported:
    """A reported patch of an identity behind the child gateway (coalesced there)."""

    device_id: str
    module_id: str | None


def up_reported_topic(device_id: str, module_id: str | None) -> str:
    pairs: list[tuple[str, str | None]] = [("d", device_id)]
    if module_id is not None:
        pairs.append(("m", module_id))
    return _UP_REPORTED + encode_bag(pairs)


_DOWN_IDENTITY: Final = DOWN_PREFIX + "identity/?"


def down_identity_topic(op: str) -> str:
    """``op``: ``put`` ``{"device": {...}, "parent": id|null}`` or ``{"module": {...}}``;
    ``delete`` ``{"deviceId", "moduleId"}``; ``sync`` ``{"ids": [[d, m|null], ...]}`` (every
    identity the parent holds behind this gateway: anything else it gave is gone)."""
    return _DOWN_IDENTITY + encode_bag([("op", op)])


def parse_down_identity(topic: str) -> str | None:
    """The op of an identity message, or None if ``topic`` is not one."""
    if not topic.startswith(_DOWN_IDENTITY):
        return None
    return dict(decode_bag(topic[len(_DOWN_IDENTITY):])).get("op") or ""


_UP_SETTLED: Final = UP_PREFIX + "c2d/settled/?"


@dataclass(frozen=True, slots=True)
class UpSettled:
    """A device behind the child gateway completed a C2D message we handed down
    (:mod:`gateway.hub.c2dfed`)."""

    device_id: str
    message_id: str
    status: str


def up_settled_topic(device_id: str, message_id: str, status: str) -> str:
    return _UP_SETTLED + encode_bag([("d", device_id), ("mid", message_id), ("st", status)])


_UP_STATE: Final = UP_PREFIX + "state/?"


@dataclass(frozen=True, slots=True)
class UpState:
    """An identity behind the child gateway connected or disconnected there; ``path``: the
    gateways below the child it came through (nearest the device first)."""

    device_id: str
    module_id: str | None
    connected: bool
    path: str | None


def up_state_topic(device_id: str, module_id: str | None, connected: bool,
                   path: str | None) -> str:
    pairs: list[tuple[str, str | None]] = [("d", device_id)]
    if module_id is not None:
        pairs.append(("m", module_id))
    pairs.append(("c", "1" if connected else "0"))
    if path:
        pairs.append(("path", path))
    return _UP_STATE + encode_bag(pairs)


_UP_LIFECYCLE: Final = UP_PREFIX + "lifecycle/?"


@dataclass(frozen=True, slots=True)
class UpLifecycle:
    """An identity was created or deleted behind the child gateway (created there, not from
    above); ``path``: the gateways below the child it came through (nearest it first)."""

    device_id: str
    module_id: str | None
    created: bool
    path: str | None


def up_lifecycle_topic(device_id: str, module_id: str | None, created: bool,
                       path: str | None) -> str:
    pairs: list[tuple[str, str | None]] = [("d", device_id)]
    if module_id is not None:
        pairs.append(("m", module_id))
    pairs.append(("op", "created" if created else "deleted"))
    if path:
        pairs.append(("path", path))
    return _UP_LIFECYCLE + encode_bag(pairs)


def up_resync_topic(via: tuple[str, ...]) -> str:
    return _UP_RESYNC + encode_bag([("via", ";".join(via))])


def twin_payload(version: int, patch: Any, desired: Any) -> bytes:
    return json.dumps({"version": version, "patch": patch, "desired": desired},
                      separators=(",", ":")).encode()


# -- the stateful part ------------------------------------------------------------------------


class _Conn(Protocol):
    client_id: str

    def publish(self, topic: str, payload: bytes, qos: int) -> int | None: ...


class _Targets(Protocol):
    async def wait_target(self, client_id: str, kind: type, timeout: float) -> Any: ...

    def target(self, client_id: str, kind: type) -> Any: ...


class Federation:
    """Routes calls for identities behind connected child gateways and correlates answers."""

    def __init__(self, registry: Registry, targets: _Targets,
                 *, is_self: Callable[[str], bool] = lambda device_id: False,
                 twins: Callable[[str, str | None], Twin | None] = lambda d, m: None) -> None:
        self.registry = registry
        self.targets = targets
        self.twins = twins
        self.child_ready: Callable[[str], None] | None = None  # set by our own downlink
        # set by our own downlink / the twin service:
        self.send_reported: Callable[[str, str | None, Mapping[str, Any]],
                                     Awaitable[None]] | None = None
        self.apply_reported: Callable[[str, str | None, Mapping[str, Any]],
                                      Awaitable[Any]] | None = None
        self.has_parent: Callable[[], bool] = lambda: False  # an upstream is set
        self.is_mirrored: Callable[[str, str | None], bool] = lambda d, m: False  # from above
        self.settle_here: Callable[[str, str, str], Awaitable[bool]] | None = None  # c2dfed
        self.send_settled: Callable[[str, str, str], Awaitable[None]] | None = None  # downlink
        # a downlink is up: a child gateway's (first, ()), or one behind it (first, below)
        self.ready_hooks: list[Callable[[str, tuple[str, ...]], None]] = []
        self.send_state: Callable[[str, str | None, bool, str | None], None] | None = None
        self.send_lifecycle: Callable[[str, str | None, bool, str | None], None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.is_self = is_self  # our own gateway identity (never a hop)
        self._scopes: dict[str, str] | None = None  # deviceScope -> edge device id
        self._pending: dict[tuple[str, str], asyncio.Future[tuple[int, Any]]] = {}
        self._rids = itertools.count(1)
        registry.add_listener(self._identity_changed, updates=True)

    def _identity_changed(self, event: str, identity: Device | Module) -> None:
        if isinstance(identity, Device) and identity.iot_edge:
            self._scopes = None
        try:
            self._push_identity(event, identity)
        except Exception:  # a listener must not fail the registry write
            log.exception("could not send identity %s down", identity.device_id)

    # -- identities flow down -----------------------------------------------------------------

    def _hops_of(self, identity: Device | Module) -> Hops | None:
        """The hops of ``identity`` (also one just deleted: its own parent chain)."""
        if isinstance(identity, Module):
            return self.hops(identity.device_id, identity.module_id)
        if not identity.parent_scopes:
            return None
        owner = self._owner_of_scope(identity.parent_scopes[0])
        if owner is None or self.is_self(owner):
            return None
        above = self.hops(owner, None)
        if above is None:
            return Hops(first=owner, via=())
        return Hops(first=above.first, via=(*above.via, owner))

    def _parent_id(self, device: Device) -> str | None:
        return self._owner_of_scope(device.parent_scopes[0]) if device.parent_scopes else None

    def _identity_message(self, identity: Device | Module) -> bytes | None:
        """What a child gateway gets to hold the identity, or None for one it owns itself
        (registered from below with authentication ``none``: its keys live down there)."""
        if identity.auth_type == "none":
            return None
        if isinstance(identity, Module):
            return json.dumps({"module": identity.to_json()}).encode()
        return json.dumps({"device": identity.to_json(),
                           "parent": self._parent_id(identity)}).encode()

    def _push_identity(self, event: str, identity: Device | Module) -> None:
        hops = self._hops_of(identity)
        if hops is None:
            return
        conn = self.targets.target(hops.first, DownlinkFilter)
        if conn is None:
            return  # the next resync (on connecting, and periodically) catches up
        if event == "deleted":
            module_id = identity.module_id if isinstance(identity, Module) else None
            conn.publish(down_identity_topic("delete"), json.dumps(
                {"deviceId": identity.device_id, "moduleId": module_id}).encode(), 0)
            return
        body = self._identity_message(identity)
        if body is not None:
            conn.publish(down_identity_topic("put"), body, 0)

    def _send_identities(self, first: str) -> int:
        """Every identity behind ``first`` that it may hold (parents before children), then
        the list of them all (the child drops what it got from us and is no longer here)."""
        conn = self.targets.target(first, DownlinkFilter)
        if conn is None:
            return 0
        behind: list[tuple[int, Device | Module]] = []
        for device in self.registry.devices():
            hops = self._hops_of(device)
            if hops is not None and hops.first == first:
                behind.append((len(hops.via), device))
                behind += [(len(hops.via) + 1, m) for m in self.registry.modules(device.device_id)]
        behind.sort(key=lambda item: item[0])
        ids: list[list[str | None]] = []
        for _, identity in behind:
            body = self._identity_message(identity)
            if body is not None:
                conn.publish(down_identity_topic("put"), body, 0)
                ids.append([identity.device_id,
                            identity.module_id if isinstance(identity, Module) else None])
        conn.publish(down_identity_topic("sync"), json.dumps({"ids": ids}).encode(), 0)
        return len(ids)

    def _owner_of_scope(self, scope: str) -> str | None:
        if self._scopes is None:
            self._scopes = {d.device_scope: d.device_id for d in self.registry.devices()
                            if d.iot_edge and d.device_scope}
        return self._scopes.get(scope)

    def hops(self, device_id: str, module_id: str | None) -> Hops | None:
        """The gateways between us and ``device_id[/module_id]``, or None if it is ours.

        A device is reached through its parent (the edge device owning its ``parentScopes``),
        that one through its own parent, and so on up to the gateway with no parent here. A
        module of an edge device that is itself behind a gateway lives on that edge device.
        """
        device = self.registry.get_device(device_id)
        if device is None:
            return None
        chain: list[str] = []
        if module_id is not None and device.iot_edge and device.parent_scopes \
                and not self.is_self(device_id):
            chain.append(device_id)
        current: Device | None = device
        while current is not None and current.parent_scopes:
            owner = self._owner_of_scope(current.parent_scopes[0])
            if owner is None or self.is_self(owner) or owner in chain or owner == device_id:
                break
            chain.append(owner)
            if len(chain) > MAX_DEPTH:
                raise ForbiddenError(f"{device_id}'s parent chain is longer than {MAX_DEPTH}")
            current = self.registry.get_device(owner)
        if not chain:
            return None
        return Hops(first=chain[-1], via=tuple(reversed(chain[:-1])))

    async def invoke(self, hops: Hops, call: DownMethod, payload: bytes) -> tuple[int, Any]:
        """Send ``call`` down to ``hops.first`` and wait for its answer (ref §5.2 timeouts)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        conn = await self.targets.wait_target(hops.first, DownlinkFilter, call.connect_timeout)
        if conn is None:
            raise FederatedNotOnlineError(
                f"{call.device_id} is behind gateway {hops.first}, which is not connected")
        left = call.connect_timeout - (loop.time() - start)
        rid = format(next(self._rids), "x")
        sent = DownMethod(rid=rid, name=call.name, device_id=call.device_id,
                          module_id=call.module_id, via=hops.via,
                          response_timeout=max(0.0, call.response_timeout - HOP_MARGIN),
                          connect_timeout=max(0.0, left))
        future: asyncio.Future[tuple[int, Any]] = loop.create_future()
        key = (conn.client_id, rid)
        self._pending[key] = future
        try:
            conn.publish(down_method_topic(sent), payload, 0)
            log.debug("method %s for %s sent down to %s via=%s", call.name, call.device_id,
                      hops.first, ";".join(hops.via))
            async with asyncio.timeout(call.response_timeout + max(0.0, left)):
                return await future
        except TimeoutError:
            raise FederatedTimeoutError(
                f"timed out waiting {call.response_timeout:.1f} s for the response from "
                f"{call.device_id} (through {hops.first})") from None
        finally:
            self._pending.pop(key, None)

    def prepare_up(self, device: Device | None, module_id: str | None,
                   topic: str) -> (UpMethod | UpResync | UpReported | UpSettled | UpState
                                   | UpLifecycle):
        """Only an edge device (not its modules) may answer downlink calls."""
        if device is None or module_id is not None or not device.iot_edge:
            raise ForbiddenError(f"topic not allowed: {topic!r}")
        if topic.startswith(_UP_RESYNC):
            via = dict(decode_bag(topic[len(_UP_RESYNC):])).get("via") or ""
            return UpResync(tuple(v for v in via.split(";") if v))
        if topic.startswith(_UP_STATE):
            params = dict(decode_bag(topic[len(_UP_STATE):]))
            if not params.get("d"):
                raise ForbiddenError(f"malformed topic {topic!r}")
            return UpState(str(params["d"]), params.get("m") or None, params.get("c") == "1",
                           params.get("path") or None)
        if topic.startswith(_UP_LIFECYCLE):
            params = dict(decode_bag(topic[len(_UP_LIFECYCLE):]))
            if not params.get("d") or params.get("op") not in ("created", "deleted"):
                raise ForbiddenError(f"malformed topic {topic!r}")
            return UpLifecycle(str(params["d"]), params.get("m") or None,
                               params.get("op") == "created", params.get("path") or None)
        if topic.startswith(_UP_SETTLED):
            params = dict(decode_bag(topic[len(_UP_SETTLED):]))
            if not params.get("d") or not params.get("mid"):
                raise ForbiddenError(f"malformed topic {topic!r}")
            return UpSettled(str(params["d"]), str(params["mid"]), params.get("st") or "Success")
        if topic.startswith(_UP_REPORTED):
            params = dict(decode_bag(topic[len(_UP_REPORTED):]))
            if not params.get("d"):
                raise ForbiddenError(f"malformed topic {topic!r}")
            return UpReported(str(params["d"]), params.get("m") or None)
        return parse_up(topic)

    # -- twins: reported properties go up -----------------------------------------------------

    def reported_changed(self, device_id: str, module_id: str | None, twin: Twin,
                         patch: Mapping[str, Any]) -> Awaitable[None] | None:
        """A device here reported: if its twin is owned upstream, queue the patch for the
        parent (durable before the device's 204); None when nothing is to go up."""
        if self.send_reported is None or not self.has_parent() or (
                twin.desired_meta.get("$owner") is None
                and not self.is_mirrored(device_id, module_id)):
            return None
        return self.send_reported(device_id, module_id, patch)

    def handle_reported(self, client_id: str, request: UpReported,
                        body: bytes) -> asyncio.Future[None] | None:
        """A child gateway's reported patch for an identity behind it: applied to our twin
        if we hold it, and queued for our own parent if we have one. The PUBACK waits."""
        try:
            patch = json.loads(body)
            if not isinstance(patch, dict):
                raise ValueError("not an object")
        except ValueError:
            log.warning("reported patch from gateway %s for %s dropped: not a JSON object",
                        client_id, request.device_id)
            return None
        hops = self.hops(request.device_id, request.module_id)
        known = self.twins(request.device_id, request.module_id) is not None
        if known and (hops is None or hops.first != client_id):
            log.warning("reported patch from gateway %s for %s dropped: not in its scope",
                        client_id, request.device_id)
            return None
        up = self.send_reported if self.has_parent() else None
        if not known and up is None:
            log.warning("reported patch from gateway %s for unknown %s dropped", client_id,
                        request.device_id)
            return None
        return asyncio.ensure_future(self._reported(request, patch, known, up))

    async def _reported(self, request: UpReported, patch: dict[str, Any], known: bool,
                        up: Callable[[str, str | None, Mapping[str, Any]],
                                     Awaitable[None]] | None) -> None:
        try:
            if known and self.apply_reported is not None:
                await self.apply_reported(request.device_id, request.module_id, patch)
            if up is not None:
                await up(request.device_id, request.module_id, patch)
        except GatewayError as exc:  # a refused patch must not take the link down
            log.warning("reported patch for %s dropped: %s", request.device_id, exc)

    # -- twins: the owner's desired state goes down -------------------------------------------

    def desired_changed(self, device_id: str, module_id: str | None, twin: Twin,
                        patch: Any) -> None:
        """A desired write here for an identity behind a child gateway: send it down now
        (QoS 0 on the live link; a link that is down catches up by :meth:`resync`)."""
        hops = self.hops(device_id, module_id)
        if hops is not None:
            self._send_twin(hops, device_id, module_id, twin, patch)

    def _send_twin(self, hops: Hops, device_id: str, module_id: str | None, twin: Twin,
                   patch: Any) -> None:
        conn = self.targets.target(hops.first, DownlinkFilter)
        if conn is None:
            return
        conn.publish(down_twin_topic(device_id, module_id, hops.via),
                     twin_payload(twin.desired_version, patch, twin.desired), 0)

    def forward_twin(self, hops: Hops, twin: DownTwin, payload: bytes) -> None:
        """A twin state from our parent for further down: passed on as it is."""
        conn = self.targets.target(hops.first, DownlinkFilter)
        if conn is not None:
            conn.publish(down_twin_topic(twin.device_id, twin.module_id, hops.via), payload, 0)

    def resync(self, first: str, below: tuple[str, ...] = ()) -> int:
        """Send the identities behind ``first`` (our direct child: ``below`` empty) and the
        desired state of every identity reached through ``first`` (and then ``below``) whose
        twin lives here; the child drops what it already has ($version)."""
        if not below:
            self._send_identities(first)
        sent = 0
        for device in self.registry.devices():
            ids: list[str | None] = [None]
            if device.iot_edge:
                ids += [m.module_id for m in self.registry.modules(device.device_id)]
            for module_id in ids:
                hops = self.hops(device.device_id, module_id)
                if hops is None or hops.first != first or hops.via[:len(below)] != below:
                    continue
                twin = self.twins(device.device_id, module_id)
                if twin is not None and (twin.desired_version > 1
                                         or "$owner" in twin.desired_meta):
                    # (a desired section never written here is nobody's to mirror: a device
                    # registered from below keeps its own)
                    self._send_twin(hops, device.device_id, module_id, twin, None)
                    sent += 1
        if sent:
            log.info("resent the desired state of %d identities behind %s%s", sent, first,
                     "".join(f" -> {g}" for g in below))
        return sent

    def on_ready(self, conn: _Conn, kinds: set[type]) -> None:
        """A child gateway subscribed its downlink: bring what is behind it up to date, and
        ask our own parent for what it owns behind that child."""
        if DownlinkFilter not in kinds:
            return
        self.resync(conn.client_id)
        for hook in self.ready_hooks:
            hook(conn.client_id, ())
        if self.child_ready is not None:
            self.child_ready(conn.client_id)

    # -- connection state of identities behind gateways goes up ------------------------------

    def state_changed(self, device_id: str, module_id: str | None, connected: bool,
                      path: str | None) -> None:
        """An identity here connected or disconnected (``path``: behind our child gateways):
        if our parent holds it (it came from there, or from below), tell the parent."""
        if self.send_state is None or not self.has_parent():
            return
        if path is None and not self.is_mirrored(device_id, module_id):
            return
        self.send_state(device_id, module_id, connected, path)

    def accept_state(self, client_id: str, up: UpState) -> str | None:
        """The gateway path to stamp on a state from ``client_id`` (None: not its to say)."""
        if self.registry.get_device(up.device_id) is None:
            return None
        hops = self.hops(up.device_id, up.module_id)
        if hops is None or hops.first != client_id:
            log.warning("connection state from gateway %s for %s dropped: not in its scope",
                        client_id, up.device_id)
            return None
        return f"{up.path};{client_id}" if up.path else client_id

    # -- lifecycle of identities created behind gateways goes up ------------------------------

    def lifecycle_changed(self, identity: Device | Module, created: bool,
                          path: str | None) -> None:
        """An identity here was created or deleted (``path``: it came from behind our child
        gateways): tell our parent, unless it is the parent's own (pushed down from there) or
        one registered from below without its stamp (authentication ``none``)."""
        if self.send_lifecycle is None or not self.has_parent():
            return
        module_id = identity.module_id if isinstance(identity, Module) else None
        if path is None and (identity.auth_type == "none"
                             or self.is_mirrored(identity.device_id, module_id)):
            return
        self.send_lifecycle(identity.device_id, module_id, created, path)

    def lifecycle_path(self, client_id: str, up: UpLifecycle) -> str:
        """The gateway path to stamp on a lifecycle event from gateway ``client_id``."""
        return f"{up.path};{client_id}" if up.path else client_id

    def spawn(self, job: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(job)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("federation task failed: %r", task.exception())

    def handle_settled(self, client_id: str, up: UpSettled) -> asyncio.Future[None] | None:
        """A C2D completion from below: settled here if queued here, else passed up
        (durably, before the PUBACK)."""
        hops = self.hops(up.device_id, None)
        if hops is not None and hops.first != client_id:
            log.warning("c2d completion from gateway %s for %s dropped: not in its scope",
                        client_id, up.device_id)
            return None
        return asyncio.ensure_future(self._settled(up))

    async def _settled(self, up: UpSettled) -> None:
        try:
            if self.settle_here is not None and await self.settle_here(
                    up.device_id, up.message_id, up.status):
                return
            if self.send_settled is not None and self.has_parent():
                await self.send_settled(up.device_id, up.message_id, up.status)
        except GatewayError as exc:
            log.warning("c2d completion for %s dropped: %s", up.device_id, exc)

    def handle_resync(self, client_id: str, request: UpResync) -> None:
        self.resync(client_id, request.via)
        if request.via:  # a downlink further down came back (ours was handled in on_ready)
            for hook in self.ready_hooks:
                hook(client_id, request.via)
        if self.child_ready is not None and request.via:  # and what our parent owns there
            self.child_ready(";".join((client_id, *request.via)))

    def handle_up(self, client_id: str, answer: UpMethod, body: bytes) -> None:
        future = self._pending.pop((client_id, answer.rid), None)
        if future is None or future.done():
            log.debug("downlink answer for no pending call client_id=%r rid=%s", client_id,
                      answer.rid)
            return
        text = body.decode("utf-8", errors="replace").strip()
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = text
        if answer.error:
            future.set_exception(error_for(answer.status, answer.error, str(payload)))
        else:
            future.set_result((answer.status, payload))

    def on_closed(self, conn: _Conn) -> None:
        """A gateway connection went: whatever waited on it is not online any more (404)."""
        for key in [k for k in self._pending if k[0] == conn.client_id]:
            future = self._pending.pop(key)
            if not future.done():
                future.set_exception(FederatedNotOnlineError(
                    f"the link to gateway {conn.client_id} went down during the call"))
