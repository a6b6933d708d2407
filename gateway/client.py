"""The device/module client used by the demo, the hw/ bridges and (later) the upstream link.

A thin layer over aiomqtt that turns an Azure connection string into an IoT Hub MQTT
connection (IoT Hub ref §1.2: client id, username, SAS password; TLS 1.2+ against a given CA)
and builds telemetry topics with their property bags (ref §2.2).
"""

from __future__ import annotations

import ssl
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiomqtt

from gateway.hub.connstr import ConnectionString, parse_connection_string
from gateway.hub.propbag import encode_bag
from gateway.hub.sas import generate_sas_token

API_VERSION = "2021-04-12"
SYSTEM_WIRE = {
    "message_id": "$.mid",
    "correlation_id": "$.cid",
    "content_type": "$.ct",
    "content_encoding": "$.ce",
    "output_name": "$.on",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientSettings:
    connection: ConnectionString
    port: int = 8883
    ca_file: str | None = None
    ca_data: str | None = None
    token_ttl: int = 3600
    keepalive: int = 60
    unix_socket: str | None = None  # a local module may use the hub's unix socket instead

    @classmethod
    def from_string(cls, connection_string: str, **kw: object) -> ClientSettings:
        return cls(connection=parse_connection_string(connection_string), **kw)  # type: ignore[arg-type]

    @property
    def client_id(self) -> str:
        c = self.connection
        assert c.device_id
        return f"{c.device_id}/{c.module_id}" if c.module_id else c.device_id

    def username(self) -> str:
        c = self.connection
        ua = urllib.parse.quote("edge-gateway/0.1", safe="")
        return f"{c.host_name}/{self.client_id}/?api-version={API_VERSION}&DeviceClientType={ua}"

    def password(self, now: float | None = None) -> str:
        c = self.connection
        assert c.shared_access_key, "X.509 clients have no password"
        resource = f"{c.host_name}/devices/{c.device_id}"
        if c.module_id:
            resource += f"/modules/{c.module_id}"
        return generate_sas_token(resource, c.shared_access_key, int((now or time.time()) + self.token_ttl))

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def mqtt_client(self, *, clean_session: bool = False) -> aiomqtt.Client:
        c = self.connection
        host = c.gateway_host_name or c.host_name
        common: dict[str, Any] = {
            "identifier": self.client_id, "username": self.username(),
            "password": self.password(), "protocol": aiomqtt.ProtocolVersion.V311,
            "clean_session": clean_session, "keepalive": self.keepalive,
        }
        if self.unix_socket:
            return aiomqtt.Client(self.unix_socket, transport="unix", **common)
        return aiomqtt.Client(host, self.port, tls_context=self.ssl_context(), **common)

    def telemetry_topic(self, properties: Mapping[str, str] | None = None,
                        **system: str | None) -> str:
        c = self.connection
        base = f"devices/{c.device_id}/"
        if c.module_id:
            base += f"modules/{c.module_id}/"
        pairs = [(SYSTEM_WIRE[k], v) for k, v in system.items() if v is not None]
        pairs += sorted((properties or {}).items())
        return base + "messages/events/" + encode_bag(pairs)
