"""A property set's routes compiled whole (:func:`gateway.routing.compiler.compile_split`, the
hub's path through :meth:`gateway.routing.router.Router.route` with a key): the same answers
as the reference evaluator, route by route, for several routes at once (IoT Hub ref §10.2)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.routing import compiler
from gateway.routing.compiler import compile_split, deps, fold_properties, split_source
from gateway.routing.message import MessageView, body_codec
from gateway.routing.model import RoutingState, parse_route
from gateway.routing.names import RouteNames
from gateway.routing.query import Node, parse, unparse
from gateway.routing.router import FALLBACK_ONLY, Router
from gateway.routing.semantics import evaluate
from gateway.store._log_sql import ROW_OF
from gateway.store.log import new_record
from tests.routing.test_query import JSON_SYS, TREES, Twin, messages

# conditions that read the twin in every role: alone, beside the body, under NOT and OR
TWIN_TREES = st.one_of(
    TREES,
    st.builds(lambda a, b: parse(f"({unparse(a)}) AND ({unparse(b)})"), TREES, TREES),
    st.sampled_from([parse(t) for t in (
        "$twin.tags.t = 'a' AND $body.t > 3", "NOT ($twin.tags.t = 'a') OR $body.n < 3",
        "$twin.properties.desired.n > 2", "$twin.tags.t = $body.s",
        "IS_DEFINED($twin.tags.obj) AND $body.t = 1", "$twin.tags.t || a = $body.s")]),
)


class Outcomes(dict[int, tuple[int, ...]]):
    """An outcome table that answers with the mask's set bits."""

    def __missing__(self, mask: int) -> tuple[int, ...]:
        return tuple(i for i in range(mask.bit_length()) if mask >> i & 1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TWIN_TREES, min_size=1, max_size=6), messages())
def test_split_agrees_with_the_reference_evaluator(trees: list[Node], m: MessageView) -> None:
    """Twin-only conditions are decided by the facts function, the rest by the run function
    with the twin-only parts of them read from the facts; together, for the properties of
    ``m`` folded in, exactly the conditions the reference evaluator finds ``true``."""
    folded = [fold_properties(t, m) for t in trees]
    twin_only = [i for i, t in enumerate(folded)
                 if "twin" in deps(t) and deps(t) <= {"props", "twin"}]
    rest = [i for i in range(len(trees)) if i not in twin_only]
    run, facts_of = compile_split(*split_source([folded[i] for i in twin_only],
                                                [folded[i] for i in rest], body_codec(m.system)))
    twin = m.twin()
    got = run(m.body, m.enqueued_ms, twin, facts_of(twin), Outcomes())
    order = twin_only + rest
    expected = [i for i in order if evaluate(trees[i], m) is True]
    assert [order[bit] for bit in got] == expected, [unparse(t) for t in trees]


def test_twin_parts_are_read_once_per_twin_not_per_message() -> None:
    trees = [parse("$twin.tags.t = 'a' AND $body.t > 3"), parse("$twin.tags.n > 1")]
    source, consts = split_source([trees[1]], [trees[0]], "utf-8-sig")
    run_source = source.split("def _facts")[0]
    assert "twin" not in run_source and ".tags" not in run_source  # the run only tests bits
    m = MessageView(JSON_SYS, {}, b'{"t": 5}', device_id="dev1", module_id=None, enqueued_ms=0)
    run, facts_of = compile_split(source, consts)
    twin, outcomes = Twin(tags={"t": "a", "n": 2}), Outcomes()
    facts = facts_of(twin)
    assert run(m.body, 0, twin, facts, outcomes) == (0, 1)
    assert run(b'{"t": 1}', 0, twin, facts, outcomes) == (0,)
    assert run(m.body, 0, None, facts_of(None), outcomes) == ()


def test_the_body_is_decoded_once_whichever_condition_decodes_it_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A condition that decodes the body on the way (after a twin fact), then one that reads
    it first thing: one decode per message, not two."""
    calls: list[bytes] = []
    loads, decode_with = compiler.loads_utf8, compiler.decode_with
    monkeypatch.setattr(compiler, "loads_utf8", lambda b: calls.append(b) or loads(b))
    monkeypatch.setattr(compiler, "decode_with", lambda b, c: calls.append(b) or decode_with(b, c))
    trees = [parse("$twin.tags.x = 1 AND $body.a > 0"), parse("$body.b > 1")]
    run, facts_of = compile_split(*split_source([], trees, "utf-8-sig"))
    for tags, expected in (({"x": 1}, (0, 1)), ({"x": 2}, (1,))):
        calls.clear()
        twin = Twin(tags=tags)
        assert run(b'{"a": 1, "b": 2}', 0, twin, facts_of(twin), Outcomes()) == expected
        assert len(calls) == 1


def test_a_body_path_several_conditions_read_is_read_once() -> None:
    trees = [parse("$body.kind = 'a'"), parse("$body.kind = 'b' OR $body.n > 2"),
             parse("$body.kind = 'c' AND $body.v.w[0] = 1"), parse("$body.v.w[0] = 2")]
    source, consts = split_source([], trees, "utf-8-sig")
    assert source.count("('kind')") == 1 and source.count("('n')") == 1, source
    assert source.count("('w')") == 1, source
    run, _facts = compile_split(source, consts)
    assert run(b'{"kind": "b"}', 0, None, 0, Outcomes()) == (1,)
    assert run(b'{"kind": "c", "n": 3, "v": {"w": [1]}}', 0, None, 0, Outcomes()) == (1, 2)
    assert run(b'{"v": {"w": [2]}}', 0, None, 0, Outcomes()) == (3,)
    assert run(b'[1]', 0, None, 0, Outcomes()) == ()
    assert run(b'{"kind": "a"', 0, None, 0, Outcomes()) == ()


ROUTE_TREES = st.lists(TWIN_TREES, min_size=1, max_size=6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ROUTE_TREES, st.lists(messages(), min_size=1, max_size=3))
def test_router_with_a_key_agrees_with_the_reference_and_the_general_path(
        trees: list[Node], ms: list[MessageView]) -> None:
    """The hub's form (one key per property set, the split compiled whole and kept, the twin
    looked up again whenever it may have changed) against each route's reference outcome and
    against the router without a key (every table general, nothing kept)."""
    state = RoutingState(tuple(parse_route(f"r{i}", {"condition": unparse(t),
                                                      "endpointNames": ["events"]})
                               for i, t in enumerate(trees)))
    twins: dict[str, Any] = {}
    r = Router(state, twins=lambda d, mod: twins.get(d))
    for m in ms:  # one property set each (the key), sent twice: compiled, then kept
        key = repr((sorted(m.system.items()), sorted(m.application.items())))
        twins["dev1"] = m.twin()
        expected = {f"r{i}" for i, t in enumerate(trees) if evaluate(t, m) is True}
        for _ in range(2):
            args = ("telemetry", m.system, m.application, m.body, "dev1", None, m.enqueued_ms)
            got = r.route(*args, key)
            assert set(got) == expected or (not expected and got == FALLBACK_ONLY)
            assert got == r.route(*args)
            assert ROW_OF(new_record("telemetry", "dev1", None, 0, "{}", b"", got))[6] \
                == ",".join(got)
        assert r._cache[key].fast


def test_outcomes_are_shared_and_carry_their_stored_text() -> None:
    state = RoutingState(tuple(parse_route(n, {"condition": c, "endpointNames": ["events"]})
                               for n, c in {"hot": "$body.t > 30", "high": "alert = 'high'",
                                            "site": "$twin.tags.site = 'a'"}.items()))
    r = Router(state, twins=lambda d, m: Twin(tags={"site": "a"}))
    system, app = dict(JSON_SYS), {"alert": "high"}
    first = r.route("telemetry", system, app, b'{"t": 40}', "dev1", None, 0, "k")
    again = r.route("telemetry", system, app, b'{"t": 41}', "dev1", None, 0, "k")
    assert first == ("high", "site", "hot") and first is again  # one tuple per outcome
    assert type(first) is RouteNames and first.text == "high,site,hot"
    row = ROW_OF(new_record("telemetry", "dev1", None, 0, "{}", b"", first))
    assert row[6] == "high,site,hot"
    assert r.route("telemetry", system, {"alert": "low"}, b'{"t": 1}', "dev1", None, 0,
                   "k2") == ("site",)
    r = Router(state, twins=lambda d, m: None)
    assert r.route("telemetry", system, {"alert": "low"}, b'{"t": 1}', "dev1", None, 0,
                   "k2") is FALLBACK_ONLY


@given(st.sampled_from([  # the condition, how often its code reads $body.t
    ("IS_NUMBER($body.t) AND $body.t < 3", 1),
    ("$body.t >= -2 AND IS_NUMBER($body.t)", 1),
    ("IS_STRING($body.t) AND $body.t = 'a'", 1),
    ("IS_DEFINED($body.t) AND $body.t != 2", 1),
    ("IS_DEFINED($body.t) AND $body.t = null", 1),
    ("IS_NUMBER($body.t) AND $body.t = 'a'", 2),  # a type test the comparison does not make
    ("IS_STRING($body.t) AND $body.t > 1", 2),
    ("IS_NUMBER($body.t) AND $body.n < 3", 1),
    ("NOT (IS_NUMBER($body.t) AND $body.t < 3)", 2),  # false, not true, is asked for here
]), st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from(["a", "b", ""]),
              st.just([1]), st.just({"a": 1})), st.booleans())
def test_a_type_test_the_comparison_makes_is_left_out(case: tuple[str, int], t: Any,
                                                      present: bool) -> None:
    text, reads = case
    tree = parse(text)
    source, consts = split_source([], [tree], "utf-8-sig")
    assert source.count("('t')") == reads, source
    body = {"t": t, "n": 1} if present else {"n": 1}
    m = MessageView(JSON_SYS, {}, json.dumps(body).encode(), device_id="dev1",
                    module_id=None, enqueued_ms=0)
    run, _facts = compile_split(source, consts)
    assert (run(m.body, 0, None, 0, Outcomes()) == (0,)) is (evaluate(tree, m) is True), text


def test_property_sets_with_the_same_conditions_left_share_the_compiled_code() -> None:
    """A key per message (a stamped on-behalf-of message carries its own message id in its
    properties) folds and generates per key but compiles once."""
    state = RoutingState(tuple(parse_route(n, {"condition": c, "endpointNames": ["events"]})
                               for n, c in {"hot": "$body.t > 30 AND alert = 'high'",
                                            "site": "$twin.tags.site = 'a'"}.items()))
    r = Router(state, twins=lambda d, m: Twin(tags={"site": "a"}))
    for i in range(50):
        system = {**JSON_SYS, "message-id": f"m{i}"}
        got = r.route("telemetry", system, {"alert": "high"}, b'{"t": %d}' % i, "dev1", None, 0,
                      f"key{i}")
        assert got == (("site", "hot") if i > 30 else ("site",))
    assert len(r._cache) == 50 and len(r._splits) == 1


def test_the_router_says_whether_a_condition_reads_the_message_id() -> None:
    def reads(*conditions: str) -> bool:
        state = RoutingState(tuple(parse_route(f"r{i}", {"condition": c,
                                                         "endpointNames": ["events"]})
                                   for i, c in enumerate(conditions)))
        return Router(state).reads_message_id

    assert not reads("$body.t > 3", "messageId = 'x'", "$correlationId = 'x'")
    assert reads("$body.t > 3", "NOT ($messageId = 'x')")
    assert reads("STARTS_WITH($MessageId, 'm')") and reads("$message-id = 'x'")
