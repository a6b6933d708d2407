"""Encoding MQTT 3.1.1 packets to bytes (the writer half of :mod:`gateway.mqtt.codec`).

Every encoder checks that the packet obeys the protocol and raises
:class:`~gateway.errors.LocalProtocolError` otherwise: we never put invalid bytes on the wire.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import Any

from gateway.errors import LocalProtocolError
from gateway.mqtt.packets import (
    SUBACK_FAILURE,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)
from gateway.mqtt.topics import filter_problem, topic_problem

__all__ = ["encode", "encode_puback", "encode_pubacks", "encode_publish"]

MAX_REMAINING_LENGTH = 268_435_455
"""The largest remaining length four length bytes can express (MQTT 3.1.1 §2.2.3)."""

_ACK = struct.Struct(">BBH")  # fixed header byte, remaining length 2, packet id
_HEAD_2 = struct.Struct(">BBH")  # fixed header byte, 1-byte remaining length, topic length
_HEAD_3 = struct.Struct(">BBBH")  # fixed header byte, 2-byte remaining length, topic length
_PACKET_ID = struct.Struct(">H")
_SUPPORTED_PROTOCOLS = {("MQTT", 4), ("MQIsdp", 3)}
_VALID_SUBACK_CODES = frozenset({0, 1, 2, SUBACK_FAILURE})


def _remaining_length(length: int) -> bytes:
    """The variable-length encoding of the remaining length (MQTT 3.1.1 §2.2.3)."""
    if length > MAX_REMAINING_LENGTH:
        raise LocalProtocolError(
            f"packet too large: remaining length {length} exceeds {MAX_REMAINING_LENGTH}"
            " (MQTT 3.1.1 §2.2.3)"
        )
    out = bytearray()
    while True:
        digit = length & 0x7F
        length >>= 7
        if length:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def _frame(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + _remaining_length(len(body)) + body


def _utf8(value: str, what: str) -> bytes:
    """A length-prefixed UTF-8 string (MQTT 3.1.1 §1.5.3)."""
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{what} is not encodable as UTF-8 (MQTT 3.1.1 §1.5.3)") from None
    if len(raw) > 0xFFFF:
        raise LocalProtocolError(f"{what} is longer than 65535 bytes (MQTT 3.1.1 §1.5.3)")
    if b"\x00" in raw:
        raise LocalProtocolError(f"{what} contains U+0000 (MQTT 3.1.1 §1.5.3)")
    return len(raw).to_bytes(2, "big") + raw


def _binary(value: bytes, what: str) -> bytes:
    """Length-prefixed binary data (MQTT 3.1.1 §1.5.3, as used by §3.1.3.3 and §3.1.3.5)."""
    if len(value) > 0xFFFF:
        raise LocalProtocolError(f"{what} is longer than 65535 bytes (MQTT 3.1.1 §3.1.3)")
    return len(value).to_bytes(2, "big") + bytes(value)


def _packet_id(packet_id: int | None, what: str) -> bytes:
    """A non-zero 16-bit packet identifier (MQTT 3.1.1 §2.3.1)."""
    if packet_id is None or not 0 < packet_id <= 0xFFFF:
        raise LocalProtocolError(
            f"{what} packet id {packet_id!r} is not in 1..65535 (MQTT 3.1.1 §2.3.1)"
        )
    return packet_id.to_bytes(2, "big")


def _encode_connect(packet: Connect) -> bytes:
    """CONNECT (MQTT 3.1.1 §3.1)."""
    if (packet.protocol_name, packet.protocol_level) not in _SUPPORTED_PROTOCOLS:
        raise LocalProtocolError(
            f"cannot encode protocol {packet.protocol_name!r} level {packet.protocol_level}"
            " (MQTT 3.1.1 §3.1.2.1, §3.1.2.2)"
        )
    if not 0 <= packet.keepalive <= 0xFFFF:
        raise LocalProtocolError(
            f"keep alive {packet.keepalive} is not in 0..65535 (MQTT 3.1.1 §3.1.2.10)"
        )
    if packet.password is not None and packet.username is None:
        raise LocalProtocolError("a password needs a user name (MQTT 3.1.1 §3.1.2.9)")
    flags = 0x02 if packet.clean_session else 0
    payload = [_utf8(packet.client_id, "client identifier")]
    will = packet.will
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise LocalProtocolError(f"will QoS {will.qos} is not 0, 1 or 2 (MQTT 3.1.1 §3.1.2.6)")
        problem = topic_problem(will.topic)
        if problem is not None:
            raise LocalProtocolError(f"will {problem}")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += (_utf8(will.topic, "will topic"), _binary(will.payload, "will message"))
    if packet.username is not None:
        flags |= 0x80
        payload.append(_utf8(packet.username, "user name"))
    if packet.password is not None:
        flags |= 0x40
        payload.append(_binary(packet.password, "password"))
    header = (
        _utf8(packet.protocol_name, "protocol name")
        + bytes((packet.protocol_level, flags))
        + packet.keepalive.to_bytes(2, "big")
    )
    return _frame(0x10, header + b"".join(payload))


def _encode_connack(packet: Connack) -> bytes:
    """CONNACK (MQTT 3.1.1 §3.2)."""
    code = packet.return_code
    if not 0 <= code <= 5:
        raise LocalProtocolError(f"CONNACK return code {code} is reserved (MQTT 3.1.1 §3.2.2.3)")
    if packet.session_present and code:
        raise LocalProtocolError(
            "a refusing CONNACK must not set session present (MQTT 3.1.1 §3.2.2.2)"
        )
    return bytes((0x20, 2, 1 if packet.session_present else 0, code))


def _encode_publish_packet(packet: Publish) -> bytes:
    return encode_publish(
        packet.topic, packet.payload, packet.qos, packet.packet_id, packet.retain, packet.dup
    )


def encode_publish(
    topic: str,
    payload: bytes,
    qos: int,
    packet_id: int | None,
    retain: bool = False,
    dup: bool = False,
) -> bytes:
    """PUBLISH (MQTT 3.1.1 §3.3) without building a :class:`Publish` first: the hot path.

    ``packet_id`` must be None for QoS 0 and in 1..65535 otherwise (§2.3.1); the topic must be
    a valid topic name (§3.3.2.1); DUP must be 0 for QoS 0 (§3.3.1.1).
    """
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise LocalProtocolError(str(topic_problem(topic)))
    try:
        raw_topic = topic.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(
            "topic name is not encodable as UTF-8 (MQTT 3.1.1 §1.5.3)"
        ) from None
    topic_length = len(raw_topic)
    if topic_length > 0xFFFF:
        raise LocalProtocolError("topic name is longer than 65535 bytes (MQTT 3.1.1 §1.5.3)")
    if qos == 1 or qos == 2:
        if packet_id is None or not 0 < packet_id <= 0xFFFF:
            raise LocalProtocolError(
                f"QoS {qos} PUBLISH needs a packet id in 1..65535, not {packet_id!r}"
                " (MQTT 3.1.1 §2.3.1)"
            )
        packet_id_bytes = _PACKET_ID.pack(packet_id)
    elif qos == 0:
        if packet_id is not None:
            raise LocalProtocolError("QoS 0 PUBLISH must not carry a packet id (MQTT 3.1.1 §2.3.1)")
        if dup:
            raise LocalProtocolError("QoS 0 PUBLISH must not set DUP (MQTT 3.1.1 §3.3.1.1)")
        packet_id_bytes = b""
    else:
        raise LocalProtocolError(f"QoS {qos} is not 0, 1 or 2 (MQTT 3.1.1 §3.3.1.2)")
    length = topic_length + 2 + len(packet_id_bytes) + len(payload)
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    if length < 0x80:
        head = _HEAD_2.pack(first, length, topic_length)
    elif length < 0x4000:
        head = _HEAD_3.pack(first, (length & 0x7F) | 0x80, length >> 7, topic_length)
    else:
        head = bytes((first,)) + _remaining_length(length) + topic_length.to_bytes(2, "big")
    return b"".join((head, raw_topic, packet_id_bytes, payload))


def encode_puback(packet_id: int) -> bytes:
    """PUBACK for ``packet_id`` (MQTT 3.1.1 §3.4): four bytes."""
    if not 0 < packet_id <= 0xFFFF:
        raise LocalProtocolError(
            f"PUBACK packet id {packet_id} is not in 1..65535 (MQTT 3.1.1 §2.3.1)"
        )
    return _ACK.pack(0x40, 2, packet_id)


def encode_pubacks(packet_ids: Iterable[int]) -> bytes:
    """PUBACKs for every id in ``packet_ids``, in order, as one bytes object (§3.4)."""
    ids = packet_ids if isinstance(packet_ids, list) else list(packet_ids)
    if not ids:
        return b""
    if min(ids) < 1 or max(ids) > 0xFFFF:
        raise LocalProtocolError("PUBACK packet ids must be in 1..65535 (MQTT 3.1.1 §2.3.1)")
    pack = _ACK.pack
    return b"".join([pack(0x40, 2, packet_id) for packet_id in ids])


def _ack_encoder(first_byte: int, name: str) -> Callable[[Any], bytes]:
    """An encoder for the packets whose body is only a packet id (§3.4-§3.7, §3.11)."""

    def encode_ack(packet: Puback | Pubrec | Pubrel | Pubcomp | Unsuback) -> bytes:
        return bytes((first_byte, 2)) + _packet_id(packet.packet_id, name)

    return encode_ack


def _encode_subscribe(packet: Subscribe) -> bytes:
    """SUBSCRIBE (MQTT 3.1.1 §3.8); fixed-header flags 0b0010 (§2.2.2)."""
    if not packet.topics:
        raise LocalProtocolError("SUBSCRIBE needs at least one topic filter (MQTT 3.1.1 §3.8.3)")
    parts = [_packet_id(packet.packet_id, "SUBSCRIBE")]
    for topic_filter, qos in packet.topics:
        problem = filter_problem(topic_filter)
        if problem is not None:
            raise LocalProtocolError(problem)
        if qos not in (0, 1, 2):
            raise LocalProtocolError(f"requested QoS {qos} is not 0, 1 or 2 (MQTT 3.1.1 §3.8.3.1)")
        parts += (_utf8(topic_filter, "topic filter"), bytes((qos,)))
    return _frame(0x82, b"".join(parts))


def _encode_suback(packet: Suback) -> bytes:
    """SUBACK (MQTT 3.1.1 §3.9)."""
    codes = packet.return_codes
    if not codes:
        raise LocalProtocolError("SUBACK needs at least one return code (MQTT 3.1.1 §3.9.3)")
    if not _VALID_SUBACK_CODES.issuperset(codes):
        raise LocalProtocolError(
            f"SUBACK return codes {codes} not all in 0, 1, 2, 0x80 (MQTT 3.1.1 §3.9.3)"
        )
    return _frame(0x90, _packet_id(packet.packet_id, "SUBACK") + bytes(codes))


def _encode_unsubscribe(packet: Unsubscribe) -> bytes:
    """UNSUBSCRIBE (MQTT 3.1.1 §3.10); fixed-header flags 0b0010 (§2.2.2)."""
    if not packet.topics:
        raise LocalProtocolError("UNSUBSCRIBE needs at least one topic filter (MQTT 3.1.1 §3.10.3)")
    parts = [_packet_id(packet.packet_id, "UNSUBSCRIBE")]
    for topic_filter in packet.topics:
        problem = filter_problem(topic_filter)
        if problem is not None:
            raise LocalProtocolError(problem)
        parts.append(_utf8(topic_filter, "topic filter"))
    return _frame(0xA2, b"".join(parts))


def _constant(raw: bytes) -> Callable[[Any], bytes]:
    def encode_constant(packet: Pingreq | Pingresp | Disconnect) -> bytes:
        return raw

    return encode_constant


_ENCODERS: dict[type, Callable[[Any], bytes]] = {
    Connect: _encode_connect,
    Connack: _encode_connack,
    Publish: _encode_publish_packet,
    Puback: _ack_encoder(0x40, "PUBACK"),
    Pubrec: _ack_encoder(0x50, "PUBREC"),
    Pubrel: _ack_encoder(0x62, "PUBREL"),
    Pubcomp: _ack_encoder(0x70, "PUBCOMP"),
    Subscribe: _encode_subscribe,
    Suback: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    Unsuback: _ack_encoder(0xB0, "UNSUBACK"),
    Pingreq: _constant(b"\xc0\x00"),
    Pingresp: _constant(b"\xd0\x00"),
    Disconnect: _constant(b"\xe0\x00"),
}


def encode(packet: Packet) -> bytes:
    """The wire encoding of ``packet`` (MQTT 3.1.1 §2-§3).

    Raises :class:`LocalProtocolError` if the packet breaks a protocol rule (bad QoS, packet id
    0, wildcard in a topic name, invalid filter, oversize, ...).
    """
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        raise LocalProtocolError(f"not an MQTT 3.1.1 packet: {packet!r}")
    return encoder(packet)
