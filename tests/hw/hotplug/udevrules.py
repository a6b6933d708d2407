"""A small udev rules linter and evaluator, for the keys our rules use (udev(7), systemd 252).

Bookworm's udev has no ``udevadm verify`` (added in 254) and ``udevadm test`` writes links and a
database to the host (appliance.md §3.5, §6: "a small Python rules linter is the fallback").
This checks the syntax udev would reject (unknown keys, an assignment operator on a match-only
key, a missing comma between tokens, a GOTO without its LABEL) and runs the rules against a
recorded device and its parents: match keys (globs with ``|`` alternatives), parent keys
(``SUBSYSTEMS``/``KERNELS``/``DRIVERS``/``ATTRS``, all on one device of the chain), GOTO/LABEL,
assignments and ``$env{}``/``$attr{}``/``%k`` substitution. ``IMPORT{builtin}`` is not run: the
recorded properties already hold what ``usb_id`` and ``path_id`` set.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from tests.hw.hotplug.devices import SysDevice

MATCH_ONLY = {"ACTION", "DEVPATH", "KERNEL", "SUBSYSTEM", "DRIVER", "KERNELS", "SUBSYSTEMS",
              "DRIVERS", "ATTRS", "TAGS"}
ASSIGN_ONLY = {"GROUP", "OWNER", "MODE", "RUN", "IMPORT", "GOTO", "LABEL", "OPTIONS"}
EITHER = {"ENV", "ATTR", "TAG", "SYMLINK", "NAME"}
NEEDS_ATTR = {"ENV", "ATTR", "ATTRS", "IMPORT"}
PARENT_KEYS = {"KERNELS", "SUBSYSTEMS", "DRIVERS", "ATTRS"}
MATCH_OPS = {"==", "!="}
ASSIGN_OPS = {"=", "+=", "-=", ":="}

TOKEN = re.compile(r'\s*([A-Z_]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|-=|:=|=)\s*"((?:[^"\\]|\\.)*)"\s*')


class RuleError(ValueError):
    pass


@dataclass(frozen=True)
class Token:
    key: str
    attr: str | None
    op: str
    value: str


@dataclass(frozen=True)
class Rule:
    line: int
    tokens: tuple[Token, ...]


@dataclass
class Outcome:
    symlinks: list[str] = field(default_factory=list)
    group: str | None = None
    mode: str | None = None
    tags: set[str] = field(default_factory=set)
    env: dict[str, str] = field(default_factory=dict)


def parse_rules(text: str) -> list[Rule]:
    """Parse and lint; raises :class:`RuleError` naming the line."""
    rules: list[Rule] = []
    logical = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not logical:
            start = number
        if raw.endswith("\\"):
            logical += raw[:-1]
            continue
        logical += raw
        line, logical = logical.strip(), ""
        if not line or line.startswith("#"):
            continue
        rules.append(Rule(start, _tokens(line, start)))
    labels = {t.value: i for i, r in enumerate(rules) for t in r.tokens if t.key == "LABEL"}
    for index, rule in enumerate(rules):
        for token in rule.tokens:
            if token.key == "GOTO" and labels.get(token.value, -1) <= index:
                raise RuleError(f"line {rule.line}: GOTO {token.value!r} has no LABEL after it")
    return rules


def _tokens(line: str, number: int) -> tuple[Token, ...]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(line):
        found = TOKEN.match(line, pos)
        if found is None:
            raise RuleError(f"line {number}: cannot parse {line[pos:pos + 30]!r}")
        key, attr, op, value = found.groups()
        _check(key, attr, op, number)
        tokens.append(Token(key, attr, op, value))
        pos = found.end()
        if pos < len(line):
            if line[pos] != ",":
                raise RuleError(f"line {number}: a comma between tokens is expected")
            pos += 1
    return tuple(tokens)


def _check(key: str, attr: str | None, op: str, number: int) -> None:
    if key not in MATCH_ONLY | ASSIGN_ONLY | EITHER:
        raise RuleError(f"line {number}: unknown key {key}")
    if key in MATCH_ONLY and op not in MATCH_OPS:
        raise RuleError(f"line {number}: invalid operator {op} for {key}")
    if key in ASSIGN_ONLY and op not in ASSIGN_OPS:
        raise RuleError(f"line {number}: invalid operator {op} for {key}")
    if key in ("GOTO", "LABEL") and op != "=":
        raise RuleError(f"line {number}: {key} takes =")
    if (key in NEEDS_ATTR) != (attr is not None):
        raise RuleError(f"line {number}: {key} {'needs' if key in NEEDS_ATTR else 'takes no'} {{}}")


def _glob(pattern: str, value: str | None) -> bool:
    value = value or ""
    return any(fnmatch.fnmatchcase(value, alt) if alt else value == ""
               for alt in pattern.split("|"))


def _matches(token: Token, value: str | None) -> bool:
    hit = _glob(token.value, value)
    return hit if token.op == "==" else not hit


def _own(token: Token, device: SysDevice, action: str, env: dict[str, str],
         tags: set[str]) -> bool:
    values = {
        "ACTION": action, "DEVPATH": device.path, "KERNEL": device.kernel,
        "SUBSYSTEM": device.subsystem, "DRIVER": device.env.get("DRIVER"),
    }
    if token.key == "ENV":
        return _matches(token, env.get(token.attr or ""))
    if token.key == "ATTR":
        return _matches(token, device.attrs.get(token.attr or ""))
    if token.key in ("TAG", "TAGS"):
        hit = token.value in tags
        return hit if token.op == "==" else not hit
    return _matches(token, values[token.key])


def _parent(token: Token, device: SysDevice) -> bool:
    value = {"KERNELS": device.kernel, "SUBSYSTEMS": device.subsystem,
             "DRIVERS": device.env.get("DRIVER"),
             "ATTRS": device.attrs.get(token.attr or "")}[token.key]
    return _matches(token, value)


def _substitute(value: str, device: SysDevice, env: dict[str, str]) -> str:
    def one(found: re.Match[str]) -> str:
        kind, name = found.group(1), found.group(2)
        if kind == "env":
            return env.get(name, "")
        return device.attrs.get(name, "")
    value = re.sub(r"\$(env|attr)\{([^}]*)\}", one, value)
    return value.replace("%k", device.kernel).replace("$kernel", device.kernel)


def evaluate(rules: list[Rule], chain: list[SysDevice], action: str = "add") -> Outcome:
    """Run ``rules`` for ``chain[0]`` (its parents follow, nearest first)."""
    device = chain[0]
    env = dict(device.env)
    out = Outcome()
    skip_to: str | None = None
    for rule in rules:
        label = next((t.value for t in rule.tokens if t.key == "LABEL"), None)
        if skip_to is not None:
            if label != skip_to:
                continue
            skip_to = None
        if label is not None:
            continue
        own = [t for t in rule.tokens if t.key not in PARENT_KEYS and t.op in MATCH_OPS]
        parent = [t for t in rule.tokens if t.key in PARENT_KEYS]
        if not all(_own(t, device, action, env, out.tags) for t in own):
            continue
        if parent and not any(all(_parent(t, d) for t in parent) for d in chain):
            continue
        for token in rule.tokens:
            if token.op in MATCH_OPS:
                continue
            value = _substitute(token.value, device, env)
            if token.key == "SYMLINK":
                out.symlinks += value.split()
            elif token.key == "GROUP":
                out.group = value
            elif token.key == "MODE":
                out.mode = value
            elif token.key == "TAG":
                out.tags.add(value)
            elif token.key == "ENV" and token.attr:
                env[token.attr] = value
                out.env[token.attr] = value
            elif token.key == "GOTO":
                skip_to = value
    return out
