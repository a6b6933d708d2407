"""The identity registry: devices, modules and shared access policies (IoT Hub ref §9.1, §7.2, §8).

Reads happen on every CONNECT and API call; writes are rare (admin). So the whole registry
lives in memory and every write goes through to SQLite first: one ``sqlite3`` connection in WAL
mode with ``synchronous=FULL``, driven by the registry's own single worker thread; each write is
one transaction, and the in-memory view changes only after it committed. The file holds keys, so
it is created mode 0600 (SQLite gives its ``-wal``/``-shm`` files the same mode).

Connection state (``connectionState``, ``connectionStateUpdatedTime``, ``lastActivityTime``) is
kept in memory only: persisting it would put a disk write on every CONNECT and disconnect, and
after a restart every device is disconnected anyway.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import re
import secrets
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PreconditionFailedError,
    StoreError,
)
from gateway.pki import thumbprints

__all__ = [
    "AUTH_TYPES",
    "DEFAULT_POLICIES",
    "NEVER",
    "Device",
    "Listener",
    "Module",
    "Policy",
    "Registry",
    "Right",
    "validate_id",
]

log = logging.getLogger(__name__)

NEVER: Final = "0001-01-01T00:00:00Z"  # IoT Hub's "never happened" timestamp
AUTH_TYPES: Final = frozenset({"sas", "selfSigned", "certificateAuthority", "none"})
_STATUSES: Final = frozenset({"enabled", "disabled"})
# Device and module ids: up to 128 ASCII letters, digits and - . + % _ # * ? ! ( ) , : = @ $ '
# (IoT Hub ref §1.2).
_ID_RE: Final = re.compile(r"[A-Za-z0-9\-.+%_#*?!(),:=@$']{1,128}")
_THUMBPRINT_RE: Final = re.compile(r"[0-9A-Fa-f]{40}|[0-9A-Fa-f]{64}")
_SENSOR_KEY_RE: Final = re.compile(r"[0-9A-Fa-f]{32}")
_KEY_BYTES: Final = 32  # generated keys; accepted keys decode to 16..64 bytes


class Right(StrEnum):
    """Shared access policy permissions (IoT Hub ref §7.2)."""

    REGISTRY_READ = "RegistryRead"
    REGISTRY_WRITE = "RegistryWrite"
    SERVICE_CONNECT = "ServiceConnect"
    DEVICE_CONNECT = "DeviceConnect"


DEFAULT_POLICIES: Final[Mapping[str, frozenset[str]]] = {
    "iothubowner": frozenset(Right),
    "service": frozenset({Right.SERVICE_CONNECT}),
    "device": frozenset({Right.DEVICE_CONNECT}),
    "registryRead": frozenset({Right.REGISTRY_READ}),
    "registryReadWrite": frozenset({Right.REGISTRY_READ, Right.REGISTRY_WRITE}),
}


def validate_id(value: str, what: str = "device id") -> str:
    """Return ``value`` if it is a legal device/module id, else raise InvalidRequestError."""
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise InvalidRequestError(
            f"invalid {what} {value!r}: 1-128 ASCII letters, digits or -.+%_#*?!(),:=@$'")
    return value


# --- identities -------------------------------------------------------------------------------

def _authentication_json(auth_type: str, primary_key: str | None, secondary_key: str | None,
                         primary_thumbprint: str | None,
                         secondary_thumbprint: str | None) -> dict[str, Any]:
    return {
        "type": auth_type,
        "symmetricKey": {"primaryKey": primary_key, "secondaryKey": secondary_key},
        "x509Thumbprint": {"primaryThumbprint": primary_thumbprint,
                           "secondaryThumbprint": secondary_thumbprint},
    }


@dataclass(frozen=True, slots=True)
class Device:
    """A device identity. Two extensions: ``certificate_pem``, the registered certificate of a
    ``selfSigned`` device, used as a TLS trust anchor; ``sensor_key`` (JSON ``sensorKey``,
    32 hex digits), the key of a child sensor's encrypted radio frames (a BTHome bindkey),
    handed only to the bridge module that owns the child (:mod:`gateway.translation`)."""

    device_id: str
    generation_id: str
    etag: str
    status: str
    status_reason: str | None
    auth_type: str
    primary_key: str | None
    secondary_key: str | None
    primary_thumbprint: str | None
    secondary_thumbprint: str | None
    iot_edge: bool
    device_scope: str | None
    parent_scopes: tuple[str, ...]
    status_updated: str
    created: str
    connection_state: str = "Disconnected"
    connection_state_updated: str = NEVER
    last_activity: str = NEVER
    certificate_pem: str | None = None
    sensor_key: str | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.status == "enabled"

    def to_json(self, *, cloud_to_device_message_count: int = 0) -> dict[str, Any]:
        """The IoT Hub REST device shape (IoT Hub ref §9.1). The C2D queue depth is not the
        registry's to know; the caller passes it."""
        return {
            "deviceId": self.device_id,
            "generationId": self.generation_id,
            "etag": self.etag,
            "connectionState": self.connection_state,
            "status": self.status,
            "statusReason": self.status_reason,
            "connectionStateUpdatedTime": self.connection_state_updated,
            "statusUpdatedTime": self.status_updated,
            "lastActivityTime": self.last_activity,
            "cloudToDeviceMessageCount": cloud_to_device_message_count,
            "authentication": _authentication_json(
                self.auth_type, self.primary_key, self.secondary_key,
                self.primary_thumbprint, self.secondary_thumbprint),
            "capabilities": {"iotEdge": self.iot_edge},
            "deviceScope": self.device_scope,
            "parentScopes": list(self.parent_scopes),
            **({"sensorKey": self.sensor_key} if self.sensor_key else {}),
        }


@dataclass(frozen=True, slots=True)
class Module:
    """A module identity on a device (IoT Hub ref §9.1)."""

    device_id: str
    module_id: str
    generation_id: str
    etag: str
    managed_by: str | None
    auth_type: str
    primary_key: str | None
    secondary_key: str | None
    primary_thumbprint: str | None
    secondary_thumbprint: str | None
    created: str
    connection_state: str = "Disconnected"
    connection_state_updated: str = NEVER
    last_activity: str = NEVER
    certificate_pem: str | None = None

    def to_json(self, *, cloud_to_device_message_count: int = 0) -> dict[str, Any]:
        """The IoT Hub REST module shape (IoT Hub ref §9.1)."""
        return {
            "moduleId": self.module_id,
            "managedBy": self.managed_by,
            "deviceId": self.device_id,
            "generationId": self.generation_id,
            "etag": self.etag,
            "connectionState": self.connection_state,
            "connectionStateUpdatedTime": self.connection_state_updated,
            "lastActivityTime": self.last_activity,
            "cloudToDeviceMessageCount": cloud_to_device_message_count,
            "authentication": _authentication_json(
                self.auth_type, self.primary_key, self.secondary_key,
                self.primary_thumbprint, self.secondary_thumbprint),
        }


@dataclass(frozen=True, slots=True)
class Policy:
    """A shared access policy (IoT Hub ref §7.2)."""

    name: str
    primary_key: str
    secondary_key: str
    rights: frozenset[str]


Listener = Callable[[str, Device | Module], None]
_Identity = TypeVar("_Identity", Device, Module)


# --- request bodies -> values (pure) ----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Auth:
    type: str
    primary_key: str | None = None
    secondary_key: str | None = None
    primary_thumbprint: str | None = None
    secondary_thumbprint: str | None = None
    certificate_pem: str | None = None


def _new_key() -> str:
    return base64.b64encode(secrets.token_bytes(_KEY_BYTES)).decode("ascii")


def _new_etag() -> str:
    # Shaped like IoT Hub's identity etags: base64 of a decimal number.
    return base64.b64encode(str(secrets.randbelow(9 * 10**8) + 10**8).encode()).decode()


def _new_generation_id() -> str:
    return str(secrets.randbelow(9 * 10**17) + 10**17)  # 18 digits, like IoT Hub's


def _optional_str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string")
    return value


def _section(body: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"{name} must be an object")
    return value


def _check_key(key: str, name: str) -> str:
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{name} is not base64") from None
    if not 16 <= len(raw) <= 64:
        raise InvalidRequestError(f"{name} must decode to 16..64 bytes")
    return key


def _sensor_key(body: Mapping[str, Any], existing: Device | None) -> str | None:
    """``sensorKey``: absent keeps the current key (an SDK's full-body update does not know the
    field), null removes it."""
    if "sensorKey" not in body:
        return existing.sensor_key if existing else None
    value = body["sensorKey"]
    if value is None:
        return None
    if not isinstance(value, str) or _SENSOR_KEY_RE.fullmatch(value) is None:
        raise InvalidRequestError("sensorKey must be 32 hex digits (a 128-bit key)")
    return value.lower()


def _check_thumbprint(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    if _THUMBPRINT_RE.fullmatch(value) is None:
        raise InvalidRequestError(f"{name} must be 40 (SHA-1) or 64 (SHA-256) hex digits")
    return value.upper()


def _load_certificate(pem: str) -> tuple[str, tuple[str, str]]:
    """-> (the first certificate alone, re-encoded as PEM; its thumbprints). Anything after
    the first certificate is dropped: it would otherwise become a TLS trust anchor too."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise InvalidRequestError("x509Certificate is not a PEM certificate") from None
    return (cert.public_bytes(Encoding.PEM).decode("ascii"),
            thumbprints(cert.public_bytes(Encoding.DER)))


def _parse_auth(raw: Mapping[str, Any], *, previous: _Auth | None,
                certificate_pem: str | None) -> _Auth:
    """``authentication`` section -> _Auth (IoT Hub ref §8, §9.1). SAS without keys: keep the
    previous keys on an update, generate new ones otherwise."""
    auth_type = raw.get("type") or "sas"
    if not isinstance(auth_type, str) or auth_type not in AUTH_TYPES:
        raise InvalidRequestError(f"authentication.type must be one of {sorted(AUTH_TYPES)}")
    if certificate_pem is not None and auth_type != "selfSigned":
        raise InvalidRequestError("a certificate can be registered only for selfSigned")
    if auth_type == "sas":
        keys = _section(raw, "symmetricKey")
        primary = _optional_str(keys, "primaryKey")
        secondary = _optional_str(keys, "secondaryKey")
        if primary is None and secondary is None:
            if previous is not None and previous.type == "sas":
                return replace(previous, certificate_pem=None)
            return _Auth("sas", _new_key(), _new_key())
        if primary is None or secondary is None:
            raise InvalidRequestError("give both symmetric keys or neither")
        return _Auth("sas", _check_key(primary, "primaryKey"),
                     _check_key(secondary, "secondaryKey"))
    if auth_type == "selfSigned":
        prints = _section(raw, "x509Thumbprint")
        primary = _check_thumbprint(_optional_str(prints, "primaryThumbprint"),
                                    "primaryThumbprint")
        secondary = _check_thumbprint(_optional_str(prints, "secondaryThumbprint"),
                                      "secondaryThumbprint")
        if certificate_pem is None and previous is not None:
            certificate_pem = previous.certificate_pem  # kept if it still matches, see below
            if certificate_pem is not None and (primary or secondary) and not (
                    {primary, secondary} & set(_load_certificate(certificate_pem)[1])):
                certificate_pem = None
        if certificate_pem is not None:
            certificate_pem, cert_prints = _load_certificate(certificate_pem)
            if primary is None and secondary is None:
                primary = cert_prints[0]
            elif not {primary, secondary} & set(cert_prints):
                raise InvalidRequestError("x509Certificate matches neither thumbprint")
        if primary is None and secondary is None:
            raise InvalidRequestError("selfSigned authentication needs a thumbprint")
        return _Auth("selfSigned", primary_thumbprint=primary, secondary_thumbprint=secondary,
                     certificate_pem=certificate_pem)
    return _Auth(auth_type)


def _auth_of(identity: Device | Module) -> _Auth:
    return _Auth(identity.auth_type, identity.primary_key, identity.secondary_key,
                 identity.primary_thumbprint, identity.secondary_thumbprint,
                 identity.certificate_pem)


def _check_body_id(body: Mapping[str, Any], name: str, expected: str) -> None:
    value = body.get(name)
    if value is not None and value != expected:
        raise InvalidRequestError(f"{name} in the body does not match the URL")


def _device_from_body(body: Mapping[str, Any], *, device_id: str, existing: Device | None,
                      now: str, certificate_pem: str | None) -> Device:
    if not isinstance(body, Mapping):
        raise InvalidRequestError("device body must be a JSON object")
    _check_body_id(body, "deviceId", device_id)
    status = body.get("status") or "enabled"
    if not isinstance(status, str) or status not in _STATUSES:
        raise InvalidRequestError("status must be enabled or disabled")
    iot_edge = _section(body, "capabilities").get("iotEdge", False)
    if not isinstance(iot_edge, bool):
        raise InvalidRequestError("capabilities.iotEdge must be a boolean")
    parent_scopes = body.get("parentScopes") or []
    if not isinstance(parent_scopes, list) or not all(isinstance(s, str) for s in parent_scopes):
        raise InvalidRequestError("parentScopes must be a list of strings")
    if len(parent_scopes) > 1:
        raise InvalidRequestError("a device has at most one parent (ref §14.1)")
    pem = certificate_pem or _optional_str(body, "x509Certificate")
    auth = _parse_auth(_section(body, "authentication"),
                       previous=_auth_of(existing) if existing else None, certificate_pem=pem)
    generation_id = existing.generation_id if existing else _new_generation_id()
    # An edge device's scope is generated and immutable; a leaf sets its parent's (ref §14.1).
    scope = (f"ms-azure-iot-edge://{device_id}-{generation_id}" if iot_edge
             else _optional_str(body, "deviceScope"))
    return Device(
        device_id=device_id,
        generation_id=generation_id,
        etag=_new_etag(),
        status=status,
        status_reason=_optional_str(body, "statusReason"),
        auth_type=auth.type,
        primary_key=auth.primary_key,
        secondary_key=auth.secondary_key,
        primary_thumbprint=auth.primary_thumbprint,
        secondary_thumbprint=auth.secondary_thumbprint,
        iot_edge=iot_edge,
        device_scope=scope,
        parent_scopes=tuple(parent_scopes),
        status_updated=(existing.status_updated if existing and existing.status == status
                        else now),
        created=existing.created if existing else now,
        certificate_pem=auth.certificate_pem,
        sensor_key=_sensor_key(body, existing),
    )


def _module_from_body(body: Mapping[str, Any], *, device_id: str, module_id: str,
                      existing: Module | None, now: str, certificate_pem: str | None) -> Module:
    if not isinstance(body, Mapping):
        raise InvalidRequestError("module body must be a JSON object")
    _check_body_id(body, "deviceId", device_id)
    _check_body_id(body, "moduleId", module_id)
    pem = certificate_pem or _optional_str(body, "x509Certificate")
    auth = _parse_auth(_section(body, "authentication"),
                       previous=_auth_of(existing) if existing else None, certificate_pem=pem)
    return Module(
        device_id=device_id,
        module_id=module_id,
        generation_id=existing.generation_id if existing else _new_generation_id(),
        etag=_new_etag(),
        managed_by=_optional_str(body, "managedBy"),
        auth_type=auth.type,
        primary_key=auth.primary_key,
        secondary_key=auth.secondary_key,
        primary_thumbprint=auth.primary_thumbprint,
        secondary_thumbprint=auth.secondary_thumbprint,
        created=existing.created if existing else now,
        certificate_pem=auth.certificate_pem,
    )


def _normalize_etag(if_match: str) -> str:
    value = if_match.strip().removeprefix("W/")
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return value


def _check_precondition(current: str, if_match: str | None, what: str) -> None:
    if if_match is not None:
        wanted = _normalize_etag(if_match)
        if wanted != "*" and wanted != current:
            raise PreconditionFailedError(f"{what}: etag does not match If-Match")


# --- persistence ------------------------------------------------------------------------------

_CONNECTION_FIELDS = ("connection_state", "connection_state_updated", "last_activity")
_SCHEMA = (
    ("CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, doc TEXT NOT NULL)"
     " WITHOUT ROWID"),
    ("CREATE TABLE IF NOT EXISTS modules (device_id TEXT NOT NULL, module_id TEXT NOT NULL,"
     " doc TEXT NOT NULL, PRIMARY KEY (device_id, module_id)) WITHOUT ROWID"),
    ("CREATE TABLE IF NOT EXISTS policies (name TEXT PRIMARY KEY, doc TEXT NOT NULL)"
     " WITHOUT ROWID"),
)
_SCHEMA_VERSION = 1
_PUT_DEVICE = "INSERT OR REPLACE INTO devices (device_id, doc) VALUES (?, ?)"
_PUT_MODULE = "INSERT OR REPLACE INTO modules (device_id, module_id, doc) VALUES (?, ?, ?)"

_Statement = tuple[str, tuple[str, ...]]


def _dump(value: Device | Module | Policy) -> str:
    record = asdict(value)
    for name in _CONNECTION_FIELDS:
        record.pop(name, None)
    if isinstance(value, Policy):
        record["rights"] = sorted(value.rights)
    return json.dumps(record, separators=(",", ":"), sort_keys=True)


def _load(cls: type[_Identity], doc: str) -> _Identity:
    record = json.loads(doc)
    names = {f.name for f in fields(cls)}
    record = {k: v for k, v in record.items() if k in names}
    if "parent_scopes" in record:
        record["parent_scopes"] = tuple(record["parent_scopes"])
    return cls(**record)


class _Database:
    """The sqlite3 connection. Every method runs on the registry's single worker thread."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None

    def open(self) -> tuple[list[str], list[str], list[str]]:
        """Create/migrate the schema; return (device docs, module docs, policy docs)."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self._path, 0o600)
        conn = sqlite3.connect(self._path, isolation_level=None)
        self._conn = conn
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise StoreError(f"{self._path}: schema version {version} is newer than this code")
        if version < _SCHEMA_VERSION:
            self.write([(sql, ()) for sql in _SCHEMA]
                       + [(f"PRAGMA user_version = {_SCHEMA_VERSION}", ())])
        def docs(table: str) -> list[str]:
            return [doc for (doc,) in conn.execute(f"SELECT doc FROM {table}")]

        return docs("devices"), docs("modules"), docs("policies")

    def write(self, statements: Sequence[_Statement]) -> None:
        """Run ``statements`` in one transaction."""
        assert self._conn is not None
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                conn.execute(sql, params)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# --- the registry -----------------------------------------------------------------------------

def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Registry:
    """Devices, modules and policies: served from memory, written through to SQLite.

    Use :meth:`open`. Reads are synchronous dictionary look-ups; writes are serialised by an
    asyncio lock, committed on the registry's one database thread, then applied to memory and
    announced to listeners (see :meth:`add_listener`).
    """

    def __init__(self, *, database: _Database, executor: ThreadPoolExecutor,
                 utcnow: Callable[[], datetime]) -> None:
        self._db = database
        self._executor = executor
        self._utcnow = utcnow
        self._lock = asyncio.Lock()
        self._devices: dict[str, Device] = {}
        self._modules: dict[str, dict[str, Module]] = {}
        self._policies: dict[str, Policy] = {}
        self._listeners: list[tuple[Listener, bool]] = []
        self._closed = False

    @classmethod
    async def open(cls, path: Path, *,
                   utcnow: Callable[[], datetime] = _utcnow) -> Registry:
        """Open (creating if needed) the registry file at ``path``. The first open creates the
        five default policies with random 32-byte keys (IoT Hub ref §7.2)."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-db")
        registry = cls(database=_Database(path), executor=executor, utcnow=utcnow)
        try:
            devices, modules, policies = await registry._run(registry._db.open)
            for doc in devices:
                device = _load(Device, doc)
                registry._devices[device.device_id] = device
            for doc in modules:
                module = _load(Module, doc)
                registry._modules.setdefault(module.device_id, {})[module.module_id] = module
            for doc in policies:
                record = json.loads(doc)
                record["rights"] = frozenset(record["rights"])
                policy = Policy(**record)
                registry._policies[policy.name] = policy
            if not registry._policies:
                await registry._create_default_policies()
        except BaseException:
            await registry.close()
            raise
        log.info("registry opened path=%s devices=%d", path, len(registry._devices))
        return registry

    async def _create_default_policies(self) -> None:
        created = [Policy(name, _new_key(), _new_key(), rights)
                   for name, rights in DEFAULT_POLICIES.items()]
        await self._write([("INSERT INTO policies (name, doc) VALUES (?, ?)", (p.name, _dump(p)))
                           for p in created])
        self._policies.update((p.name, p) for p in created)

    async def close(self) -> None:
        """Close the database and stop its thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
        finally:
            self._executor.shutdown(wait=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def _run(self, fn: Callable[[], Any]) -> Any:
        if self._closed:
            raise StoreError("registry is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            raise StoreError(f"registry database: {exc}") from exc

    async def _write(self, statements: Sequence[_Statement]) -> None:
        await self._run(lambda: self._db.write(statements))

    def _now(self) -> str:
        return _iso(self._utcnow())

    # --- reads (memory) ---------------------------------------------------------------------

    def get_device(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def get_module(self, device_id: str, module_id: str) -> Module | None:
        return self._modules.get(device_id, {}).get(module_id)

    def devices(self) -> list[Device]:
        return list(self._devices.values())

    def modules(self, device_id: str) -> list[Module]:
        return list(self._modules.get(device_id, {}).values())

    def get_policy(self, name: str) -> Policy | None:
        return self._policies.get(name)

    def policies(self) -> list[Policy]:
        return list(self._policies.values())

    def registered_certificates(self) -> list[str]:
        """PEMs registered for ``selfSigned`` identities: the TLS layer trusts them as anchors
        so self-signed client certificates pass the handshake (IoT Hub ref §8)."""
        pems = [d.certificate_pem for d in self._devices.values() if d.certificate_pem]
        pems += [m.certificate_pem for mods in self._modules.values()
                 for m in mods.values() if m.certificate_pem]
        return pems

    # --- listeners --------------------------------------------------------------------------

    def add_listener(self, fn: Listener, *, updates: bool = False) -> None:
        """Call ``fn(event, identity)`` after each committed change: ``"created"`` or
        ``"deleted"`` (deleting a device announces its modules first); with ``updates=True``
        also ``"updated"`` (status, keys or certificates changed: a hub may want to drop the
        identity's live connection). Listeners run synchronously; exceptions are logged."""
        self._listeners.append((fn, updates))

    def _emit(self, event: Literal["created", "updated", "deleted"],
              identity: Device | Module) -> None:
        for fn, updates in self._listeners:
            if event == "updated" and not updates:
                continue
            try:
                fn(event, identity)
            except Exception:
                log.exception("registry listener failed event=%s", event)

    # --- writes -----------------------------------------------------------------------------

    def _with_live_state(self, fresh: _Identity, current: _Identity | None) -> _Identity:
        """Carry the in-memory connection state over to a rewritten identity."""
        if current is None:
            return fresh
        return replace(fresh, connection_state=current.connection_state,
                       connection_state_updated=current.connection_state_updated,
                       last_activity=current.last_activity)

    async def put_device(self, body: Mapping[str, Any], *, device_id: str, if_match: str | None,
                         certificate_pem: str | None = None) -> tuple[Device, bool]:
        """Create or update a device from its REST JSON body (IoT Hub ref §9.1).

        Create: no such device and no ``If-Match`` (an ``If-Match`` on a missing device is
        NotFoundError). Update: ``If-Match`` ``*`` or the current etag (else
        PreconditionFailedError); without ``If-Match`` an existing device is ConflictError.
        Returns ``(device, created)``.
        """
        validate_id(device_id)
        async with self._lock:
            existing = self._devices.get(device_id)
            if existing is None:
                if if_match is not None:
                    raise NotFoundError(f"device {device_id!r} not found")
            elif if_match is None:
                raise ConflictError(f"device {device_id!r} already exists")
            else:
                _check_precondition(existing.etag, if_match, f"device {device_id!r}")
            device = _device_from_body(body, device_id=device_id, existing=existing,
                                       now=self._now(), certificate_pem=certificate_pem)
            await self._write([(_PUT_DEVICE, (device_id, _dump(device)))])
            device = self._with_live_state(device, self._devices.get(device_id))
            self._devices[device_id] = device
            self._emit("created" if existing is None else "updated", device)
        return device, existing is None

    async def delete_device(self, device_id: str, *, if_match: str | None) -> Device:
        """Delete a device and its modules (``If-Match`` optional: ``*`` or the etag)."""
        async with self._lock:
            existing = self._devices.get(device_id)
            if existing is None:
                raise NotFoundError(f"device {device_id!r} not found")
            _check_precondition(existing.etag, if_match, f"device {device_id!r}")
            await self._write([
                ("DELETE FROM modules WHERE device_id = ?", (device_id,)),
                ("DELETE FROM devices WHERE device_id = ?", (device_id,)),
            ])
            existing = self._devices.pop(device_id)
            for module in self._modules.pop(device_id, {}).values():
                self._emit("deleted", module)
            self._emit("deleted", existing)
        return existing

    async def put_module(self, body: Mapping[str, Any], *, device_id: str, module_id: str,
                         if_match: str | None,
                         certificate_pem: str | None = None) -> tuple[Module, bool]:
        """Create or update a module; same If-Match rules as :meth:`put_device`. The device
        must exist (NotFoundError)."""
        validate_id(device_id)
        validate_id(module_id, "module id")
        async with self._lock:
            if device_id not in self._devices:
                raise NotFoundError(f"device {device_id!r} not found")
            existing = self.get_module(device_id, module_id)
            what = f"module {device_id!r}/{module_id!r}"
            if existing is None:
                if if_match is not None:
                    raise NotFoundError(f"{what} not found")
            elif if_match is None:
                raise ConflictError(f"{what} already exists")
            else:
                _check_precondition(existing.etag, if_match, what)
            module = _module_from_body(body, device_id=device_id, module_id=module_id,
                                       existing=existing, now=self._now(),
                                       certificate_pem=certificate_pem)
            await self._write([(_PUT_MODULE, (device_id, module_id, _dump(module)))])
            module = self._with_live_state(module, self.get_module(device_id, module_id))
            self._modules.setdefault(device_id, {})[module_id] = module
            self._emit("created" if existing is None else "updated", module)
        return module, existing is None

    async def delete_module(self, device_id: str, module_id: str, *,
                            if_match: str | None) -> Module:
        """Delete a module (``If-Match`` optional: ``*`` or the etag)."""
        async with self._lock:
            existing = self.get_module(device_id, module_id)
            if existing is None:
                raise NotFoundError(f"module {device_id!r}/{module_id!r} not found")
            _check_precondition(existing.etag, if_match, f"module {device_id!r}/{module_id!r}")
            await self._write([("DELETE FROM modules WHERE device_id = ? AND module_id = ?",
                                (device_id, module_id))])
            mods = self._modules[device_id]
            existing = mods.pop(module_id)
            if not mods:
                del self._modules[device_id]
            self._emit("deleted", existing)
        return existing

    def set_connection_state(self, device_id: str, module_id: str | None,
                                   connected: bool, when: str) -> None:
        """Record a connect/disconnect at ``when`` (ISO 8601). Memory only, by design (see the
        module docstring); unknown identities are ignored (deleted while connected)."""
        state = "Connected" if connected else "Disconnected"
        if module_id is None:
            device = self._devices.get(device_id)
            if device is not None:
                self._devices[device_id] = replace(
                    device, connection_state=state, connection_state_updated=when,
                    last_activity=when)
            return
        module = self.get_module(device_id, module_id)
        if module is not None:
            self._modules[device_id][module_id] = replace(
                module, connection_state=state, connection_state_updated=when,
                last_activity=when)
