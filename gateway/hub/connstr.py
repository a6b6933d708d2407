"""Azure IoT connection strings: parse and format (IoT Hub ref §7.3).

Pure. ``HostName=hub;DeviceId=dev;SharedAccessKey=...`` -- ``;``-separated ``Key=value`` pairs,
split on the first ``=``, keys case-sensitive, unknown or repeated keys rejected, as the Azure
Python device SDK does. ``str()`` writes the keys in the order the Azure portal and CLI use, so
the result is accepted unchanged by the SDKs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from gateway.errors import ConfigError

__all__ = ["ConnectionString", "parse_connection_string"]

# (attribute, key) in Azure's order.
_KEYS: tuple[tuple[str, str], ...] = (
    ("host_name", "HostName"),
    ("device_id", "DeviceId"),
    ("module_id", "ModuleId"),
    ("shared_access_key_name", "SharedAccessKeyName"),
    ("shared_access_key", "SharedAccessKey"),
    ("shared_access_signature", "SharedAccessSignature"),
    ("gateway_host_name", "GatewayHostName"),
    ("x509", "x509"),
)
_ATTR_BY_KEY = {key: attr for attr, key in _KEYS}


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionString:
    """One connection string. Valid combinations (ref §7.3): a device or module string
    (``HostName`` + ``DeviceId`` + one of ``SharedAccessKey``, ``SharedAccessSignature``,
    ``x509=true``) or a service string (``HostName`` + ``SharedAccessKeyName`` +
    ``SharedAccessKey``). ``ModuleId`` needs ``DeviceId``; a key and ``x509`` exclude each other.
    """

    host_name: str
    device_id: str | None = None
    module_id: str | None = None
    shared_access_key: str | None = None
    shared_access_key_name: str | None = None
    gateway_host_name: str | None = None
    x509: bool = False
    shared_access_signature: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and (value == "" or ";" in value):
                raise ConfigError(f"{f.name} must be non-empty and contain no ';'",
                                  path="connection_string")
        device = self.device_id is not None
        service = self.shared_access_key_name is not None
        if device == service:
            raise ConfigError("needs exactly one of DeviceId or SharedAccessKeyName",
                              path="connection_string")
        if self.module_id is not None and not device:
            raise ConfigError("ModuleId needs DeviceId", path="connection_string")
        credentials = sum((self.shared_access_key is not None,
                           self.shared_access_signature is not None, self.x509))
        if service and (self.shared_access_key is None or credentials != 1):
            raise ConfigError("a service string needs SharedAccessKey only",
                              path="connection_string")
        if device and credentials != 1:
            raise ConfigError("needs exactly one of SharedAccessKey, SharedAccessSignature, x509",
                              path="connection_string")

    @property
    def resource_uri(self) -> str:
        """The SAS audience for this identity (ref §7.2): ``host/devices/d[/modules/m]``, or
        the bare host for a service string."""
        if self.device_id is None:
            return self.host_name
        uri = f"{self.host_name}/devices/{self.device_id}"
        return uri if self.module_id is None else f"{uri}/modules/{self.module_id}"

    def __str__(self) -> str:
        parts: list[str] = []
        for attr, key in _KEYS:
            value = getattr(self, attr)
            if value is None or value is False:
                continue
            parts.append(f"{key}={'true' if value is True else value}")
        return ";".join(parts)


def parse_connection_string(s: str) -> ConnectionString:
    """Parse ``s`` (ref §7.3). Surrounding whitespace and one trailing ``;`` are tolerated;
    anything else the Azure SDK rejects raises :class:`ConfigError`."""
    text = s.strip().removesuffix(";")
    values: dict[str, str] = {}
    for pair in text.split(";"):
        key, eq, value = pair.partition("=")
        if not eq:
            raise ConfigError(f"segment {key!r} has no '='", path="connection_string")
        attr = _ATTR_BY_KEY.get(key)
        if attr is None:
            raise ConfigError(f"unknown key {key!r}", path="connection_string")
        if attr in values:
            raise ConfigError(f"repeated key {key!r}", path="connection_string")
        values[attr] = value
    x509 = values.pop("x509", "false").lower()
    if x509 not in ("true", "false"):
        raise ConfigError("x509 must be true or false", path="connection_string")
    if "host_name" not in values:
        raise ConfigError("missing HostName", path="connection_string")
    get = values.get
    return ConnectionString(
        host_name=values["host_name"],
        device_id=get("device_id"),
        module_id=get("module_id"),
        shared_access_key=get("shared_access_key"),
        shared_access_key_name=get("shared_access_key_name"),
        gateway_host_name=get("gateway_host_name"),
        x509=x509 == "true",
        shared_access_signature=get("shared_access_signature"),
    )
