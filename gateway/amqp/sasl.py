"""The SASL layer (AMQP 1.0 part 5 §5.3) as the Azure clients use it. Pure.

Both Azure clients authenticate the connection with claims-based security afterwards
(a ``$cbs`` put-token), so their SASL exchange carries no credentials: azure-eventhub's
pure-Python transport asks for ``ANONYMOUS``; uamqp (azure-iot-hub's registry manager,
azure-eventhub's uamqp transport) asks for ``MSSBCBS``, the mechanism Azure Service Bus and
Event Hubs offer to say "the token follows on $cbs". Proton's built-in SASL (without Cyrus)
cannot offer a mechanism it does not implement, so this small exchange is done here and
Proton gets the AMQP stream that follows::

    client: AMQP 3.1.0.0                 server: AMQP 3.1.0.0, sasl-mechanisms [MSSBCBS ANONYMOUS]
    client: sasl-init (mechanism, ...)   server: sasl-outcome (ok | auth)
    then both: AMQP 0.1.0.0 ...

A peer that sends the plain AMQP header (no SASL) is answered with the SASL header and
closed (part 2 §2.2: the server answers with the protocol it wants). The mechanism only
decides how the connection proves itself later: it is always ``$cbs``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

__all__ = ["MECHANISMS", "SASL_HEADER", "AMQP_HEADER", "SaslResult", "SaslServer"]

SASL_HEADER: Final = b"AMQP\x03\x01\x00\x00"
AMQP_HEADER: Final = b"AMQP\x00\x01\x00\x00"
MECHANISMS: Final = ("MSSBCBS", "ANONYMOUS")
MAX_FRAME: Final = 4096  # a sasl-init carries a short mechanism name (and, for PLAIN, ~1 KB)

_U32: Final = struct.Struct(">I")


def _frame(body: bytes) -> bytes:
    """A SASL frame (type 1, channel 0) around ``body``."""
    return _U32.pack(8 + len(body)) + b"\x02\x01\x00\x00" + body


def _mechanisms_frame() -> bytes:
    symbols = b"".join(bytes([len(m)]) + m.encode() for m in MECHANISMS)
    array = bytes([0xE0, 2 + len(symbols), len(MECHANISMS), 0xA3]) + symbols
    return _frame(b"\x00\x53\x40" + bytes([0xC0, 1 + len(array), 1]) + array)


def _outcome_frame(code: int) -> bytes:
    return _frame(b"\x00\x53\x44\xc0\x04\x02\x50" + bytes([code]) + b"\x40")


@dataclass(frozen=True, slots=True)
class SaslResult:
    """The exchange is over: ``ok`` with the ``mechanism`` used, and the bytes that came
    after it (the start of the AMQP stream), or refused (``error`` says why)."""

    ok: bool
    mechanism: str = ""
    rest: bytes = b""
    error: str = ""


class SaslServer:
    """Feed it the peer's bytes; it returns what to send and, once over, a result."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header_seen = False

    def feed(self, data: bytes) -> tuple[bytes, SaslResult | None]:
        buf = self._buf
        buf += data
        out = b""
        if not self._header_seen:
            if len(buf) < 8:
                if not SASL_HEADER.startswith(bytes(buf[:4])[: len(buf)]):
                    return SASL_HEADER, SaslResult(False, error="not AMQP")
                return b"", None
            header = bytes(buf[:8])
            del buf[:8]
            if header != SASL_HEADER:
                what = "AMQP without SASL" if header == AMQP_HEADER else "not AMQP with SASL"
                return SASL_HEADER, SaslResult(False, error=f"{what}: SASL is required")
            self._header_seen = True
            out = SASL_HEADER + _mechanisms_frame()
        if len(buf) < 8:
            return out, None
        size = _U32.unpack_from(buf, 0)[0]
        if size < 12 or size > MAX_FRAME or buf[5] != 1:
            return out + _outcome_frame(2), SaslResult(False, error="malformed SASL frame")
        if len(buf) < size:
            return out, None
        frame = bytes(buf[:size])
        rest = bytes(buf[size:])
        buf.clear()
        mechanism = _init_mechanism(frame)
        if mechanism is None:
            return out + _outcome_frame(2), SaslResult(False, error="expected sasl-init")
        if mechanism not in MECHANISMS:
            return out + _outcome_frame(1), SaslResult(
                False, mechanism=mechanism,
                error=f"SASL mechanism {mechanism!r} not offered (use {' or '.join(MECHANISMS)})")
        return out + _outcome_frame(0), SaslResult(True, mechanism=mechanism, rest=rest)


def _init_mechanism(frame: bytes) -> str | None:
    """The mechanism symbol of a sasl-init frame, None if the frame is not one."""
    at = frame[4] * 4
    if frame[at:at + 3] != b"\x00\x53\x41":
        return None
    at += 3
    kind = frame[at:at + 1]
    if kind == b"\xc0":
        at += 3
    elif kind == b"\xd0":
        at += 9
    else:
        return None
    code = frame[at:at + 1]
    if code == b"\xa3":
        length, at = frame[at + 1], at + 2
    elif code == b"\xb3" and len(frame) >= at + 5:
        length, at = _U32.unpack_from(frame, at + 1)[0], at + 5
    else:
        return None
    if at + length > len(frame):
        return None
    try:
        return frame[at:at + length].decode("ascii")
    except UnicodeDecodeError:
        return None
