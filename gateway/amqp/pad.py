"""Pad every performative Proton writes to its full field count. Pure.

AMQP 1.0 (part 1 §1.4, "trailing null elements may be omitted") lets an encoder drop the
fields after the last non-null one, and Proton does. azure-eventhub's pure-Python client
(``azure/eventhub/_pyamqp``) reads performative fields by position (``frame[9]`` of open,
``frame[13]`` of attach, the transfer payload as ``frame[11]``), which only works with peers
that write every field, as Microsoft's own AMQP stack does. So the shell rewrites each
outgoing frame's performative list to its full length, appending nulls (``0x40``); the
bytes mean the same to every conforming peer (uamqp, Proton, .NET).

Only frame headers and the outermost list header are read: size, data offset, frame type,
the descriptor code, the list's size and count. Protocol headers (``AMQP`` + 4 bytes) and
empty frames pass through as they are.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["FramePadder"]

# descriptor code -> field count (AMQP 1.0 part 2 §2.7, part 5 §5.3)
_FIELDS: Final = {
    0x10: 10, 0x11: 8, 0x12: 14, 0x13: 11, 0x14: 11, 0x15: 6, 0x16: 3, 0x17: 1, 0x18: 1,
    0x40: 1, 0x41: 3, 0x42: 1, 0x43: 1, 0x44: 2,
}
_U32: Final = struct.Struct(">I")
_NULL: Final = 0x40


class FramePadder:
    """Feed it output bytes in any chunks; get back whole frames, padded."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> bytes:
        buf = self._buf
        buf += data
        out = bytearray()
        pos = 0
        end = len(buf)
        while end - pos >= 8:
            if buf[pos:pos + 4] == b"AMQP":
                out += buf[pos:pos + 8]
                pos += 8
                continue
            size = _U32.unpack_from(buf, pos)[0]
            if size < 8:  # not a frame: hand it on unchanged and stop parsing
                out += buf[pos:]
                pos = end
                break
            if end - pos < size:
                break
            out += _pad(bytes(buf[pos:pos + size]))
            pos += size
        del buf[:pos]
        return bytes(out)


def _pad(frame: bytes) -> bytes:
    doff = frame[4] * 4
    if len(frame) <= doff + 3 or frame[doff] != 0x00 or frame[doff + 1] != 0x53:
        return frame  # empty frame, or a descriptor form Proton does not write
    code = frame[doff + 2]
    want = _FIELDS.get(code)
    if want is None:
        return frame
    at = doff + 3
    kind = frame[at]
    if kind == 0x45:  # list0
        count, elements, after = 0, b"", at + 1
    elif kind == 0xC0:  # list8: size, count
        size, count = frame[at + 1], frame[at + 2]
        elements, after = frame[at + 3:at + 2 + size], at + 2 + size
    elif kind == 0xD0:  # list32
        size, count = _U32.unpack_from(frame, at + 1)[0], _U32.unpack_from(frame, at + 5)[0]
        elements, after = frame[at + 9:at + 5 + size], at + 5 + size
    else:
        return frame
    if count >= want:
        return frame
    elements += bytes([_NULL]) * (want - count)
    if len(elements) + 1 <= 255:
        listed = bytes([0xC0, len(elements) + 1, want]) + elements
    else:
        listed = b"\xd0" + _U32.pack(len(elements) + 4) + _U32.pack(want) + elements
    rest = frame[after:]
    head = frame[4:doff]  # doff, type, channel, extended header
    new = head + frame[doff:at] + listed + rest
    return _U32.pack(len(new) + 4) + new
