"""The compiled route table: which routes a message matches, which endpoint gets what, and the
enrichments stamped on the way (IoT Hub ref §6.2, §10.1, §10.4). Pure.

:meth:`Router.route` runs on the hub's publish path before the store append (DESIGN step 4);
the names it returns are stored with the message, and every endpoint reader selects from the
log by them (:meth:`Router.select`). Semantics as IoT Hub: a message goes to the endpoint of
every matching route; ``events`` gets what a route sends it, plus, while the fallback route is
enabled, device messages that match no route (stored as :data:`FALLBACK`); with no routes at
all everything goes to ``events``.

Cost: conditions that read only properties and identities give the same answer for every
message with the same stored properties (one topic of one connection), so their outcome is
cached per properties text; conditions that read the twin besides, and the parts of the others
that do, are decided with it until the twin changes (the twin look-up gives a new object for
every change, as the hub's twin store does); only what reads the body or the enqueued time runs
per message, all of one property set in one generated function
(:func:`gateway.routing.compiler.compile_split`: the body decoded at most once, no view
object), which gives the set's shared tuple for the routes matched (:class:`_Outcomes`, each
carrying the text the log stores), so a message costs one dict look-up, one call and the
conditions themselves, and builds nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from gateway.routing.compiler import (
    NOT_LOOKED_UP,
    Compiled,
    compile_source,
    compile_split,
    fold_properties,
    split_source,
    table_source,
)
from gateway.routing.message import MessageView, TwinLookup, body_codec, system_key
from gateway.routing.model import (
    EVENTS,
    FALLBACK,
    SOURCES,
    TWIN_VALUE,
    RouteSpec,
    RoutingState,
    compile_route,
    parse_module_input,
)
from gateway.routing.names import RouteNames
from gateway.routing.query import UNDEFINED, Binary, Call, Node, SysProp, Unary, clauses, unparse
from gateway.routing.semantics import describe, evaluate, walk

TELEMETRY: Final = "telemetry"
TWIN_CHANGE: Final = "twinChange"
ALL_KINDS: Final = frozenset(SOURCES.values())
FALLBACK_ONLY: Final = RouteNames((FALLBACK,))
NOWHERE: Final[tuple[str, ...]] = RouteNames()
CACHE_LIMIT: Final = 4096
_NO_TWIN: Final[Any] = NOT_LOOKED_UP


class TwinChanges(Protocol):
    """Counts the changes of the twins a :data:`TwinLookup` gives (the hub's twin store)."""

    @property
    def changes(self) -> int: ...


class Routed(Protocol):
    """A stored message as readers see it (:class:`gateway.store.log.Entry`)."""

    @property
    def routes(self) -> tuple[str, ...]: ...
    @property
    def device_id(self) -> str: ...
    @property
    def module_id(self) -> str | None: ...


def message_source(module_id: str | None, output_name: str | None) -> str:
    """The edgeHub source path of a telemetry message (ref §6.2 table)."""
    if module_id is None:
        return "/messages"
    if output_name:
        return f"/messages/modules/{module_id}/outputs/{output_name}"
    return f"/messages/modules/{module_id}"


def source_path(kind: str, module_id: str | None, system: Mapping[str, str]) -> str | None:
    if kind == TELEMETRY:
        return message_source(module_id, system.get("output-name"))
    if kind == TWIN_CHANGE:
        return "/twinChangeNotifications"
    return None


Table = Callable[..., list[str]]


@dataclass(frozen=True, slots=True)
class _Route:
    index: int
    spec: RouteSpec
    compiled: Compiled
    kinds: frozenset[str]
    prefix: str | None  # edgeHub source: lower-case path prefix ending in "/"
    static: bool  # the condition reads only properties and ids
    twin_only: bool  # ... and the twin

    def source_matches(self, kind: str, path: str | None) -> bool:
        if kind not in self.kinds:
            return False
        return self.prefix is None or (path is not None and (path.lower() + "/").startswith(self.prefix))


def _compile(index: int, spec: RouteSpec) -> _Route:
    compiled = compile_route(spec)
    if spec.source.startswith("/"):
        prefix = spec.source.rstrip("*").rstrip("/").lower() + "/"
        kinds = frozenset({TELEMETRY, TWIN_CHANGE})
    else:
        prefix = None
        kinds = frozenset({SOURCES[spec.source]})
    return _Route(index, spec, compiled, kinds, prefix, compiled.deps <= {"props"},
                  "twin" in compiled.deps and compiled.deps <= {"props", "twin"})


def _slow_table(routes: list[_Route]) -> Table:
    def table(system: Mapping[str, str], application: Mapping[str, str | None], body: bytes,
              device_id: str, module_id: str | None, enqueued_ms: int,
              twins: TwinLookup | None, twin: Any = _NO_TWIN) -> list[str]:
        if twin is not _NO_TWIN:
            twins = _fixed(twin)
        view = MessageView(system, application, body, device_id=device_id, module_id=module_id,
                           enqueued_ms=enqueued_ms, twins=twins)
        return [r.spec.name for r in routes if r.compiled.predicate(view)]
    return table


def _reads_system(node: Node, name: str) -> bool:
    """Whether ``node`` reads the stored system property ``name`` (``$messageId``, ...)."""
    if isinstance(node, SysProp):
        return system_key(node.name) == name
    if isinstance(node, Unary):
        return _reads_system(node.operand, name)
    if isinstance(node, Binary):
        return _reads_system(node.left, name) or _reads_system(node.right, name)
    if isinstance(node, Call):
        return any(_reads_system(a, name) for a in node.args)
    return False


def _fixed(twin: Any) -> TwinLookup:
    return lambda device_id, module_id: twin  # noqa: ARG005


class _Outcomes(dict[int, tuple[str, ...]]):
    """A property set's answers by mask (:func:`gateway.routing.compiler.compile_split`): the
    names it matches whatever the message, then those of the mask's bits; the fallback's
    answer for none. Filled on first use (one tuple per distinct outcome, shared by every
    message with it), so a message builds nothing."""

    __slots__ = ("empty", "names", "static")

    def __init__(self, static: tuple[str, ...], names: tuple[str, ...],
                 empty: tuple[str, ...]) -> None:
        super().__init__()
        self.static = static
        self.names = names
        self.empty = empty

    def __missing__(self, mask: int) -> tuple[str, ...]:
        names = self.static + tuple(n for i, n in enumerate(self.names) if mask >> i & 1)
        out = RouteNames(names) if names else self.empty
        if len(self) < CACHE_LIMIT:
            self[mask] = out
        return out


class _Split:
    """What routing one property set takes: the routes it matches whatever the message
    (``names``), the routes that also read the twin (``twin_table``, with the last twin seen and
    their outcome for it) and those to run per message (``table``).

    A split kept for a property set (``fast``) has all of that compiled into ``run`` (None:
    nothing left to run per message, the answer is ``outcome``) and ``facts_of``, which gives
    ``facts`` for the twin last looked up (:func:`gateway.routing.compiler.compile_split`)."""

    __slots__ = ("facts", "facts_of", "fast", "names", "outcome", "outcomes", "reads_twin", "run",
                 "seen", "table", "twin", "twin_names", "twin_table")

    def __init__(self, names: tuple[str, ...], twin_table: Table | None,
                 table: Table | None, reads_twin: bool) -> None:
        self.names = names
        self.twin_table = twin_table
        self.table = table
        self.reads_twin = reads_twin  # some route left reads the twin: the router looks it up
        self.twin: Any = _NO_TWIN  # the twin last looked up, twin_names are for it
        self.twin_names: tuple[str, ...] = ()
        self.seen = -1  # the twin store's change count when twin was looked up
        self.fast = False
        self.run: Callable[..., tuple[str, ...]] | None = None
        self.facts_of: Callable[[Any], int] | None = None
        self.facts = 0
        self.outcomes: _Outcomes | None = None
        self.outcome: tuple[str, ...] = names


def _new_twin(split: _Split, twin: Any) -> None:
    """A fast split's facts for another twin object (see :class:`_Split`)."""
    assert split.facts_of is not None and split.outcomes is not None
    split.facts = split.facts_of(twin)
    if split.run is None:
        split.outcome = split.outcomes[split.facts]
    split.twin = twin


class Router:
    """One immutable, compiled routing state. Build a new one to change routing."""

    def __init__(self, state: RoutingState | None = None, *, hub_name: str = "",
                 twins: TwinLookup | None = None, twin_changes: TwinChanges | None = None) -> None:
        """``twins`` gives a new object whenever a twin changes (never mutates one);
        ``twin_changes``, when given, counts those changes, so that while it stands still a
        property set's twin need not be looked up again."""
        self.state = state or RoutingState()
        self.hub_name = hub_name
        self.twins = twins
        self.twin_changes = twin_changes
        routes = [_compile(i, r) for i, r in enumerate(self.state.routes)]
        self._routes = routes
        enabled = [r for r in routes if r.spec.enabled]
        self._by_kind = {kind: [r for r in enabled if kind in r.kinds] for kind in ALL_KINDS}
        self.empty = not routes
        self.fallback = self.state.fallback
        self.trivial = self.empty  # everything goes to events (or nowhere): no evaluation
        self.default = FALLBACK_ONLY if self.fallback else NOWHERE  # what route() gives then
        # whether a condition reads $messageId: if not, messages whose properties differ only
        # by it route alike, and the caller may give them one key (a stamped topic's template)
        self.reads_message_id = any(_reads_system(r.compiled.tree, "message-id") for r in routes)
        self._cache: dict[str, _Split] = {}
        self._tables: dict[tuple[str, str], Table] = {}  # by source
        self._splits: dict[tuple[str, str], tuple[Callable[..., Any], Callable[[Any], int]]] = {}
        self._general: dict[tuple[tuple[int, ...], str | None], Table] = {}  # unfolded
        self._endpoint_routes: dict[str, frozenset[str]] = {}
        for r in routes:
            self._endpoint_routes[r.spec.endpoint] = self._endpoint_routes.get(
                r.spec.endpoint, frozenset()) | {r.spec.name}
        self._endpoint_routes[EVENTS] = self._endpoint_routes.get(EVENTS, frozenset()) | {FALLBACK}
        self._enrich: dict[str, list[tuple[str, str, tuple[str, ...] | None, str | None]]] = {}
        for e in self.state.enrichments:
            twin = TWIN_VALUE.match(e.value)
            section = path = None
            if twin:
                section = {"tags": "tags", "properties.desired": "desired",
                           "properties.reported": "reported"}[twin.group(1)]
                path = tuple(twin.group(2)[1:].split("."))
            for endpoint in e.endpoints:
                self._enrich.setdefault(endpoint, []).append((e.key, e.value, path, section))

    # -- the publish path ----------------------------------------------------------------------

    def route(self, kind: str, system: Mapping[str, str], application: Mapping[str, str | None],
              body: bytes, device_id: str, module_id: str | None, enqueued_ms: int,
              key: str | None = None) -> tuple[str, ...]:
        """The names of the routes a message matches (``($fallback,)`` when it goes to
        ``events`` by the fallback route). ``key`` is the stored properties text when the
        caller has it: property-only conditions are cached by it, and everything else is
        compiled for it into one function (the hub's path: a dict look-up and one call)."""
        if key is not None:
            hit = self._cache.get(key)
            if hit is not None and hit.fast:
                if hit.reads_twin:
                    clock = self.twin_changes
                    if clock is None:  # nothing counts the changes: look it up every time
                        twins = self.twins
                        now = twins(device_id, module_id) if twins is not None else None
                        if now is not hit.twin:
                            _new_twin(hit, now)
                    elif clock.changes != hit.seen:
                        self._look_up_twin(hit, device_id, module_id)
                run = hit.run
                if run is None:
                    return hit.outcome
                return run(body, enqueued_ms, hit.twin, hit.facts, hit.outcomes)
        if self.empty:
            return self.default
        names: tuple[str, ...] = ()
        if self._by_kind.get(kind):
            hit = self._cache.get(key) if key is not None else None
            if hit is None:
                hit = self._split(kind, system, application, device_id, module_id,
                                  key is not None)
                if key is not None:
                    if len(self._cache) >= CACHE_LIMIT:
                        self._cache.clear()
                    self._cache[key] = hit
                    if hit.fast:
                        return self.route(kind, system, application, body, device_id,
                                          module_id, enqueued_ms, key)
            names = hit.names
            twin: Any = _NO_TWIN
            if hit.reads_twin:
                clock = self.twin_changes
                if clock is not None and clock.changes == hit.seen:
                    twin = hit.twin  # no twin changed since this one was looked up
                else:
                    twin = self.twins(device_id, module_id) if self.twins is not None else None
                    if hit.twin_table is not None and twin is not hit.twin:
                        hit.twin_names = tuple(hit.twin_table(
                            system, application, b"", device_id, module_id, 0, None, twin))
                    if key is not None:  # a split kept in the cache: remember for next time
                        hit.twin = twin
                        if clock is not None:
                            hit.seen = clock.changes
                if hit.twin_names:
                    names = names + hit.twin_names
            if hit.table is not None:
                more = hit.table(system, application, body, device_id, module_id, enqueued_ms,
                                 self.twins, twin)
                if more:
                    names = names + tuple(more)
        if not names and kind == TELEMETRY and self.fallback:
            return FALLBACK_ONLY
        return names

    def takes(self, kind: str) -> bool:
        """Whether an enabled route takes messages of ``kind`` (a non-telemetry event nobody
        routes need not be built: with no routes at all only device messages reach
        ``events``, by the fallback route, as IoT Hub)."""
        return bool(self._by_kind.get(kind))

    def _split(self, kind: str, system: Mapping[str, str], application: Mapping[str, str | None],
               device_id: str, module_id: str | None, kept: bool) -> _Split:
        """The static routes matched, and the compiled tables of the routes left to evaluate
        per twin and per message, for one property set; ``kept``: the split is cached for
        the messages of this property set (so worth compiling with the properties folded
        in), else it serves one message (an event) and takes the general tables."""
        path = source_path(kind, module_id, system)
        view = MessageView(system, application, b"", device_id=device_id, module_id=module_id,
                           enqueued_ms=0)
        matched: list[str] = []
        twin_only: list[int] = []
        dynamic: list[int] = []
        for r in self._by_kind[kind]:
            if not r.source_matches(kind, path):
                continue
            if r.twin_only:
                twin_only.append(r.index)
            elif not r.static:
                dynamic.append(r.index)
            elif r.compiled.predicate(view):
                matched.append(r.spec.name)
        codec = body_codec(system)
        reads_twin = bool(twin_only) or any("twin" in self._routes[i].compiled.deps
                                            for i in dynamic)
        if kept:
            split = self._fast_split(kind, tuple(matched), twin_only, dynamic, codec, view)
            if split is not None:
                split.reads_twin = reads_twin
                return split
        props = view if kept else None
        return _Split(tuple(matched),
                      self._table(twin_only, None, props) if twin_only else None,
                      self._table(dynamic, codec, props) if dynamic else None, reads_twin)

    def _fast_split(self, kind: str, matched: tuple[str, ...], twin_only: list[int],
                    dynamic: list[int], codec: str | None, view: MessageView) -> _Split | None:
        """A kept split compiled whole (see :class:`_Split`); None past CPython's limits."""
        empty = FALLBACK_ONLY if kind == TELEMETRY and self.fallback else NOWHERE
        names = tuple(self._routes[i].spec.name for i in twin_only + dynamic)
        outcomes = _Outcomes(matched, names, empty)
        split = _Split(matched, None, None, False)
        split.fast, split.outcomes = True, outcomes
        if not twin_only and not dynamic:
            split.outcome = outcomes[0]
            return split
        try:
            twin_trees = [fold_properties(self._routes[i].compiled.tree, view) for i in twin_only]
            trees = [fold_properties(self._routes[i].compiled.tree, view) for i in dynamic]
            source, consts = split_source(twin_trees, trees, codec)
            pair = _compiled(self._splits, source, consts, compile_split)
        except (SyntaxError, RecursionError, MemoryError, ValueError):  # past CPython's limits
            return None
        run, facts_of = pair
        split.run = run if dynamic else None
        split.facts_of = facts_of
        split.outcome = outcomes[0]
        return split

    def _look_up_twin(self, split: _Split, device_id: str, module_id: str | None) -> None:
        """A fast split's twin looked up again (a twin changed since), and what its conditions
        read of it recomputed if it is another object."""
        twin = self.twins(device_id, module_id) if self.twins is not None else None
        if twin is not split.twin:
            _new_twin(split, twin)
        clock = self.twin_changes
        if clock is not None:
            split.seen = clock.changes

    def _table(self, indexes: list[int], codec: str | None, view: MessageView | None) -> Table:
        """The conditions of ``indexes`` for messages with ``view``'s properties (folded in:
        what reads only them is a constant here; None: any properties) and a body with
        ``codec``; one compiled function per distinct source."""
        routes = [self._routes[i] for i in indexes]
        general = (tuple(indexes), codec)
        if view is None and general in self._general:
            return self._general[general]
        try:
            trees = [r.compiled.tree if view is None else fold_properties(r.compiled.tree, view)
                     for r in routes]
            source, consts = table_source(trees, [r.spec.name for r in routes], codec)
            table = _compiled(self._tables, source, consts, compile_source)
        except (SyntaxError, RecursionError, MemoryError):  # past CPython's nesting limits
            table = _slow_table(routes)
        if view is None:
            self._general[general] = table
        return table

    # -- readers -------------------------------------------------------------------------------

    def endpoint_routes(self, endpoint: str) -> frozenset[str]:
        """The stored route names that send messages to ``endpoint``."""
        return self._endpoint_routes.get(endpoint, frozenset())

    def select(self, endpoint: str) -> Callable[[Routed], bool]:
        """A predicate on stored messages: did it go to ``endpoint``?"""
        names = self.endpoint_routes(endpoint)
        if not names:
            return lambda entry: False
        if len(names) == 1:
            (only,) = names
            return lambda entry: only in entry.routes
        return lambda entry: not names.isdisjoint(entry.routes)

    def targets_module(self, module_id: str) -> bool:
        return any(m == module_id for m, _ in self.state.module_inputs())

    def module_inputs(self, routes: Iterable[str], module_id: str) -> list[str]:
        """The input names of ``module_id`` a message with these stored routes goes to."""
        out: list[str] = []
        for name in routes:
            spec = self.state.route(name)
            target = parse_module_input(spec.endpoint) if spec is not None else None
            if target is not None and target[0] == module_id and target[1] not in out:
                out.append(target[1])
        return out

    def enrich(self, endpoint: str, entry: Routed) -> dict[str, str]:
        """The enrichment properties for a message on its way to ``endpoint``: a twin path
        that does not exist stamps its own text, as IoT Hub does."""
        items = self._enrich.get(endpoint)
        if not items:
            return {}
        out: dict[str, str] = {}
        twin: Any = None
        looked = False
        for key, value, path, section in items:
            if value == "$iothubname":
                out[key] = self.hub_name
            elif path is not None and section is not None:
                if not looked:
                    twin = self.twins(entry.device_id, entry.module_id) if self.twins else None
                    looked = True
                found = walk(getattr(twin, section), path) if twin is not None else UNDEFINED
                if found is UNDEFINED:
                    out[key] = value
                else:
                    out[key] = found if isinstance(found, str) else json.dumps(found)
            else:
                out[key] = value
        return out

    # -- explaining ----------------------------------------------------------------------------

    def test(self, kind: str, view: MessageView) -> dict[str, Any]:
        """Every route with whether it matched and, if not, why (the first false or
        undefined clause); and whether the message would reach ``events`` by the fallback."""
        path = source_path(kind, view.module_id, view.system)
        results: list[dict[str, Any]] = []
        for r in self._routes:
            row: dict[str, Any] = {"name": r.spec.name, "endpoint": r.spec.endpoint}
            if not r.spec.enabled:
                row.update(matched=False, reason="the route is disabled")
            elif not r.source_matches(kind, path):
                row.update(matched=False, reason=f"source {r.spec.source} does not match "
                           f"{path or kind}")
            else:
                row["matched"] = r.compiled.predicate(view)
                if not row["matched"]:
                    row["reason"] = _first_failing(r.compiled, view)
            results.append(row)
        routed = self.route(kind, view.system, view.application, view.body, view.device_id,
                            view.module_id, view.enqueued_ms)
        return {"routes": results, "fallback": routed == FALLBACK_ONLY,
                "endpoints": sorted({r.spec.endpoint for r in self._routes
                                     if r.spec.name in routed} | ({EVENTS} if routed == FALLBACK_ONLY else set()))}


def _first_failing(compiled: Compiled, view: MessageView) -> str:
    for clause in clauses(compiled.tree):
        value = evaluate(clause, view)
        if value is not True:
            return f"{unparse(clause)} was {describe(value)}"
    return "the condition was not true"  # pragma: no cover - the predicate said so


_T = TypeVar("_T")


def _compiled(cache: dict[tuple[str, str], _T], source: str, consts: dict[str, Any],
              build: Callable[[str, dict[str, Any]], _T]) -> _T:
    """``build(source, consts)`` once per distinct source and constants; the cache is
    emptied when it holds :data:`CACHE_LIMIT` of them."""
    key = (source, repr(sorted((k, type(v).__name__, repr(v)) for k, v in consts.items())))
    found = cache.get(key)
    if found is None:
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        found = cache[key] = build(source, consts)
    return found
