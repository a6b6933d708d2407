"""Compile a parsed condition once into a Python predicate (IoT Hub ref §10.2-10.3). Pure.

The tree becomes the source of one small function, compiled with :func:`compile`. A route
needs only "is the condition exactly ``true``", so the code is a Python test, not a value:
the three-valued ``AND``/``OR``/``NOT`` become Python's ``and``/``or`` (``NOT x`` is true
exactly when ``x`` is false, so the test for false is generated too), a comparison with a
literal is one type test and one operator on a constant, property look-ups are direct
``dict.get`` calls, and the cheaper operand goes first (properties before the twin, the twin
before the body: the language has no side effects, and the three-valued ``AND``/``OR`` are
commutative). Values are computed (:meth:`_Gen.expr`) only where an operator needs one. The
meaning is :func:`gateway.routing.semantics.evaluate`'s; tests check the two agree.

:attr:`Compiled.deps` says what a condition reads (``props``, ``time``, ``twin``, ``body``): a
condition that reads only properties gives the same answer for every message with the same
properties, which the router uses to cache it per topic; :func:`fold_properties` puts those
answers into the rest, and :func:`compile_table` compiles all the routes left for one set of
properties into one function (the body decoded once, up front when the first condition that
reads it reads it first thing, a body path that several conditions read then read once; the
twin looked up once). :func:`compile_split`, the router's form for a property set it keeps,
goes further: what reads only the twin becomes bits computed once per twin object, and the
function answers with a mask of the routes matched, so nothing is built per message.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.routing import semantics
from gateway.routing.message import (
    ENQUEUED_TIME,
    MessageView,
    decode_body,
    decode_with,
    iso_ms,
    loads_utf8,
    system_key,
)
from gateway.routing.query import (
    UNDEFINED,
    AppProp,
    Binary,
    BodyPath,
    Call,
    Lit,
    Node,
    SysProp,
    TwinPath,
    Unary,
    parse,
)

U = UNDEFINED
_NUM = frozenset({int, float})
_COST = {"props": 1, "time": 2, "twin": 3, "body": 10}
_FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "=": "=", "!=": "!=", "<>": "<>"}
_PYOP = {"=": "==", "!=": "!=", "<>": "!=", "<": "<", ">": ">", "<=": "<=", ">=": ">="}


def deps(node: Node) -> frozenset[str]:
    """What ``node`` reads: ``props`` (properties and ids), ``time`` ($enqueuedTime),
    ``twin``, ``body``."""
    if isinstance(node, Lit):
        return frozenset()
    if isinstance(node, AppProp):
        return frozenset({"props"})
    if isinstance(node, SysProp):
        return frozenset({"time" if node.name.lower() == ENQUEUED_TIME else "props"})
    if isinstance(node, BodyPath):
        return frozenset({"body"})
    if isinstance(node, TwinPath):
        return frozenset({"twin"})
    if isinstance(node, Unary):
        return deps(node.operand)
    if isinstance(node, Binary):
        return deps(node.left) | deps(node.right)
    if isinstance(node, Call):
        out = frozenset({"body"}) if node.name == "TWIN_CHANGE_INCLUDES" else frozenset()
        for arg in node.args:
            out |= deps(arg)
        return out
    raise TypeError(node)  # pragma: no cover


def cost(node: Node) -> int:
    return sum(_COST[d] for d in deps(node))


# -- runtime helpers the generated code calls ------------------------------------------------


def _ord_ok(a: Any, b: Any) -> bool:
    ta, tb = a.__class__, b.__class__
    return (ta in _NUM and tb in _NUM) or (ta is str and tb is str)


def _eq(a: Any, b: Any) -> Any:
    ta, tb = a.__class__, b.__class__
    if ta in _NUM:
        return a == b if tb in _NUM else U
    if ta is str or ta is bool:
        return a == b if tb is ta else U
    if a is None:
        return True if b is None else U
    return U


def _ne(a: Any, b: Any) -> Any:
    r = _eq(a, b)
    return r if r is U else not r


def _lt(a: Any, b: Any) -> Any:
    return a < b if _ord_ok(a, b) else U


def _gt(a: Any, b: Any) -> Any:
    return a > b if _ord_ok(a, b) else U


def _le(a: Any, b: Any) -> Any:
    return a <= b if _ord_ok(a, b) else U


def _ge(a: Any, b: Any) -> Any:
    return a >= b if _ord_ok(a, b) else U


def _arith(fn: Callable[[Any, Any], Any], zero_guard: bool) -> Callable[[Any, Any], Any]:
    def run(a: Any, b: Any) -> Any:
        if a.__class__ not in _NUM or b.__class__ not in _NUM:
            return U
        if zero_guard and b == 0:
            return U
        try:
            out = fn(a, b)
        except OverflowError:
            return U
        if out.__class__ is float and not math.isfinite(out):
            return U
        return out
    return run


_EMPTY: dict[str, Any] = {}  # never written: a body or twin section that is not an object


def _as_dict(value: Any) -> Any:
    return value if value.__class__ is dict else _EMPTY


_CMP_HELPER = {"=": "_eq", "!=": "_ne", "<>": "_ne", "<": "_lt", ">": "_gt", "<=": "_le",
               ">=": "_ge"}
_ARITH_HELPER = {"+": "_add", "-": "_sub", "*": "_mul", "/": "_div", "%": "_mod"}

_NAMESPACE: dict[str, Any] = {
    "U": U, "_NUM": _NUM, "_walk": semantics.walk, "_iso": iso_ms, "_E": _EMPTY,
    "_dict": _as_dict,
    "_tci": semantics.twin_change_includes,
    "_eq": _eq, "_ne": _ne, "_lt": _lt, "_gt": _gt, "_le": _le, "_ge": _ge,
    "_add": _arith(lambda a, b: a + b, False), "_sub": _arith(lambda a, b: a - b, False),
    "_mul": _arith(lambda a, b: a * b, False), "_div": _arith(lambda a, b: a / b, True),
    "_mod": _arith(semantics.modulo, True),
    **{f"_f_{name}": fn for name, fn in semantics.FUNCTIONS.items()},
}


# -- code generation -------------------------------------------------------------------------


class _Gen:
    """Code for one condition over a :class:`MessageView` ``m`` (``raw=False``), or for a whole
    table over the raw parts (``raw=True``: locals ``S`` ``A`` ``body`` ``dev`` ``mod`` ``enq``
    ``twins``, with the decoded body ``B``, the body as an object ``D``, the twin ``T`` and its
    sections ``G_tags`` ``G_desired`` ``G_reported`` computed on first use).

    :meth:`truth` is the form a route needs: a Python test that holds exactly when the
    condition is ``true`` (or exactly ``false``, under ``NOT``), so the three-valued ``AND``/
    ``OR``/``NOT`` become Python's ``and``/``or`` and a comparison with a literal is one type
    test and one operator; :meth:`expr` gives the value itself where one is needed."""

    def __init__(self, raw: bool = False, codec: str | None | object = None,
                 prefix: str = "_c", facts: dict[str, tuple[int, Node, bool]] | None = None,
                 fact_bit: int = 0) -> None:
        self.consts: dict[str, Any] = {}
        self.prefix = prefix  # of the constants' names (two generators can share a namespace)
        self.temps = 0
        self.raw = raw
        self.codec = codec  # raw: AUTO (look at the properties), None (no body), or a codec
        self.decoded = False  # raw: B and D are set already (decoded by a statement)
        # raw, one property set: parts that read only the twin (and folded properties) become
        # bits of ``F``, computed once per twin object (see compile_split); repr -> bit, part
        self.facts = facts
        self.fact_bit = fact_bit  # the first bit free in F
        self.twin_given = facts is not None or prefix != "_c"  # T is the twin (or None)
        self.known: dict[int, tuple[Node, frozenset[str]]] = {}  # deps of the trees' nodes
        self.hoisted: dict[tuple[Any, ...], str] = {}  # raw, decoded: body path -> its local
        self.lazy = False  # raw: code that decodes the body on first use was made

    def decode_statement(self, shared: Sequence[tuple[Any, ...]] = ()) -> list[str]:
        """Lines that decode the body into ``B`` and ``D`` now (for a condition that reads it
        first thing: no test per operand after it), then read the ``shared`` body paths (those
        several conditions read) into locals once."""
        self.decoded = True
        tail = ["    D = B if B.__class__ is dict else _E"]
        for path in shared:
            name = f"_h{len(self.hoisted)}"
            tail.append(f"    {name} = {self._path('B', path, 'D')}")
            self.hoisted[path] = name
        if self.codec is AUTO:
            head = ["    B = _decode(body, S)"]
        elif self.codec != "utf-8-sig":
            head = [f"    B = _decode_with(body, {self.const(self.codec)})"]
        else:
            # the common case without a Python call: UTF-8 without a byte order mark, which
            # the fast decoder takes (it refuses a byte order mark); anything it refuses goes
            # the general way (decode_with)
            head = ["    try:",
                    "        B = _loads(body)",
                    "    except ValueError:",
                    f"        B = _decode_with(body, {self.const(self.codec)})"]
        if self.lazy:  # a condition before may have decoded it already: not twice
            head = ["    if B is _N:", *["    " + line for line in head]]
        return head + tail

    def body(self) -> str:
        if not self.raw:
            return "m.body_json()"
        if self.decoded:
            return "B"
        self.lazy = self.lazy or self.codec is not None
        if self.codec is AUTO:
            return "(B if B is not _N else (B := _decode(body, S)))"
        if self.codec is None:
            return "U"
        return f"(B if B is not _N else (B := _decode_with(body, {self.const(self.codec)})))"

    def body_object(self) -> str | None:
        """The body when it is a JSON object, else ``{}`` (a key path reads undefined either
        way); None where there is no such local."""
        if not self.raw or self.codec is None:
            return None
        if self.decoded:
            return "D"
        return f"(D if D is not None else (D := _dict({self.body()})))"

    def twin(self, section: str) -> str:
        if not self.raw:
            return f"m.twin_section({section!r})"
        if self.twin_given:
            return f"(U if T is None else T.{section})"
        t = self.temp()
        return (f"(U if ({t} := (T if T is not _N else (T := (twins(dev, mod) if twins is not None"
                f" else None)))) is None else {t}.{section})")

    def twin_object(self, section: str) -> str | None:
        if not self.raw:
            return None
        local, t, v = f"G_{section}", self.temp(), self.temp()
        twin = "(T if T is not _N else (T := (twins(dev, mod) if twins is not None else None)))"
        if self.twin_given:
            twin = "T"
        return (f"({local} if {local} is not None else ({local} := _E if ({t} := {twin}) is None"
                f" else ({v} if ({v} := {t}.{section}).__class__ is dict else _E)))")

    def cost(self, node: Node) -> int:
        found = self.known.get(id(node))
        if found is not None and found[0] is node:
            return sum(_COST[d] for d in found[1])
        return cost(node)

    def const(self, value: Any) -> str:
        name = f"{self.prefix}{len(self.consts)}"
        self.consts[name] = value
        return name

    def lit(self, value: Any) -> str:
        """A literal in the source where Python has one (a constant load), else a name."""
        if type(value) is str or type(value) is int or (
                type(value) is float and math.isfinite(value)):
            return f"({value!r})"
        return self.const(value)

    def temp(self) -> str:
        self.temps += 1
        return f"_t{self.temps}"

    def expr(self, node: Node) -> str:  # noqa: C901 - one branch per node type
        node = _fold(node)
        if isinstance(node, Lit):
            if node.value is U:
                return "U"
            if node.value is None or type(node.value) is bool:
                return repr(node.value)
            return self.const(node.value)  # a name: ``is`` tests on a literal are refused
        if isinstance(node, AppProp):
            return f"A.get({self.lit(node.name)}, U)"
        if isinstance(node, SysProp):
            if node.name.lower() == ENQUEUED_TIME:
                return "_iso(enq)" if self.raw else "_iso(m.enqueued_ms)"
            t = self.temp()
            key, fallback = self.lit(system_key(node.name)), self.lit("$" + node.name)
            return f"({t} if ({t} := S.get({key}, U)) is not U else A.get({fallback}, U))"
        if isinstance(node, BodyPath):
            if node.path in self.hoisted:
                return self.hoisted[node.path]
            return self._path(self.body(), node.path, self.body_object())
        if isinstance(node, TwinPath):
            return self._path(self.twin(node.section), node.path, self.twin_object(node.section))
        if isinstance(node, Unary):
            t = self.temp()
            inner = self.expr(node.operand)
            if node.op == "NOT":
                return f"((not {t}) if ({t} := {inner}).__class__ is bool else U)"
            sign = "-" if node.op == "-" else "+"
            return f"({sign}{t} if ({t} := {inner}).__class__ in _NUM else U)"
        if isinstance(node, Binary):
            return self._binary(node)
        if isinstance(node, Call):
            if node.name == "TWIN_CHANGE_INCLUDES":
                return f"_tci({self.body()}, {self.const(node.args[0].value)})"  # type: ignore[union-attr]
            if node.name in _TYPE_TESTS:
                return f"({self.expr(node.args[0])}{_TYPE_TESTS[node.name]})"
            return f"_f_{node.name}({', '.join(self.expr(a) for a in node.args)})"
        raise TypeError(node)  # pragma: no cover

    def truth(self, node: Node, want: bool = True) -> str:
        """A Python test that holds exactly when ``node`` is ``want`` (``true``/``false``)."""
        node = _fold(node)
        if isinstance(node, Lit):
            return "True" if node.value is want else "False"
        if self.facts is not None and _twin_fact(node, self.known):
            key = f"{want!r}:{_shape(node)}"
            found = self.facts.get(key)
            if found is None:
                found = self.facts[key] = (1 << (self.fact_bit + len(self.facts)), node, want)
            return f"(F & {found[0]})"
        if isinstance(node, Unary) and node.op == "NOT":
            return self.truth(node.operand, not want)
        if isinstance(node, Binary):
            if node.op in ("AND", "OR"):
                left, right = node.left, node.right
                if node.op == "AND" and want:  # IS_NUMBER(x) AND x < 3: x < 3 alone
                    if _implied(left, right):
                        return self.truth(right, True)
                    if _implied(right, left):
                        return self.truth(left, True)
                if self.cost(right) < self.cost(left):
                    left, right = right, left
                # AND is true when both are, false when either is; OR the other way round
                both = (node.op == "AND") == want  # else either
                a = self.truth(left, want)
                if a == ("False" if both else "True"):
                    return a
                b = self.truth(right, want)
                if a == ("True" if both else "False"):
                    return b
                if b == ("True" if both else "False"):
                    return a
                if b == ("False" if both else "True"):
                    return b
                return f"({a}{' and ' if both else ' or '}{b})"
            if node.op in _CMP_HELPER:
                test = self._compare_truth(node.op, _fold(node.left), _fold(node.right), want)
                if test is not None:
                    return test
        if isinstance(node, Call) and node.name in _TYPE_TESTS:
            test = f"({self.expr(node.args[0])}{_TYPE_TESTS[node.name]})"
            return test if want else f"(not {test})"
        return f"({self.expr(node)} is {want!r})"

    def _compare_truth(self, op: str, left: Node, right: Node, want: bool) -> str | None:
        """``left op literal`` as a test for ``want``; None when neither side is a literal."""
        if isinstance(left, Lit) and not isinstance(right, Lit):
            left, right, op = right, left, _FLIP[op]
        if not isinstance(right, Lit) or isinstance(left, Lit):
            return None
        value = right.value
        equality = op in ("=", "!=", "<>")
        if value is U or ((value is None or type(value) is bool) and not equality):
            return "False"  # undefined whatever the other side is
        inner = self.expr(left)
        if value is None:  # x = null is true for null and never false; != the other way
            return f"({inner} is None)" if (op == "=") == want else "False"
        if type(value) is bool:  # x = true: true for true, false for false
            return f"({inner} is {value if (op == '=') == want else not value!r})"
        pyop = _PYOP[op] if want else _NEG[_PYOP[op]]
        c = self.lit(value)
        if type(value) is str and pyop == "==":
            return f"({inner} == {c})"  # only a str equals a str among the language's values
        kind = "is str" if type(value) is str else "in _NUM"
        if inner.isidentifier():  # a local already (a shared body path)
            return f"({inner}.__class__ {kind} and {inner} {pyop} {c})"
        t = self.temp()
        return f"(({t} := {inner}).__class__ {kind} and {t} {pyop} {c})"

    def _path(self, base: str, path: tuple[Any, ...], obj: str | None = None) -> str:
        """Inline steps: ``x.get(k, U)`` behind a dict test, ``x[i]`` behind a list test;
        ``obj``, when given, is ``base`` as an object (``{}`` when it is not one), so a first
        key step needs no test."""
        if len(path) > 4:
            return f"_walk({base}, {self.const(path)})"
        code = base
        for i, step in enumerate(path):
            t = self.temp()
            if type(step) is str:
                if i == 0 and obj is not None:
                    code = f"{obj}.get({self.lit(step)}, U)"
                else:
                    code = (f"({t}.get({self.lit(step)}, U) if ({t} := {code}).__class__ is dict"
                            " else U)")
            else:
                code = (f"({t}[{step}] if ({t} := {code}).__class__ is list and len({t}) > {step}"
                        " else U)")
        return code

    def _binary(self, node: Binary) -> str:
        op = node.op
        if op in ("AND", "OR"):
            left, right = node.left, node.right
            if self.cost(right) < self.cost(left):
                left, right = right, left
            a, b = self.temp(), self.temp()
            stop = "False" if op == "AND" else "True"
            go = "True" if op == "AND" else "False"
            return (f"({stop} if ({a} := {self.expr(left)}) is {stop} else "
                    f"({stop} if ({b} := {self.expr(right)}) is {stop} else "
                    f"({go} if {a} is {go} and {b} is {go} else U)))")
        if op == "??":
            a = self.temp()
            return f"({self.expr(node.right)} if ({a} := {self.expr(node.left)}) is U else {a})"
        if op == "||":
            a, b = self.temp(), self.temp()
            return (f"({a} + {b} if ({a} := {self.expr(node.left)}).__class__ is str and "
                    f"({b} := {self.expr(node.right)}).__class__ is str else U)")
        if op in _CMP_HELPER:
            return self._compare(op, _fold(node.left), _fold(node.right))
        return f"{_ARITH_HELPER[op]}({self.expr(node.left)}, {self.expr(node.right)})"

    def _compare(self, op: str, left: Node, right: Node) -> str:
        if isinstance(left, Lit) and not isinstance(right, Lit):
            left, right, op = right, left, _FLIP[op]
        if isinstance(right, Lit):
            value = right.value
            t = self.temp()
            inner = self.expr(left)
            if value is U:
                return "U"
            if value is None:
                if op not in ("=", "!=", "<>"):
                    return "U"
                result = "True" if op == "=" else "False"
                return f"({result} if {inner} is None else U)"
            if type(value) is bool:
                if op not in ("=", "!=", "<>"):
                    return "U"
                test = "is" if op == "=" else "is not"
                return f"(({t} {test} {value!r}) if ({t} := {inner}).__class__ is bool else U)"
            c = self.lit(value)
            kind = "is str" if type(value) is str else "in _NUM"
            return f"(({t} {_PYOP[op]} {c}) if ({t} := {inner}).__class__ {kind} else U)"
        return f"{_CMP_HELPER[op]}({self.expr(left)}, {self.expr(right)})"


_NEG = {"==": "!=", "!=": "==", "<": ">=", ">": "<=", "<=": ">", ">=": "<"}
"""The negated operator: exact for numbers and strings (the language has no NaN)."""
_TYPE_TESTS = {"IS_ARRAY": ".__class__ is list", "IS_BOOL": ".__class__ is bool",
               "IS_NUMBER": ".__class__ in _NUM", "IS_OBJECT": ".__class__ is dict",
               "IS_STRING": ".__class__ is str", "IS_DEFINED": " is not U", "IS_NULL": " is None"}
"""Type-test functions inlined: each is a plain boolean for any operand, undefined included."""


def _shape(node: Node) -> str:
    """``node`` as a text equal for equal trees wherever they stand (no positions) and
    distinct for distinct ones (``1``, ``1.0`` and ``true`` are three literals)."""
    if isinstance(node, Lit):
        return f"Lit({type(node.value).__name__}:{node.value!r})"
    if isinstance(node, Unary):
        return f"Unary({node.op},{_shape(node.operand)})"
    if isinstance(node, Binary):
        return f"Binary({node.op},{_shape(node.left)},{_shape(node.right)})"
    if isinstance(node, Call):
        return f"Call({node.name},{','.join(_shape(a) for a in node.args)})"
    return repr(dataclasses.replace(node, pos=0))


def _implied(test: Node, other: Node) -> bool:
    """Whether ``test`` is true whenever ``other`` is: ``test`` a type test (``IS_DEFINED``,
    ``IS_NUMBER``, ``IS_STRING``) of what ``other`` compares with a literal (a comparison is
    true only between two defined values of one type, ref §10.2)."""
    test, other = _fold(test), _fold(other)
    if not (isinstance(test, Call) and test.name in ("IS_DEFINED", "IS_NUMBER", "IS_STRING")
            and isinstance(other, Binary) and other.op in _CMP_HELPER):
        return False
    left, right = _fold(other.left), _fold(other.right)
    if isinstance(left, Lit):
        left, right = right, left
    if not isinstance(right, Lit) or isinstance(left, Lit) or _shape(left) != _shape(test.args[0]):
        return False
    value = right.value
    if test.name == "IS_NUMBER":
        return type(value) is int or type(value) is float
    if test.name == "IS_STRING":
        return type(value) is str
    return True


def _twin_fact(node: Node, known: dict[int, tuple[Node, frozenset[str]]]) -> bool:
    """Whether ``node`` reads the twin and nothing but the twin and properties (which are
    constants where facts are made: one property set); ``known``: :func:`_all_deps`."""
    found = known.get(id(node))
    d = found[1] if found is not None and found[0] is node else deps(node)
    return "twin" in d and d <= {"twin", "props"}


def _all_deps(node: Node, known: dict[int, tuple[Node, frozenset[str]]]) -> frozenset[str]:
    """:func:`deps` of ``node`` and of every part of it, into ``known`` by identity (the node
    kept with it, so its id is not reused meanwhile): one walk instead of one per part."""
    if isinstance(node, Unary):
        out = _all_deps(node.operand, known)
    elif isinstance(node, Binary):
        out = _all_deps(node.left, known) | _all_deps(node.right, known)
    elif isinstance(node, Call):
        out = frozenset({"body"}) if node.name == "TWIN_CHANGE_INCLUDES" else frozenset()
        for arg in node.args:
            out |= _all_deps(arg, known)
    else:
        out = deps(node)
    known[id(node)] = (node, out)
    return out


def _fold(node: Node) -> Node:
    """``-5`` and ``+5`` (a sign on a number literal) as the literal itself."""
    if isinstance(node, Unary) and node.op in ("-", "+"):
        inner = _fold(node.operand)
        if isinstance(inner, Lit) and (type(inner.value) is int or type(inner.value) is float):
            return Lit(-inner.value if node.op == "-" else inner.value)
    return node


@dataclass(frozen=True, slots=True)
class Compiled:
    """A condition, parsed and compiled: ``predicate(view)`` is True exactly when the
    condition is ``true`` for that message."""

    text: str
    tree: Node
    predicate: Callable[[MessageView], bool]
    deps: frozenset[str]
    source: str


def fold_properties(node: Node, m: MessageView) -> Node:
    """``node`` with every part that reads only properties and identities replaced by its
    value for ``m`` (exact for every message with the same properties: what the router
    compiles per property set)."""
    d = deps(node)
    if not d:
        return node
    if d == {"props"}:
        return Lit(semantics.evaluate(node, m))
    if isinstance(node, Unary):
        return Unary(node.op, fold_properties(node.operand, m))
    if isinstance(node, Binary):
        return Binary(node.op, fold_properties(node.left, m), fold_properties(node.right, m))
    if isinstance(node, Call) and node.name != "TWIN_CHANGE_INCLUDES":
        return Call(node.name, tuple(fold_properties(a, m) for a in node.args))
    return node


def _reads_body_first(node: Node) -> bool:
    """Whether the code :meth:`_Gen.truth` makes for ``node`` reads the body whatever the
    message, before anything can stop it (so decoding first loses nothing). Conservative:
    False when unsure."""
    node = _fold(node)
    if isinstance(node, BodyPath):
        return True
    if isinstance(node, Unary):
        return _reads_body_first(node.operand)
    if isinstance(node, Call):
        if node.name == "TWIN_CHANGE_INCLUDES":
            return True
        return any(_reads_body_first(a) for a in node.args)
    if isinstance(node, Binary):
        if node.op in ("AND", "OR"):
            first = node.right if cost(node.right) < cost(node.left) else node.left
            return _reads_body_first(first)
        if node.op in ("??", "||"):
            return _reads_body_first(node.left)
        left, right = _fold(node.left), _fold(node.right)
        for lit, other in ((right, left), (left, right)):
            if isinstance(lit, Lit) and not isinstance(other, Lit):
                if lit.value is U or lit.value is None or type(lit.value) is bool:
                    return False  # may be decided without reading the other side
                return _reads_body_first(other)
        return _reads_body_first(left) or _reads_body_first(right)
    return False


def _body_paths(node: Node, out: list[tuple[Any, ...]]) -> None:
    """Every body path ``node`` reads, into ``out`` (once per place it stands)."""
    if isinstance(node, BodyPath):
        out.append(node.path)
    elif isinstance(node, Unary):
        _body_paths(node.operand, out)
    elif isinstance(node, Binary):
        _body_paths(node.left, out)
        _body_paths(node.right, out)
    elif isinstance(node, Call):
        for arg in node.args:
            _body_paths(arg, out)


def _shared_paths(trees: list[Node]) -> list[tuple[Any, ...]]:
    """The body paths more than one of ``trees`` read, in order: read once into a local
    after the body is decoded (reading one cannot fail, and has no effect)."""
    counts: dict[tuple[Any, ...], int] = {}
    for tree in trees:
        found: list[tuple[Any, ...]] = []
        _body_paths(tree, found)
        for path in dict.fromkeys(found):
            counts[path] = counts.get(path, 0) + 1
    return [path for path, n in counts.items() if n > 1]


def compile_tree(tree: Node, text: str = "") -> Compiled:
    gen = _Gen()
    body = gen.truth(tree)
    source = ("def _condition(m):\n"
              "    S = m.system\n"
              "    A = m.application\n"
              f"    return {body}\n")
    namespace = dict(_NAMESPACE)
    namespace.update(gen.consts)
    try:
        code = compile(source, "<condition>", "exec")
    except (SyntaxError, RecursionError, MemoryError):  # nested past CPython's parser limits
        return Compiled(text=text, tree=tree, predicate=lambda m: semantics.matches(tree, m),
                        deps=deps(tree), source="")
    exec(code, namespace)  # noqa: S102 - our own generated code
    return Compiled(text=text, tree=tree, predicate=namespace["_condition"], deps=deps(tree),
                    source=source)


_NOT_YET: Any = object()
NOT_LOOKED_UP: Any = _NOT_YET
"""A table's ``twin`` argument when the caller has not looked the twin up (it may be None)."""
AUTO: Any = object()
"""``compile_table(codec=AUTO)``: decide per message from its properties whether and how the
body is decoded (otherwise the caller knows it for the property set the table serves)."""


def table_source(trees: list[Node], names: list[str],
                 codec: str | None = AUTO) -> tuple[str, dict[str, Any]]:
    """The source of :func:`compile_table`'s function and the constants it names."""
    gen = _Gen(raw=True, codec=codec)
    lines = ["def _table(S, A, body, dev, mod, enq, twins, T=_N):",
             "    B = _N",
             "    D = G_tags = G_desired = G_reported = None",
             "    out = []"]
    for i, (tree, name) in enumerate(zip(trees, names, strict=True)):
        if not gen.decoded and codec is not None and _reads_body_first(tree):
            lines += gen.decode_statement(_shared_paths(trees[i:]))
        test = gen.truth(tree)
        if test == "False":
            continue
        if test == "True":
            lines.append(f"    out.append({gen.lit(name)})")
            continue
        lines.append(f"    if {test}:")
        lines.append(f"        out.append({gen.lit(name)})")
    lines.append("    return out")
    return "\n".join(lines) + "\n", gen.consts


def compile_source(source: str, consts: dict[str, Any]) -> Callable[..., list[str]]:
    namespace = dict(_NAMESPACE)
    namespace.update(consts)
    namespace.update(_N=_NOT_YET, _decode=decode_body, _decode_with=decode_with,
                     _loads=loads_utf8)
    exec(compile(source, "<route table>", "exec"), namespace)  # noqa: S102
    return namespace["_table"]  # type: ignore[no-any-return]


def compile_table(trees: list[Node], names: list[str],
                  codec: str | None = AUTO) -> Callable[..., list[str]]:
    """One function for several conditions: ``fn(S, A, body, dev, mod, enq, twins[, twin])``
    gives the names of those that are true, in order (``twin``: the twin when the caller has
    looked it up already). The body is decoded at most once and the twin looked up at most
    once, and only if a condition reaches them (decoded up front when the first condition
    that reads it reads it first thing); no view object is built. ``codec``: the body's codec
    (:func:`gateway.routing.message.body_codec`) when every message the table sees has the
    same properties, None when their body is not JSON."""
    return compile_source(*table_source(trees, names, codec))


def compile_condition(text: str) -> Compiled:
    """Parse and compile ``text``; :class:`gateway.routing.query.QueryError` (with the
    position) when it is not a valid condition. An empty condition means ``true``."""
    if not text.strip():
        text = "true"
    return compile_tree(parse(text), text)


def split_source(twin_trees: list[Node], trees: list[Node], codec: str | None,
                 ) -> tuple[str, dict[str, Any]]:
    """The source of :func:`compile_split`'s two functions and the constants they name."""
    facts: dict[str, tuple[int, Node, bool]] = {}
    first = len(twin_trees)  # bits 0..first-1 of F and of the mask: the twin-only routes
    gen = _Gen(raw=True, codec=codec, facts=facts, fact_bit=first)
    start = 0
    lines: list[str] = []
    for i, tree in enumerate(trees):
        if not gen.decoded and codec is not None and _reads_body_first(tree):
            lines += gen.decode_statement(_shared_paths(trees[i:]))
        _all_deps(tree, gen.known)
        test, bit = gen.truth(tree), 1 << (first + i)
        if test == "True":
            start |= bit
        elif test != "False":
            lines += [f"    if {test}:", f"        m |= {bit}"]
    low = (1 << first) - 1
    head = ["def _run(body, enq, T, F, O):",
            f"    m = {'F' if not facts else f'F & {low}' if first else '0'}"
            + (f" | {start}" if start else "")]
    run = head + _locals(lines) + lines + ["    return O[m]"]
    twin_gen = _Gen(raw=True, codec=None, prefix="_k")
    fact_lines = ["def _facts(T):", "    F = 0"]
    parts = [(tree, True, 1 << i) for i, tree in enumerate(twin_trees)]
    parts += [(node, want, bit) for bit, node, want in facts.values()]
    for node, want, bit in parts:
        test = twin_gen.truth(node, want)
        if test == "True":
            fact_lines.append(f"    F |= {bit}")
        elif test != "False":
            fact_lines += [f"    if {test}:", f"        F |= {bit}"]
    fact_lines[2:2] = _locals(fact_lines[2:])
    fact_lines.append("    return F")
    return "\n".join(run + fact_lines) + "\n", {**gen.consts, **twin_gen.consts}


_PER_SET = frozenset({"S", "A", "dev", "mod", "twins"})
"""What a split's code must not read: the parts of one property set (folded in instead), so
that property sets with equal conditions left share the compiled code."""


def _locals(lines: list[str]) -> list[str]:
    """The first-use locals (the decoded body, the twin's sections) ``lines`` test before
    setting, each set to "not yet" (no statement for those they do not use)."""
    text = "\n".join(lines)
    out = ["    B = _N"] if "B is not _N" in text or "B is _N" in text else []
    lazy = [name for name in ("D", "G_tags", "G_desired", "G_reported")
            if f"{name} is not None" in text]
    return out + ([f"    {' = '.join(lazy)} = None"] if lazy else [])


def compile_split(source: str, consts: dict[str, Any]) -> tuple[Callable[..., Any],
                                                                Callable[[Any], int]]:
    """The two functions of :func:`split_source`'s text, for the conditions left for one
    property set (folded in: :func:`fold_properties`): ``twin_trees``, which read the twin and
    the properties alone, and ``trees``, the rest. ``facts(twin)`` gives an int whose bit
    ``i`` says whether ``twin_trees[i]`` is true, and whose higher bits are the outcomes of
    the twin-only parts of ``trees`` (computed once per twin object, not per message);
    ``run(body, enq, twin, facts, outcomes)`` gives ``outcomes[mask]``, where bit
    ``len(twin_trees) + j`` of ``mask`` says that ``trees[j]`` is true and the low bits are
    the twin-only conditions' from ``facts``: no list, no tuple built per message. The body
    is decoded at most once, as in :func:`compile_table`; nothing of the property set is read
    (property sets with the same conditions left share the functions)."""
    namespace = dict(_NAMESPACE)
    namespace.update(consts)
    namespace.update(_N=_NOT_YET, _decode_with=decode_with, _loads=loads_utf8)
    exec(compile(source, "<route split>", "exec"), namespace)  # noqa: S102
    run, facts = namespace["_run"], namespace["_facts"]
    if _PER_SET & {*run.__code__.co_names, *facts.__code__.co_names}:
        raise ValueError("the conditions read properties that are not folded in")
    return run, facts
