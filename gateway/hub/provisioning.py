"""The hub as a Device Provisioning Service for the devices below it (IoT Hub ref §12).

An unmodified ``ProvisioningDeviceClient`` pointed at the gateway (``provisioning_host`` = the
gateway's address, ``id_scope`` = ``gateway enrollment id-scope``) registers itself on the
hub's MQTT port: it authenticates as a member of an enrollment group (a key derived from the
group key, or a certificate the hub CA issued with CN = registration id), the hub creates its
device identity (keys = the derived keys, or CA authentication; the group's initial twin and
``iotEdge`` capability), and answers with this hub as ``assignedHub``. A provisioning
connection may do nothing else: its only topics are ``$dps/registrations/...``.

Re-registration is idempotent: a device this service created is assigned again (its keys
follow the group's keys); an identity created by other means is never taken over.
"""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from gateway.errors import AuthError, GatewayError
from gateway.hub import dps
from gateway.hub.auth import SKEW_SECONDS, Principal
from gateway.hub.enrollments import EnrollmentGroup, EnrollmentStore, Registration
from gateway.hub.registry import Registry
from gateway.hub.sas import parse_sas_token, verify_sas_signature
from gateway.tasks import TaskSet

if TYPE_CHECKING:  # cryptography: imported by the first X.509 registration
    from cryptography import x509

log = logging.getLogger(__name__)

MAX_OPERATIONS = 4096  # operation ids remembered for polling (oldest forgotten first)
RETRY_AFTER_S = 1


class Publisher(Protocol):
    """The live connection a provisioning answer goes to."""

    def publish(self, topic: str, payload: bytes, qos: int) -> int | None: ...


InitialTwin = Callable[[str, EnrollmentGroup], Awaitable[None]]


class ProvisioningService:
    def __init__(self, store: EnrollmentStore, registry: Registry, *, assigned_hub: str,
                 ca_pems: Sequence[str], initial_twin: InitialTwin | None = None,
                 tasks: TaskSet, clock: Callable[[], float]) -> None:
        self.store = store
        self._tasks = tasks
        self.registry = registry
        self.assigned_hub = assigned_hub
        self._ca_pems = tuple(ca_pems)
        self._ca_certs: tuple[x509.Certificate, ...] | None = None  # parsed when first needed
        self._initial_twin = initial_twin
        self._clock = clock
        self._operations: OrderedDict[str, str] = OrderedDict()  # operation id -> registration

    # -- authentication ----------------------------------------------------------------------

    def authenticate(self, *, client_id: str, username: str, password: bytes | None,
                     peer_cert_chain: Sequence[bytes] | None, now: float) -> Principal:
        user = dps.parse_dps_username(username)
        if user.id_scope.lower() != self.store.id_scope.lower():
            raise AuthError("unknown ID scope")
        registration_id = dps.check_registration_id(user.registration_id)
        if client_id.lower() != registration_id:
            raise AuthError("client id mismatch")
        if password:
            group, expires = self._by_key(user, registration_id, password, now)
        elif peer_cert_chain:
            group, expires = self._by_certificate(registration_id, peer_cert_chain[0], now), None
        else:
            raise AuthError("no password and no client certificate", connack=4)
        return Principal(device_id=registration_id, module_id=None,
                         auth_type="sas" if password else "x509", generation_id="",
                         expires_at=expires, model_id=None, provisioning=group.group_id)

    def _by_key(self, user: dps.DpsUsername, registration_id: str, password: bytes,
                now: float) -> tuple[EnrollmentGroup, float]:
        try:
            token = parse_sas_token(password.decode("utf-8"))
        except UnicodeDecodeError:
            raise AuthError("password is not UTF-8", connack=4) from None
        if token.resource.lower() != dps.token_resource(user.id_scope, registration_id).lower():
            raise AuthError("token audience names another registration")
        refused = None
        for group in self.store.groups.values():
            if group.attestation != "symmetricKey":
                continue
            keys = [dps.derive_device_key(k, registration_id)
                    for k in (group.primary_key, group.secondary_key) if k]
            try:
                verify_sas_signature(token, keys, now=now, skew=SKEW_SECONDS)
            except AuthError as exc:
                if exc.reason == "token expired":
                    raise
                continue
            if group.enabled:
                return group, token.expiry + SKEW_SECONDS
            refused = group
        if refused is not None:
            raise AuthError(f"enrollment group {refused.group_id} disabled")
        raise AuthError("bad signature (no enrollment group derives this key)")

    def _by_certificate(self, registration_id: str, leaf_der: bytes,
                        now: float) -> EnrollmentGroup:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        if self._ca_certs is None:
            self._ca_certs = tuple(x509.load_pem_x509_certificate(p.encode())
                                   for p in self._ca_pems)
        try:
            leaf = x509.load_der_x509_certificate(leaf_der)
        except ValueError:
            raise AuthError("client certificate unreadable") from None
        moment = datetime.fromtimestamp(now, UTC)
        if not leaf.not_valid_before_utc <= moment <= leaf.not_valid_after_utc:
            raise AuthError("client certificate expired or not yet valid")
        names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(names) != 1 or str(names[0].value).lower() != registration_id:
            raise AuthError("certificate common name is not the registration id")
        if not any(_issued_by(leaf, ca) for ca in self._ca_certs):
            raise AuthError("certificate not issued by the hub CA")
        groups = [g for g in self.store.groups.values() if g.attestation == "x509"]
        enabled = [g for g in groups if g.enabled]
        if not enabled:
            raise AuthError("no enabled X.509 enrollment group" if not groups
                            else f"enrollment group {groups[0].group_id} disabled")
        return sorted(enabled, key=lambda g: g.group_id)[0]

    # -- requests ----------------------------------------------------------------------------

    def handle(self, conn: Publisher, principal: Principal, request: dps.DpsRequest,
               payload: bytes) -> None:
        """Answer a register or poll request. The request is acknowledged at once and the
        answer follows it (the SDK drops an answer that overtakes its PUBACK)."""
        self._tasks.spawn(self._handle(conn, principal, request, payload), "provisioning")

    async def _handle(self, conn: Publisher, principal: Principal, request: dps.DpsRequest,
                      payload: bytes) -> None:
        if isinstance(request, dps.DpsPoll):
            registration_id = self._operations.get(request.operation_id)
            registration = self.store.registrations.get(registration_id or "")
            if registration is None or registration_id != principal.device_id:
                self._answer(conn, 404, request.rid, {
                    "errorCode": 404201, "message": "unknown operation id",
                    "trackingId": str(uuid.uuid4())})
                return
            self._answer(conn, 200, request.rid, {
                "operationId": request.operation_id, "status": registration.status,
                "registrationState": registration.json()})
            return
        try:
            body = dps.register_payload(payload)
        except GatewayError as exc:
            self._answer(conn, 400, request.rid, {"errorCode": 400004, "message": str(exc)})
            return
        assert principal.provisioning is not None
        group = self.store.groups[principal.provisioning]
        registration = await self._register(principal.device_id, group, body.get("payload"))
        operation_id = f"5.{secrets.token_hex(8)}.{uuid.uuid4()}"
        self._operations[operation_id] = registration.registration_id
        while len(self._operations) > MAX_OPERATIONS:
            self._operations.popitem(last=False)
        self._answer(conn, 202, request.rid, {"operationId": operation_id,
                                              "status": "assigning"}, retry_after=RETRY_AFTER_S)

    async def _register(self, registration_id: str, group: EnrollmentGroup,
                        payload: Any) -> Registration:
        now = self._clock()
        previous = self.store.registrations.get(registration_id)
        existing = self.registry.get_device(registration_id)
        ours = previous is not None and previous.status == "assigned" and existing is not None
        fields = dict(registration_id=registration_id, group_id=group.group_id,
                      device_id=registration_id, assigned_hub=self.assigned_hub,
                      etag=secrets.token_hex(8),
                      created=previous.created if previous else now, updated=now,
                      payload=payload)
        if existing is not None and not ours:
            log.warning("provisioning refused registration_id=%r reason=device exists and was "
                        "not provisioned here", registration_id)
            registration = Registration(
                status="failed", error=f"device {registration_id!r} already exists and was not "
                "created by provisioning; delete it or choose another registration id", **fields)
        elif existing is not None and existing.status != "enabled":
            registration = Registration(status="disabled", error="the device is disabled",
                                        **fields)
        else:
            body = self._device_body(registration_id, group)
            if existing is None or _auth_of(existing) != body["authentication"]:
                # a new device, or the group's keys were rotated since it was provisioned
                await self.registry.put_device(body, device_id=registration_id,
                                               if_match=None if existing is None else "*")
            if existing is None and self._initial_twin is not None:
                await self._initial_twin(registration_id, group)
            registration = Registration(
                status="assigned",
                substatus="reprovisionedToInitialAssignment" if ours else "initialAssignment",
                **fields)
            log.info("provisioned registration_id=%r group=%s assigned_hub=%s",
                     registration_id, group.group_id, self.assigned_hub)
        await self.store.record(registration)
        return registration

    @staticmethod
    def _device_body(registration_id: str, group: EnrollmentGroup) -> dict[str, Any]:
        if group.attestation == "symmetricKey":
            auth: dict[str, Any] = {"type": "sas", "symmetricKey": {
                "primaryKey": dps.derive_device_key(group.primary_key, registration_id),
                "secondaryKey": dps.derive_device_key(group.secondary_key, registration_id)}}
        else:
            auth = {"type": "certificateAuthority"}
        return {"deviceId": registration_id, "status": "enabled", "authentication": auth,
                "capabilities": {"iotEdge": group.iot_edge}}

    @staticmethod
    def _answer(conn: Publisher, status: int, rid: str, body: dict[str, Any],
                retry_after: int | None = None) -> None:
        conn.publish(dps.response_topic(status, rid, retry_after),
                     json.dumps(body, separators=(",", ":")).encode(), 0)


def _auth_of(device: Any) -> dict[str, Any]:
    auth: dict[str, Any] = device.to_json()["authentication"]
    if auth.get("type") == "sas":
        keys = auth.get("symmetricKey") or {}
        return {"type": "sas", "symmetricKey": {"primaryKey": keys.get("primaryKey"),
                                                "secondaryKey": keys.get("secondaryKey")}}
    return {"type": auth.get("type")}


def _issued_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
