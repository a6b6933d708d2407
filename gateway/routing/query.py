"""IoT Hub's routing query language: lexer, parser and pretty-printer (ref §10.2-10.3). Pure.

Grammar (keywords and function names case-insensitive), lowest precedence first::

    expr     := or
    or       := and ("OR" and)*
    and      := not ("AND" not)*
    not      := "NOT" not | cmp
    cmp      := coalesce [("=" | "!=" | "<>" | "<" | ">" | "<=" | ">=") coalesce]
    coalesce := concat ("??" concat)*
    concat   := sum ("||" sum)*
    sum      := product (("+" | "-") product)*
    product  := unary (("*" | "/" | "%") unary)*
    unary    := ("-" | "+") unary | primary
    primary  := literal | NAME | "{" any-but-brace "}" | "$" NAME | body | twin
              | FUNCTION "(" [expr ("," expr)*] ")" | "(" expr ")"
    body     := "$body" ("." NAME | "[" INT "]")+          -- the first step must be "." NAME
    twin     := "$twin" "." ("tags" | "properties" "." ("desired" | "reported")) path
    literal  := 'text' | "text" (escapes \\' \\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)
              | 12 | 0x1F | 1.5e3 | true | false | null | undefined

``NAME`` is ``[A-Za-z_][A-Za-z0-9_-]*`` (so ``a-1`` is one name; write ``a - 1`` to
subtract); ``{...}`` names an application property with any other characters. A bare name is
an application property; ``$name`` is a system property (looked up among the application
properties as ``$name`` when the message has no such system property, as IoT Hub does).
Errors are :class:`QueryError` with the 0-based position of the offending token.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TypeAlias, Union

from gateway.errors import InvalidRequestError


class _Undefined:
    """The ``undefined`` value of the query language (a missing property, a type mismatch)."""

    _instance: _Undefined | None = None

    def __new__(cls) -> _Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "undefined"

    def __reduce__(self) -> str:
        return "UNDEFINED"


UNDEFINED = _Undefined()

Value: TypeAlias = object  # None (null), bool, int, float, str, list, dict, or UNDEFINED


class QueryError(InvalidRequestError):
    """A condition does not parse or compile; ``position`` is 0-based in ``text``."""

    def __init__(self, message: str, *, text: str, position: int) -> None:
        near = text[position:position + 20]
        where = f" near {near!r}" if near else " at the end"
        super().__init__(f"{message} at column {position + 1}{where}")
        self.text = text
        self.position = position
        self.reason = message


# -- syntax tree -----------------------------------------------------------------------------

PathStep: TypeAlias = str | int


@dataclass(frozen=True, slots=True)
class Lit:
    value: Value
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class AppProp:
    name: str
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class SysProp:
    name: str  # without the "$"
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class BodyPath:
    path: tuple[PathStep, ...]
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class TwinPath:
    section: str  # "tags", "desired" or "reported"
    path: tuple[PathStep, ...]
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Unary:
    op: str  # "NOT", "-", "+"
    operand: Node
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Binary:
    op: str  # "OR" "AND" "=" "!=" "<>" "<" ">" "<=" ">=" "??" "||" "+" "-" "*" "/" "%"
    left: Node
    right: Node
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Call:
    name: str  # upper case
    args: tuple[Node, ...]
    pos: int = field(default=0, compare=False)


Node: TypeAlias = Union[Lit, AppProp, SysProp, BodyPath, TwinPath, Unary, Binary, Call]

FUNCTION_ARITY: dict[str, tuple[int, int | None]] = {
    "ABS": (1, 1), "EXP": (1, 1), "POWER": (2, 2), "SQUARE": (1, 1), "CEILING": (1, 1),
    "FLOOR": (1, 1), "SIGN": (1, 1), "SQRT": (1, 1),
    "AS_NUMBER": (1, 1), "IS_ARRAY": (1, 1), "IS_BOOL": (1, 1), "IS_DEFINED": (1, 1),
    "IS_NULL": (1, 1), "IS_NUMBER": (1, 1), "IS_OBJECT": (1, 1), "IS_PRIMITIVE": (1, 1),
    "IS_STRING": (1, 1),
    "CONCAT": (1, None), "LENGTH": (1, 1), "LOWER": (1, 1), "UPPER": (1, 1),
    "SUBSTRING": (2, 3), "INDEX_OF": (2, 2), "STARTS_WITH": (2, 2), "ENDS_WITH": (2, 2),
    "CONTAINS": (2, 2),
    "TWIN_CHANGE_INCLUDES": (1, 1),
}
"""Every function of ref §10.3, with its (min, max) argument count."""

MAX_DEPTH = 40
"""Parentheses, NOT, signs and calls nested deeper than this are refused."""
COMPARISONS = frozenset({"=", "!=", "<>", "<", ">", "<=", ">="})
KEYWORDS = frozenset({"and", "or", "not", "true", "false", "null", "undefined"})

# -- lexer -----------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>0[xX][0-9A-Fa-f]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<brace>\{[^}]*\})
  | (?P<sys>\$[A-Za-z_][A-Za-z0-9_-]*)
  | (?P<name>[A-Za-z_][A-Za-z0-9_-]*)
  | (?P<op><>|!=|<=|>=|\?\?|\|\||[=<>+\-*/%(),.\[\]])
""", re.VERBOSE | re.DOTALL)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_ESCAPES = {"'": "'", '"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n",
            "r": "\r", "t": "\t"}


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # num str brace sys name op end
    text: str
    pos: int
    value: Value = None


def _unescape(raw: str, text: str, pos: int) -> str:
    out: list[str] = []
    i = 1
    end = len(raw) - 1
    while i < end:
        c = raw[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = raw[i + 1]
        if e == "u":
            digits = raw[i + 2:i + 6]
            if len(digits) != 4 or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise QueryError("a \\u escape needs 4 hex digits", text=text, position=pos + i)
            out.append(chr(int(digits, 16)))
            i += 6
        elif e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        else:
            raise QueryError(f"unknown escape \\{e}", text=text, position=pos + i)
    return "".join(out)


def tokenize(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None:
            c = text[pos]
            what = "an unterminated string" if c in "'\"" else f"unexpected character {c!r}"
            raise QueryError(what, text=text, position=pos)
        kind = m.lastgroup
        assert kind is not None
        raw = m.group()
        if kind == "num":
            if raw[:2].lower() == "0x":
                value: Value = int(raw, 16)
            elif any(c in raw for c in ".eE"):
                value = float(raw)
                if not math.isfinite(value):
                    raise QueryError("number out of range", text=text, position=pos)
            else:
                value = int(raw)
            end = m.end()
            if end < n and (text[end].isalnum() or text[end] == "_"):
                raise QueryError("malformed number", text=text, position=pos)
            out.append(_Tok("num", raw, pos, value))
        elif kind == "str":
            out.append(_Tok("str", raw, pos, _unescape(raw, text, pos)))
        elif kind != "ws":
            out.append(_Tok(kind, raw, pos))
        pos = m.end()
    out.append(_Tok("end", "", n))
    return out


# -- parser ----------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = tokenize(text)
        self.i = 0
        self.depth = 0

    def error(self, message: str, tok: _Tok | None = None) -> QueryError:
        tok = tok or self.toks[self.i]
        return QueryError(message, text=self.text, position=tok.pos)

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def is_op(self, *ops: str) -> bool:
        return self.tok.kind == "op" and self.tok.text in ops

    def is_word(self, word: str) -> bool:
        return self.tok.kind == "name" and self.tok.text.lower() == word

    def expect(self, op: str) -> _Tok:
        if not self.is_op(op):
            found = f"{self.tok.text!r}" if self.tok.kind != "end" else "the end"
            raise self.error(f"expected {op!r}, found {found}")
        return self.take()

    def parse(self) -> Node:
        if self.tok.kind == "end":
            raise self.error("empty condition")
        node = self.or_()
        if self.tok.kind != "end":
            raise self.error(f"unexpected {self.tok.text!r}")
        return node

    def or_(self) -> Node:
        left = self.and_()
        while self.is_word("or"):
            tok = self.take()
            left = Binary("OR", left, self.and_(), tok.pos)
        return left

    def and_(self) -> Node:
        left = self.not_()
        while self.is_word("and"):
            tok = self.take()
            left = Binary("AND", left, self.not_(), tok.pos)
        return left

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"nested more than {MAX_DEPTH} levels deep")

    def not_(self) -> Node:
        if self.is_word("not"):
            self.nest()
            tok = self.take()
            node = Unary("NOT", self.not_(), tok.pos)
            self.depth -= 1
            return node
        return self.cmp()

    def cmp(self) -> Node:
        left = self.coalesce()
        if self.tok.kind == "op" and self.tok.text in COMPARISONS:
            tok = self.take()
            left = Binary(tok.text, left, self.coalesce(), tok.pos)
            if self.tok.kind == "op" and self.tok.text in COMPARISONS:
                raise self.error("comparisons do not chain: add parentheses")
        return left

    def _left_assoc(self, ops: tuple[str, ...], operand: str) -> Node:
        sub = getattr(self, operand)
        left: Node = sub()
        while self.is_op(*ops):
            tok = self.take()
            left = Binary(tok.text, left, sub(), tok.pos)
        return left

    def coalesce(self) -> Node:
        return self._left_assoc(("??",), "concat")

    def concat(self) -> Node:
        return self._left_assoc(("||",), "sum")

    def sum(self) -> Node:
        return self._left_assoc(("+", "-"), "product")

    def product(self) -> Node:
        return self._left_assoc(("*", "/", "%"), "unary")

    def unary(self) -> Node:
        if self.is_op("-", "+"):
            self.nest()
            tok = self.take()
            node = Unary(tok.text, self.unary(), tok.pos)
            self.depth -= 1
            return node
        return self.primary()

    def primary(self) -> Node:
        tok = self.tok
        if tok.kind == "num" or tok.kind == "str":
            self.take()
            return Lit(tok.value, tok.pos)
        if tok.kind == "brace":
            self.take()
            name = tok.text[1:-1]
            if not name:
                raise self.error("an empty {} property name", tok)
            return AppProp(name, tok.pos)
        if tok.kind == "op" and tok.text == "(":
            self.nest()
            self.take()
            node = self.or_()
            self.expect(")")
            self.depth -= 1
            return node
        if tok.kind == "sys":
            self.take()
            name = tok.text[1:]
            if name.lower() == "body":
                return self.body(tok)
            if name.lower() == "twin":
                return self.twin(tok)
            return SysProp(name, tok.pos)
        if tok.kind == "name":
            self.take()
            word = tok.text.lower()
            if self.is_op("("):
                return self.call(tok)
            if word in ("and", "or", "not"):
                raise self.error(f"{tok.text} needs an operand before it", tok)
            constants: dict[str, Value] = {"true": True, "false": False, "null": None,
                                           "undefined": UNDEFINED}
            if word in constants:
                return Lit(constants[word], tok.pos)
            return AppProp(tok.text, tok.pos)
        if tok.kind == "end":
            raise self.error("the condition ends too early")
        raise self.error(f"unexpected {tok.text!r}")

    def path(self, *, first_dot: bool) -> tuple[PathStep, ...]:
        steps: list[PathStep] = []
        while self.is_op(".", "["):
            if self.take().text == ".":
                name = self.tok
                if name.kind != "name":
                    raise self.error("expected a property name after '.'")
                self.take()
                steps.append(name.text)
            else:
                if first_dot and not steps:
                    raise self.error("$body[...] is not supported: start with $body.name")
                index = self.tok
                if index.kind != "num" or type(index.value) is not int:
                    raise self.error("expected an array index")
                self.take()
                steps.append(int(index.value))
                self.expect("]")
        return tuple(steps)

    def body(self, tok: _Tok) -> Node:
        if self.is_op("["):
            raise self.error("$body[...] is not supported: start with $body.name")
        steps = self.path(first_dot=True)
        if not steps:
            raise self.error("a bare $body is not supported: name a property ($body.x)", tok)
        return BodyPath(steps, tok.pos)

    def twin(self, tok: _Tok) -> Node:
        steps = self.path(first_dot=True)
        head = [s.lower() if isinstance(s, str) else s for s in steps[:2]]
        if head[:1] == ["tags"]:
            return TwinPath("tags", steps[1:], tok.pos)
        if head[:1] == ["properties"] and len(head) == 2 and head[1] in ("desired", "reported"):
            return TwinPath(str(head[1]), steps[2:], tok.pos)
        raise QueryError("a twin path is $twin.tags..., $twin.properties.desired... or "
                         "$twin.properties.reported...", text=self.text, position=tok.pos)

    def call(self, tok: _Tok) -> Node:
        name = tok.text.upper()
        arity = FUNCTION_ARITY.get(name)
        if arity is None:
            raise self.error(f"unknown function {tok.text}", tok)
        self.nest()
        self.expect("(")
        args: list[Node] = []
        if name == "TWIN_CHANGE_INCLUDES":
            args.append(self.change_path())
        elif not self.is_op(")"):
            args.append(self.or_())
            while self.is_op(","):
                self.take()
                args.append(self.or_())
        self.expect(")")
        self.depth -= 1
        low, high = arity
        if len(args) < low or (high is not None and len(args) > high):
            count = f"{low}" if low == high else f"{low} to {high}" if high else f"at least {low}"
            raise self.error(f"{name} takes {count} argument(s), not {len(args)}", tok)
        return Call(name, tuple(args), tok.pos)

    def change_path(self) -> Node:
        """``twin_change_includes(properties.reported.x)``: a dotted path (or a string)."""
        tok = self.tok
        if tok.kind == "str":
            self.take()
            return Lit(tok.value, tok.pos)
        parts: list[str] = []
        while True:
            if self.tok.kind not in ("name", "sys"):
                raise self.error("expected a twin path such as properties.reported.x")
            parts.append(self.take().text)
            if not self.is_op("."):
                break
            self.take()
        return Lit(".".join(parts), tok.pos)


def parse(text: str) -> Node:
    """Parse a condition; :class:`QueryError` with the position on any mistake."""
    return _Parser(text).parse()


# -- pretty-printer --------------------------------------------------------------------------


def _quote(text: str) -> str:
    out = ["'"]
    for c in text:
        if c in "'\\":
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    out.append("'")
    return "".join(out)


def _literal(value: Value) -> str:
    if value is UNDEFINED:
        return "undefined"
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, int):
        return str(value) if value >= 0 else f"(-{-value})"
    if isinstance(value, float):
        text = repr(value)
        return text if value >= 0 and not text.startswith("-") else f"(-{repr(-value)})"
    raise TypeError(f"not a literal: {value!r}")


def _path(steps: tuple[PathStep, ...]) -> str:
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps)


def is_plain_name(name: str) -> bool:
    return bool(_NAME.match(name)) and name.lower() not in KEYWORDS


def unparse(node: Node) -> str:
    """The condition as text, fully parenthesized: ``parse(unparse(n)) == n``."""
    if isinstance(node, Lit):
        return _literal(node.value)
    if isinstance(node, AppProp):
        return node.name if is_plain_name(node.name) else "{" + node.name + "}"
    if isinstance(node, SysProp):
        return "$" + node.name
    if isinstance(node, BodyPath):
        return "$body" + _path(node.path)
    if isinstance(node, TwinPath):
        head = "$twin.tags" if node.section == "tags" else f"$twin.properties.{node.section}"
        return head + _path(node.path)
    if isinstance(node, Unary):
        sep = " " if node.op == "NOT" else ""
        return f"({node.op}{sep}{unparse(node.operand)})"
    if isinstance(node, Binary):
        return f"({unparse(node.left)} {node.op} {unparse(node.right)})"
    if isinstance(node, Call):
        if node.name == "TWIN_CHANGE_INCLUDES":
            return f"{node.name}({_literal(node.args[0].value)})"  # type: ignore[union-attr]
        return f"{node.name}({', '.join(unparse(a) for a in node.args)})"
    raise TypeError(f"not a node: {node!r}")  # pragma: no cover


def clauses(node: Node) -> list[Node]:
    """The top-level AND clauses of a condition, in order (for explaining a non-match)."""
    if isinstance(node, Binary) and node.op == "AND":
        return clauses(node.left) + clauses(node.right)
    return [node]
