"""Shared access policies and their rights (IoT Hub ref §7.2)."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

__all__ = ["ALL_RIGHTS", "DEFAULT_POLICIES", "Policy", "Right", "new_key"]

KEY_BYTES: Final = 32  # generated keys; accepted keys decode to 16..64 bytes


class Right(StrEnum):
    """Shared access policy permissions (IoT Hub ref §7.2)."""

    REGISTRY_READ = "RegistryRead"
    REGISTRY_WRITE = "RegistryWrite"
    SERVICE_CONNECT = "ServiceConnect"
    DEVICE_CONNECT = "DeviceConnect"


ALL_RIGHTS: Final = "+".join(Right)
"""What a route needs when only a policy holding every right may call it (reading keys)."""

DEFAULT_POLICIES: Final[Mapping[str, frozenset[str]]] = {
    "iothubowner": frozenset(Right),
    "service": frozenset({Right.SERVICE_CONNECT}),
    "device": frozenset({Right.DEVICE_CONNECT}),
    "registryRead": frozenset({Right.REGISTRY_READ}),
    "registryReadWrite": frozenset({Right.REGISTRY_READ, Right.REGISTRY_WRITE}),
}



@dataclass(frozen=True, slots=True)
class Policy:
    """A shared access policy (IoT Hub ref §7.2)."""

    name: str
    primary_key: str
    secondary_key: str
    rights: frozenset[str]



def new_key() -> str:
    """A random 32-byte key, base64 (what IoT Hub generates for policies and identities)."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")
