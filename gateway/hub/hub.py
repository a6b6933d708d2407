"""IoT Hub semantics for MQTT connections: who may connect, what a PUBLISH means, what is stored.

The broker shell calls in here with parsed packets; everything here is synchronous and cheap
except :meth:`Hub.append`, which hands rows to the durable log and returns the commit future.
Telemetry handling follows IoT Hub ref §2: the topic is parsed against the *authenticated*
identity (never trusting ids in the topic), the property bag is decoded once per topic and
cached by the connection, the hub stamps the anti-spoofing system properties (§2.5), and the
256 KB limit (§2.4) is enforced before anything is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import operator
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from gateway.errors import (
    AuthError,
    ForbiddenError,
    GatewayError,
    MessageTooLargeError,
    NotFoundError,
    QuotaExceededError,
    StoreError,
    StoreFullError,
)
from gateway.hub import addresses, dps, federated, onbehalf
from gateway.hub.auth import Authenticator, Principal
from gateway.hub.children import ChildDirectory
from gateway.hub.connections import Connection
from gateway.hub.messages import (
    Event,
    connection_state_event,
    file_upload_event,
    format_time,
    lifecycle_event,
    message_size,
    props_json,
    split_properties,
    twin_change_event,
)
from gateway.hub.propbag import decode_bag
from gateway.hub.quota import DailyQuota
from gateway.hub.quota import units as quota_units
from gateway.hub.registry import Device, Module, Registry
from gateway.hub.twins import new_twin
from gateway.hub.twinstore import TwinStore
from gateway.mqtt.packets import Publish, Will
from gateway.routing.router import Router
from gateway.store.log import MessageLog, Record, new_record
from gateway.translation import CHILD_PROPERTY

if TYPE_CHECKING:
    from gateway.hub.c2dsvc import C2DService
    from gateway.hub.methods import MethodService
    from gateway.hub.provisioning import ProvisioningService
    from gateway.hub.twinsvc import TwinService

log = logging.getLogger(__name__)

TELEMETRY = "telemetry"
CONNECTION_STATE = "connectionState"
FILE_NOTIFICATION = "fileNotification"
LIFECYCLE = "deviceLifecycle"
TWIN_CHANGE = "twinChange"


@dataclass(frozen=True, slots=True)
class PreparedTelemetry:
    """What a telemetry topic means for one connection, computed once per topic."""

    device_id: str
    module_id: str | None
    props: str  # stored JSON of system + application properties
    props_size: int  # bytes counted against the 256 KB limit
    retained_props: str  # the same with application property mqtt-retain=true
    system: Mapping[str, str]  # what ``props`` holds, for route conditions (read-only)
    application: Mapping[str, str | None]
    retained_application: Mapping[str, str | None]
    once: tuple[str, str, int, int | None] | None = None  # on-behalf-of: key, epoch, seq, prev


@dataclass(frozen=True, slots=True)
class _StampTemplate:
    """A stamped on-behalf-of topic, prepared once (:meth:`Hub._prepare_on_behalf`): the
    stored JSON split around the message id, which is spliced in per message."""

    prepared: PreparedTelemetry  # with message-id "\x00" and sequence 0
    head: str
    tail: str
    retained_head: str
    retained_tail: str
    key: str
    epoch: str
    plain_epoch: bool  # the default id ``{epoch}-{seq}`` goes into the JSON as it is

    def prepare(self, seq: int, prev: int | None, mid: str | None,
                routed: bool = True) -> PreparedTelemetry:
        """This message's own. ``routed``: routes look at ``system``, so it gets its own
        copy with the message id (else the template's is shared, read by nobody)."""
        mid = mid or f"{self.epoch}-{seq}"
        quoted, size = _quoted(mid)
        p = self.prepared
        system = p.system
        if routed:
            system = dict(system)
            system["message-id"] = mid
        return PreparedTelemetry(
            p.device_id, p.module_id, self.head + quoted + self.tail, p.props_size - 1 + size,
            self.retained_head + quoted + self.retained_tail, system, p.application,
            p.retained_application, (self.key, self.epoch, seq, prev))


def _quoted(mid: str) -> tuple[str, int]:
    """A message id as a JSON string, and its size as counted against the 256 KB limit."""
    if mid.isascii() and mid.isprintable() and '"' not in mid and "\\" not in mid:
        return f'"{mid}"', len(mid)
    return json.dumps(mid, ensure_ascii=False), len(mid.encode())


@dataclass(frozen=True, slots=True)
class PendingWill:
    """A connection's Will, ready to store if its link drops."""

    prepared: PreparedTelemetry
    payload: bytes
    retain: bool


class Hub:
    """The local IoT hub's device-facing semantics."""

    def __init__(
        self,
        *,
        host_name: str,
        registry: Registry,
        authenticator: Authenticator,
        log: MessageLog,
        twin_store: TwinStore,
        max_message_bytes: int = 262144,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host_name = host_name
        self.registry = registry
        self.authenticator = authenticator
        self.log = log
        self.twin_store = twin_store
        self.max_message_bytes = max_message_bytes
        self.clock = clock
        self._state_seq = 0
        self._id_prefix = str(uuid.uuid4())[:24]  # "xxxxxxxx-xxxx-4xxx-yxxx-"
        self._id_counter = 0
        self.methods: MethodService
        self.twins: TwinService
        self.c2d: C2DService
        self.provisioning: ProvisioningService | None = None
        self.children = ChildDirectory(registry, twin_store, self.connection_state)
        # The route table (DESIGN step 4); the routing service swaps in a new one on change.
        self.router = Router(hub_name=host_name, twins=twin_store.get, twin_changes=twin_store)
        self.on_behalf: onbehalf.OnBehalf | None = None  # edge devices acting for others
        self.quota: DailyQuota | None = None  # [hub] daily_message_quota (IoT Hub's 403002)
        self.billed_messages = 0  # telemetry messages received (a pack of readings is one)
        self.federation: federated.Federation | None = None  # identities behind child gateways
        self.refusing: str | None = None  # why new telemetry is refused (a full upstream queue)
        self._lifecycle_paths: dict[str, str] = {}  # device id -> gateway path to stamp
        self._lifecycle_tail: asyncio.Future[None] | None = None  # lifecycles from below
        self._twin_readers = 0  # live readers of ``events`` that want twin-change events
        registry.add_listener(self._on_registry_change)

    # -- connect -----------------------------------------------------------------------------

    def authenticate(
        self, client_id: str, username: str | None, password: bytes | None,
        cert_chain: Sequence[bytes] | None,
    ) -> Principal:
        if self.quota is not None and self.quota.exhausted(self.clock()):
            raise AuthError(f"daily message quota of {self.quota.limit} units used up (IoT Hub "
                            "403002): refused until 00:00 UTC", connack=3)
        return self.authenticator.authenticate_mqtt(
            client_id=client_id, username=username, password=password,
            peer_cert_chain=cert_chain, now=self.clock(),
        )

    def check_will(self, principal: Principal, will: Will) -> PendingWill:
        """A Will must be the identity's own telemetry topic (ref §1.2 "Will"); it is sent as
        telemetry with ``iothub-MessageType=Will`` if the link drops without DISCONNECT. It is
        prepared (and size-checked) now, at CONNECT."""
        if principal.provisioning is not None:
            raise ForbiddenError("a provisioning client has no telemetry topic for a Will")
        address = addresses.parse_publish_topic(
            will.topic, device_id=principal.device_id, module_id=principal.module_id)
        if not isinstance(address, addresses.Telemetry):
            raise ForbiddenError(f"will topic not allowed: {will.topic!r}")
        prepared = self._prepare_telemetry(principal, address, {"iothub-MessageType": "Will"})
        self.telemetry_record(prepared, will.payload)  # refuse an oversize Will at CONNECT
        return PendingWill(prepared, will.payload, will.retain)

    # -- publish -----------------------------------------------------------------------------

    def prepare_publish(self, principal: Principal, topic: str) -> Any:
        """Parse ``topic`` for ``principal``; raise ForbiddenError for anything not allowed."""
        if principal.provisioning is not None:
            return dps.parse_publish(topic)
        if self.federation is not None and topic.startswith(federated.UP_PREFIX):
            return self.federation.prepare_up(  # a child gateway answering a call we sent
                self.registry.get_device(principal.device_id), principal.module_id, topic)
        if self.on_behalf is not None and (not onbehalf.is_own_topic(
                topic, principal.device_id, principal.module_id) or onbehalf.is_stamped(topic)) \
                and self.on_behalf.is_gateway(principal.device_id, principal.module_id):
            return self._prepare_on_behalf(principal, topic)
        return self._prepare_own(principal, topic)

    def stamped_record(self, principal: Principal, topic: str, body: bytes,
                       retain: bool = False) -> Record | None:
        """The stored row of a child gateway's stamped message whose rest of the topic was
        prepared before (:meth:`_prepare_on_behalf`'s template), or None: then it takes
        :meth:`prepare_publish` and :meth:`handle_publish` (the first of each rest, anything
        else). The same row, checks and routes as that path, without its per-message
        objects; a template exists only while the registry has not changed since it was made
        for this gateway (``principal``: a device's own connection, not a module's or DPS's)."""
        stamped = onbehalf.split_stamp(topic)
        if stamped is None or self.on_behalf is None:
            return None
        rest, seq, prev, mid = stamped
        template = self.on_behalf.templates.get((principal.device_id, rest))
        if type(template) is not _StampTemplate:
            return None
        router = self.router
        if not router.trivial:  # route conditions read the message's own system properties
            # keyed by the template's properties while no condition reads the message id (all
            # that differs between its messages): one compiled split for all of them
            key = None if router.reads_message_id else (
                template.prepared.retained_props if retain else template.prepared.props)
            return self.telemetry_record(template.prepare(seq, prev, mid, True), body,
                                         retain=retain, key=key)
        if mid is None and template.plain_epoch:  # the usual case: no check per message
            mid = f"{template.epoch}-{seq}"
            quoted, size = f'"{mid}"', len(mid)
        else:
            quoted, size = _quoted(mid or f"{template.epoch}-{seq}")
        p = template.prepared
        total = len(body) + p.props_size - 1 + size  # less the template's 1-byte placeholder id
        if total > self.max_message_bytes:
            raise self._too_large(total)
        props = (template.retained_head + quoted + template.retained_tail if retain
                 else template.head + quoted + template.tail)
        return new_record(TELEMETRY, p.device_id, p.module_id, int(self.clock() * 1000), props,
                          body, router.default, (template.key, template.epoch, seq, prev))

    def _prepare_own(self, principal: Principal, topic: str) -> Any:
        address = addresses.parse_publish_topic(
            topic, device_id=principal.device_id, module_id=principal.module_id
        )
        if isinstance(address, addresses.Telemetry):
            return self._prepare_telemetry(principal, address)
        return address  # a twin request or a method response: dispatched per packet

    def _prepare_on_behalf(self, principal: Principal, topic: str) -> Any:
        """An edge device registering or sending for an identity in its scope (on-behalf-of,
        :mod:`gateway.hub.onbehalf`): the origin is stamped, the gateway path recorded. A
        topic with the stamp in front is prepared once per rest of the topic (cached) and
        only its sequence and message id are new per message."""
        assert self.on_behalf is not None
        count = onbehalf.pack_count(topic)
        if count is not None:  # readings packed by the child: unpacked in handle_publish
            self.on_behalf.gateway(principal.device_id, principal.module_id)
            at = topic.index("/messages/events/") + len("/messages/events/")
            return onbehalf.Pack(topic[:at], count)
        stamped = onbehalf.split_stamp(topic)
        if stamped is not None:
            rest, seq, prev, mid = stamped
            cache_key = (principal.device_id, rest)
            template = self.on_behalf.templates.get(cache_key)
            if template is None:
                template = self._stamp_template(principal, rest)
                self.on_behalf.remember(cache_key, template)
            if type(template) is _StampTemplate:
                return template.prepare(seq, prev, mid, not self.router.trivial)
        return self._prepare_on_behalf_topic(principal, topic)

    def _stamp_template(self, principal: Principal, rest: str) -> _StampTemplate | bool:
        """``rest`` prepared the general way with a marker for the message id; False when it
        cannot be spliced (the per-message path then parses every message whole)."""
        at = rest.index("/messages/events/") + len("/messages/events/")
        probe = f"{rest[:at]}{onbehalf.SEQ_KEY}=0&$.mid=%00&{rest[at:]}"
        prepared = self._prepare_on_behalf_topic(principal, probe)
        if type(prepared) is not PreparedTelemetry or prepared.once is None:
            return False
        mark = '"\\u0000"'
        if prepared.props.count(mark) != 1 or prepared.retained_props.count(mark) != 1 \
                or prepared.system.get("message-id") != "\x00":
            return False
        head, tail = prepared.props.split(mark)
        retained_head, retained_tail = prepared.retained_props.split(mark)
        epoch = prepared.once[1]
        return _StampTemplate(prepared, head, tail, retained_head, retained_tail,
                              prepared.once[0], epoch, _quoted(epoch) == (f'"{epoch}"', len(epoch)))

    def _prepare_on_behalf_topic(self, principal: Principal, topic: str) -> Any:
        assert self.on_behalf is not None
        gateway = self.on_behalf.gateway(principal.device_id, principal.module_id)
        if topic.startswith(onbehalf.REGISTER_PREFIX):
            return self.on_behalf.prepare_register(gateway, topic)
        device_id, module_id = onbehalf.origin_of(topic)
        if (device_id, module_id) == (principal.device_id, principal.module_id):
            if onbehalf.is_stamped(topic):  # its own messages, forwarded from its store
                address = addresses.parse_publish_topic(topic, device_id=device_id,
                                                        module_id=module_id)
                if isinstance(address, addresses.Telemetry):
                    return self._prepare_telemetry(principal, address,
                                                   gateway=principal.device_id)
            return self._prepare_own(principal, topic)  # its own, with a percent-encoded id
        generation_id = self.on_behalf.check(gateway, device_id, module_id)
        address = addresses.parse_publish_topic(topic, device_id=device_id, module_id=module_id)
        if not isinstance(address, addresses.Telemetry):
            raise ForbiddenError(f"only telemetry may be sent on another's behalf: {topic!r}")
        origin = Principal(device_id=device_id, module_id=module_id,
                           auth_type=principal.auth_type, generation_id=generation_id,
                           expires_at=None, model_id=None, policy=principal.policy)
        return self._prepare_telemetry(origin, address, gateway=principal.device_id)

    def _prepare_telemetry(self, principal: Principal, address: addresses.Telemetry,
                           extra: dict[str, str | None] | None = None,
                           gateway: str | None = None) -> PreparedTelemetry:
        system, application = split_properties(decode_bag(address.bag))
        if extra:
            application.update(extra)
        once = None
        if gateway is not None:  # on-behalf-of: the child's stamp becomes the dedupe key
            path = application.pop(onbehalf.PATH_KEY, None)
            epoch = application.pop(onbehalf.EPOCH_KEY, None)
            seq = application.pop(onbehalf.SEQ_KEY, None)
            route = application.pop(onbehalf.ROUTE_KEY, None)
            prev = application.pop(onbehalf.PREV_KEY, None)
            if epoch and seq and seq.isdigit():
                key = f"{gateway}/{principal.client_id}" + (f"#{route}" if route else "")
                once = (key, epoch, int(seq), int(prev) if prev and prev.isdigit() else None)
            system[onbehalf.GATEWAY_PATH] = f"{path};{gateway}" if path else gateway
        system.pop("to", None)  # C2D-only; never accepted from devices (ref §2.3)
        device_id, module_id = principal.device_id, principal.module_id
        generation_id = principal.generation_id
        child_id = application.pop(CHILD_PROPERTY, None)
        if child_id is not None:  # a bridge speaking for a sensor's child device
            child = self.children.owner_of(child_id, device_id, module_id)
            device = self.registry.get_device(child_id)
            if child is None or device is None:
                raise ForbiddenError(f"{principal.client_id} may not send as device {child_id!r}")
            device_id, module_id, generation_id = child_id, None, device.generation_id
        system["iothub-connection-device-id"] = device_id
        if module_id is not None:
            system["iothub-connection-module-id"] = module_id
        system["iothub-connection-auth-method"] = principal.auth_method_json()
        system["iothub-connection-auth-generation-id"] = generation_id
        system["iothub-message-source"] = "Telemetry"
        if principal.model_id:
            system["dt-dataschema"] = principal.model_id
        size = message_size(b"", system, application)
        retained = dict(application)
        retained["mqtt-retain"] = "true"
        return PreparedTelemetry(
            device_id=device_id,
            module_id=module_id,
            props=props_json(system, application),
            props_size=size,
            retained_props=props_json(system, retained),
            system=system,
            application=application,
            retained_application=retained,
            once=once,
        )

    def handle_publish(self, conn: Connection, prepared: Any,
                       packet: Publish) -> Record | asyncio.Future[Any] | None:
        """Telemetry: the row to store (the caller batches and commits). A twin request: the
        future of its handling (its PUBACK waits for it). A method response, or a refused
        report on a child's behalf: None."""
        if type(prepared) is PreparedTelemetry:
            return self.telemetry_record(prepared, packet.payload, retain=packet.retain)
        if isinstance(prepared, onbehalf.RegisterOrigin):
            assert self.on_behalf is not None
            return self.on_behalf.register(prepared)
        if type(prepared) is onbehalf.Pack:
            return self._unpack(conn, prepared, packet)
        if isinstance(prepared, addresses.MethodResponse):
            self.methods.handle_response(conn.client_id, prepared, packet.payload)
            return None
        if isinstance(prepared, federated.UpMethod):
            assert self.federation is not None
            self.federation.handle_up(conn.client_id, prepared, packet.payload)
            return None
        if isinstance(prepared, federated.UpReported):
            assert self.federation is not None
            return self.federation.handle_reported(conn.client_id, prepared, packet.payload)
        if isinstance(prepared, federated.UpState):
            assert self.federation is not None
            path = self.federation.accept_state(conn.client_id, prepared)
            if path is not None:
                self.connection_state(prepared.device_id, prepared.module_id,
                                      prepared.connected, path)
            return None
        if isinstance(prepared, federated.UpLifecycle):
            assert self.federation is not None
            return self._federated_lifecycle(conn.client_id, prepared)
        if isinstance(prepared, federated.UpSettled):
            assert self.federation is not None
            return self.federation.handle_settled(conn.client_id, prepared)
        if isinstance(prepared, federated.UpResync):
            assert self.federation is not None
            self.federation.handle_resync(conn.client_id, prepared)
            return None
        if isinstance(prepared, addresses.TwinGet):
            return self.twins.handle_get(conn, prepared)
        if isinstance(prepared, addresses.TwinReportedPatch):
            return self.twins.handle_reported(conn, prepared, packet.payload)
        if isinstance(prepared, addresses.ChildReportedPatch):
            return self.twins.handle_child_reported(conn, prepared, packet.payload)
        if isinstance(prepared, dps.DpsRegister | dps.DpsPoll):
            assert self.provisioning is not None and conn.principal is not None
            self.provisioning.handle(conn, conn.principal, prepared, packet.payload)
            return None
        raise ForbiddenError(f"unsupported publish on {packet.topic!r}")  # pragma: no cover

    def telemetry_record(self, prepared: PreparedTelemetry, body: bytes, *,
                         retain: bool = False, key: str | None = None) -> Record:
        """The stored row of one telemetry message, whatever transport brought it (MQTT,
        WebSocket, HTTP): the 256 KB limit (ref §2.4), the enqueued time, and the routes it
        matches (conditions on properties are cached per topic by the router, by ``key``
        when given, else by the stored properties text)."""
        if len(body) + prepared.props_size > self.max_message_bytes:
            raise self._too_large(len(body) + prepared.props_size)
        enqueued = int(self.clock() * 1000)
        props = prepared.retained_props if retain else prepared.props
        router = self.router
        if router.trivial:
            routes = router.default
        else:
            routes = router.route(
                TELEMETRY, prepared.system,
                prepared.retained_application if retain else prepared.application,
                body, prepared.device_id, prepared.module_id, enqueued,
                props if key is None else key)
        return new_record(TELEMETRY, prepared.device_id, prepared.module_id, enqueued, props,
                          body, routes, prepared.once)

    def _too_large(self, size: int) -> MessageTooLargeError:
        return MessageTooLargeError(
            f"message of {size} bytes is over the {self.max_message_bytes}-byte limit")

    def _unpack(self, conn: Connection, pack: onbehalf.Pack,
                packet: Publish) -> asyncio.Future[int]:
        """A child's pack: every reading becomes its own stored message, as if it had come
        alone on ``{base}{bag}`` (same checks, its own properties, id and dedupe position);
        stored in one body, acknowledged together, billed as one message (ref §13)."""
        assert conn.principal is not None
        records = []
        for bag, body in onbehalf.unpack_frames(packet.payload, pack.count):
            prepared = self._prepare_on_behalf(conn.principal, pack.base + bag)
            if type(prepared) is not PreparedTelemetry or prepared.once is None:
                raise ForbiddenError("a pack holds only stamped telemetry of its origin")
            records.append(self.telemetry_record(prepared, body))
        return self.append(records, billed=quota_units(len(packet.payload) + len(packet.topic)))

    def refuse_telemetry(self, reason: str | None) -> None:
        """While ``reason`` is set, telemetry is refused: no PUBACK, the publisher keeps it
        (an upstream route full under ``reject-new``); None accepts again."""
        if reason != self.refusing:
            if reason:
                log.warning("refusing telemetry: %s", reason)
            else:
                log.info("accepting telemetry again")
        self.refusing = reason

    def append(self, rows: Sequence[Record], billed: int | None = None) -> asyncio.Future[int]:
        """Store telemetry ``rows`` (one body). ``billed``: the quota units they cost when
        they came as one message (a pack), else one per started 4 KB of each (ref §13),
        charged only with a ``daily_message_quota``."""
        if self.refusing is not None:
            refused: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            refused.set_exception(StoreFullError(self.refusing))
            return refused
        if self.quota is not None and not self.quota.charge(billed if billed is not None else sum(
                [quota_units(len(r.body) + len(r.props)) for r in rows if r.kind == TELEMETRY]),
                self.clock()):
            over: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            over.set_exception(QuotaExceededError(
                f"daily message quota of {self.quota.limit} units used up (IoT Hub 403002): "
                "telemetry refused until 00:00 UTC"))
            return over
        self.billed_messages += 1 if billed is not None else len(rows)
        if self.on_behalf is not None and any(map(_ONCE_OF, rows)):
            return self.log.append_once(rows)  # a child's resends: dropped, not stored twice
        return self.log.append(rows)

    def append_then(self, rows: Sequence[Record],
                    done: Callable[[BaseException | None], None]) -> None:
        """:meth:`append` for the broker's PUBACK path: ``done(None)`` once ``rows`` are
        durable, ``done(error)`` if not (at once when refused); no future per commit
        (:meth:`MessageLog.append_then`, or :meth:`MessageLog.append_once_then` for a child
        gateway's stamped rows). While refusing or with a quota it goes through
        :meth:`append`."""
        if self.refusing is None and self.quota is None:  # what append checks first
            self.billed_messages += len(rows)
            if self.on_behalf is not None and any(map(_ONCE_OF, rows)):
                self.log.append_once_then(rows, done)  # a child's resends: dropped
            else:
                self.log.append_then(rows, done)
            return
        self.append(rows).add_done_callback(partial(_then, done))

    # -- non-telemetry events (ref §10.5) -----------------------------------------------------

    def _correlation_id(self) -> str:
        """A uuid-shaped id, unique per event: a random prefix drawn once per hub run and a
        counter (uuid4 per event costs a getrandom call each, on the twin-patch hot path)."""
        self._id_counter += 1
        return f"{self._id_prefix}{self._id_counter:012x}"

    def _next_sequence(self) -> str:
        """Connection-state sequence numbers: 64 hex digits, strictly increasing, comparable as
        strings (ref §10.5); the high part is the time so they also increase across restarts."""
        value = max(self._state_seq + 1, time.time_ns())
        self._state_seq = value
        return f"{value:064X}"

    def _record(self, kind: str, event: Event, device_id: str, module_id: str | None) -> Record:
        """A non-telemetry event (built by the pure builders of :mod:`gateway.hub.messages`)
        as a stored row; the enqueued time lives in its own column, as for telemetry."""
        system, application, body = event
        system.pop("iothub-enqueuedtime", None)
        enqueued = int(self.clock() * 1000)
        routes = self.router.route(kind, system, application, body, device_id, module_id,
                                   enqueued)
        return Record(kind, device_id, module_id, enqueued, props_json(system, application),
                      body, routes)

    def connection_event(self, principal: Principal, connected: bool) -> None:
        """A client connected or disconnected; a bridge module's child devices follow it
        (identity translation: they are reachable exactly while their bridge is). A
        provisioning client is no identity yet: it has no connection state."""
        if principal.provisioning is not None:
            return
        self.connection_state(principal.device_id, principal.module_id, connected)
        if principal.module_id is not None:
            for child in self.children.of_module(principal.device_id, principal.module_id):
                self.connection_state(child.device_id, None, connected)

    def connection_state(self, device_id: str, module_id: str | None, connected: bool,
                         gateway_path: str | None = None) -> None:
        """Record an identity's connection state and its ``deviceConnectionStateEvents``;
        ``gateway_path``: it is connected behind child gateways (federation), stamped as
        ``iothub-gateway-path``."""
        event = connection_state_event(
            hub_name=self.host_name, device_id=device_id, module_id=module_id,
            connected=connected, sequence_number=self._next_sequence(),
            correlation_id=self._correlation_id(), now=self.clock())
        if gateway_path:
            event[0][onbehalf.GATEWAY_PATH] = gateway_path
        self.registry.set_connection_state(device_id, module_id, connected,
                                           format_time(self.clock()))
        self._append_event(self._record(CONNECTION_STATE, event, device_id, module_id))
        if self.federation is not None:  # our parent hears of it too
            self.federation.state_changed(device_id, module_id, connected, gateway_path)

    def _on_registry_change(self, change: str, identity: Device | Module) -> None:
        module_id = identity.module_id if isinstance(identity, Module) else None
        existing = self.twin_store.get(identity.device_id, module_id)
        twin = (existing or new_twin(identity.device_id, module_id, now=self.clock())).document()
        event = lifecycle_event(
            hub_name=self.host_name, device_id=identity.device_id, module_id=module_id,
            created=change == "created", twin=twin, correlation_id=self._correlation_id(),
            now=self.clock())
        path = self._lifecycle_paths.get(identity.device_id)
        if path:
            event[0][onbehalf.GATEWAY_PATH] = path
        self._append_event(self._record(LIFECYCLE, event, identity.device_id, module_id))
        if self.federation is not None:  # our parent hears of it too
            self.federation.lifecycle_changed(identity, change == "created", path)

    def _federated_lifecycle(self, gateway_id: str,
                             up: federated.UpLifecycle) -> asyncio.Future[None]:
        """An identity was created or deleted behind child gateway ``gateway_id``; applied
        in the order the gateway sent them (:meth:`_apply_lifecycle`), its PUBACK after."""
        previous = self._lifecycle_tail

        async def run() -> None:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            await self._apply_lifecycle(gateway_id, up)

        self._lifecycle_tail = task = asyncio.ensure_future(run())
        return task

    async def _apply_lifecycle(self, gateway_id: str, up: federated.UpLifecycle) -> None:
        """Create the identity here as the gateway's child (authentication ``none``, as a
        registration does) or delete the one registered from below, its lifecycle event
        stamped with the gateway path. One that exists here with its own keys (ours, pushed
        down) is left alone."""
        assert self.federation is not None
        gateway = self.registry.get_device(gateway_id)
        if self.on_behalf is None or gateway is None or not gateway.device_scope:
            return
        path = self.federation.lifecycle_path(gateway_id, up)
        log.debug("lifecycle from below: %s%s %s path=%s", up.device_id,
                  f"/{up.module_id}" if up.module_id else "",
                  "created" if up.created else "deleted", path)
        self._lifecycle_paths[up.device_id] = path
        try:
            if up.created:
                await self.on_behalf.register(self.on_behalf.prepare_register(
                    gateway, onbehalf.register_topic(up.device_id, up.module_id)))
                return
            device = self.registry.get_device(up.device_id)
            identity: Device | Module | None = device if up.module_id is None else \
                self.registry.get_module(up.device_id, up.module_id)
            if device is None or identity is None or identity.auth_type != "none" \
                    or up.device_id == gateway_id \
                    or not self.on_behalf.in_scope(gateway, up.device_id):
                return
            if up.module_id is None:
                await self.registry.delete_device(up.device_id, if_match=None)
            else:
                await self.registry.delete_module(up.device_id, up.module_id, if_match=None)
        except NotFoundError:
            pass
        except GatewayError as exc:
            log.warning("lifecycle of %s from gateway %s not applied: %s", up.device_id,
                        gateway_id, exc)
        finally:
            del self._lifecycle_paths[up.device_id]

    def file_uploaded(self, device_id: str, notification: Mapping[str, Any]) -> None:
        """Record a completed file upload (ref §11) in the log, as ``fileNotification``."""
        event = file_upload_event(hub_name=self.host_name, device_id=device_id,
                                  notification=notification,
                                  correlation_id=self._correlation_id(), now=self.clock())
        self._append_event(self._record(FILE_NOTIFICATION, event, device_id, None))

    @contextlib.contextmanager
    def reading_events(self, kinds: Collection[str] | None) -> Iterator[None]:
        """While a live reader of ``events`` streams ``kinds`` (None: every kind), twin
        changes are recorded even when no route takes them (``monitor-events --all-kinds``
        sees them with no routes configured)."""
        wants = kinds is None or TWIN_CHANGE in kinds
        self._twin_readers += wants
        log.debug("live events reader kinds=%s twin_changes=%s",
                  ",".join(sorted(kinds)) if kinds else "all", wants)
        try:
            yield
        finally:
            self._twin_readers -= wants

    def wants_twin_changes(self) -> bool:
        """IoT Hub emits twin-change events only to a route that takes them (its fallback
        route carries device messages only); here also to a live reader while no route
        exists (everything goes to ``events`` then). Nobody else: not built, not stored."""
        router = self.router
        return router.takes(TWIN_CHANGE) or (router.empty and self._twin_readers > 0)

    def twin_change_event(self, device_id: str, module_id: str | None, op: str,
                          body: dict[str, Any]) -> None:
        """Record a twin change (ref §10.5 twinChangeEvents) for routing and readers, if a
        route or a reader wants it (:meth:`wants_twin_changes`)."""
        if not self.wants_twin_changes():
            return
        event = twin_change_event(
            hub_name=self.host_name, device_id=device_id, module_id=module_id,
            replaced=op == "replaceTwin", body=body, correlation_id=self._correlation_id(),
            now=self.clock())
        self._append_event(self._record(TWIN_CHANGE, event, device_id, module_id))

    def _append_event(self, record: Record) -> None:
        self.log.append([record]).add_done_callback(_log_failure)


_ONCE_OF = operator.attrgetter("once")


def _then(done: Callable[[BaseException | None], None], fut: asyncio.Future[Any]) -> None:
    done(StoreError("append cancelled") if fut.cancelled() else fut.exception())


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("could not record event: %s", fut.exception())
