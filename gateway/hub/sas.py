"""Shared access signature tokens: make, parse and verify (IoT Hub ref §7.1).

Pure: no I/O, no clock of its own (callers pass ``now``).

A token reads ``SharedAccessSignature sr={uri}&sig={sig}&se={expiry}[&skn={policy}]``. The
signature is ``base64(HMAC-SHA256(base64decode(key), sr + "\\n" + se))`` computed over ``sr``
*exactly as it travels in the token*: the Python device SDK escapes with ``quote(uri, safe="")``
(upper-case ``%2F``), the service SDK with ``quote_plus``, the docs show lower-case escapes. So
the verifier keeps ``sr`` and ``se`` raw and only decodes ``sr`` afterwards to check the
audience, as edgeHub does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote

from gateway.errors import AuthError

__all__ = [
    "SAS_PREFIX",
    "SasToken",
    "generate_sas_token",
    "parse_sas_token",
    "sign",
    "verify_sas_signature",
]

SAS_PREFIX = "SharedAccessSignature"
_FIELDS = frozenset({"sr", "sig", "se", "skn"})
_MAX_TOKEN_LENGTH = 4096  # real tokens are ~200 bytes; refuse to hash megabytes
MAX_EXPIRY = 253402300799  # 9999-12-31T23:59:59Z: past it, se is no time (a float overflows)


def sign(key_b64: str, message: str) -> bytes:
    """Return the raw HMAC-SHA256 of ``message`` under the base64 ``key_b64`` (ref §7.1)."""
    key = base64.b64decode(key_b64, validate=True)
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


def generate_sas_token(
    resource_uri: str, key_b64: str, expiry: int, policy: str | None = None
) -> str:
    """Make a token for ``resource_uri`` (e.g. ``hub/devices/dev1``) valid until ``expiry``.

    Encodes like the Python device SDK: ``sr`` and ``sig`` fully percent-encoded with upper-case
    escapes, ``skn`` appended for policy keys (IoT Hub ref §7.1, §7.2).
    """
    sr = quote(resource_uri, safe="")
    se = str(int(expiry))
    sig = base64.b64encode(sign(key_b64, f"{sr}\n{se}")).decode("ascii")
    token = f"{SAS_PREFIX} sr={sr}&sig={quote(sig, safe='')}&se={se}"
    if policy is not None:
        token += f"&skn={quote(policy, safe='')}"
    return token


@dataclass(frozen=True, slots=True)
class SasToken:
    """A parsed token. ``raw_sr``/``raw_se`` are the bytes that were signed; ``resource`` is
    ``raw_sr`` percent-decoded; ``signature`` is the decoded HMAC."""

    raw_sr: str
    resource: str
    signature: bytes
    expiry: int
    policy: str | None
    raw_se: str


def _malformed(reason: str) -> AuthError:
    return AuthError(f"malformed SAS token: {reason}", connack=4)


def parse_sas_token(token: str) -> SasToken:
    """Parse a token the way edgeHub does (IoT Hub ref §7.1).

    Split on the first space; the scheme must be ``SharedAccessSignature``; fields split on
    ``&`` then on the first ``=``; field names case-insensitive; ``sr`` kept raw, the other
    values percent-decoded (``+`` is kept: it is a base64 character, never a space here).
    Unknown or repeated fields, a non-integer ``se`` or a signature that is not 32 bytes of
    base64 raise :class:`AuthError` with CONNACK 4.
    """
    if len(token) > _MAX_TOKEN_LENGTH:
        raise _malformed("too long")
    scheme, sep, rest = token.strip().partition(" ")
    if not sep or scheme != SAS_PREFIX:
        raise _malformed(f"scheme is not {SAS_PREFIX}")
    fields: dict[str, str] = {}
    for pair in rest.strip().split("&"):
        name, eq, value = pair.partition("=")
        name = name.strip().lower()
        if not eq or name not in _FIELDS:
            raise _malformed(f"unexpected field {name!r}")
        if name in fields:
            raise _malformed(f"repeated field {name!r}")
        fields[name] = value.strip()
    missing = [name for name in ("sr", "sig", "se") if not fields.get(name)]
    if missing:
        raise _malformed(f"missing {', '.join(missing)}")
    raw_se = fields["se"]
    if not raw_se.isascii() or not raw_se.isdigit():
        raise _malformed("se is not an integer")
    try:
        signature = base64.b64decode(unquote(fields["sig"]), validate=True)
    except (binascii.Error, ValueError):
        raise _malformed("sig is not base64") from None
    if len(signature) != hashlib.sha256().digest_size:
        raise _malformed("sig is not an HMAC-SHA256")
    skn = fields.get("skn")
    return SasToken(
        raw_sr=fields["sr"],
        resource=unquote(fields["sr"]),
        signature=signature,
        expiry=int(raw_se),
        policy=unquote(skn) if skn else None,
        raw_se=raw_se,
    )


def verify_sas_signature(
    token: SasToken, keys: Iterable[str], *, now: float, skew: float = 300,
    key_text: bool = False,
) -> None:
    """Check expiry (with ``skew`` seconds of clock allowance) and that one of ``keys`` (base64)
    signed ``raw_sr + "\\n" + raw_se`` (IoT Hub ref §7.1). Keys that are not base64 never match.

    ``key_text``: also accept the Event Hubs/Service Bus scheme, where the HMAC key is the
    key's base64 *text* (azure-eventhub signs so; its AMQP ``$cbs`` tokens need it).

    Raises :class:`AuthError` ``"token expired"``, ``"token expiry out of range"`` (an ``se``
    past year 9999: hundreds of digits would overflow a float) or ``"bad signature"``
    (CONNACK 5).
    """
    if token.expiry > MAX_EXPIRY:
        raise AuthError("token expiry out of range")
    if token.expiry + skew < now:
        raise AuthError("token expired")
    message = f"{token.raw_sr}\n{token.raw_se}"
    for key in keys:
        try:
            expected = sign(key, message)
        except (binascii.Error, ValueError):
            continue
        if hmac.compare_digest(expected, token.signature):
            return
        if key_text:  # Event Hubs / Service Bus sign with the key's text itself
            expected = hmac.new(key.encode(), message.encode(), hashlib.sha256).digest()
            if hmac.compare_digest(expected, token.signature):
                return
    raise AuthError("bad signature")
