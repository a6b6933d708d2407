"""Routes between modules, in edgeHub's route syntax (IoT Hub ref §6.2). Pure.

Grammar (keywords case-insensitive)::

    route  := "FROM" source ["WHERE" condition] "INTO" sink
    source := "/" item ("/" item)*            item := "*" | name
    sink   := "$upstream"
            | "BrokeredEndpoint" "(" quoted-string ")"    -- "/modules/{m}/inputs/{i}"

Source matching follows edgeHub: trailing ``*`` and ``/`` are trimmed from the route's source,
then it is a case-insensitive path-prefix match against the message's source with a ``/``
appended to both. Message sources: ``/messages`` for device telemetry,
``/messages/modules/{m}`` for module telemetry without an output name,
``/messages/modules/{m}/outputs/{o}`` with one, ``/twinChangeNotifications`` for reported
changes.

The ``WHERE`` condition language (ref §10.2-10.3) is not implemented yet: a route with a
condition is refused with a :class:`RouteError` rather than routing everything (the seam is
:attr:`Route.condition`). A ``BrokeredEndpoint`` names a module of the device the message came
from (on an edge device, all modules are its own).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import RouteError

UPSTREAM = "$upstream"

_ROUTE = re.compile(
    r"""^\s*(?:SELECT\s+\*\s+)?FROM\s+(?P<source>/\S*)
        (?:\s+WHERE\s+(?P<condition>.+?))?
        \s+INTO\s+(?P<sink>.+?)\s*$""",
    re.IGNORECASE | re.VERBOSE | re.DOTALL,
)
_BROKERED = re.compile(r"""^BrokeredEndpoint\s*\(\s*(["'])(?P<path>[^"']*)\1\s*\)$""", re.IGNORECASE)
_NAME = re.compile(r"^[^/\s*]+$")


@dataclass(frozen=True, slots=True)
class ModuleInput:
    """A sink: module ``module_id``'s input ``input_name``."""

    module_id: str
    input_name: str


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    source: str  # normalized prefix, lower case, ending in "/"
    sink: ModuleInput | str  # a ModuleInput, or UPSTREAM
    condition: str | None = None

    def matches(self, message_source: str) -> bool:
        return (message_source.lower() + "/").startswith(self.source)


def parse_route(name: str, text: str) -> Route:
    """Parse one route; :class:`RouteError` points at the offending part."""
    if not name or any(c in name for c in ".$# "):
        raise RouteError("a route name must be non-empty without '.', '$', '#' or spaces",
                         route=text, position=0, path=f"routes.{name}")
    m = _ROUTE.match(text)
    if m is None:
        position = text.upper().find("INTO") if "FROM" in text.upper() else 0
        raise RouteError("expected FROM <source> [WHERE <condition>] INTO <sink>", route=text,
                         position=max(position, 0), path=f"routes.{name}")
    if m.group("condition") is not None:
        raise RouteError("WHERE conditions are not supported yet", route=text,
                         position=m.start("condition"), path=f"routes.{name}")
    source = m.group("source")
    items = [i for i in source.strip("/").split("/") if i]
    for item in items:
        if item != "*" and not _NAME.match(item):
            raise RouteError(f"bad source item {item!r}", route=text,
                             position=m.start("source"), path=f"routes.{name}")
    prefix = "/" + "/".join(items)
    prefix = prefix.rstrip("*").rstrip("/").lower() + "/"
    sink_text = m.group("sink").strip()
    sink: ModuleInput | str
    if sink_text.lower() == UPSTREAM:
        sink = UPSTREAM
    else:
        b = _BROKERED.match(sink_text)
        parts = b.group("path").strip("/").split("/") if b else []
        if b is None or len(parts) != 4 or parts[0] != "modules" or parts[2] != "inputs" \
                or not all(_NAME.match(p) for p in (parts[1], parts[3])):
            raise RouteError('the sink must be $upstream or BrokeredEndpoint("/modules/{m}/inputs/{i}")',
                             route=text, position=m.start("sink"), path=f"routes.{name}")
        sink = ModuleInput(parts[1], parts[3])
    return Route(name=name, source=prefix, sink=sink)


def message_source(module_id: str | None, output_name: str | None) -> str:
    """The route source path of a telemetry message (ref §6.2 table)."""
    if module_id is None:
        return "/messages"
    if output_name:
        return f"/messages/modules/{module_id}/outputs/{output_name}"
    return f"/messages/modules/{module_id}"


class RouteTable:
    """The compiled routes; answers "which module inputs get this message"."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        self._inputs = [r for r in routes if isinstance(r.sink, ModuleInput)]

    @classmethod
    def parse(cls, routes: dict[str, str]) -> RouteTable:
        return cls([parse_route(name, text) for name, text in routes.items()])

    def module_inputs(self, source: str) -> list[ModuleInput]:
        out: list[ModuleInput] = []
        for route in self._inputs:
            if route.matches(source) and route.sink not in out:
                out.append(route.sink)  # type: ignore[arg-type]
        return out

    def targets_module(self, module_id: str) -> bool:
        return any(r.sink.module_id == module_id for r in self._inputs)  # type: ignore[union-attr]
