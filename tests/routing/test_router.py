"""The route model and the compiled router (IoT Hub ref §6.2, §10.1, §10.4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.errors import InvalidRequestError
from gateway.routing.model import (
    FALLBACK,
    RoutingState,
    check_state,
    parse_enrichment,
    parse_route,
    users_of,
)
from gateway.routing.router import Router, message_source

JSON = {"content-type": "application/json", "content-encoding": "utf-8"}


@dataclass
class Twin:
    tags: dict[str, Any] = field(default_factory=dict)
    desired: dict[str, Any] = field(default_factory=dict)
    reported: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stored:
    routes: tuple[str, ...]
    device_id: str = "dev1"
    module_id: str | None = None


def router(routes: dict[str, Any], *, fallback: bool = True, twins: dict[str, Twin] | None = None,
           endpoints: tuple[str, ...] = ("archive",), enrich: dict[str, Any] | None = None) -> Router:
    state = RoutingState(tuple(parse_route(n, d) for n, d in routes.items()),
                         {e: object() for e in endpoints},
                         tuple(parse_enrichment(k, d) for k, d in (enrich or {}).items()), fallback)
    check_state(state)
    table = twins or {}
    return Router(state, hub_name="hub7", twins=lambda d, m: table.get(d))


def route(r: Router, kind: str = "telemetry", *, body: bytes = b"{}", app: dict[str, Any] | None = None,
          module: str | None = None, output: str | None = None, key: str | None = None,
          system: dict[str, str] | None = None) -> tuple[str, ...]:
    sys_ = dict(JSON if system is None else system)
    if output:
        sys_["output-name"] = output
    return r.route(kind, sys_, app or {}, body, "dev1", module, 0, key)


@pytest.mark.parametrize("source,matches,misses", [
    ("/*", ["/messages", "/messages/modules/a/outputs/b"], []),
    ("/messages/*", ["/messages", "/messages/modules/m1"], []),
    ("/messages/modules/*", ["/messages/modules/m1/outputs/o"], ["/messages"]),
    ("/messages/modules/m1/*", ["/messages/modules/m1", "/messages/modules/m1/outputs/x"],
     ["/messages/modules/m10", "/messages/modules/m2"]),
    ("/messages/modules/m1/outputs/o1", ["/messages/modules/m1/outputs/o1",
                                         "/messages/modules/M1/outputs/O1"],
     ["/messages/modules/m1/outputs/o10", "/messages/modules/m1"]),
])
def test_edgehub_source_matching(source: str, matches: list[str], misses: list[str]) -> None:
    r = router({"r": f"FROM {source} INTO events"}, fallback=False)

    def routed(path: str) -> bool:
        parts = path.split("/")
        module = parts[3] if len(parts) > 3 else None
        output = parts[5] if len(parts) > 5 else None
        assert message_source(module, output).lower() == path.lower()
        return route(r, module=module, output=output) == ("r",)

    assert all(routed(m) for m in matches)
    assert not any(routed(m) for m in misses)


def test_sinks_and_forms() -> None:
    r = parse_route("r", 'select * from /messages/modules/a/outputs/o into BrokeredEndpoint("/modules/b/inputs/in1")')
    assert r.endpoint == 'BrokeredEndpoint("/modules/b/inputs/in1")'
    assert parse_route("u", "FROM /messages/* INTO $UPSTREAM").endpoint == "$upstream"
    obj = parse_route("o", {"route": "FROM /messages WHERE a = '1' INTO events", "priority": 0,
                            "timeToLiveSecs": 60})
    assert (obj.condition, obj.priority, obj.ttl, obj.live_first) == ("a = '1'", 0, 60, None)
    live = parse_route("l", {"route": "FROM /messages INTO $upstream", "liveFirst": True})
    assert live.live_first is True and live.to_json()["liveFirst"] is True
    stored = {k: v for k, v in live.to_json().items() if k != "route"}  # as routingsvc keeps it
    assert parse_route("l", stored) == live
    hub = parse_route("h", {"source": "twinchangeevents", "endpointNames": ["archive"],
                            "isEnabled": False})
    assert (hub.source, hub.enabled, hub.condition) == ("TwinChangeEvents", False, "true")


@pytest.mark.parametrize("doc,fragment", [
    ("FROM /messages INTO BrokeredEndpoint(\"/modules/b/outputs/x\")", "module input"),
    ("TO /messages INTO events", "expected FROM"),
    ("FROM /messages WHERE a = INTO events", "column 25 of the route"),
    ({"source": "Nope", "endpointNames": ["events"]}, "source 'Nope'"),
    ({"source": "DeviceMessages", "endpointNames": ["a", "b"]}, "exactly one endpoint"),
    ({"endpointNames": ["events"], "priority": 10}, "priority must be an integer from 0 to 9"),
    ({"endpointNames": ["events"], "bogus": 1}, "unknown key 'bogus'"),
    ({"endpointNames": ["events"], "liveFirst": 1}, "liveFirst must be true or false"),
])
def test_bad_routes(doc: Any, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_route("r", doc)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_bad_names() -> None:
    with pytest.raises(InvalidRequestError):
        parse_route("a b", "FROM /messages INTO events")
    with pytest.raises(InvalidRequestError):
        parse_route("a,b", "FROM /messages INTO events")


def test_limits_and_references() -> None:
    many = RoutingState(tuple(parse_route(f"r{i}", "FROM /messages INTO events") for i in range(101)))
    with pytest.raises(InvalidRequestError, match="at most 100 routes"):
        check_state(many)
    check_state(RoutingState(many.routes[:100]))
    with pytest.raises(InvalidRequestError, match="at most 10 custom endpoints"):
        check_state(RoutingState(endpoints={f"e{i}": object() for i in range(11)}))
    with pytest.raises(InvalidRequestError, match="does not exist"):
        check_state(RoutingState((parse_route("r", "FROM /messages INTO archive"),)))
    with pytest.raises(InvalidRequestError, match="exists already"):
        check_state(RoutingState((parse_route("r", "FROM /messages INTO events"),
                                  parse_route("R", "FROM /messages INTO events"))))
    state = RoutingState((parse_route("r", "FROM /messages INTO archive"),), {"archive": object()},
                         (parse_enrichment("k", {"value": "v", "endpointNames": ["archive"]}),))
    assert users_of(state, "archive") == ["route r", "enrichment k"]


def test_fallback_semantics() -> None:
    # no routes at all: everything goes to events, every kind
    empty = router({})
    assert route(empty) == (FALLBACK,) and route(empty, "twinChange") == (FALLBACK,)
    assert route(router({}, fallback=False)) == ()
    r = router({"hot": {"source": "DeviceMessages", "condition": "$body.t > 30",
                        "endpointNames": ["archive"]},
                "twin": {"source": "TwinChangeEvents", "endpointNames": ["events"]}})
    assert route(r, body=b'{"t": 31}') == ("hot",)  # matched: not in events
    assert route(r, body=b'{"t": 1}') == (FALLBACK,)  # matched nothing: fallback
    assert route(r, "twinChange") == ("twin",)
    assert route(r, "connectionState") == ()  # no route for it, and fallback is for telemetry
    off = router({"hot": "FROM /messages WHERE $body.t > 30 INTO archive"}, fallback=False)
    assert route(off, body=b'{"t": 1}') == ()
    events = r.select("events")
    assert events(Stored((FALLBACK,))) and events(Stored(("twin",))) and not events(Stored(("hot",)))
    assert r.select("archive")(Stored(("hot",))) and not r.select("nothing")(Stored(("hot",)))


def test_property_conditions_are_cached_per_topic_but_others_are_not() -> None:
    twins = {"dev1": Twin(tags={"site": "a"})}
    r = router({"prop": "FROM /messages WHERE alert = 'high' INTO archive",
                "twin": "FROM /messages WHERE $twin.tags.site = 'a' INTO archive",
                "body": "FROM /messages WHERE $body.t > 30 INTO archive"}, twins=twins)
    key = '{"k": 1}'
    assert route(r, app={"alert": "high"}, body=b'{"t": 40}', key=key) == ("prop", "twin", "body")
    twins["dev1"] = Twin(tags={"site": "b"})  # a new twin object, as the twin store makes
    assert route(r, app={"alert": "high"}, body=b'{"t": 1}', key=key) == ("prop",)
    # the cache is keyed by the properties text: the same key means the same properties
    assert route(r, app={"alert": "low"}, body=b'{"t": 1}', key='{"k": 2}') == (FALLBACK,)


def test_twin_conditions_run_once_per_twin_and_the_twin_is_looked_up_once_per_message() -> None:
    twin = Twin(tags={"site": "a"}, desired={"mode": "eco"})
    lookups: list[str] = []
    runs: list[int] = []

    def lookup(device_id: str, module_id: str | None) -> Twin:
        lookups.append(device_id)
        return twin

    state = RoutingState(tuple(parse_route(n, {"condition": c, "endpointNames": ["events"]})
                               for n, c in {"site": "$twin.tags.site = 'a'",
                                            "eco": "$twin.properties.desired.mode = 'eco' "
                                                   "AND $body.t > 30"}.items()))
    r = Router(state, twins=lookup)
    split = None
    for t, want in ((40, ("site", "eco")), (1, ("site",)), (50, ("site", "eco"))):
        got = r.route("telemetry", JSON, {}, b'{"t": %d}' % t, "dev1", None, 0, "k")
        assert got == want
        split = r._cache["k"]
        assert split.twin is twin  # the twin-only outcome is kept with the twin it is for
        runs.append(len(lookups))
    assert runs == [1, 2, 3]  # one look-up per message, shared by both kinds of condition
    assert split is not None
    twin = Twin(tags={"site": "b"}, desired={"mode": "eco"})  # changed: a new object
    assert r.route("telemetry", JSON, {}, b'{"t": 40}', "dev1", None, 0, "k") == ("eco",)

    class Changes:
        changes = 0

    counter = Changes()
    lookups.clear()
    r = Router(state, twins=lookup, twin_changes=counter)
    for _ in range(3):
        assert r.route("telemetry", JSON, {}, b'{"t": 40}', "dev1", None, 0, "k") == ("eco",)
    assert len(lookups) == 1  # no twin changed: the one looked up first still holds
    twin = Twin(tags={"site": "a"}, desired={"mode": "boost"})
    counter.changes += 1
    assert r.route("telemetry", JSON, {}, b'{"t": 40}', "dev1", None, 0, "k") == ("site",)
    assert len(lookups) == 2


def test_disabled_routes_and_module_inputs() -> None:
    r = router({"a": 'FROM /messages/modules/s/* INTO BrokeredEndpoint("/modules/f/inputs/in1")',
                "b": {"route": 'FROM /messages/* INTO BrokeredEndpoint("/modules/f/inputs/in2")',
                      "isEnabled": False}})
    assert route(r, module="s") == ("a",)
    assert r.targets_module("f") and not r.targets_module("s")
    assert r.module_inputs(("a", "b"), "f") == ["in1", "in2"]
    assert r.module_inputs(("a",), "other") == []


def test_enrichments() -> None:
    r = router({"hot": "FROM /messages INTO archive"},
               twins={"dev1": Twin(tags={"site": {"line": 7}, "name": "boiler"})},
               enrich={"hub": {"value": "$iothubname", "endpointNames": ["archive"]},
                       "line": {"value": "$twin.tags.site.line", "endpointNames": ["archive"]},
                       "name": {"value": "$twin.tags.name", "endpointNames": ["archive", "events"]},
                       "gone": {"value": "$twin.properties.reported.nope", "endpointNames": ["archive"]},
                       "static": {"value": "fixed", "endpointNames": ["archive"]}})
    assert r.enrich("archive", Stored(("hot",))) == {
        "hub": "hub7", "line": "7", "name": "boiler", "gone": "$twin.properties.reported.nope",
        "static": "fixed"}
    assert r.enrich("events", Stored(("hot",), device_id="unknown")) == {"name": "$twin.tags.name"}
    with pytest.raises(InvalidRequestError, match="a \\$ value must be"):
        parse_enrichment("k", {"value": "$twin.other", "endpointNames": ["events"]})


def test_route_test_explains() -> None:
    from gateway.routing.message import MessageView

    r = router({"hot": "FROM /messages WHERE alert = 'high' AND $body.t > 30 INTO archive",
                "mod": "FROM /messages/modules/x/* INTO events",
                "off": {"route": "FROM /messages INTO events", "isEnabled": False}})
    view = MessageView(JSON, {"alert": "high"}, b'{"t": 3}', device_id="d", module_id=None,
                       enqueued_ms=0)
    result = r.test("telemetry", view)
    reasons = {row["name"]: row.get("reason") for row in result["routes"]}
    assert reasons == {"hot": "($body.t > 30) was false",
                       "mod": "source /messages/modules/x/* does not match /messages",
                       "off": "the route is disabled"}
    assert result["fallback"] and result["endpoints"] == ["events"]
