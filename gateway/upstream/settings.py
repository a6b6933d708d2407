"""Who we are at the parent and where it is: the upstream link's settings.

Pure apart from :func:`load` / :func:`save`. Two ways to say it (README "Connect to a parent
hub"): a device connection string (``HostName``, ``DeviceId``, ``SharedAccessKey``, optional
``GatewayHostName``), or an X.509 certificate and key with the parent's host name and our device
id. The address dialled defaults to ``GatewayHostName``, else ``HostName`` (IoT Hub ref §14.1);
``host``/``port`` override it. ``gateway upstream set`` stores them in ``DATA_DIR/upstream.json``
(mode 0600: it holds a key), which wins over ``[upstream]`` in ``gateway.toml``; ``clear``
stores ``{}`` (no upstream, whatever the file says).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from gateway.config import UpstreamConfig
from gateway.errors import ConfigError
from gateway.hub.connstr import parse_connection_string
from gateway.hub.registry import validate_id

FILE = "upstream.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkSettings:
    hub: str  # the parent's HostName: the SAS audience and the username's host
    device_id: str
    shared_access_key: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    host: str = ""  # dialled
    port: int = 8883

    def __post_init__(self) -> None:
        if not self.hub:
            raise ConfigError("the parent's host name is missing", path="upstream.hub")
        try:
            validate_id(self.device_id)
        except Exception as exc:
            raise ConfigError(str(exc), path="upstream.device") from None
        if (self.shared_access_key is None) == (self.cert_file is None):
            raise ConfigError("give a connection string with SharedAccessKey, or --x509 CERT KEY",
                              path="upstream")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("an X.509 identity needs both the certificate and the key",
                              path="upstream")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} out of range", path="upstream.port")

    @property
    def auth(self) -> str:
        return "sas" if self.shared_access_key else "x509"

    def redacted(self) -> dict[str, Any]:
        """What ``gateway upstream show`` prints: everything but the key."""
        out = asdict(self)
        out["shared_access_key"] = "<hidden>" if self.shared_access_key else None
        out["auth"] = self.auth
        return out


def from_connection_string(text: str, *, ca_file: str | None = None, host: str | None = None,
                           port: int | None = None) -> LinkSettings:
    cs = parse_connection_string(text)
    if cs.device_id is None or cs.module_id is not None or cs.shared_access_key is None:
        raise ConfigError("needs a device connection string with SharedAccessKey (not a module's"
                          " or a policy's)", path="upstream.connection_string")
    return LinkSettings(hub=cs.host_name, device_id=cs.device_id,
                        shared_access_key=cs.shared_access_key, ca_file=ca_file or None,
                        host=host or cs.gateway_host_name or cs.host_name, port=port or 8883)


def from_x509(cert: str, key: str, *, hub: str, device: str, ca_file: str | None = None,
              host: str | None = None, port: int | None = None) -> LinkSettings:
    for path in (cert, key):
        if not Path(path).is_file():
            raise ConfigError(f"no such file: {path}", path="upstream.x509")
    return LinkSettings(hub=hub, device_id=device, cert_file=str(Path(cert).resolve()),
                        key_file=str(Path(key).resolve()), ca_file=ca_file or None,
                        host=host or hub, port=port or 8883)


def from_config(cfg: UpstreamConfig) -> LinkSettings | None:
    """``[upstream]`` of gateway.toml, or None when it names no parent."""
    if cfg.connection_string:
        return from_connection_string(cfg.connection_string, ca_file=cfg.ca_file or None,
                                      host=cfg.host or None, port=cfg.port)
    if cfg.x509_cert or cfg.x509_key:
        return from_x509(cfg.x509_cert, cfg.x509_key, hub=cfg.hub, device=cfg.device,
                         ca_file=cfg.ca_file or None, host=cfg.host or None, port=cfg.port)
    return None


def from_json(data: dict[str, Any]) -> LinkSettings | None:
    if not data:
        return None
    known = {"hub", "device_id", "shared_access_key", "cert_file", "key_file", "ca_file",
             "host", "port"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown keys {sorted(unknown)}", path=FILE)
    try:
        return LinkSettings(**data)
    except TypeError as exc:
        raise ConfigError(str(exc), path=FILE) from None


def load(data_dir: Path, cfg: UpstreamConfig) -> LinkSettings | None:
    """The settings in force: ``upstream.json`` if present, else ``[upstream]``."""
    path = data_dir / FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return from_config(cfg)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("must be a JSON object", path=str(path))
    return from_json(data)


def save(data_dir: Path, settings: LinkSettings | None) -> None:
    """Persist (atomically, mode 0600); None records "no upstream"."""
    path = data_dir / FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(asdict(settings) if settings is not None else {}, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def from_request(body: dict[str, Any]) -> LinkSettings:
    """The body of ``PUT /upstream`` (what ``gateway upstream set`` sends)."""
    port = body.get("port")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool)):
        raise ConfigError("port must be an integer", path="upstream.port")
    ca_file, host = body.get("caFile"), body.get("host")
    for name, value in (("caFile", ca_file), ("host", host)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string", path="upstream")
    if body.get("connectionString"):
        return from_connection_string(str(body["connectionString"]), ca_file=ca_file, host=host,
                                      port=port)
    x509 = body.get("x509")
    if isinstance(x509, dict):
        return from_x509(str(x509.get("cert", "")), str(x509.get("key", "")),
                         hub=str(body.get("hub") or ""), device=str(body.get("device") or ""),
                         ca_file=ca_file, host=host, port=port)
    raise ConfigError("give connectionString, or x509 with hub and device", path="upstream")


def with_defaults(settings: LinkSettings) -> LinkSettings:
    return replace(settings, host=settings.host or settings.hub)
