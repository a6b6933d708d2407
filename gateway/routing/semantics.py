"""What a condition means: the value rules, the functions, and a plain reference evaluator.
Pure (IoT Hub ref §10.2-10.3).

Values are JSON values plus ``undefined``. The rules, as IoT Hub (and Cosmos DB, whose query
language it borrows) define them:

* a missing property, a body that is not JSON, an operator or function applied to the wrong
  types, a division by zero: ``undefined``;
* ``=``/``!=``/``<>`` compare two numbers, two strings, two booleans or two nulls; ``<`` ``>``
  ``<=`` ``>=`` two numbers or two strings; anything else is ``undefined``;
* ``AND``/``OR``/``NOT`` are three-valued: ``false AND x`` is false, ``true OR x`` is true,
  a non-boolean operand counts as undefined;
* ``a ?? b`` is ``b`` only when ``a`` is undefined; ``a || b`` concatenates two strings;
* a route matches only when its condition is exactly ``true``.

:func:`evaluate` walks the tree; it is the definition the compiler (:mod:`.compiler`) is
tested against. :func:`explain` says which top-level clause stopped a route.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from gateway.routing.query import (
    UNDEFINED,
    AppProp,
    Binary,
    BodyPath,
    Call,
    Lit,
    Node,
    PathStep,
    SysProp,
    TwinPath,
    Unary,
    Value,
    clauses,
    unparse,
)


class Message(Protocol):
    """What a condition can see of a message (see :class:`gateway.routing.message.MessageView`)."""

    def sys(self, name: str) -> Value: ...
    def app(self, name: str) -> Value: ...
    def body_json(self) -> Value: ...
    def twin_section(self, section: str) -> Value: ...


def is_number(v: object) -> bool:
    return (type(v) is int or type(v) is float)


def walk(value: Value, path: tuple[PathStep, ...]) -> Value:
    """Follow ``path`` (keys and indexes) into a JSON value; undefined when it is not there."""
    for step in path:
        if type(step) is str:
            if type(value) is not dict:
                return UNDEFINED
            value = value.get(step, UNDEFINED)
        else:
            if type(value) is not list or not 0 <= step < len(value):  # type: ignore[operator]
                return UNDEFINED
            value = value[step]  # type: ignore[index]
        if value is UNDEFINED:
            return UNDEFINED
    return value


# -- functions (shared by the evaluator and the compiled code) --------------------------------


def _num1(fn: Callable[[Any], Value]) -> Callable[..., Value]:
    def run(x: Value) -> Value:
        if not is_number(x):
            return UNDEFINED
        try:
            out = fn(x)
        except (ValueError, OverflowError, ZeroDivisionError):
            return UNDEFINED
        if type(out) is float and not math.isfinite(out):
            return UNDEFINED
        return out
    return run


def _power(x: Value, y: Value) -> Value:
    if not is_number(x) or not is_number(y):
        return UNDEFINED
    try:
        out = float(x) ** float(y)  # type: ignore[arg-type]
    except (ValueError, OverflowError, ZeroDivisionError):
        return UNDEFINED
    if type(out) is not float or not math.isfinite(out):
        return UNDEFINED  # a complex result (negative base, fractional power)
    return int(out) if type(x) is int and type(y) is int and y >= 0 and out.is_integer() else out


def _sign(x: Any) -> Value:
    return (x > 0) - (x < 0)


def _as_number(x: Value) -> Value:
    if is_number(x):
        return x
    if type(x) is not str:
        return UNDEFINED
    text = x.strip()
    try:
        if text.isdigit() or (text[:1] == "-" and text[1:].isdigit()):
            return int(text)
        if not text or not all(c in "0123456789+-.eE" for c in text):
            return UNDEFINED
        out = float(text)
    except ValueError:
        return UNDEFINED
    return out if math.isfinite(out) else UNDEFINED


def _strings(fn: Callable[..., Value]) -> Callable[..., Value]:
    def run(*args: Value) -> Value:
        for a in args:
            if type(a) is not str:
                return UNDEFINED
        return fn(*args)
    return run


def _substring(s: Value, start: Value, length: Value = None) -> Value:
    if type(s) is not str or not is_number(start):
        return UNDEFINED
    if length is not None and not is_number(length):
        return UNDEFINED
    begin = max(int(start), 0)  # type: ignore[call-overload]
    if length is None:
        return s[begin:]
    return s[begin:begin + max(int(length), 0)]  # type: ignore[call-overload]


def _is_primitive(x: Value) -> bool:
    return x is None or type(x) in (bool, int, float, str)


FUNCTIONS: dict[str, Callable[..., Value]] = {
    "ABS": _num1(abs),
    "EXP": _num1(math.exp),
    "POWER": _power,
    "SQUARE": _num1(lambda x: x * x),
    "CEILING": _num1(math.ceil),
    "FLOOR": _num1(math.floor),
    "SIGN": _num1(_sign),
    "SQRT": _num1(math.sqrt),
    "AS_NUMBER": _as_number,
    "IS_ARRAY": lambda x: type(x) is list,
    "IS_BOOL": lambda x: type(x) is bool,
    "IS_DEFINED": lambda x: x is not UNDEFINED,
    "IS_NULL": lambda x: x is None,
    "IS_NUMBER": is_number,
    "IS_OBJECT": lambda x: type(x) is dict,
    "IS_PRIMITIVE": _is_primitive,
    "IS_STRING": lambda x: type(x) is str,
    "CONCAT": _strings(lambda *a: "".join(a)),
    "LENGTH": _strings(len),
    "LOWER": _strings(str.lower),
    "UPPER": _strings(str.upper),
    "SUBSTRING": _substring,
    "INDEX_OF": _strings(str.find),
    "STARTS_WITH": _strings(str.startswith),
    "ENDS_WITH": _strings(str.endswith),
    "CONTAINS": _strings(lambda s, f: f in s),
}
"""TWIN_CHANGE_INCLUDES is not here: it reads the message (see :func:`twin_change_includes`)."""


def twin_change_includes(body: Value, path: str) -> Value:
    """edgeHub's ``twin_change_includes(properties.reported.x)``: whether a twin change
    notification's body contains that path."""
    steps = tuple(path.split("."))
    if body is UNDEFINED:
        return UNDEFINED
    return walk(body, steps) is not UNDEFINED


def modulo(x: Any, y: Any) -> Any:
    """``%`` with the sign of the dividend (as in JavaScript and Cosmos DB); y != 0."""
    if type(x) is int and type(y) is int:
        r = abs(x) % abs(y)
        return r if x >= 0 else -r
    return math.fmod(x, y)


# -- the reference evaluator -----------------------------------------------------------------


def _compare(op: str, a: Value, b: Value) -> Value:
    if a is UNDEFINED or b is UNDEFINED:
        return UNDEFINED
    if is_number(a) and is_number(b):
        pass
    elif type(a) is str and type(b) is str:
        pass
    elif op in ("=", "!=", "<>") and ((type(a) is bool and type(b) is bool) or (a is None and b is None)):
        pass
    else:
        return UNDEFINED
    x: Any = a
    y: Any = b
    if op == "=":
        return bool(x == y)
    if op in ("!=", "<>"):
        return bool(x != y)
    if op == "<":
        return bool(x < y)
    if op == ">":
        return bool(x > y)
    if op == "<=":
        return bool(x <= y)
    return bool(x >= y)


def _arith(op: str, a: Value, b: Value) -> Value:
    if not is_number(a) or not is_number(b):
        return UNDEFINED
    x: Any = a
    y: Any = b
    if op in ("/", "%") and y == 0:
        return UNDEFINED
    try:
        if op == "+":
            out = x + y
        elif op == "-":
            out = x - y
        elif op == "*":
            out = x * y
        elif op == "/":
            out = x / y
        else:
            out = modulo(x, y)
    except OverflowError:
        return UNDEFINED
    if type(out) is float and not math.isfinite(out):
        return UNDEFINED
    return out


def evaluate(node: Node, m: Message) -> Value:
    """The value of ``node`` for message ``m`` (a tree walk: the definition)."""
    if isinstance(node, Lit):
        return node.value
    if isinstance(node, AppProp):
        return m.app(node.name)
    if isinstance(node, SysProp):
        return m.sys(node.name)
    if isinstance(node, BodyPath):
        return walk(m.body_json(), node.path)
    if isinstance(node, TwinPath):
        return walk(m.twin_section(node.section), node.path)
    if isinstance(node, Unary):
        v = evaluate(node.operand, m)
        if node.op == "NOT":
            return (not v) if type(v) is bool else UNDEFINED
        if not is_number(v):
            return UNDEFINED
        return -v if node.op == "-" else v  # type: ignore[operator]
    if isinstance(node, Binary):
        op = node.op
        left = evaluate(node.left, m)
        right = evaluate(node.right, m)
        if op == "AND":
            if left is False or right is False:
                return False
            return True if left is True and right is True else UNDEFINED
        if op == "OR":
            if left is True or right is True:
                return True
            return False if left is False and right is False else UNDEFINED
        if op == "??":
            return right if left is UNDEFINED else left
        if op == "||":
            return left + right if type(left) is str and type(right) is str else UNDEFINED
        if op in ("=", "!=", "<>", "<", ">", "<=", ">="):
            return _compare(op, left, right)
        return _arith(op, left, right)
    if isinstance(node, Call):
        if node.name == "TWIN_CHANGE_INCLUDES":
            return twin_change_includes(m.body_json(), node.args[0].value)  # type: ignore[union-attr, arg-type]
        return FUNCTIONS[node.name](*(evaluate(a, m) for a in node.args))
    raise TypeError(f"not a node: {node!r}")  # pragma: no cover


def matches(node: Node, m: Message) -> bool:
    return evaluate(node, m) is True


def describe(value: Value) -> str:
    if value is UNDEFINED:
        return "undefined"
    if value is None or type(value) in (bool, int, float, str):
        return unparse(Lit(value))
    return type(value).__name__


def explain(node: Node, m: Message) -> str | None:
    """None when ``node`` is true for ``m``; otherwise the first top-level AND clause that
    was false or undefined, with what it was (``$body.t > 30 was false``)."""
    for clause in clauses(node):
        value = evaluate(clause, m)
        if value is not True:
            return f"{unparse(clause)} was {describe(value)}"
    return None
