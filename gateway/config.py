"""Typed, frozen configuration. Every default lives here.

The gateway reads one TOML file (``gateway.toml`` in the data directory, or the file given with
``--config``). Every section is optional; unknown keys are errors, so a typo never silently
falls back to a default. Example::

    [hub]
    host_name = "gw-plant-7.local"

    [mqtt]
    tls_port = 8883
    local_port = 1883

    [api]
    port = 443

    [store]
    sync = "full"
    retention_days = 7
    max_bytes = 1073741824
    overflow = "drop-oldest"

    [modules.modbus]
    bridge = "modbus"

    [routes]
    sensorToFilter = 'FROM /messages/modules/sensor/outputs/raw INTO BrokeredEndpoint("/modules/filter/inputs/in1")'
    hot = { source = "DeviceMessages", condition = "$body.temp > 30", endpoint = "alarms" }

    [endpoints.alarms]
    type = "mqtt"
    url = "mqtt://10.0.0.5:1883"
    topic = "plant/{deviceId}/alarms"

    [enrichments.site]
    value = "$twin.tags.site"
    endpointNames = ["alarms"]

    [routing]
    fallback = true
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from gateway.errors import ConfigError

SYSTEM_DATA_DIR = Path("/var/lib/gateway")


def default_data_dir() -> Path:
    """``$STATE_DIRECTORY`` under systemd, ``/var/lib/gateway`` when it exists and is ours
    (we own it, are root, or may read it: the hub systemd runs there is then found by every
    ``gateway`` command without ``--data-dir``), otherwise a per-user directory
    (``$XDG_DATA_HOME/gateway``)."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0])
    if is_ours(SYSTEM_DATA_DIR):
        return SYSTEM_DATA_DIR
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "gateway"


def is_ours(path: Path) -> bool:
    """A directory we own, or may read (root may read them all)."""
    try:
        st = path.stat()
    except OSError:
        return False
    if not path.is_dir():
        return False
    euid = os.geteuid()
    return euid in (0, st.st_uid) or os.access(path, os.R_OK | os.X_OK)


def _default_host_name() -> str:
    return socket.gethostname() or "localhost"


def _default_api_port() -> int:
    return 443 if os.geteuid() == 0 else 8443


@dataclass(frozen=True, slots=True, kw_only=True)
class HubConfig:
    """Who the hub is. ``host_name`` is the ``HostName=`` of every connection string and the
    first SAN of the server certificate; ``aliases`` are further names devices may dial (and
    may sign their SAS tokens for), e.g. a DNS name and the IoT Hub name of a transparent
    gateway setup."""

    host_name: str = field(default_factory=_default_host_name)
    device_id: str = ""  # the gateway's own device identity (its modules hang off it); "" = host_name
    aliases: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    on_behalf: bool = True  # edge devices (--edge) may send for the identities in their scope
    # telemetry units (one per started 4 KB) per UTC day, as IoT Hub meters; 0: no quota
    daily_message_quota: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttConfig:
    """MQTT listeners and per-connection limits (IoT Hub ref §1)."""

    bind: str = "0.0.0.0"
    tls_port: int = 8883
    local_bind: str = "127.0.0.1"
    local_port: int = 1883
    unix_socket: bool = True
    max_packet_size: int = 300 * 1024  # 256 KB message + topic and property bag
    max_message_bytes: int = 262144  # IoT Hub ref §2.4
    connect_timeout: float = 60.0  # edgeHub ConnectArrivalTimeout
    max_keepalive: int = 1740  # Python SDK maximum; IoT Hub caps at 1767 s of silence
    max_inflight: int = 100  # outbound QoS1 window per connection
    outbox_bytes: int = 4 * 1024 * 1024  # slow-consumer bound: beyond this the client is dropped
    max_pending_acks: int = 2000  # inbound QoS1 not yet committed, per connection
    max_pending_bytes: int = 8 * 1024 * 1024  # inbound message bytes not yet committed, per connection


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiConfig:
    """HTTPS: service API, device HTTP API, MQTT over WebSocket."""

    bind: str = "0.0.0.0"
    port: int = field(default_factory=_default_api_port)
    header_timeout: float = 10.0  # TLS handshake + request line and headers, seconds
    body_timeout: float = 60.0  # a request's body, from its headers, seconds
    events_page_bytes: int = 1024 * 1024  # message bytes per page of /messages/events


@dataclass(frozen=True, slots=True, kw_only=True)
class AmqpConfig:
    """The AMQP 1.0 listener for back ends (docs: "Back ends over AMQP"): the built-in
    endpoint as an Event Hub and service-side C2D. ``port`` takes TLS (IoT Hub and Event Hubs
    use 5671); AMQP over WebSocket is served on the HTTPS port at ``/$servicebus/websocket``.
    ``event_hub_name`` is the Event Hubs-compatible name (``""``: the first label of the hub's
    host name). ``consumer_groups`` lists groups besides ``$Default``, which always exists.
    ``auth_timeout``: seconds a connection may stay without a valid ``$cbs`` token."""

    enabled: bool = True
    bind: str = "0.0.0.0"
    port: int = 5671
    event_hub_name: str = ""
    consumer_groups: tuple[str, ...] = ()
    auth_timeout: float = 60.0
    idle_timeout: float = 240.0  # AMQP idle-time-out we announce (Event Hubs: 240 s)
    max_connections: int = 100
    max_links: int = 64  # per connection
    max_frame_size: int = 65536
    outbox_bytes: int = 4 * 1024 * 1024  # encoded bytes waiting for the socket, per connection


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreConfig:
    """The durable message store. ``sync = "full"`` fsyncs every group commit (survives power
    loss); ``"normal"`` survives a killed process but may lose the last commits on power loss.
    ``overflow`` is the policy at ``max_bytes``: ``drop-oldest`` evicts the oldest messages
    (counted as dropped), ``reject-new`` refuses new telemetry (the publisher is disconnected
    without an acknowledgement, so it keeps the message)."""

    sync: Literal["full", "normal"] = "full"
    retention_days: float = 7.0
    max_bytes: int = 1 << 30
    overflow: Literal["drop-oldest", "reject-new"] = "drop-oldest"


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    """What all clients together may hold. Connections count over every listener (MQTT,
    HTTPS and MQTT over WebSocket); ``max_connections`` is lowered at start to what the
    process's file descriptor limit allows. ``pending_bytes_total``: inbound message bytes
    read but not yet committed, over all connections (reading pauses at the bound)."""

    max_connections: int = 16384
    max_connections_per_address: int = 1024
    pending_bytes_total: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    """The link to a parent hub (``[upstream]``; README "Connect to a parent hub"). The
    identity is a device connection string, or an X.509 certificate and key with ``hub`` and
    ``device``; ``gateway upstream set`` overrides this section at run time (persisted in
    ``DATA_DIR/upstream.json``). The queue policy keys are the default route's
    (``FROM /messages/* INTO $upstream``)."""

    connection_string: str = ""
    x509_cert: str = ""
    x509_key: str = ""
    hub: str = ""  # the parent's HostName (X.509)
    device: str = ""  # our device id at the parent (X.509)
    ca_file: str = ""  # the parent's CA; "" = the system's trust store
    host: str = ""  # where to dial; "" = GatewayHostName, else HostName
    port: int = 8883
    mode: Literal["gateway", "identity"] = "gateway"  # identity: one connection per origin (Azure)
    max_inflight: int = 16  # QoS 1 window per connection (IoT Hub's Receive Maximum)
    gateway_inflight: int = 1024  # the window of the one on-behalf-of connection to our own parent
    keepalive: int = 60
    ack_timeout: float = 30.0  # no PUBACK for this long: the link is dead, reconnect
    token_ttl: int = 3600  # SAS tokens, renewed at 80 % of their life (reconnect between windows)
    reconnect_min: float = 1.0  # jittered exponential backoff
    reconnect_max: float = 60.0
    # the parent's daily quota used up (403002): wait for 00:00 UTC, trying once every this many s
    paused_probe: float = 3600.0
    connect_rate: float = 100.0  # identity mode: new connections per second (S1: 100/s)
    policy_name: str = ""  # identity mode: a DeviceConnect policy of the parent, instead of
    policy_key: str = ""  # ... each device's own key from our registry
    idle_close: float = 3600.0  # identity mode: close a connection idle this long
    status_interval: float = 30.0  # seconds between status reports to the parent's twin
    ttl: float = 0.0  # seconds; 0 = keep until sent (monotonic age, see README)
    max_bytes: int = 0  # byte cap of the route's backlog; 0 = only the store's cap
    when_full: Literal["reject-new", "drop-oldest", "thin"] = "drop-oldest"
    thin_interval: float = 60.0  # "thin": keep one message per origin per this many seconds
    disk_high_water: float = 0.95  # fraction of the data directory's disk: full above it
    priority: int = 0  # 0 (highest) .. 9, served by weighted fairness
    bandwidth: int = 0  # bytes/s over the link for the route; 0 = unlimited
    # towards a parent of ours: backlog readings of one origin packed into messages <= 4 KB
    pack: bool = False
    # the default route's live-first lane: after an outage, new messages go ahead of the backlog
    live_first: bool = False
    federation_refresh: float = 300.0  # seconds between full refreshes from the parent


@dataclass(frozen=True, slots=True, kw_only=True)
class ProvisioningConfig:
    """The hub's Device Provisioning Service for the devices below it (``gateway enrollment``).
    ``assigned_hub``: the host name provisioned devices are told to connect to (default: the
    hub's ``host_name``; set it when devices reach the hub by another name)."""

    enabled: bool = True
    assigned_hub: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class FilesConfig:
    """File upload from devices (IoT Hub ref §11). Files live under ``DATA_DIR/files`` and
    count against ``store.max_bytes`` with the message log. ``blob_host``: the host (and
    port) devices are told to upload to, default the hub's host name and HTTPS port."""

    enabled: bool = True
    container: str = "fileupload"
    blob_host: str = ""
    sas_ttl_seconds: int = 3600  # IoT Hub's default; 1 h
    max_file_bytes: int = 256 << 20
    device_quota_bytes: int = 1 << 30
    max_concurrent_uploads: int = 10  # per device, as IoT Hub
    notification_ttl_seconds: int = 3600
    notification_lock_seconds: int = 60
    notification_max_deliveries: int = 100
    # forwarding upstream (gateway/files/forward.py), when an upstream is set
    forward: bool = True  # stored files go up to the parent
    forward_port: int = 443  # the parent's HTTPS port (its file-upload API)
    forward_block_bytes: int = 4 << 20  # Put Block size towards the parent
    forward_bandwidth: int = 0  # bytes/s for files on the link; 0 = [upstream] bandwidth
    forward_priority: int = 9  # 0..9: files yield to upstream routes of this class or higher
    after_forward: Literal["keep", "delete"] = "keep"  # a forwarded file's bytes at the edge


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleSpec:
    """A southbound bridge the hub runs as one of its modules (``[modules.NAME]``)."""

    name: str  # the module id
    bridge: Literal["modbus", "serial", "ble"]
    enabled: bool = True
    status_interval: float = 30.0  # seconds between reported-status updates (when changed)


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingConfig:
    """``[routing]``: the fallback route sends device messages that match no route to the
    built-in endpoint ``events`` (IoT Hub's default)."""

    fallback: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    data_dir: Path
    hub: HubConfig = field(default_factory=HubConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    provisioning: ProvisioningConfig = field(default_factory=ProvisioningConfig)
    files: FilesConfig = field(default_factory=FilesConfig)
    amqp: AmqpConfig = field(default_factory=AmqpConfig)
    routes: tuple[tuple[str, Any], ...] = ()  # (name, "FROM ..." or a route table), file order
    modules: tuple[ModuleSpec, ...] = ()
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    endpoints: tuple[tuple[str, dict[str, Any]], ...] = ()  # [endpoints.NAME], checked on load
    enrichments: tuple[tuple[str, dict[str, Any]], ...] = ()  # [enrichments.KEY]
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)


_SECTIONS = {"hub": HubConfig, "mqtt": MqttConfig, "api": ApiConfig, "store": StoreConfig,
             "limits": LimitsConfig, "routing": RoutingConfig, "upstream": UpstreamConfig,
             "provisioning": ProvisioningConfig, "files": FilesConfig, "amqp": AmqpConfig}


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin = getattr(hint, "__origin__", None)
    if origin is Literal:
        if value not in get_args(hint):
            choices = ", ".join(repr(a) for a in get_args(hint))
            raise ConfigError(f"must be one of {choices}, not {value!r}", path=path)
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError("must be a list of strings", path=path)
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, not {value!r}", path=path)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"must be an integer, not {value!r}", path=path)
        if value < 0:
            raise ConfigError("must not be negative", path=path)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"must be a number, not {value!r}", path=path)
        if value < 0:
            raise ConfigError("must not be negative", path=path)
        return float(value)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"must be a non-empty string, not {value!r}", path=path)
        return value
    raise ConfigError(f"unsupported type {hint!r}", path=path)  # pragma: no cover


def _section(cls: type, raw: Any, name: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError("must be a table", path=name)
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown key (known: {', '.join(sorted(known))})", path=f"{name}.{key}")
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
    return cls(**kwargs)


def _routes(raw: Any) -> tuple[tuple[str, Any], ...]:
    """``[routes]`` maps route names to routes in edgeHub's syntax (IoT Hub ref §6.2) or to
    tables of the route model (``source``, ``condition``, ``endpoint``, ...)."""
    from gateway.errors import InvalidRequestError
    from gateway.routing.model import parse_route

    if not isinstance(raw, dict):
        raise ConfigError("must be a table of name = \"FROM ... INTO ...\"", path="routes")
    out = []
    for name, doc in raw.items():
        try:
            parse_route(name, doc)
        except InvalidRequestError as exc:
            raise ConfigError(str(exc), path=f"routes.{name}") from None
        out.append((name, doc))
    return tuple(out)


def _named_tables(raw: Any, section: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """``[endpoints.NAME]`` / ``[enrichments.KEY]``: checked when the routing state is built
    (:func:`gateway.routingsvc.config_state`)."""
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ConfigError(f"must be [{section}.NAME] tables", path=section)
    return tuple((name, dict(doc)) for name, doc in raw.items())


def load_config(data_dir: Path, file: Path | None = None, **overrides: Any) -> Config:
    """Build the config from ``file`` (or ``data_dir/gateway.toml`` if it exists).
    ``overrides`` maps section names to ready objects (used by tests and ``gateway demo``)."""
    path = file if file is not None else data_dir / "gateway.toml"
    raw: dict[str, Any] = {}
    if file is not None or path.exists():
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "routes":
            sections["routes"] = _routes(value)
            continue
        if name in ("endpoints", "enrichments"):
            sections[name] = _named_tables(value, name)
            continue
        if name == "modules":
            if not isinstance(value, dict):
                raise ConfigError("must be a table of [modules.NAME] tables", path="modules")
            specs = []
            for module_name, body in value.items():
                if not isinstance(body, dict):
                    raise ConfigError("must be a table", path=f"modules.{module_name}")
                spec = _section(ModuleSpec, {"name": module_name, **body}, f"modules.{module_name}")
                specs.append(spec)
            sections["modules"] = tuple(specs)
            continue
        if name not in _SECTIONS:
            raise ConfigError(f"unknown section (known: {', '.join(_SECTIONS)}, routes, "
                              "endpoints, enrichments, modules)", path=name)
        sections[name] = _section(_SECTIONS[name], value, name)
    sections.update(overrides)
    config = Config(data_dir=data_dir, **sections)
    from gateway.routingsvc import config_state

    config_state(config)  # refuse bad endpoints, enrichments, limits and references now
    return config
