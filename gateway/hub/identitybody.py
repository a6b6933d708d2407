"""Request bodies -> identities (pure): the REST device and module JSON parsed, checked and
completed the way IoT Hub does it (IoT Hub ref §8, §9.1): generated keys, etags and
generation ids; ``If-Match`` preconditions.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from gateway.errors import InvalidRequestError, PreconditionFailedError
from gateway.hub.identities import AUTH_TYPES, Device, Module
from gateway.hub.policies import new_key as _new_key
from gateway.hubcerts import thumbprints

__all__ = ["check_precondition", "device_from_body", "module_from_body", "new_etag"]

_STATUSES: Final = frozenset({"enabled", "disabled"})
_THUMBPRINT_RE: Final = re.compile(r"[0-9A-Fa-f]{40}|[0-9A-Fa-f]{64}")
_SENSOR_KEY_RE: Final = re.compile(r"[0-9A-Fa-f]{32}")


@dataclass(frozen=True, slots=True)
class _Auth:
    type: str
    primary_key: str | None = None
    secondary_key: str | None = None
    primary_thumbprint: str | None = None
    secondary_thumbprint: str | None = None
    certificate_pem: str | None = None



def new_etag() -> str:
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
    the first certificate is dropped (one certificate, one thumbprint)."""
    from cryptography import x509  # here: an idle hub does not import it
    from cryptography.hazmat.primitives.serialization import Encoding

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


def device_from_body(body: Mapping[str, Any], *, device_id: str, existing: Device | None,
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
        etag=new_etag(),
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


def module_from_body(body: Mapping[str, Any], *, device_id: str, module_id: str,
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
        etag=new_etag(),
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


def check_precondition(current: str, if_match: str | None, what: str) -> None:
    if if_match is not None:
        wanted = _normalize_etag(if_match)
        if wanted != "*" and wanted != current:
            raise PreconditionFailedError(f"{what}: etag does not match If-Match")

