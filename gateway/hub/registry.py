"""The identity registry: devices, modules, shared access policies and CA certificates
(IoT Hub ref §9.1, §7.2, §8).

Reads happen on every CONNECT and API call; writes are rare (admin). So the whole registry
lives in memory and every write goes through to SQLite first (:mod:`gateway.hub.registrydb`),
on the registry's own single worker thread; the in-memory view changes only after the write
committed. The values are in :mod:`gateway.hub.identities`, :mod:`gateway.hub.policies` and
:mod:`gateway.hub.cacerts`; request bodies are parsed by :mod:`gateway.hub.identitybody`.

Connection state (``connectionState``, ``connectionStateUpdatedTime``, ``lastActivityTime``) is
kept in memory only: persisting it would put a disk write on every CONNECT and disconnect, and
after a restart every device is disconnected anyway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

from gateway.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    StoreError,
)
from gateway.hub import cacerts
from gateway.hub.cacerts import CaCertificate
from gateway.hub.identities import AUTH_TYPES, NEVER, Device, Module, validate_id
from gateway.hub.identitybody import (
    check_precondition,
    device_from_body,
    module_from_body,
    new_etag,
)
from gateway.hub.policies import DEFAULT_POLICIES, Policy, Right, new_key
from gateway.hub.registrydb import (
    PUT_CERTIFICATE,
    PUT_DEVICE,
    PUT_MODULE,
    RegistryDatabase,
    Statement,
    dump,
    load,
)

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "AUTH_TYPES",
    "DEFAULT_POLICIES",
    "NEVER",
    "CaCertificate",
    "Device",
    "Listener",
    "Module",
    "Policy",
    "Registry",
    "Right",
    "validate_id",
]

log = logging.getLogger(__name__)

Listener = Callable[[str, Device | Module], None]
CertificateListener = Callable[[str, CaCertificate], None]
_Identity = TypeVar("_Identity", Device, Module)


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

    def __init__(self, *, database: RegistryDatabase, executor: ThreadPoolExecutor,
                 utcnow: Callable[[], datetime]) -> None:
        self._db = database
        self._executor = executor
        self._utcnow = utcnow
        self._lock = asyncio.Lock()
        self._devices: dict[str, Device] = {}
        self._modules: dict[str, dict[str, Module]] = {}
        self._policies: dict[str, Policy] = {}
        self._certificates: dict[str, CaCertificate] = {}
        self._listeners: list[tuple[Listener, bool]] = []
        self._certificate_listeners: list[CertificateListener] = []
        self._closed = False

    @classmethod
    async def open(cls, path: Path, *,
                   utcnow: Callable[[], datetime] = _utcnow) -> Registry:
        """Open (creating if needed) the registry file at ``path``. The first open creates the
        five default policies with random 32-byte keys (IoT Hub ref §7.2)."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-db")
        registry = cls(database=RegistryDatabase(path), executor=executor, utcnow=utcnow)
        try:
            docs = await registry._run(registry._db.open)
            for doc in docs["devices"]:
                device = load(Device, doc)
                registry._devices[device.device_id] = device
            for doc in docs["modules"]:
                module = load(Module, doc)
                registry._modules.setdefault(module.device_id, {})[module.module_id] = module
            for doc in docs["certificates"]:
                cert = load(CaCertificate, doc)
                registry._certificates[cert.name] = cert
            for doc in docs["policies"]:
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
        created = [Policy(name, new_key(), new_key(), rights)
                   for name, rights in DEFAULT_POLICIES.items()]
        await self._write([("INSERT INTO policies (name, doc) VALUES (?, ?)", (p.name, dump(p)))
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

    async def _write(self, statements: Sequence[Statement]) -> None:
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

    def certificate(self, name: str) -> CaCertificate | None:
        return self._certificates.get(name)

    def certificates(self) -> list[CaCertificate]:
        return list(self._certificates.values())

    def verified_ca_certificates(self) -> list[x509.Certificate]:
        """The CAs ``certificateAuthority`` devices may chain to (besides the hub's own)."""
        return [c.certificate for c in self._certificates.values() if c.is_verified]

    def registered_certificates(self) -> list[str]:
        """PEMs registered for ``selfSigned`` identities (the certificates their thumbprints
        were taken from). Nothing trusts them as anchors: TLS accepts any client certificate
        and the thumbprint decides (IoT Hub ref §8)."""
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

    def add_certificate_listener(self, fn: CertificateListener) -> None:
        """Call ``fn(event, certificate)`` after each committed CA certificate change:
        ``"created"``, ``"replaced"`` (a new upload under the same name), ``"code"`` (a new
        verification code), ``"verified"`` or ``"deleted"``."""
        self._certificate_listeners.append(fn)

    def _emit_certificate(self, event: str, cert: CaCertificate) -> None:
        for fn in self._certificate_listeners:
            try:
                fn(event, cert)
            except Exception:
                log.exception("certificate listener failed event=%s", event)

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
                check_precondition(existing.etag, if_match, f"device {device_id!r}")
            device = device_from_body(body, device_id=device_id, existing=existing,
                                       now=self._now(), certificate_pem=certificate_pem)
            await self._write([(PUT_DEVICE, (device_id, dump(device)))])
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
            check_precondition(existing.etag, if_match, f"device {device_id!r}")
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
                check_precondition(existing.etag, if_match, what)
            module = module_from_body(body, device_id=device_id, module_id=module_id,
                                       existing=existing, now=self._now(),
                                       certificate_pem=certificate_pem)
            await self._write([(PUT_MODULE, (device_id, module_id, dump(module)))])
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
            check_precondition(existing.etag, if_match, f"module {device_id!r}/{module_id!r}")
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


    # --- CA certificates (IoT Hub ref §8) ---------------------------------------------------

    def _existing_certificate(self, name: str, if_match: str | None) -> CaCertificate:
        cert = self._certificates.get(name)
        if cert is None:
            raise cacerts.certificate_not_found(name)
        check_precondition(cert.etag, if_match, f"certificate {name!r}")
        return cert

    async def _store_certificate(self, cert: CaCertificate, event: str) -> CaCertificate:
        await self._write([(PUT_CERTIFICATE, (cert.name, dump(cert)))])
        self._certificates[cert.name] = cert
        self._emit_certificate(event, cert)
        return cert

    async def put_certificate(self, name: str, body: Mapping[str, Any], *,
                              if_match: str | None) -> tuple[CaCertificate, bool]:
        """Create or replace a CA certificate from ``{"properties": {"certificate": PEM,
        "isVerified": bool}}``; same If-Match rules as :meth:`put_device`. Replacing the
        certificate itself resets verification (unless ``isVerified`` is given)."""
        cacerts.validate_certificate_name(name)
        if not isinstance(body, Mapping) or not isinstance(body.get("properties", {}), Mapping):
            raise InvalidRequestError("body must be {\"properties\": {\"certificate\": PEM}}")
        props = body.get("properties") or {}
        verified = props.get("isVerified", False)
        if not isinstance(verified, bool):
            raise InvalidRequestError("properties.isVerified must be a boolean")
        async with self._lock:
            existing = self._certificates.get(name)
            if existing is None:
                if if_match is not None:
                    raise cacerts.certificate_not_found(name)
            elif if_match is None:
                err = ConflictError(f"certificate {name!r} already exists")
                err.code = "CertificateAlreadyExists"
                raise err
            else:
                check_precondition(existing.etag, if_match, f"certificate {name!r}")
            pem = cacerts.load_ca_pem(props.get("certificate"), now=self._utcnow())
            now = self._now()
            cert = CaCertificate(
                name=name, pem=pem, etag=new_etag(),
                is_verified=verified or (existing is not None and existing.pem == pem
                                         and existing.is_verified and "isVerified" not in props),
                created=existing.created if existing else now, updated=now)
            await self._store_certificate(cert, "created" if existing is None else "replaced")
        log.info("ca certificate stored name=%s verified=%s", name, cert.is_verified)
        return cert, existing is None

    async def delete_certificate(self, name: str, *, if_match: str | None) -> CaCertificate:
        async with self._lock:
            cert = self._existing_certificate(name, if_match)
            await self._write([("DELETE FROM certificates WHERE name = ?", (name,))])
            del self._certificates[name]
            self._emit_certificate("deleted", cert)
        log.info("ca certificate deleted name=%s", name)
        return cert

    async def generate_verification_code(self, name: str, *,
                                         if_match: str | None) -> CaCertificate:
        """A new proof-of-possession code for ``name`` (the previous one stops counting)."""
        async with self._lock:
            cert = self._existing_certificate(name, if_match)
            cert = replace(cert, verification_code=cacerts.new_verification_code(),
                           etag=new_etag(), updated=self._now())
            return await self._store_certificate(cert, "code")

    async def verify_certificate(self, name: str, proof_pem: object, *,
                                 if_match: str | None) -> CaCertificate:
        """Mark ``name`` verified if ``proof_pem`` proves possession of its key (a
        certificate with ``CN`` = the verification code, signed by the CA)."""
        async with self._lock:
            cert = self._existing_certificate(name, if_match)
            cacerts.check_proof(cert, proof_pem, now=self._utcnow())
            cert = replace(cert, is_verified=True, verification_code=None, etag=new_etag(),
                           updated=self._now())
            await self._store_certificate(cert, "verified")
        log.info("ca certificate verified name=%s", name)
        return cert
