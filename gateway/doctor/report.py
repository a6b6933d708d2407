"""What ``gateway doctor`` found: one finding per check, rendered as text or JSON. Pure.

Every finding says ``ok``, ``warn`` or ``fail``, what was seen, and (unless ok) a hint that
tells a technician what to do next, in the manner of ``iotedge check``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "warn", "fail", "skip"]
_MARK: Mapping[Status, str] = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


@dataclass(frozen=True, slots=True)
class Finding:
    check: str  # a stable dotted name, e.g. "certificates.server", "upstream.tls"
    status: Status
    message: str
    hint: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"check": self.check, "status": self.status,
                               "message": self.message}
        if self.hint:
            out["hint"] = self.hint
        if self.details:
            out["details"] = dict(self.details)
        return out


def ok(check: str, message: str, **details: Any) -> Finding:
    return Finding(check, "ok", message, details=details)


def warn(check: str, message: str, hint: str, **details: Any) -> Finding:
    return Finding(check, "warn", message, hint, details)


def fail(check: str, message: str, hint: str, **details: Any) -> Finding:
    return Finding(check, "fail", message, hint, details)


def skip(check: str, message: str) -> Finding:
    return Finding(check, "skip", message)


def summary(findings: Iterable[Finding]) -> dict[str, int]:
    counts = {"ok": 0, "warn": 0, "fail": 0, "skip": 0}
    for f in findings:
        counts[f.status] += 1
    return counts


def render_text(findings: Iterable[Finding]) -> str:
    findings = list(findings)
    lines = []
    for f in findings:
        lines.append(f"[{_MARK[f.status]}] {f.check}: {f.message}")
        if f.hint:
            lines.append(f"         hint: {f.hint}")
    counts = summary(findings)
    lines.append(f"{counts['ok']} ok, {counts['warn']} warnings, {counts['fail']} failures"
                 + (f", {counts['skip']} skipped" if counts["skip"] else ""))
    return "\n".join(lines)


def render_json(findings: Iterable[Finding]) -> dict[str, Any]:
    findings = list(findings)
    return {"summary": summary(findings), "checks": [f.json() for f in findings]}


def exit_status(findings: Iterable[Finding]) -> int:
    """0 when nothing failed, 1 when something failed (warnings do not fail the command)."""
    return 1 if any(f.status == "fail" for f in findings) else 0
