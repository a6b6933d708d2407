"""Device and module identities: the values the registry holds (IoT Hub ref §9.1, §8).

Immutable dataclasses with their IoT Hub REST shapes; :func:`validate_id` is the id grammar.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.errors import InvalidRequestError

__all__ = ["AUTH_TYPES", "NEVER", "Device", "Module", "validate_id"]

NEVER: Final = "0001-01-01T00:00:00Z"  # IoT Hub's "never happened" timestamp
AUTH_TYPES: Final = frozenset({"sas", "selfSigned", "certificateAuthority", "none"})
# Device and module ids: up to 128 ASCII letters, digits and - . + % _ # * ? ! ( ) , : = @ $ '
# (IoT Hub ref §1.2).
_ID_RE: Final = re.compile(r"[A-Za-z0-9\-.+%_#*?!(),:=@$']{1,128}")


def validate_id(value: str, what: str = "device id") -> str:
    """Return ``value`` if it is a legal device/module id, else raise InvalidRequestError."""
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise InvalidRequestError(
            f"invalid {what} {value!r}: 1-128 ASCII letters, digits or -.+%_#*?!(),:=@$'")
    return value



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
    """A device identity. Two extensions: ``certificate_pem``, the certificate a ``selfSigned``
    device was registered with (its thumbprint is what counts); ``sensor_key`` (JSON ``sensorKey``,
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

