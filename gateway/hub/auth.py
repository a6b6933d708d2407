"""Authentication: MQTT CONNECT credentials and service API tokens -> principals.

IoT Hub ref §1.2 (username, client id, password), §7.1-7.2 (SAS tokens and their audience),
§8 (X.509), §14.1 (a gateway accepts the upstream hub's name in ``sr``). Pure apart from reading
the in-memory registry. The TLS layer accepts any client certificate, as IoT Hub does; every
X.509 decision is made here: a ``selfSigned`` identity by thumbprint, a ``certificateAuthority``
one by ``CN`` and a chain (through the intermediates the device sent) to the hub CA or a
verified CA certificate of the registry.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from gateway.errors import AuthError, ForbiddenError
from gateway.hub import dps
from gateway.hub.cacerts import verify_client_chain
from gateway.hub.messages import auth_method_json
from gateway.hub.policies import ALL_RIGHTS
from gateway.hub.registry import Device, Module, Policy, Registry, Right
from gateway.hub.sas import SasToken, parse_sas_token, verify_sas_signature
from gateway.hub.username import Username, parse_username
from gateway.hubcerts import thumbprints

if TYPE_CHECKING:  # cryptography: imported by the first X.509 authentication
    from cryptography import x509

    from gateway.hub.provisioning import ProvisioningService

__all__ = ["Authenticator", "Principal", "ServicePrincipal"]

SKEW_SECONDS = 300.0  # clock-skew allowance on SAS expiry (edgeHub: 5 min, ref §7.1)
SERVICE_TOKEN_CACHE = 256  # verified service tokens remembered (distinct back-end tokens)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who an MQTT connection is. ``expires_at`` is when the SAS token stops being accepted,
    ``se + SKEW_SECONDS`` (None for X.509): close the connection then (ref §1.4). ``policy`` names the shared access policy when
    a gateway connected on the device's behalf with a DeviceConnect policy token."""

    device_id: str
    module_id: str | None
    auth_type: str  # "sas" | "x509"
    generation_id: str
    expires_at: float | None
    model_id: str | None
    policy: str | None = None
    provisioning: str | None = None  # a DPS registration: the enrollment group it proved


    @property
    def client_id(self) -> str:
        return self.device_id if self.module_id is None else f"{self.device_id}/{self.module_id}"

    def auth_method_json(self) -> str:
        """Value of ``iothub-connection-auth-method`` (ref §2.5), shaped as IoT Hub stamps it:
        scope ``hub`` for policy tokens, else ``device``/``module``; type ``sas`` or
        ``x509Certificate`` (issuer ``external``)."""
        scope: Literal["device", "module", "hub"] = (
            "hub" if self.policy is not None else "device" if self.module_id is None else "module")
        return auth_method_json(scope=scope, method="x509" if self.auth_type == "x509" else "sas")


@dataclass(frozen=True, slots=True)
class ServicePrincipal:
    """A caller of the service REST API, authenticated with a shared access policy token;
    ``expires_at`` as in :class:`Principal`."""

    policy: str
    rights: frozenset[str]
    expires_at: float
    scope: tuple[str, ...] = ()
    """The token's ``sr`` path below the host (``("devices", "dev1")``); empty: the hub."""


def _split_resource(resource: str) -> tuple[str, list[str]]:
    """``host/a/b`` -> (``host``, [``a``, ``b``]); empty segments (trailing ``/``) dropped."""
    host, _, path = resource.partition("/")
    return host, [segment for segment in path.split("/") if segment]


class Authenticator:
    """Checks CONNECT credentials against the registry (ref §1.2, §7, §8).

    ``host_names``: hub names accepted as the host of a token's ``sr`` (case-insensitive) --
    our own HostName and any alias, including the upstream IoT Hub's name that devices behind a
    transparent gateway keep using (ref §7.1, §14.1). ``ca_pems``: the hub's own CA(s), trusted
    for ``certificateAuthority`` identities besides the registry's verified CA certificates
    (:meth:`Registry.verified_ca_certificates`). Nothing else is: a registered self-signed
    device certificate, even one made with CA:TRUE, vouches only for its own thumbprint.
    """

    def __init__(self, registry: Registry, *, host_names: Collection[str],
                 ca_pems: Sequence[str] = ()) -> None:
        if not host_names:
            raise ValueError("host_names must not be empty")
        self._registry = registry
        self._hosts = frozenset(name.lower() for name in host_names)
        self._ca_pems = tuple(ca_pems)
        self._ca_certs: tuple[x509.Certificate, ...] | None = None  # parsed when first needed
        # Authorization header -> (policy it was verified against, principal): a back end
        # sends the same token with every call for up to an hour.
        self._service_tokens: dict[str, tuple[Policy, ServicePrincipal]] = {}
        self.provisioning: ProvisioningService | None = None  # DPS registrations (ref §12)

    # --- MQTT -------------------------------------------------------------------------------

    def authenticate_mqtt(self, *, client_id: str, username: str | None,
                          password: bytes | None, peer_cert_chain: Sequence[bytes] | None,
                          now: float) -> Principal:
        """Authenticate a CONNECT. SAS when a non-empty password is present, else the client
        certificate (``peer_cert_chain``: DER, leaf first), as edgeHub does (ref §1.2).

        Raises :class:`AuthError` whose reason names what failed; CONNACK 4 for a malformed
        username, password or missing credentials, 5 otherwise.
        """
        if username is None:
            raise AuthError("missing username", connack=4)
        if self.provisioning is not None and dps.is_dps_username(username):
            return self.provisioning.authenticate(
                client_id=client_id, username=username, password=password,
                peer_cert_chain=peer_cert_chain, now=now)
        user = parse_username(username)
        if client_id != user.client_id:
            raise AuthError("client id mismatch")
        if password:
            try:
                token_text = password.decode("utf-8")
            except UnicodeDecodeError:
                raise AuthError("password is not UTF-8", connack=4) from None
            return self._sas(user, parse_sas_token(token_text), now)
        if peer_cert_chain:
            return self._x509(user, peer_cert_chain, now)
        raise AuthError("no password and no client certificate", connack=4)

    def _identity(self, user: Username) -> tuple[Device, Module | None]:
        device = self._registry.get_device(user.device_id)
        if device is None:
            raise AuthError("unknown device")
        if not device.enabled:
            raise AuthError("device disabled")
        if user.module_id is None:
            return device, None
        module = self._registry.get_module(user.device_id, user.module_id)
        if module is None:
            raise AuthError("unknown module")
        return device, module

    def _sas(self, user: Username, token: SasToken, now: float) -> Principal:
        device, module = self._identity(user)
        identity: Device | Module = module or device
        expected = ["devices", user.device_id.lower()]
        if user.module_id is not None:
            expected += ["modules", user.module_id.lower()]
        host, segments = _split_resource(token.resource)
        if token.policy is None:
            if identity.auth_type != "sas":
                raise AuthError("identity does not use SAS")
            keys: Iterable[str] = (k for k in (identity.primary_key, identity.secondary_key) if k)
            verify_sas_signature(token, keys, now=now, skew=SKEW_SECONDS)
            audience_ok = [s.lower() for s in segments] == expected
        else:
            # The gateway pattern (ref §7.2): a DeviceConnect policy token whose sr is the hub,
            # {hub}/devices or {hub}/devices/{d} -- a segment prefix of the identity's URI.
            policy = self._registry.get_policy(token.policy)
            if policy is None:
                raise AuthError("unknown policy")
            if Right.DEVICE_CONNECT not in policy.rights:
                raise AuthError("policy lacks DeviceConnect")
            verify_sas_signature(token, (policy.primary_key, policy.secondary_key), now=now,
                                 skew=SKEW_SECONDS)
            lowered = [s.lower() for s in segments]
            audience_ok = lowered == expected[:len(lowered)]
        if host.lower() not in self._hosts:
            raise AuthError("token audience names another hub")
        if not audience_ok:
            raise AuthError("token audience names another identity")
        return Principal(
            device_id=device.device_id,
            module_id=user.module_id,
            auth_type="sas",
            generation_id=identity.generation_id,
            expires_at=token.expiry + SKEW_SECONDS,
            model_id=user.model_id,
            policy=token.policy,
        )

    def _issuers(self) -> tuple[x509.Certificate, ...]:
        if self._ca_certs is None:
            from cryptography import x509

            self._ca_certs = tuple(x509.load_pem_x509_certificate(pem.encode())
                                   for pem in self._ca_pems)
        return self._ca_certs

    def _x509(self, user: Username, chain: Sequence[bytes], now: float) -> Principal:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        device, module = self._identity(user)
        identity: Device | Module = module or device
        if identity.auth_type not in ("selfSigned", "certificateAuthority"):
            raise AuthError("identity does not use X.509")
        leaf_der = chain[0]
        try:
            leaf = x509.load_der_x509_certificate(leaf_der)
        except ValueError:
            raise AuthError("client certificate unreadable") from None
        moment = datetime.fromtimestamp(now, UTC)
        if moment < leaf.not_valid_before_utc:
            raise AuthError("client certificate not yet valid")
        if moment > leaf.not_valid_after_utc:
            raise AuthError("client certificate expired")
        if identity.auth_type == "selfSigned":
            registered = {p for p in (identity.primary_thumbprint,
                                      identity.secondary_thumbprint) if p}
            if not registered & set(thumbprints(leaf_der)):
                raise AuthError("thumbprint mismatch")
        else:
            names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if len(names) != 1 or names[0].value != user.client_id:
                raise AuthError("certificate common name mismatch")
            try:
                intermediates = [x509.load_der_x509_certificate(der) for der in chain[1:]]
            except ValueError:
                raise AuthError("client certificate chain unreadable") from None
            anchors = [*self._issuers(), *self._registry.verified_ca_certificates()]
            verify_client_chain(leaf, intermediates, anchors, now=moment)
        return Principal(
            device_id=device.device_id,
            module_id=user.module_id,
            auth_type="x509",
            generation_id=identity.generation_id,
            expires_at=None,
            model_id=user.model_id,
        )

    # --- service API ------------------------------------------------------------------------

    def authenticate_service(self, authorization: str | None, *, now: float,
                             key_text: bool = False) -> ServicePrincipal:
        """Authenticate an ``Authorization: SharedAccessSignature ...&skn=policy`` header
        (ref §9). ``sr`` must name one of our hosts (optionally followed by a path, and after
        a URL scheme such as ``sb://``); only shared access policies are accepted.
        ``key_text``: also accept Event Hubs' signing scheme (AMQP ``$cbs`` tokens)."""
        if not authorization:
            raise AuthError("missing Authorization header")
        cached = None if key_text else self._service_tokens.get(authorization)
        if cached is not None:
            checked, principal = cached
            # still valid, and the policy (its keys, its rights) unchanged since the check
            if now <= principal.expires_at and self._registry.get_policy(checked.name) is checked:
                return principal
            del self._service_tokens[authorization]
        token = parse_sas_token(authorization)
        if token.policy is None:
            raise AuthError("service calls need a shared access policy token (skn)")
        policy = self._registry.get_policy(token.policy)
        if policy is None:
            raise AuthError("unknown policy")
        verify_sas_signature(token, (policy.primary_key, policy.secondary_key), now=now,
                             skew=SKEW_SECONDS, key_text=key_text)
        # AMQP clients sign a URL (``sb://host/entity``, ``amqps://host``): drop the scheme
        host, segments = _split_resource(token.resource.split("://", 1)[-1])
        if host.lower() not in self._hosts:
            raise AuthError("token audience names another hub")
        principal = ServicePrincipal(policy=policy.name, rights=policy.rights,
                                     expires_at=token.expiry + SKEW_SECONDS,
                                     scope=tuple(segments))
        if key_text:  # not cached: a REST call must not pass on an Event Hubs signature
            return principal
        if len(self._service_tokens) >= SERVICE_TOKEN_CACHE:
            del self._service_tokens[next(iter(self._service_tokens))]  # the oldest
        self._service_tokens[authorization] = (policy, principal)
        return principal

    @staticmethod
    def require(principal: ServicePrincipal, right: str) -> None:
        """Raise :class:`ForbiddenError` unless the principal's policy grants ``right``
        (:data:`ALL_RIGHTS`: every right, as reading policy keys needs)."""
        if right == ALL_RIGHTS:
            if not principal.rights >= frozenset(Right):
                raise ForbiddenError(f"policy {principal.policy!r} lacks some right: reading "
                                     "shared access policy keys needs every right")
        elif right not in principal.rights:
            raise ForbiddenError(f"policy {principal.policy!r} lacks {right}")

    @staticmethod
    def require_path(principal: ServicePrincipal, path: str) -> None:
        """Raise :class:`ForbiddenError` unless the request ``path`` lies within the token's
        ``sr`` (IoT Hub ref §7.1: segment prefix). A device's twin (``/twins/{d}``) counts as
        its path (``/devices/{d}``); a token for one device reaches nothing hub-wide."""
        if not principal.scope:
            return
        segments = [s for s in path.split("/") if s]
        if segments[:1] == ["twins"]:
            segments[0] = "devices"
        scope = list(principal.scope)
        if [s.lower() for s in segments[:1]] + segments[1:len(scope)] != (
                [scope[0].lower()] + scope[1:]):
            raise ForbiddenError(f"token is for {'/'.join(scope)}, not {path}")
