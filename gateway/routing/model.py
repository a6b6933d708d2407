"""The routing model: routes, enrichments, the fallback route, and their limits (IoT Hub ref
§6.2, §10.1, §10.4). Pure.

One route model serves both dialects:

* IoT Hub's: ``{"name", "source": "DeviceMessages" | "TwinChangeEvents" |
  "DeviceLifecycleEvents" | "DeviceConnectionStateEvents", "condition", "endpointNames":
  [one endpoint], "isEnabled"}``;
* edgeHub's: ``"FROM /messages/modules/m/outputs/o WHERE cond INTO sink"`` (a string, or
  ``{"route": ..., "priority", "timeToLiveSecs"}``), whose source is a path (ref §6.2);
  ours adds ``liveFirst`` (store-and-forward's live-first lane, :mod:`gateway.upstream.backlog`).

Either way a route has one endpoint: ``events`` (the built-in endpoint), ``$upstream``,
a module input ``BrokeredEndpoint("/modules/m/inputs/i")`` or a custom endpoint's name.
``priority`` (0-9, 0 highest), ``timeToLiveSecs`` and ``liveFirst`` are kept for the forwarder.
Everything is validated as a whole (:func:`check_state`): what is refused is refused before
anything changes.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from gateway.errors import InvalidRequestError
from gateway.routing import compiler
from gateway.routing.query import QueryError, parse

EVENTS: Final = "events"
UPSTREAM: Final = "$upstream"
FALLBACK: Final = "$fallback"
"""The stored route name of a message that reached ``events`` by the fallback route (or
because no route exists at all)."""

MAX_ROUTES: Final = 100
MAX_ENDPOINTS: Final = 10
MAX_ENRICHMENTS: Final = 10
MAX_CONDITION: Final = 1024

SOURCES: Final[Mapping[str, str]] = {
    "DeviceMessages": "telemetry",
    "TwinChangeEvents": "twinChange",
    "DeviceLifecycleEvents": "deviceLifecycle",
    "DeviceConnectionStateEvents": "connectionState",
    "FileUploadNotifications": "fileNotification",  # ours: IoT Hub has no route source for them
}
"""IoT Hub route source -> the stored message kind."""
_SOURCE_NAMES = {name.lower(): name for name in SOURCES}

_ROUTE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENDPOINT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ENRICH_KEY = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PATH_ITEM = re.compile(r"[^/\s*]+")
_TEXT = re.compile(
    r"""^\s*(?:SELECT\s+\*\s+)?FROM\s+(?P<source>\S+)
        (?:\s+WHERE\s+(?P<condition>.+?))?
        \s+INTO\s+(?P<sink>.+?)\s*$""",
    re.IGNORECASE | re.VERBOSE | re.DOTALL,
)
_BROKERED = re.compile(r"""^BrokeredEndpoint\s*\(\s*(["'])(?P<path>[^"']*)\1\s*\)$""", re.IGNORECASE)


def module_input_endpoint(module_id: str, input_name: str) -> str:
    """The endpoint name of a module input: ``BrokeredEndpoint("/modules/m/inputs/i")``."""
    return f'BrokeredEndpoint("/modules/{module_id}/inputs/{input_name}")'


def parse_module_input(endpoint: str) -> tuple[str, str] | None:
    """(module, input) of a ``BrokeredEndpoint(...)`` endpoint, or None for other names."""
    m = _BROKERED.match(endpoint.strip())
    if m is None:
        return None
    parts = m.group("path").strip("/").split("/")
    if len(parts) != 4 or parts[0] != "modules" or parts[2] != "inputs" \
            or not all(_PATH_ITEM.fullmatch(p) for p in (parts[1], parts[3])):
        raise InvalidRequestError(
            f'a module input is BrokeredEndpoint("/modules/{{module}}/inputs/{{input}}"), not {endpoint}')
    return parts[1], parts[3]


def normalize_endpoint(endpoint: str) -> str:
    text = endpoint.strip()
    if text.lower() == UPSTREAM:
        return UPSTREAM
    target = parse_module_input(text)
    if target is not None:
        return module_input_endpoint(*target)
    if not _ENDPOINT_NAME.fullmatch(text):
        raise InvalidRequestError(
            f"endpoint {endpoint!r}: expected events, $upstream, "
            'BrokeredEndpoint("/modules/m/inputs/i") or an endpoint name')
    return EVENTS if text.lower() == EVENTS else text


def normalize_source(source: str) -> str:
    """An IoT Hub source name (any case) or an edgeHub path, checked."""
    text = source.strip()
    canonical = _SOURCE_NAMES.get(text.lower())
    if canonical is not None:
        return canonical
    if not text.startswith("/"):
        raise InvalidRequestError(
            f"source {source!r}: expected {', '.join(SOURCES)} or a path such as /messages/*")
    items = [i for i in text.strip("/").split("/") if i]
    for i, item in enumerate(items):
        if item == "*" and i == len(items) - 1:
            continue
        if not _PATH_ITEM.fullmatch(item):
            raise InvalidRequestError(f"source {source!r}: bad path item {item!r}")
    return "/" + "/".join(items)


@dataclass(frozen=True, slots=True)
class RouteSpec:
    name: str
    source: str  # a SOURCES name or an edgeHub path
    endpoint: str
    condition: str = "true"
    enabled: bool = True
    priority: int | None = None  # 0-9, 0 highest; None: the lowest
    ttl: int | None = None  # timeToLiveSecs; None: the store-and-forward default
    live_first: bool | None = None  # liveFirst; None: the store-and-forward default

    @property
    def text(self) -> str:
        """The route in edgeHub's string form."""
        where = f" WHERE {self.condition}" if self.condition.strip().lower() != "true" else ""
        return f"FROM {self.source}{where} INTO {self.endpoint}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "condition": self.condition,
                "endpointNames": [self.endpoint], "isEnabled": self.enabled,
                "priority": self.priority, "timeToLiveSecs": self.ttl,
                "liveFirst": self.live_first, "route": self.text}


ROUTE_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "description": "A route: IoT Hub's object, or edgeHub's {\"route\": \"FROM ... INTO ...\"}",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "source": {"type": "string", "description": "DeviceMessages, ... or an edgeHub path"},
        "condition": {"type": "string", "maxLength": MAX_CONDITION},
        "endpointNames": {"type": "array", "items": {"type": "string"},
                          "minItems": 1, "maxItems": 1},
        "isEnabled": {"type": "boolean"},
        "route": {"type": "string", "description": "FROM source [WHERE condition] INTO endpoint"},
        "priority": {"type": "integer", "minimum": 0, "maximum": 9, "nullable": True,
                     "description": "store-and-forward: 0 highest"},
        "timeToLiveSecs": {"type": "integer", "minimum": 0, "nullable": True,
                           "description": "store-and-forward: running age before a drop"},
        "liveFirst": {"type": "boolean", "nullable": True,
                      "description": "store-and-forward: after an outage, new messages go up "
                                     "ahead of the backlog (the live-first lane)"},
    },
}
"""The JSON shape of a route (the OpenAPI document's ``Route``)."""


def _fail(name: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"route {name!r}: {message}")


def check_condition(name: str, condition: str) -> str:
    if not isinstance(condition, str):
        raise _fail(name, "condition must be a string")
    if len(condition) > MAX_CONDITION:
        raise _fail(name, f"condition is longer than {MAX_CONDITION} characters")
    text = condition.strip() or "true"
    try:
        parse(text)
    except QueryError as exc:
        raise _fail(name, f"condition: {exc}") from None
    return text


def parse_route_text(name: str, text: str) -> RouteSpec:
    """edgeHub's ``[SELECT *] FROM source [WHERE condition] INTO sink``."""
    m = _TEXT.match(text)
    if m is None:
        raise _fail(name, f"expected FROM <source> [WHERE <condition>] INTO <endpoint>, not {text!r}")
    try:
        source = normalize_source(m.group("source"))
        endpoint = normalize_endpoint(m.group("sink"))
    except InvalidRequestError as exc:
        raise _fail(name, str(exc)) from None
    if m.group("condition") is not None:
        try:
            parse(m.group("condition"))
        except QueryError as exc:
            at = m.start("condition") + exc.position
            raise _fail(name, f"condition: {exc.reason} at column {at + 1} of the route") from None
    condition = check_condition(name, m.group("condition") or "true")
    return RouteSpec(name=name, source=source, endpoint=endpoint, condition=condition)


def _int(name: str, doc: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(name, f"{key} must be an integer from {low} to {high}, not {value!r}")
    return value


def check_route_name(name: str) -> None:
    if not isinstance(name, str) or not _ROUTE_NAME.fullmatch(name):
        raise InvalidRequestError(
            f"route name {name!r} must be 1-64 letters, digits, '_' or '-'")


def parse_route(name: str, doc: str | Mapping[str, Any]) -> RouteSpec:
    """A route from any of its JSON forms (a string, ``{"route": ...}``, IoT Hub's object)."""
    check_route_name(name)
    if isinstance(doc, str):
        return parse_route_text(name, doc)
    if not isinstance(doc, Mapping):
        raise _fail(name, "must be a string FROM ... INTO ... or an object")
    known = {"name", "route", "source", "condition", "endpointNames", "endpoint", "isEnabled",
             "enabled", "priority", "timeToLiveSecs", "liveFirst"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise _fail(name, f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    if doc.get("name", name) != name:
        raise _fail(name, f"the name in the body ({doc.get('name')!r}) differs")
    if doc.get("route") is not None:
        if not isinstance(doc["route"], str):
            raise _fail(name, "route must be a string FROM ... INTO ...")
        if any(k in doc for k in ("source", "condition", "endpointNames", "endpoint")):
            raise _fail(name, "give either route or source/condition/endpointNames, not both")
        spec = parse_route_text(name, doc["route"])
    else:
        source = doc.get("source", "DeviceMessages")
        endpoints = doc.get("endpointNames")
        if endpoints is None and doc.get("endpoint") is not None:
            endpoints = [doc["endpoint"]]
        if not isinstance(endpoints, list) or len(endpoints) != 1 \
                or not isinstance(endpoints[0], str) or not isinstance(source, str):
            raise _fail(name, "needs a source and exactly one endpoint (endpointNames: [NAME])")
        try:
            spec = RouteSpec(name=name, source=normalize_source(source),
                             endpoint=normalize_endpoint(endpoints[0]),
                             condition=check_condition(name, doc.get("condition") or "true"))
        except InvalidRequestError as exc:
            if str(exc).startswith("route "):
                raise
            raise _fail(name, str(exc)) from None
    enabled = doc.get("isEnabled", doc.get("enabled", True))
    if not isinstance(enabled, bool):
        raise _fail(name, f"isEnabled must be true or false, not {enabled!r}")
    live_first = doc.get("liveFirst")
    if live_first is not None and not isinstance(live_first, bool):
        raise _fail(name, f"liveFirst must be true or false, not {live_first!r}")
    return replace(spec, enabled=enabled, priority=_int(name, doc, "priority", 0, 9),
                   ttl=_int(name, doc, "timeToLiveSecs", 0, 2**31 - 1), live_first=live_first)


@dataclass(frozen=True, slots=True)
class EnrichmentSpec:
    """Application property ``key`` = ``value`` on messages to ``endpoints`` (ref §10.4):
    a static string, ``$iothubname``, or a twin path (``$twin.tags.x``,
    ``$twin.properties.desired.x``, ``$twin.properties.reported.x``)."""

    key: str
    value: str
    endpoints: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "value": self.value, "endpointNames": list(self.endpoints)}


TWIN_VALUE = re.compile(r"\$twin\.(tags|properties\.desired|properties\.reported)((?:\.[^.\s]+)+)\Z")


def parse_enrichment(key: str, doc: Mapping[str, Any]) -> EnrichmentSpec:
    if not isinstance(key, str) or not _ENRICH_KEY.fullmatch(key):
        raise InvalidRequestError(f"enrichment key {key!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if not isinstance(doc, Mapping):
        raise InvalidRequestError(f"enrichment {key!r} must be an object")
    unknown = sorted(set(doc) - {"key", "value", "endpointNames"})
    if unknown:
        raise InvalidRequestError(f"enrichment {key!r}: unknown key {unknown[0]!r}")
    if doc.get("key", key) != key:
        raise InvalidRequestError(f"enrichment {key!r}: the key in the body differs")
    value = doc.get("value")
    if not isinstance(value, str) or not value or len(value) > 128:
        raise InvalidRequestError(f"enrichment {key!r}: value must be a string of 1-128 characters")
    if value.startswith("$") and value != "$iothubname" and not TWIN_VALUE.match(value):
        raise InvalidRequestError(
            f"enrichment {key!r}: a $ value must be $iothubname, $twin.tags.*, "
            f"$twin.properties.desired.* or $twin.properties.reported.*, not {value!r}")
    endpoints = doc.get("endpointNames")
    if not isinstance(endpoints, list) or not endpoints or not all(isinstance(e, str) for e in endpoints):
        raise InvalidRequestError(f"enrichment {key!r}: endpointNames must list at least one endpoint")
    names = tuple(dict.fromkeys(normalize_endpoint(e) for e in endpoints))
    return EnrichmentSpec(key=key, value=value, endpoints=names)


@dataclass(frozen=True, slots=True)
class RoutingState:
    """Everything routing knows: routes (in order), custom endpoints (specs, opaque here),
    enrichments, and whether the fallback route is enabled."""

    routes: tuple[RouteSpec, ...] = ()
    endpoints: Mapping[str, Any] = field(default_factory=dict)
    enrichments: tuple[EnrichmentSpec, ...] = ()
    fallback: bool = True

    def route(self, name: str) -> RouteSpec | None:
        return next((r for r in self.routes if r.name == name), None)

    def enrichment(self, key: str) -> EnrichmentSpec | None:
        return next((e for e in self.enrichments if e.key == key), None)

    def module_inputs(self) -> set[tuple[str, str]]:
        return {t for r in self.routes if (t := parse_module_input(r.endpoint)) is not None}


def known_endpoint(state: RoutingState, endpoint: str) -> bool:
    return (endpoint in (EVENTS, UPSTREAM) or endpoint in state.endpoints
            or parse_module_input(endpoint) is not None)


def check_state(state: RoutingState, *, extra_endpoints: Collection[str] = ()) -> None:
    """Refuse a state that breaks a limit or a reference, with one line saying why."""
    if len(state.routes) > MAX_ROUTES:
        raise InvalidRequestError(f"at most {MAX_ROUTES} routes (IoT Hub's limit)")
    if len(state.endpoints) > MAX_ENDPOINTS:
        raise InvalidRequestError(f"at most {MAX_ENDPOINTS} custom endpoints (IoT Hub's limit)")
    if len(state.enrichments) > MAX_ENRICHMENTS:
        raise InvalidRequestError(f"at most {MAX_ENRICHMENTS} enrichments (IoT Hub's limit)")
    seen: set[str] = set()
    for route in state.routes:
        if route.name.lower() in seen:
            raise InvalidRequestError(f"route {route.name!r} exists already")
        seen.add(route.name.lower())
        if not known_endpoint(state, route.endpoint) and route.endpoint not in extra_endpoints:
            raise InvalidRequestError(
                f"route {route.name!r}: endpoint {route.endpoint!r} does not exist "
                f"(create it first: gateway endpoint create {route.endpoint} ...)")
    keys: set[str] = set()
    for enrichment in state.enrichments:
        if enrichment.key in keys:
            raise InvalidRequestError(f"enrichment {enrichment.key!r} exists already")
        keys.add(enrichment.key)
        for endpoint in enrichment.endpoints:
            if not known_endpoint(state, endpoint):
                raise InvalidRequestError(
                    f"enrichment {enrichment.key!r}: endpoint {endpoint!r} does not exist")


def users_of(state: RoutingState, endpoint: str) -> list[str]:
    """What refers to ``endpoint`` (``route r1``, ``enrichment k``)."""
    return ([f"route {r.name}" for r in state.routes if r.endpoint == endpoint]
            + [f"enrichment {e.key}" for e in state.enrichments if endpoint in e.endpoints])


def compile_route(route: RouteSpec) -> compiler.Compiled:
    try:
        return compiler.compile_condition(route.condition)
    except QueryError as exc:  # pragma: no cover - checked when the route was parsed
        raise _fail(route.name, f"condition: {exc}") from None
