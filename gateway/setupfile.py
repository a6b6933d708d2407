"""``gateway-setup.toml``: the zero-touch setup file on the boot partition (pure).

A technician edits one small file on the FAT boot partition before the first boot::

    hostname = "gw-plant-7"

    [hub]                                  # optional: more names/addresses devices dial
    aliases = ["gw-plant-7.local"]
    addresses = ["10.0.4.7"]

    [upstream]                             # optional: the parent hub (IoT Hub or a gateway)
    connection_string = "HostName=...;DeviceId=gw-plant-7;SharedAccessKey=..."
    # or, a DPS-style symmetric-key group enrollment (the key is derived on the device):
    # host = "plant-hub.example.net"
    # id_scope = "0ne00AB12CD"
    # group_key = "base64 enrollment group key"
    # registration_id = "gw-plant-7"       # default: the host name
    # port = 8883
    # ca_pem = "-----BEGIN CERTIFICATE-----..."  # the parent's CA, if not a public one

    [admin]
    password_hash = "$scrypt$ln=15,r=8,p=1$<salt>$<hash>"   # see admin_hash(); never a password

    [time]
    servers = ["ntp.plant.example", "10.0.4.1"]

    [ssh]                                  # SSH stays off unless this names a key
    authorized_keys = ["ssh-ed25519 AAAA... technician"]

:func:`parse` validates it (unknown keys are errors, with their path); :func:`redacted` is the
copy kept once the secrets are gone; :func:`gateway_toml` renders what goes into the hub's
``gateway.toml``. The shell that applies it all is :mod:`gateway.firstboot`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import tomllib
from dataclasses import dataclass
from typing import Any

from gateway.errors import ConfigError
from gateway.hub.connstr import ConnectionString, parse_connection_string

FILE_NAME = "gateway-setup.toml"
REDACTED = "<removed after setup>"
_HOSTNAME = re.compile(r"^(?=.{1,63}$)[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?$")
_REGISTRATION_ID = re.compile(r"^[a-z0-9._:-]{1,128}$", re.IGNORECASE)  # DPS ref §12
_SSH_KEY = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|"
                      r"sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com) "
                      r"[A-Za-z0-9+/]+={0,3}( [^\r\n]*)?$")
_SCRYPT = re.compile(r"^\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+={0,2})"
                     r"\$([A-Za-z0-9+/]+={0,2})$")
_SECRET_KEYS = {("upstream", "connection_string"), ("upstream", "group_key"),
                ("admin", "password_hash")}
_KNOWN: dict[str, set[str]] = {
    "": {"hostname", "hub", "upstream", "admin", "time", "ssh"},
    "hub": {"aliases", "addresses"},
    "upstream": {"connection_string", "host", "port", "id_scope", "group_key",
                 "registration_id", "ca_pem"},
    "admin": {"password_hash"},
    "time": {"servers"},
    "ssh": {"authorized_keys"},
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """What the ``[upstream]`` section of gateway.toml gets (keys: connection_string,
    ca_file, host, port); ``ca_pem`` is written to a file first, whose path goes in ca_file."""

    connection_string: str
    host: str = ""
    port: int = 0
    ca_pem: str = ""
    id_scope: str = ""  # kept for provisioning.json when the key was derived from a group key
    registration_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Setup:
    hostname: str
    aliases: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    upstream: Upstream | None = None
    admin_password_hash: str = ""
    time_servers: tuple[str, ...] = ()
    ssh_keys: tuple[str, ...] = ()


def derive_device_key(group_key: str, registration_id: str) -> str:
    """A device's key in a symmetric-key enrollment group, as DPS derives it: base64 of
    HMAC-SHA256 over the registration id, keyed with the base64-decoded group key (ref §12)."""
    try:
        key = base64.b64decode(group_key, validate=True)
    except binascii.Error:
        raise ConfigError("must be base64", path="upstream.group_key") from None
    if not key:
        raise ConfigError("must not be empty", path="upstream.group_key")
    digest = hmac.new(key, registration_id.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def admin_hash(password: str, *, ln: int = 15, salt: bytes | None = None) -> str:
    """The admin password as stored: ``$scrypt$ln=N,r=8,p=1$salt$hash`` (PHC-style, base64).
    ``ln`` is log2 of scrypt's N (15: 32 MiB of memory, about 0.1 s)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=1 << ln, r=8, p=1,
                            maxmem=1 << 27, dklen=32)
    b64 = base64.b64encode
    return f"$scrypt$ln={ln},r=8,p=1${b64(salt).decode()}${b64(digest).decode()}"


def verify_admin(password: str, stored: str) -> bool:
    """Check ``password`` against an :func:`admin_hash` string, in constant time."""
    m = _SCRYPT.match(stored)
    if m is None:
        return False
    ln, r, p = (int(m.group(i)) for i in (1, 2, 3))
    if not (10 <= ln <= 20 and 1 <= r <= 16 and 1 <= p <= 4):
        return False
    salt, want = base64.b64decode(m.group(4)), base64.b64decode(m.group(5))
    got = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=1 << ln, r=r, p=p,
                         maxmem=1 << 28, dklen=len(want))
    return hmac.compare_digest(got, want)


def _check_keys(raw: dict[str, Any], section: str) -> None:
    known = _KNOWN[section]
    for key in raw:
        if key not in known:
            where = f"{section}.{key}" if section else key
            raise ConfigError(f"unknown key (known: {', '.join(sorted(known))})", path=where)


def _table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError("must be a table", path=name)
    _check_keys(value, name)
    return value


def _str(table: dict[str, Any], key: str, path: str, default: str = "") -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or (key in table and not value.strip()):
        raise ConfigError(f"must be a non-empty string, not {value!r}", path=path)
    return value.strip()


def _strings(table: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError("must be a list of non-empty strings", path=path)
    return tuple(v.strip() for v in value)


def _upstream(table: dict[str, Any], hostname: str) -> Upstream | None:
    if not table:
        return None
    host = _str(table, "host", "upstream.host")
    port = table.get("port", 0)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"must be a port number, not {port!r}", path="upstream.port")
    ca_pem = _str(table, "ca_pem", "upstream.ca_pem")
    if ca_pem and "-----BEGIN CERTIFICATE-----" not in ca_pem:
        raise ConfigError("must be a PEM certificate", path="upstream.ca_pem")
    enrollment = {k for k in ("id_scope", "group_key", "registration_id") if k in table}
    if "connection_string" in table:
        if enrollment:
            raise ConfigError("give either connection_string or id_scope and group_key, "
                              "not both", path="upstream")
        text = _str(table, "connection_string", "upstream.connection_string")
        try:
            cs = parse_connection_string(text)
        except (ConfigError, ValueError) as exc:
            reason = str(exc).removeprefix("connection_string: ")
            raise ConfigError(f"not a connection string: {reason}",
                              path="upstream.connection_string") from None
        if not cs.device_id or not cs.shared_access_key:
            raise ConfigError("must name a DeviceId and its SharedAccessKey",
                              path="upstream.connection_string")
        return Upstream(connection_string=text, host=host, port=port, ca_pem=ca_pem)
    if not {"id_scope", "group_key"} <= enrollment:
        raise ConfigError("needs connection_string, or id_scope and group_key", path="upstream")
    scope = _str(table, "id_scope", "upstream.id_scope")
    registration_id = _str(table, "registration_id", "upstream.registration_id",
                           default=hostname)
    if not _REGISTRATION_ID.match(registration_id):
        raise ConfigError("must be 1-128 of letters, digits and . _ : -",
                          path="upstream.registration_id")
    if not host:
        raise ConfigError("the assigned hub is needed with a group enrollment (this image "
                          "does not run a DPS registration itself)", path="upstream.host")
    key = derive_device_key(_str(table, "group_key", "upstream.group_key"), registration_id)
    cs = ConnectionString(host_name=host, device_id=registration_id, shared_access_key=key)
    return Upstream(connection_string=str(cs), host=host, port=port, ca_pem=ca_pem,
                    id_scope=scope, registration_id=registration_id)


def parse(text: str) -> Setup:
    """Validate a setup file. Errors name the key (``upstream.group_key: must be base64``)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{FILE_NAME}: {exc}") from None
    _check_keys(raw, "")
    hostname = _str(raw, "hostname", "hostname")
    if not hostname:
        raise ConfigError("is required (the gateway's host name)", path="hostname")
    if not _HOSTNAME.match(hostname):
        raise ConfigError("must be 1-63 letters, digits and inner hyphens", path="hostname")
    hub = _table(raw, "hub")
    admin = _table(raw, "admin")
    password_hash = _str(admin, "password_hash", "admin.password_hash")
    if password_hash and not _SCRYPT.match(password_hash):
        raise ConfigError("must be a $scrypt$ln=..,r=..,p=..$salt$hash string (see the "
                          "README: never the password itself)", path="admin.password_hash")
    ssh_keys = _strings(_table(raw, "ssh"), "authorized_keys", "ssh.authorized_keys")
    for i, key in enumerate(ssh_keys):
        if not _SSH_KEY.match(key):
            raise ConfigError("must be an OpenSSH public key line (ssh-ed25519 AAAA...)",
                              path=f"ssh.authorized_keys[{i}]")
    return Setup(
        hostname=hostname,
        aliases=_strings(hub, "aliases", "hub.aliases"),
        addresses=_strings(hub, "addresses", "hub.addresses"),
        upstream=_upstream(_table(raw, "upstream"), hostname),
        admin_password_hash=password_hash,
        time_servers=_strings(_table(raw, "time"), "servers", "time.servers"),
        ssh_keys=ssh_keys,
    )


def redacted(text: str) -> str:
    """The setup file with every secret replaced (what stays on the FAT partition)."""
    out, section = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        header = re.match(r"^\[\s*([A-Za-z0-9_.-]+)\s*\]", stripped)
        if header:
            section = header.group(1)
        key = re.match(r"^([A-Za-z0-9_-]+)\s*=", stripped)
        if key and (section, key.group(1)) in _SECRET_KEYS:
            line = f'{key.group(1)} = "{REDACTED}"'
        out.append(line)
    result = "\n".join(out) + "\n"
    # Secrets written another way (multi-line strings, inline tables, dotted or quoted keys)
    # survive line-wise redaction: then keep no copy at all.
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        raw = {}
    try:
        copy = tomllib.loads(result)
    except tomllib.TOMLDecodeError:
        copy = {}
    values = [raw[s].get(k) for s, k in _SECRET_KEYS if isinstance(raw.get(s), dict)]
    leaked = [v for v in values if isinstance(v, str) and v.strip() and v.strip() in result]
    kept = [(s, k) for s, k in _SECRET_KEYS if k in raw.get(s, {})
            and copy.get(s, {}).get(k) != REDACTED]
    if leaked or kept or not raw:
        return f"# {FILE_NAME} applied; no copy kept (its secrets were not on lines of their own)\n"
    return result


def toml_value(value: str | int | tuple[str, ...]) -> str:
    """A TOML literal for the few value types gateway.toml sections need."""
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def gateway_toml(setup: Setup, *, ca_file: str = "", api_port: int = 443) -> str:
    """The ``gateway.toml`` the appliance's hub starts with (hub identity, API port, upstream)."""
    lines = ["# Written by gateway-firstboot from gateway-setup.toml.", "[hub]",
             f"host_name = {toml_value(setup.hostname)}"]
    if setup.aliases:
        lines.append(f"aliases = {toml_value(setup.aliases)}")
    if setup.addresses:
        lines.append(f"addresses = {toml_value(setup.addresses)}")
    lines += ["", "[api]", f"port = {api_port}"]
    up = setup.upstream
    if up is not None:
        lines += ["", "[upstream]", f"connection_string = {toml_value(up.connection_string)}"]
        if ca_file:
            lines.append(f"ca_file = {toml_value(ca_file)}")
        if up.host:
            lines.append(f"host = {toml_value(up.host)}")
        if up.port:
            lines.append(f"port = {up.port}")
    return "\n".join(lines) + "\n"
