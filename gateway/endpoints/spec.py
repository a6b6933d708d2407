"""Custom endpoint definitions: one JSON shape for the REST API, ``gateway.toml`` and a parent's
push, parsed into frozen specs. Pure apart from checking that named files can be read.

The shape (camelCase keys, as IoT Hub's REST API spells them; ``type`` picks the kind)::

    {"type": "mqtt", "url": "mqtt://HOST:PORT" | "mqtts://HOST:PORT", "topic": "TEMPLATE",
     "qos": 0 | 1, "envelope": "body" | "json", "caFile": "/abs/ca.pem",
     "username": "U", "passwordFile": "/abs/secret", "clientId": "ID"}
    {"type": "http", "url": "http(s)://...", "headers": {"K": "V"}, "caFile": "/abs/ca.pem",
     "batch": N, "timeoutSecs": S}
    {"type": "file", "path": "/abs/dir", "format": "jsonl" | "avro",
     "rollSeconds": S, "rollBytes": B}

Only ``type`` and the kind's address (``url`` + ``topic``, ``url``, ``path``) are required;
every default is in the dataclasses below. Endpoint names follow IoT Hub (1-64 of
``A-Z a-z 0-9 . _ -``; ``events`` and ``fileNotifications`` are reserved). File paths must be
absolute (the CLI resolves the user's relative paths before sending them). A topic template
may use ``{deviceId}`` and ``{moduleId}`` (the empty string for device messages) and no MQTT
wildcard. Errors are :class:`~gateway.errors.InvalidRequestError` with one line naming the
endpoint and the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias
from urllib.parse import urlsplit, urlunsplit

from gateway.errors import InvalidRequestError

__all__ = [
    "EndpointSpec",
    "FileEndpointSpec",
    "HttpEndpointSpec",
    "MqttEndpointSpec",
    "REDACTED",
    "endpoint_json",
    "parse_endpoint",
    "parse_header",
]

REDACTED: Final = "***"
MAX_BATCH: Final = 500
MAX_TOPIC_BYTES: Final = 65535
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_RESERVED = frozenset({"events", "filenotifications", "$default"})
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_TOPIC_FIELDS = frozenset({"deviceId", "moduleId"})
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_FORBIDDEN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_SECRET_HEADER = re.compile(r"auth|key|token|secret|password|cookie|signature", re.IGNORECASE)


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttEndpointSpec:
    """An external MQTT broker (MQTT 3.1.1 on the hub's own codec). ``envelope="body"`` publishes the
    raw body with the properties as an IoT Hub property bag appended as the topic's last
    level; ``"json"`` publishes the JSON envelope. QoS 1 moves the cursor on PUBACK."""

    name: str
    url: str
    topic: str
    qos: Literal[0, 1] = 1
    envelope: Literal["body", "json"] = "body"
    ca_file: str | None = None
    username: str | None = None
    password_file: str | None = None
    client_id: str | None = None  # default: "{hub name}-{endpoint name}"
    max_inflight: int = 16  # QoS 1 PUBLISHes awaiting PUBACK

    @property
    def type(self) -> Literal["mqtt"]:
        return "mqtt"

    @property
    def tls(self) -> bool:
        return self.url.startswith("mqtts://")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpEndpointSpec:
    """POST of the JSON envelope (one object, or an array of up to ``batch``). 2xx delivered,
    408/429/5xx retried, other 4xx dead-lettered."""

    name: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    ca_file: str | None = None
    batch: int = 1
    timeout_secs: float = 30.0

    @property
    def type(self) -> Literal["http"]:
        return "http"


@dataclass(frozen=True, slots=True, kw_only=True)
class FileEndpointSpec:
    """Files under ``path`` named like Azure Storage's ``{hub}/{YYYY}/{MM}/{DD}/{HH}/{mm}``;
    a file rolls after ``roll_seconds`` or ``roll_bytes``; fsynced before its messages count
    as delivered."""

    name: str
    path: str
    format: Literal["jsonl", "avro"] = "jsonl"
    roll_seconds: float = 300.0  # Azure Storage's default batch frequency
    roll_bytes: int = 100 * 1024 * 1024

    @property
    def type(self) -> Literal["file"]:
        return "file"


EndpointSpec: TypeAlias = MqttEndpointSpec | HttpEndpointSpec | FileEndpointSpec

_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "mqtt": frozenset({"type", "name", "url", "topic", "qos", "envelope", "caFile", "username",
                       "passwordFile", "clientId", "maxInflight"}),
    "http": frozenset({"type", "name", "url", "headers", "caFile", "batch", "timeoutSecs"}),
    "file": frozenset({"type", "name", "path", "format", "rollSeconds", "rollBytes"}),
}


class _Doc:
    """Typed access to one endpoint document, every error prefixed with the endpoint name."""

    def __init__(self, name: str, doc: Mapping[str, Any]) -> None:
        self.name = name
        self.doc = doc

    def fail(self, key: str, message: str) -> InvalidRequestError:
        where = f"endpoint {self.name!r}" + (f": {key}" if key else "")
        return InvalidRequestError(f"{where} {message}")

    def string(self, key: str, *, required: bool = False) -> str | None:
        value = self.doc.get(key)
        if value is None:
            if required:
                raise self.fail(key, "is required")
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"must be a non-empty string, not {value!r}")
        if any(c in value for c in "\r\n\0"):
            raise self.fail(key, "must not contain line breaks or NUL")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.doc.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, not {value!r}")
        if not low <= value <= high:
            raise self.fail(key, f"must be between {low} and {high}, not {value}")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.doc.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"must be a number, not {value!r}")
        if not low <= value <= high:
            raise self.fail(key, f"must be between {low:g} and {high:g}, not {value}")
        return float(value)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.doc.get(key, default)
        if value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, not {value!r}")
        return str(value)

    def readable_file(self, key: str) -> str | None:
        path = self.absolute(key)
        if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise self.fail(key, f"{path} is not a readable file")
        return path

    def absolute(self, key: str, *, required: bool = False) -> str | None:
        path = self.string(key, required=required)
        if path is not None and not os.path.isabs(path):
            raise self.fail(key, f"must be an absolute path, not {path!r}")
        return path


def parse_endpoint(name: str, doc: Mapping[str, Any]) -> EndpointSpec:
    """The spec of endpoint ``name`` from its JSON document (shape in the module docstring).
    Raises InvalidRequestError with one line naming the endpoint and the offending key."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise InvalidRequestError(
            f"endpoint name {name!r} must be 1-64 letters, digits, '.', '_' or '-'"
        )
    if name.lower() in _RESERVED:
        raise InvalidRequestError(f"endpoint name {name!r} is reserved")
    if not isinstance(doc, Mapping):
        raise InvalidRequestError(f"endpoint {name!r} must be a JSON object")
    d = _Doc(name, doc)
    kind = doc.get("type")
    if not isinstance(kind, str) or kind not in _KEYS:
        raise d.fail("type", f"must be one of mqtt, http, file, not {kind!r}")
    unknown = sorted(set(doc) - _KEYS[kind])
    if unknown:
        raise d.fail(unknown[0], f"is not a setting of {kind} endpoints"
                     f" (known: {', '.join(sorted(_KEYS[kind] - {'name', 'type'}))})")
    if doc.get("name", name) != name:
        raise d.fail("name", f"{doc.get('name')!r} does not match the endpoint name")
    if kind == "mqtt":
        return _mqtt(d)
    if kind == "http":
        return _http(d)
    return _file(d)


def _mqtt(d: _Doc) -> MqttEndpointSpec:
    url = d.string("url", required=True)
    assert url is not None
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise d.fail("url", f"must be mqtt://HOST:PORT or mqtts://HOST:PORT, not {url!r}")
    if parts.username is not None or parts.password is not None:
        raise d.fail("url", "must not carry credentials (use username and passwordFile)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise d.fail("url", f"must be mqtt://HOST:PORT or mqtts://HOST:PORT, not {url!r}")
    try:
        parts.port
    except ValueError:
        raise d.fail("url", f"has a bad port: {url!r}") from None
    topic = d.string("topic", required=True)
    assert topic is not None
    _check_topic(d, topic)
    qos = d.integer("qos", 1, 0, 1)
    envelope = d.choice("envelope", "body", ("body", "json"))
    ca_file = d.readable_file("caFile")
    if ca_file is not None and parts.scheme != "mqtts":
        raise d.fail("caFile", "needs an mqtts:// url")
    username = d.string("username")
    password_file = d.readable_file("passwordFile")
    if password_file is not None and username is None:
        raise d.fail("passwordFile", "needs a username")
    client_id = d.string("clientId")
    if client_id is not None and len(client_id.encode("utf-8")) > 65535:
        raise d.fail("clientId", "is too long")
    return MqttEndpointSpec(
        name=d.name,
        url=urlunsplit((parts.scheme, parts.netloc, "", "", "")),
        topic=topic,
        qos=1 if qos else 0,
        envelope="json" if envelope == "json" else "body",
        ca_file=ca_file,
        username=username,
        password_file=password_file,
        client_id=client_id,
        max_inflight=d.integer("maxInflight", 16, 1, 1000),
    )


def _check_topic(d: _Doc, topic: str) -> None:
    if "+" in topic or "#" in topic:
        raise d.fail("topic", f"must not contain MQTT wildcards: {topic!r}")
    if topic.startswith("$"):
        raise d.fail("topic", f"must not start with '$': {topic!r}")
    for field in _PLACEHOLDER.findall(topic):
        if field not in _TOPIC_FIELDS:
            raise d.fail("topic", f"has an unknown placeholder {{{field}}}"
                         " (known: {deviceId}, {moduleId})")
    if "{" in _PLACEHOLDER.sub("", topic) or "}" in _PLACEHOLDER.sub("", topic):
        raise d.fail("topic", f"has an unbalanced brace: {topic!r}")
    if len(topic.encode("utf-8")) > MAX_TOPIC_BYTES // 2:
        raise d.fail("topic", "is too long")


def parse_header(text: str) -> tuple[str, str]:
    """``'K: V'`` (the CLI's ``--header``) -> ``("K", "V")``; InvalidRequestError if malformed."""
    key, sep, value = text.partition(":")
    key, value = key.strip(), value.strip()
    if not sep or _HEADER_NAME.fullmatch(key) is None or any(c in value for c in "\r\n\0"):
        raise InvalidRequestError(f"header {text!r} must be 'Name: value'")
    return key, value


def _http(d: _Doc) -> HttpEndpointSpec:
    url = d.string("url", required=True)
    assert url is not None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise d.fail("url", f"must be an http:// or https:// URL, not {url!r}")
    try:
        parts.port
    except ValueError:
        raise d.fail("url", f"has a bad port: {url!r}") from None
    raw = d.doc.get("headers", {})
    if not isinstance(raw, Mapping):
        raise d.fail("headers", "must be an object of name: value")
    headers: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, value in raw.items():
        if not isinstance(key, str) or _HEADER_NAME.fullmatch(key) is None:
            raise d.fail("headers", f"has a bad header name {key!r}")
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise d.fail("headers", f"{key}: the value must be a string on one line")
        if key.lower() in _FORBIDDEN_HEADERS:
            raise d.fail("headers", f"{key} is set by the gateway")
        if key.lower() in seen:
            raise d.fail("headers", f"{key} is given twice")
        seen.add(key.lower())
        headers.append((key, value))
    ca_file = d.readable_file("caFile")
    if ca_file is not None and parts.scheme != "https":
        raise d.fail("caFile", "needs an https:// url")
    return HttpEndpointSpec(
        name=d.name,
        url=url,
        headers=tuple(headers),
        ca_file=ca_file,
        batch=d.integer("batch", 1, 1, MAX_BATCH),
        timeout_secs=d.number("timeoutSecs", 30.0, 1.0, 600.0),
    )


def _file(d: _Doc) -> FileEndpointSpec:
    path = d.absolute("path", required=True)
    assert path is not None
    if os.path.exists(path) and not os.path.isdir(path):
        raise d.fail("path", f"{path} exists and is not a directory")
    fmt = d.choice("format", "jsonl", ("jsonl", "avro"))
    return FileEndpointSpec(
        name=d.name,
        path=os.path.normpath(path),
        format="avro" if fmt == "avro" else "jsonl",
        roll_seconds=d.number("rollSeconds", 300.0, 1.0, 86400.0),
        roll_bytes=d.integer("rollBytes", 100 * 1024 * 1024, 1, 1 << 40),
    )


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{REDACTED}@{host}"))


def endpoint_json(spec: EndpointSpec, *, secrets: bool = False) -> dict[str, Any]:
    """The JSON document of ``spec`` (the inverse of :func:`parse_endpoint`: parsing the result
    with ``secrets=True`` gives an equal spec). Unless ``secrets``, values of headers whose
    names look like credentials and a password in a URL are shown as ``***``."""
    out: dict[str, Any] = {"name": spec.name, "type": spec.type}
    if isinstance(spec, MqttEndpointSpec):
        out.update(url=spec.url, topic=spec.topic, qos=spec.qos, envelope=spec.envelope)
        for key, value in (("caFile", spec.ca_file), ("username", spec.username),
                           ("passwordFile", spec.password_file), ("clientId", spec.client_id)):
            if value is not None:
                out[key] = value
        out["maxInflight"] = spec.max_inflight
    elif isinstance(spec, HttpEndpointSpec):
        out["url"] = spec.url if secrets else _redact_url(spec.url)
        out["headers"] = {
            key: value if secrets or _SECRET_HEADER.search(key) is None else REDACTED
            for key, value in spec.headers
        }
        if spec.ca_file is not None:
            out["caFile"] = spec.ca_file
        out.update(batch=spec.batch, timeoutSecs=spec.timeout_secs)
    else:
        out.update(path=spec.path, format=spec.format, rollSeconds=spec.roll_seconds,
                   rollBytes=spec.roll_bytes)
    return out
