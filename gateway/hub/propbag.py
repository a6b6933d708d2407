"""The IoT Hub property bag: ``k1=v1&k2=v2`` with percent-encoded keys and values.

Pure. The bag is the last topic level of telemetry, C2D and module-input topics
(IoT Hub ref §2.2, §3.1, §6.1; pitfalls 10 and 11 in §15.3).

Grammar (what :func:`decode_bag` accepts)::

    bag     = [ "?" ] [ segment *( "&" segment ) ]
    segment = ""                      ; empty segments (``a=1&&b=2``) are skipped
            | key                     ; no "=": the value is None (null)
            | key "=" value           ; "k=" gives the empty string
    key     = 1*pchar                 ; percent-decoded; may not be empty
    value   = *( pchar / "=" )        ; split on the *first* "=", then percent-decoded

Decoding is ``urllib.parse.unquote`` with strict checks: a ``+`` stays a ``+`` (never
``unquote_plus``: the SDKs insist, ref §2.2), a ``%`` not followed by two hex digits and
escapes that do not form UTF-8 raise :class:`~gateway.errors.RemoteProtocolError`.

Encoding (:func:`encode_bag`) is full percent-encoding (``quote(safe="")``), as the Python
SDK does: ``$`` becomes ``%24``, ``/`` ``%2F``, space ``%20``, ``&`` ``%26``, ``=`` ``%3D``.
Only RFC 3986 unreserved characters (``A-Z a-z 0-9 - . _ ~``) are left as they are, so an
encoded bag never contains ``/``, ``+`` or ``#`` and is safe as one MQTT topic level.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote

from gateway.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["Pairs", "decode_bag", "decode_component", "encode_bag", "encode_component"]

Pairs = tuple[tuple[str, str | None], ...]
"""Decoded bag: ``(key, value)`` in wire order; value None means the key had no ``=``."""

# A "%" that does not start a two-hex-digit escape.
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")

# ASCII quoting table: every ASCII character except the unreserved ones -> "%XX".
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ASCII_QUOTE = {c: f"%{c:02X}" for c in range(128) if chr(c) not in _UNRESERVED}
_ALL_UNRESERVED = re.compile(r"[A-Za-z0-9._~-]*")

# Decoding table for the escapes of ASCII characters, either case: "24" -> "$", "2f" -> "/".
_ASCII_ESCAPES = {
    hi + lo: chr(int(hi + lo, 16)) for hi in "01234567" for lo in "0123456789abcdefABCDEF"
}


def decode_component(text: str) -> str:
    """Percent-decode one key or value strictly (``+`` is a plus; IoT Hub ref §2.2).

    Raises RemoteProtocolError on a malformed escape or escapes that are not UTF-8.
    """
    if "%" not in text:
        return text
    # Fast path: every escape is ASCII (%00-%7F), as for "$", "/", " ", "&", "=".
    parts = text.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        char = _ASCII_ESCAPES.get(part[:2])
        if char is None:
            return _decode_strict(text)
        out.append(char)
        out.append(part[2:])
    return "".join(out)


def _decode_strict(text: str) -> str:
    if _BAD_ESCAPE.search(text) is not None:
        raise RemoteProtocolError(f"malformed percent escape in {text!r}")
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"percent escapes are not UTF-8 in {text!r}") from None


def encode_component(text: str) -> str:
    """Percent-encode one key or value with nothing safe (``quote(text, safe="")``)."""
    if text.isascii():
        if text.isalnum() or _ALL_UNRESERVED.fullmatch(text) is not None:
            return text
        return text.translate(_ASCII_QUOTE)
    return quote(text, safe="")


def decode_bag(bag: str) -> Pairs:
    """Decode a property bag into ``(key, value)`` pairs in wire order (IoT Hub ref §2.2).

    ``""`` gives ``()``; a leading ``?`` is tolerated; empty segments are skipped; a
    segment without ``=`` has value None; ``k=`` has value ``""``. Duplicate keys are
    kept (the caller decides; :func:`gateway.hub.messages.split_properties` keeps the
    first). Raises RemoteProtocolError on malformed escapes, non-UTF-8 escapes or an
    empty key.
    """
    if not bag:
        return ()
    if bag[0] == "?":
        bag = bag[1:]
    out: list[tuple[str, str | None]] = []
    if "%" not in bag:  # fast path: nothing to unquote
        for segment in bag.split("&"):
            if not segment:
                continue
            key, sep, value = segment.partition("=")
            if not key:
                raise RemoteProtocolError(f"empty property name in bag {bag!r}")
            out.append((key, value if sep else None))
        return tuple(out)
    for segment in bag.split("&"):
        if not segment:
            continue
        key, sep, value = segment.partition("=")
        key = decode_component(key)
        if not key:
            raise RemoteProtocolError(f"empty property name in bag {bag!r}")
        out.append((key, decode_component(value) if sep else None))
    return tuple(out)


def encode_bag(pairs: Iterable[tuple[str, str | None]] | Mapping[str, str | None]) -> str:
    """Encode pairs (or a mapping) as a property bag, fully percent-encoded (ref §2.2).

    A None value gives a bare key. Raises LocalProtocolError on an empty key (it could not
    be decoded back).
    """
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    parts: list[str] = []
    for key, value in items:
        if not key:
            raise LocalProtocolError("a property name may not be empty")
        if value is None:
            parts.append(encode_component(key))
        else:
            parts.append(encode_component(key) + "=" + encode_component(value))
    return "&".join(parts)
