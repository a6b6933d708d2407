"""Hand-built MQTT bytes for tests, written without the codec under test (MQTT 3.1.1 §2)."""

from __future__ import annotations


def varint(length: int) -> bytes:
    """The remaining-length encoding (§2.2.3), written independently of the codec."""
    out = bytearray()
    while True:
        length, digit = divmod(length, 128)
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def frame(first: int, body: bytes) -> bytes:
    """A packet from its first byte and its body."""
    return bytes([first]) + varint(len(body)) + body


def u16(value: int) -> bytes:
    return value.to_bytes(2, "big")


def string(value: str | bytes) -> bytes:
    """A length-prefixed string; bytes are taken as they are (to build ill-formed UTF-8)."""
    raw = value.encode() if isinstance(value, str) else value
    return u16(len(raw)) + raw


def connect_body(
    *,
    name: str | bytes = "MQTT",
    level: int = 4,
    flags: int = 0x02,
    keepalive: int = 60,
    payload: bytes | None = None,
) -> bytes:
    """A CONNECT body; the payload defaults to client id "c" only."""
    if payload is None:
        payload = string("c")
    return string(name) + bytes([level, flags]) + u16(keepalive) + payload


def publish(
    topic: str | bytes, payload: bytes = b"x", *, first: int = 0x32, packet_id: int = 1
) -> bytes:
    """A PUBLISH; the packet id is written when the first byte says QoS > 0."""
    qos = (first >> 1) & 3
    return frame(first, string(topic) + (u16(packet_id) if qos else b"") + payload)
