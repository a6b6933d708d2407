"""The routing query language: parser, printer, semantics and compiler (IoT Hub ref §10.2-10.3)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.routing.compiler import AUTO as AUTO_CODEC
from gateway.routing.compiler import compile_condition, compile_tree
from gateway.routing.message import MessageView, body_codec
from gateway.routing.query import (
    FUNCTION_ARITY,
    UNDEFINED,
    AppProp,
    Binary,
    BodyPath,
    Call,
    Lit,
    Node,
    QueryError,
    SysProp,
    TwinPath,
    Unary,
    parse,
    unparse,
)
from gateway.routing.semantics import evaluate, explain

JSON_SYS = {"content-type": "application/json", "content-encoding": "utf-8",
            "iothub-connection-device-id": "dev1", "message-id": "m1"}


class Twin:
    def __init__(self, tags: Any = None, desired: Any = None, reported: Any = None) -> None:
        self.tags, self.desired, self.reported = tags or {}, desired or {}, reported or {}


def view(body: Any = None, app: dict[str, str | None] | None = None,
         system: dict[str, str] | None = None, twin: Twin | None = None,
         raw: bytes | None = None) -> MessageView:
    data = raw if raw is not None else json.dumps(body).encode()
    return MessageView(JSON_SYS if system is None else system, app or {}, data,
                       device_id="dev1", module_id=None, enqueued_ms=1_764_000_000_123,
                       twins=(lambda d, m: twin))


def check(text: str, m: MessageView) -> Any:
    """The reference value, asserting the compiled predicate agrees."""
    value = evaluate(parse(text), m)
    assert compile_condition(text).predicate(m) is (value is True), text
    return value


@pytest.mark.parametrize("text,expected", [
    ("$body.temp > 30", True),
    ("$body.temp > 30 AND alert = 'high'", True),
    ("$body.missing > 30", UNDEFINED),
    ("NOT ($body.missing > 30)", UNDEFINED),
    ("$body.temp > 30 OR $body.missing", True),
    ("$body.missing OR $body.temp < 0", UNDEFINED),
    ("$body.missing AND $body.temp < 0", False),
    ("$body.arr[1].x = 'b'", True),
    ("$body.arr[5].x", UNDEFINED),
    ("alert = 'high'", True),
    ("alert = 1", UNDEFINED),
    ("AS_NUMBER(level) >= 7.5", True),
    ("level = '7.5'", True),
    ("flag = null", True),
    ("nothing = null", UNDEFINED),
    ("IS_NULL(flag)", True),
    ("$contentType = 'application/json'", True),
    ("$connectionDeviceId = 'dev1'", True),
    ("IS_DEFINED($connectionModuleId)", False),
    ("$messageId = 'm1'", True),
    ("$enqueuedTime > '2025-01-01'", True),
    ("$twin.tags.site = 'plant-7'", True),
    ("$twin.properties.desired.mode = 'eco'", True),
    ("$twin.properties.reported.fw >= 3", True),
    ("$twin.tags.nothing ?? 'dflt' = 'dflt'", True),
    ("'a' || 'b' = 'ab'", True),
    ("1 + 2 * 3 = 7", True),
    ("7 % 3 = 1 AND -7 % 3 = -1", True),
    ("1 / 0", UNDEFINED),
    ("0x1F = 31", True),
    ("2.5e1 = 25", True),
])
def test_semantics(text: str, expected: Any) -> None:
    m = view({"temp": 31.5, "arr": [{"x": "a"}, {"x": "b"}]},
             {"alert": "high", "level": "7.5", "flag": None},
             twin=Twin({"site": "plant-7"}, {"mode": "eco"}, {"fw": 3}))
    assert check(text, m) is expected


@pytest.mark.parametrize("text,expected", [
    ("ABS(-3) = 3 AND SQUARE(3) = 9 AND POWER(2, 10) = 1024 AND SQRT(16) = 4", True),
    ("CEILING(1.2) = 2 AND FLOOR(1.8) = 1 AND SIGN(-4) = -1 AND EXP(0) = 1", True),
    ("SQRT(-1)", UNDEFINED),
    ("IS_ARRAY($body.arr) AND IS_OBJECT($body.obj) AND IS_PRIMITIVE($body.n)", True),
    ("IS_PRIMITIVE($body.arr) OR IS_OBJECT($body.arr)", False),
    ("IS_BOOL($body.b) AND IS_NUMBER($body.n) AND IS_STRING($body.s) AND IS_NULL($body.z)", True),
    ("CONCAT($body.s, '-', 'x') = 'hey-x' AND LENGTH($body.s) = 3", True),
    ("LOWER('AbC') = 'abc' AND UPPER('abc') = 'ABC'", True),
    ("SUBSTRING('hello', 1, 3) = 'ell' AND SUBSTRING('hello', 2) = 'llo'", True),
    ("INDEX_OF('hello', 'll') = 2 AND INDEX_OF('hello', 'z') = -1", True),
    ("STARTS_WITH('hello', 'he') AND ENDS_WITH('hello', 'lo') AND CONTAINS('hello', 'ell')", True),
    ("starts_with($body.n, 'x')", UNDEFINED),
    ("AS_NUMBER('12') = 12 AND NOT IS_DEFINED(AS_NUMBER('twelve'))", True),
])
def test_functions(text: str, expected: Any) -> None:
    m = view({"arr": [1], "obj": {"a": 1}, "n": 5, "b": True, "s": "hey", "z": None})
    assert check(text, m) is expected


def test_body_needs_json_content_type_and_encoding() -> None:
    body = {"t": 40}
    assert check("$body.t = 40", view(body)) is True
    for system in ({"content-type": "application/json"},
                   {"content-type": "text/plain", "content-encoding": "utf-8"},
                   {"content-type": "application/json", "content-encoding": "latin-1"}):
        assert check("$body.t = 40", view(body, system=system)) is UNDEFINED
    utf16 = {"content-type": "application/json", "content-encoding": "utf-16"}
    assert check("$body.t = 40", view(raw='{"t": 40}'.encode("utf-16"), system=utf16)) is True
    assert check("$body.t = 40", view(raw=b"{not json", system=JSON_SYS)) is UNDEFINED
    assert check("$body.t = 40", view(raw=b'{"t": NaN}', system=JSON_SYS)) is UNDEFINED


def test_body_decoded_once_for_many_conditions() -> None:
    calls = 0

    class Counting(MessageView):
        __slots__ = ()

        def body_json(self) -> Any:
            nonlocal calls
            calls += 1
            return super().body_json()

    m = Counting(JSON_SYS, {}, b'{"a": 1}', device_id="d", module_id=None, enqueued_ms=0)
    preds = [compile_condition(f"$body.a = {i}").predicate for i in range(5)]
    assert [p(m) for p in preds] == [False, True, False, False, False]
    assert m._json == {"a": 1}  # decoded and kept: later reads are attribute reads


def test_dollar_names_fall_back_to_application_properties() -> None:
    m = view({}, {"$custom": "x", "plain": "y"})
    assert check("$custom = 'x'", m) is True
    assert check("{$custom} = 'x' AND {plain} = 'y'", m) is True


@pytest.mark.parametrize("text,column,fragment", [
    ("a = ", 5, "ends too early"),
    ("a = = 1", 5, "unexpected '='"),
    ("nofunc(1)", 1, "unknown function"),
    ("$body = 1", 1, "bare $body"),
    ("$body[0] = 1", 6, "not supported"),
    ("$twin.foo = 1", 1, "twin path"),
    ("'unterminated", 1, "unterminated"),
    ("a < b < c", 7, "do not chain"),
    ("LENGTH('a', 'b')", 1, "takes 1"),
    ("'\\q'", 2, "unknown escape"),
    ("1x = 1", 1, "malformed number"),
    ("a = 1 b", 7, "unexpected 'b'"),
    ("", 1, "empty"),
])
def test_errors_give_the_position(text: str, column: int, fragment: str) -> None:
    with pytest.raises(QueryError) as err:
        parse(text)
    assert fragment in str(err.value) and f"column {column}" in str(err.value)
    assert "\n" not in str(err.value)


def test_explain_names_the_first_failing_clause() -> None:
    m = view({"t": 10}, {"alert": "high"})
    tree = parse("alert = 'high' AND $body.t > 30 AND $body.nothing = 1")
    assert explain(tree, m) == "($body.t > 30) was false"
    assert explain(parse("alert = 'high' AND $body.x = 1"), m) == "($body.x = 1) was undefined"
    assert explain(parse("alert = 'high'"), m) is None


# -- properties ------------------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "alert", "level", "x-y", "n_1"])
BODY_KEYS = st.sampled_from(["t", "s", "arr", "obj", "n", "b"])
LEAF_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 50),
                        st.floats(-100, 100, allow_nan=False), st.sampled_from(["", "a", "hi", "7"]))


def literals() -> st.SearchStrategy[Node]:
    return st.one_of(
        st.builds(Lit, st.none() | st.booleans() | st.just(UNDEFINED)),
        st.builds(Lit, st.integers(0, 1 << 70)),
        st.builds(Lit, st.floats(0, 1e300, allow_nan=False, allow_infinity=False)),
        st.builds(Lit, st.text(max_size=6)),
    )


def leaves() -> st.SearchStrategy[Node]:
    path = st.lists(st.one_of(BODY_KEYS, st.integers(0, 2)), min_size=0, max_size=2)
    return st.one_of(
        literals(),
        st.builds(AppProp, NAMES),
        st.builds(AppProp, st.sampled_from(["$odd", "has space", "true"])),
        st.builds(SysProp, st.sampled_from(["contentType", "connectionDeviceId", "messageId",
                                            "connectionModuleId", "enqueuedTime", "odd"])),
        st.builds(lambda k, p: BodyPath((k, *p)), BODY_KEYS, path),
        st.builds(TwinPath, st.sampled_from(["tags", "desired", "reported"]),
                  st.lists(BODY_KEYS, max_size=2).map(tuple)),
    )


def extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    ops = ["OR", "AND", "=", "!=", "<>", "<", ">", "<=", ">=", "??", "||", "+", "-", "*", "/", "%"]
    fixed = [(n, lo) for n, (lo, hi) in FUNCTION_ARITY.items() if lo == hi and n != "TWIN_CHANGE_INCLUDES"]
    return st.one_of(
        st.builds(Unary, st.sampled_from(["NOT", "-", "+"]), children),
        st.builds(Binary, st.sampled_from(ops), children, children),
        st.sampled_from(fixed).flatmap(
            lambda f: st.lists(children, min_size=f[1], max_size=f[1]).map(
                lambda args: Call(f[0], tuple(args)))),
        st.builds(lambda a: Call("CONCAT", tuple(a)), st.lists(children, min_size=1, max_size=3)),
        st.builds(lambda a: Call("SUBSTRING", tuple(a)), st.lists(children, min_size=3, max_size=3)),
        st.builds(lambda p: Call("TWIN_CHANGE_INCLUDES", (Lit(p),)),
                  st.sampled_from(["t", "obj.a", "properties.reported"])),
    )


TREES = st.recursive(leaves(), extend, max_leaves=12)

JSON_VALUES = st.recursive(LEAF_VALUES, lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(BODY_KEYS, c, max_size=3), max_leaves=8)


@st.composite
def messages(draw: st.DrawFn) -> MessageView:
    body = draw(st.dictionaries(BODY_KEYS, JSON_VALUES, max_size=5))
    app = draw(st.dictionaries(st.one_of(NAMES, st.sampled_from(["$odd", "has space", "true"])),
                               st.none() | st.sampled_from(["", "a", "7", "high", "1.5"]), max_size=5))
    system = dict(JSON_SYS)
    if draw(st.booleans()):
        system["content-type"] = draw(st.sampled_from(["text/plain", "application/json; charset=utf-8"]))
    twin = draw(st.none() | st.builds(Twin, st.dictionaries(BODY_KEYS, JSON_VALUES, max_size=3),
                                      st.dictionaries(BODY_KEYS, JSON_VALUES, max_size=3),
                                      st.dictionaries(BODY_KEYS, JSON_VALUES, max_size=3)))
    return view(body, app, system, twin)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TREES)
def test_printer_round_trips(tree: Node) -> None:
    text = unparse(tree)
    assert parse(text) == tree, text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TREES, messages())
def test_compiled_predicate_agrees_with_the_reference_evaluator(tree: Node, m: MessageView) -> None:
    expected = evaluate(tree, m) is True
    compiled = compile_tree(tree)
    assert compiled.source  # really compiled, not the fallback
    assert compiled.predicate(m) is expected, unparse(tree)


def test_deeply_chained_conditions_still_work() -> None:
    text = " AND ".join(f"a{i} = '1'" for i in range(120))
    compiled = compile_condition(text)
    assert compiled.predicate(view({}, {f"a{i}": "1" for i in range(120)}))
    assert not compiled.predicate(view({}, {f"a{i}": "1" for i in range(119)}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TREES, min_size=1, max_size=4), messages())
def test_compiled_table_agrees_with_the_reference_evaluator(trees: list[Node], m: MessageView) -> None:
    """The hub's form: several conditions in one function over the raw message parts, also
    with the message's properties folded in (as the router compiles them per property set)."""
    from gateway.routing.compiler import compile_table, fold_properties
    from gateway.routing.message import body_codec

    names = [f"r{i}" for i in range(len(trees))]
    expected = [n for n, t in zip(names, trees) if evaluate(t, m) is True]
    folded = [fold_properties(t, m) for t in trees]
    for table in (compile_table(trees, names), compile_table(trees, names, body_codec(m.system)),
                  compile_table(folded, names, body_codec(m.system))):
        got = table(m.system, m.application, m.body, m.device_id, m.module_id, m.enqueued_ms,
                    m.twins)
        assert got == expected


@pytest.mark.parametrize("raw,encoding,expected", [
    (b'{"t": 40}', "utf-8", ["hot"]),
    (b'\xef\xbb\xbf{"t": 40}', "utf-8", ["hot"]),  # a byte order mark: the general decoder
    (b'{"t": 40, "big": 123456789012345678901234567890}', "utf-8", ["hot"]),  # past 64 bits
    (b'{"t": 40', "utf-8", []),  # not JSON: undefined
    (b'[1, 2]', "utf-8", []),  # not an object
    ('{"t": 40}'.encode("utf-16"), "utf-16", ["hot"]),
])
def test_table_decodes_the_body_up_front_as_the_view_does(raw: bytes, encoding: str,
                                                          expected: list[str]) -> None:
    from gateway.routing.compiler import compile_table, table_source

    system = {"content-type": "application/json", "content-encoding": encoding}
    trees = [parse("$body.t > 30"), parse("$body.t > 100")]
    assert "B = " in table_source(trees, ["hot", "hotter"], encoding.replace("utf-8", "utf-8-sig"))[0]
    m = MessageView(system, {}, raw, device_id="d", module_id=None, enqueued_ms=0)
    assert [n for n, t in zip(["hot", "hotter"], trees) if evaluate(t, m) is True] == expected
    for codec in (AUTO_CODEC, body_codec(system)):
        table = compile_table(trees, ["hot", "hotter"], codec)
        assert table(system, {}, raw, "d", None, 0, None) == expected
