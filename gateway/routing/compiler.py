"""Compile a parsed condition once into a Python predicate (IoT Hub ref §10.2-10.3). Pure.

The tree becomes the source of one small function, compiled with :func:`compile`: property
look-ups are direct ``dict.get`` calls, comparisons with a literal are inlined with their type
test, ``AND``/``OR`` short-circuit with the cheaper operand first (properties before the twin,
the twin before the body: the language has no side effects, and the three-valued ``AND``/
``OR`` are commutative), and the body is decoded only when a body operand is reached. The
meaning is :func:`gateway.routing.semantics.evaluate`'s; tests check the two agree.

:attr:`Compiled.deps` says what a condition reads (``props``, ``time``, ``twin``, ``body``): a
condition that reads only properties gives the same answer for every message with the same
properties, which the router uses to cache it per topic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.routing import semantics
from gateway.routing.message import (
    ENQUEUED_TIME,
    MessageView,
    decode_body,
    decode_with,
    iso_ms,
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


_CMP_HELPER = {"=": "_eq", "!=": "_ne", "<>": "_ne", "<": "_lt", ">": "_gt", "<=": "_le",
               ">=": "_ge"}
_ARITH_HELPER = {"+": "_add", "-": "_sub", "*": "_mul", "/": "_div", "%": "_mod"}

_NAMESPACE: dict[str, Any] = {
    "U": U, "_NUM": _NUM, "_walk": semantics.walk, "_iso": iso_ms,
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
    ``twins``, with the decoded body ``B`` and the twin ``T`` computed on first use)."""

    def __init__(self, raw: bool = False, codec: str | None | object = None) -> None:
        self.consts: dict[str, Any] = {}
        self.temps = 0
        self.raw = raw
        self.codec = codec  # raw: AUTO (look at the properties), None (no body), or a codec

    def body(self) -> str:
        if not self.raw:
            return "m.body_json()"
        if self.codec is AUTO:
            return "(B if B is not _N else (B := _decode(body, S)))"
        if self.codec is None:
            return "U"
        return f"(B if B is not _N else (B := _decode_with(body, {self.const(self.codec)})))"

    def twin(self, section: str) -> str:
        if not self.raw:
            return f"m.twin_section({section!r})"
        t = self.temp()
        return (f"(U if ({t} := (T if T is not _N else (T := (twins(dev, mod) if twins is not None"
                f" else None)))) is None else {t}.{section})")

    def const(self, value: Any) -> str:
        name = f"_c{len(self.consts)}"
        self.consts[name] = value
        return name

    def temp(self) -> str:
        self.temps += 1
        return f"_t{self.temps}"

    def expr(self, node: Node) -> str:  # noqa: C901 - one branch per node type
        if isinstance(node, Lit):
            if node.value is U:
                return "U"
            if node.value is None or type(node.value) is bool:
                return repr(node.value)
            return self.const(node.value)
        if isinstance(node, AppProp):
            return f"A.get({self.const(node.name)}, U)"
        if isinstance(node, SysProp):
            if node.name.lower() == ENQUEUED_TIME:
                return "_iso(enq)" if self.raw else "_iso(m.enqueued_ms)"
            t = self.temp()
            key, fallback = self.const(system_key(node.name)), self.const("$" + node.name)
            return f"({t} if ({t} := S.get({key}, U)) is not U else A.get({fallback}, U))"
        if isinstance(node, BodyPath):
            return self._path(self.body(), node.path)
        if isinstance(node, TwinPath):
            return self._path(self.twin(node.section), node.path)
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
            return f"_f_{node.name}({', '.join(self.expr(a) for a in node.args)})"
        raise TypeError(node)  # pragma: no cover

    def _path(self, base: str, path: tuple[Any, ...]) -> str:
        """Inline steps: ``x.get(k, U)`` behind a dict test, ``x[i]`` behind a list test."""
        if len(path) > 4:
            return f"_walk({base}, {self.const(path)})"
        code = base
        for step in path:
            t = self.temp()
            if type(step) is str:
                code = f"({t}.get({self.const(step)}, U) if ({t} := {code}).__class__ is dict else U)"
            else:
                code = (f"({t}[{step}] if ({t} := {code}).__class__ is list and len({t}) > {step}"
                        " else U)")
        return code

    def _binary(self, node: Binary) -> str:
        op = node.op
        if op in ("AND", "OR"):
            left, right = node.left, node.right
            if cost(right) < cost(left):
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
            return self._compare(op, node.left, node.right)
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
            c = self.const(value)
            kind = "is str" if type(value) is str else "in _NUM"
            return f"(({t} {_PYOP[op]} {c}) if ({t} := {inner}).__class__ {kind} else U)"
        return f"{_CMP_HELPER[op]}({self.expr(left)}, {self.expr(right)})"


@dataclass(frozen=True, slots=True)
class Compiled:
    """A condition, parsed and compiled: ``predicate(view)`` is True exactly when the
    condition is ``true`` for that message."""

    text: str
    tree: Node
    predicate: Callable[[MessageView], bool]
    deps: frozenset[str]
    source: str


def compile_tree(tree: Node, text: str = "") -> Compiled:
    gen = _Gen()
    body = gen.expr(tree)
    source = ("def _condition(m):\n"
              "    S = m.system\n"
              "    A = m.application\n"
              f"    return {body} is True\n")
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


_NOT_YET = object()
AUTO: Any = object()
"""``compile_table(codec=AUTO)``: decide per message from its properties whether and how the
body is decoded (otherwise the caller knows it for the property set the table serves)."""


def compile_table(trees: list[Node], names: list[str],
                  codec: str | None = AUTO) -> Callable[..., list[str]]:
    """One function for several conditions: ``fn(S, A, body, dev, mod, enq, twins)`` gives
    the names of those that are true, in order. The body is decoded at most once and the twin
    looked up at most once, and only if a condition reaches them; no view object is built.
    ``codec``: the body's codec (:func:`gateway.routing.message.body_codec`) when every
    message the table sees has the same properties, None when their body is not JSON."""
    gen = _Gen(raw=True, codec=codec)
    lines = ["def _table(S, A, body, dev, mod, enq, twins):",
             "    B = T = _N",
             "    out = []"]
    for tree, name in zip(trees, names, strict=True):
        lines.append(f"    if {gen.expr(tree)} is True:")
        lines.append(f"        out.append({gen.const(name)})")
    lines.append("    return out")
    namespace = dict(_NAMESPACE)
    namespace.update(gen.consts)
    namespace.update(_N=_NOT_YET, _decode=decode_body, _decode_with=decode_with)
    exec(compile("\n".join(lines) + "\n", "<route table>", "exec"), namespace)  # noqa: S102
    return namespace["_table"]  # type: ignore[no-any-return]


def compile_condition(text: str) -> Compiled:
    """Parse and compile ``text``; :class:`gateway.routing.query.QueryError` (with the
    position) when it is not a valid condition. An empty condition means ``true``."""
    if not text.strip():
        text = "true"
    return compile_tree(parse(text), text)
