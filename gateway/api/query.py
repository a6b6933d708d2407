"""Query-string values of the service API, checked: a bad one is a 400 in IoT Hub's error
shape (``ArgumentInvalid``), never a 500 from a stray ``ValueError``."""

from __future__ import annotations

import math

from aiohttp import web

from gateway.errors import InvalidRequestError

__all__ = ["float_query", "int_query"]


def int_query(request: web.Request, name: str, default: int, *, minimum: int = 0,
              maximum: int | None = None) -> int:
    """``?name=N``: a decimal integer >= ``minimum``, clamped to ``maximum``."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    text = raw.strip()
    if not text.lstrip("-").isdigit() or len(text) > 18:
        raise InvalidRequestError(f"{name} must be an integer, not {raw[:40]!r}")
    value = int(text)
    if value < minimum:
        raise InvalidRequestError(f"{name} must be at least {minimum}, not {value}")
    return value if maximum is None else min(value, maximum)


def float_query(request: web.Request, name: str, default: float, *, minimum: float = 0.0,
                maximum: float) -> float:
    """``?name=S``: a finite number >= ``minimum``, clamped to ``maximum``."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequestError(f"{name} must be a number, not {raw[:40]!r}") from None
    if not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number, not {raw[:40]!r}")
    if value < minimum:
        raise InvalidRequestError(f"{name} must be at least {minimum:g}, not {value:g}")
    return min(value, maximum)
