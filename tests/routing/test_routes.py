from __future__ import annotations

import pytest

from gateway.errors import RouteError
from gateway.routing.routes import UPSTREAM, ModuleInput, RouteTable, message_source, parse_route


@pytest.mark.parametrize("source,matches,misses", [
    ("/*", ["/messages", "/messages/modules/a/outputs/b", "/twinChangeNotifications"], []),
    ("/messages/*", ["/messages", "/messages/modules/m1"], ["/twinChangeNotifications"]),
    ("/messages/modules/*", ["/messages/modules/m1/outputs/o"], ["/messages"]),
    ("/messages/modules/m1/*", ["/messages/modules/m1", "/messages/modules/m1/outputs/x"],
     ["/messages/modules/m10", "/messages/modules/m2"]),
    ("/messages/modules/m1/outputs/o1", ["/messages/modules/m1/outputs/o1",
                                         "/messages/modules/M1/outputs/O1"],
     ["/messages/modules/m1/outputs/o10", "/messages/modules/m1"]),
])
def test_source_matching_follows_edgehub(source: str, matches: list[str], misses: list[str]) -> None:
    route = parse_route("r", f"FROM {source} INTO $upstream")
    assert all(route.matches(m) for m in matches)
    assert not any(route.matches(m) for m in misses)


def test_sinks() -> None:
    r = parse_route("r", 'select * from /messages/modules/a/outputs/o into BrokeredEndpoint("/modules/b/inputs/in1")')
    assert r.sink == ModuleInput("b", "in1")
    assert parse_route("u", "FROM /messages/* INTO $UPSTREAM").sink == UPSTREAM


@pytest.mark.parametrize("text,fragment", [
    ("FROM /messages INTO somewhere", "sink"),
    ('FROM /messages INTO BrokeredEndpoint("/modules/b/outputs/x")', "sink"),
    ("TO /messages INTO $upstream", "expected FROM"),
    ("FROM /messages WHERE a = 1 INTO $upstream", "WHERE"),
])
def test_bad_routes_are_refused_with_position(text: str, fragment: str) -> None:
    with pytest.raises(RouteError) as err:
        parse_route("r", text)
    assert fragment in str(err.value) and "^" in str(err.value)


def test_table_finds_inputs() -> None:
    table = RouteTable.parse({
        "a": 'FROM /messages/modules/sensor/outputs/raw INTO BrokeredEndpoint("/modules/filter/inputs/in")',
        "b": 'FROM /messages/modules/sensor/* INTO BrokeredEndpoint("/modules/filter/inputs/in")',
        "c": "FROM /messages/* INTO $upstream",
    })
    assert table.module_inputs(message_source("sensor", "raw")) == [ModuleInput("filter", "in")]
    assert table.module_inputs(message_source(None, None)) == []
    assert table.targets_module("filter") and not table.targets_module("sensor")
