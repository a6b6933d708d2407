"""Decoding the body of each MQTT 3.1.1 packet (the reader half of :mod:`gateway.mqtt.codec`).

Every reader takes the whole buffer, the offsets of one packet's body and the low nibble of
its fixed header, and returns the packet or raises :class:`~gateway.errors.RemoteProtocolError`.
Readers check every offset against the body's end themselves: the buffer usually holds more
packets after this one, so running past ``end`` would not raise IndexError, it would read
the next packet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import RemoteProtocolError
from gateway.mqtt.packets import (
    SUBACK_FAILURE,
    Connack,
    ConnackCode,
    Connect,
    Disconnect,
    Packet,
    PacketType,
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
    Will,
)
from gateway.mqtt.topics import filter_problem, topic_problem

Reader = Callable[[bytes, int, int, int], Packet]


# Frozen dataclasses assign each field through object.__setattr__, which makes building a
# Publish cost about 450 ns, more than the rest of its decoding. The decoder builds a plain
# slotted twin with the same slots instead and then gives it the frozen class: the object is
# indistinguishable from one made by Publish(...) (tests/mqtt/test_codec.py checks it) at a
# third of the cost. CPython allows the __class__ assignment because the layouts are equal.
@dataclass(slots=True)
class PublishTwin:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None


@dataclass(slots=True)
class PubackTwin:
    packet_id: int


def new_publish(
    topic: str, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int | None
) -> Publish:
    """``Publish(topic, payload, qos, retain, dup, packet_id)``, fast (see PublishTwin)."""
    packet = PublishTwin(topic, payload, qos, retain, dup, packet_id)
    packet.__class__ = Publish  # type: ignore[assignment]
    return packet  # type: ignore[return-value]


def new_puback(packet_id: int) -> Puback:
    """``Puback(packet_id)``, fast (see PublishTwin)."""
    packet = PubackTwin(packet_id)
    packet.__class__ = Puback  # type: ignore[assignment]
    return packet  # type: ignore[return-value]


def malformed(reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed packet: {reason}")


def read_utf8(data: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    """A length-prefixed UTF-8 string and the offset after it (MQTT 3.1.1 §1.5.3).

    Python's strict UTF-8 codec refuses ill-formed input, including encoded surrogates
    U+D800..U+DFFF (§1.5.3 MQTT-1.5.3-1); U+0000 is refused here (MQTT-1.5.3-2).
    """
    start = pos + 2
    if start > end:
        raise malformed(f"{what} length is cut off")
    stop = start + ((data[pos] << 8) | data[pos + 1])
    if stop > end:
        raise malformed(f"{what} runs past the end of the packet")
    try:
        value = data[start:stop].decode("utf-8")
    except UnicodeDecodeError:
        raise malformed(f"{what} is not well-formed UTF-8 (MQTT 3.1.1 §1.5.3)") from None
    if "\x00" in value:
        raise malformed(f"{what} contains U+0000 (MQTT 3.1.1 §1.5.3)")
    return value, stop


def read_binary(data: bytes, pos: int, end: int, what: str) -> tuple[bytes, int]:
    """Length-prefixed binary data and the offset after it (MQTT 3.1.1 §3.1.3.3, §3.1.3.5)."""
    start = pos + 2
    if start > end:
        raise malformed(f"{what} length is cut off")
    stop = start + ((data[pos] << 8) | data[pos + 1])
    if stop > end:
        raise malformed(f"{what} runs past the end of the packet")
    return data[start:stop], stop


def read_packet_id(data: bytes, pos: int, end: int, what: str) -> int:
    """A packet identifier, which must not be 0 (MQTT 3.1.1 §2.3.1)."""
    if pos + 2 > end:
        raise malformed(f"{what} packet id is cut off")
    packet_id = (data[pos] << 8) | data[pos + 1]
    if not packet_id:
        raise malformed(f"{what} packet id is 0 (MQTT 3.1.1 §2.3.1)")
    return packet_id


def _read_connect(data: bytes, pos: int, end: int, flags: int) -> Connect:
    """CONNECT (MQTT 3.1.1 §3.1)."""
    name, pos = read_utf8(data, pos, end, "protocol name")
    if name == "MQTT":
        supported_level = 4
    elif name == "MQIsdp":
        supported_level = 3
    else:
        raise malformed(f"protocol name {name!r} is not 'MQTT' (MQTT 3.1.1 §3.1.2.1)")
    if pos + 4 > end:
        raise malformed("CONNECT variable header is cut off (MQTT 3.1.1 §3.1.2)")
    level = data[pos]
    connect_flags = data[pos + 1]
    keepalive = (data[pos + 2] << 8) | data[pos + 3]
    pos += 4
    clean_session = bool(connect_flags & 0x02)
    if level != supported_level:
        # Another version's payload: leave it undecoded; the server answers CONNACK 0x01.
        return Connect("", clean_session, keepalive, protocol_name=name, protocol_level=level)
    if connect_flags & 0x01:
        raise malformed("reserved CONNECT flag is set (MQTT 3.1.1 §3.1.2.3)")
    will_flag = connect_flags & 0x04
    will_qos = (connect_flags >> 3) & 0x03
    will_retain = bool(connect_flags & 0x20)
    if will_flag:
        if will_qos == 3:
            raise malformed("will QoS is 3 (MQTT 3.1.1 §3.1.2.6)")
    elif will_qos or will_retain:
        raise malformed("will QoS or retain set without the will flag (MQTT 3.1.1 §3.1.2.5)")
    username_flag = connect_flags & 0x80
    password_flag = connect_flags & 0x40
    if password_flag and not username_flag:
        raise malformed("password flag set without user name flag (MQTT 3.1.1 §3.1.2.9)")
    client_id, pos = read_utf8(data, pos, end, "client identifier")
    will = None
    if will_flag:
        will_topic, pos = read_utf8(data, pos, end, "will topic")
        problem = topic_problem(will_topic)
        if problem is not None:
            raise malformed(f"will {problem}")
        will_payload, pos = read_binary(data, pos, end, "will message")
        will = Will(will_topic, will_payload, will_qos, will_retain)
    username = password = None
    if username_flag:
        username, pos = read_utf8(data, pos, end, "user name")
    if password_flag:
        password, pos = read_binary(data, pos, end, "password")
    if pos != end:
        raise malformed(f"CONNECT has {end - pos} bytes after its payload (MQTT 3.1.1 §3.1.3)")
    return Connect(client_id, clean_session, keepalive, username, password, will, name, level)


def _read_connack(data: bytes, pos: int, end: int, flags: int) -> Connack:
    """CONNACK (MQTT 3.1.1 §3.2)."""
    if end - pos != 2:
        raise malformed(f"CONNACK remaining length is {end - pos}, not 2 (MQTT 3.1.1 §3.2)")
    ack_flags = data[pos]
    code = data[pos + 1]
    if ack_flags & 0xFE:
        raise malformed("reserved CONNACK acknowledge flags are set (MQTT 3.1.1 §3.2.2.1)")
    if code > 5:
        raise malformed(f"CONNACK return code {code} is reserved (MQTT 3.1.1 §3.2.2.3)")
    if code and ack_flags:
        raise malformed("refusing CONNACK sets session present (MQTT 3.1.1 §3.2.2.2)")
    return Connack(bool(ack_flags), ConnackCode(code))


def _publish_flags_problem(flags: int) -> str | None:
    """Why the PUBLISH fixed-header flags are invalid (MQTT 3.1.1 §3.3.1), or None."""
    qos = (flags >> 1) & 0x03
    if qos == 3:
        return "PUBLISH QoS is 3 (MQTT 3.1.1 §3.3.1.2)"
    if flags & 0x08 and not qos:
        return "QoS 0 PUBLISH sets DUP (MQTT 3.1.1 §3.3.1.1)"
    return None


def read_publish(data: bytes, pos: int, end: int, flags: int) -> Publish:
    """PUBLISH (MQTT 3.1.1 §3.3), any flags; the decoder's fast path handles the usual ones."""
    problem = _publish_flags_problem(flags)
    if problem is not None:
        raise malformed(problem)
    qos = (flags >> 1) & 0x03
    dup = bool(flags & 0x08)
    topic, pos = read_utf8(data, pos, end, "topic name")
    problem = topic_problem(topic)
    if problem is not None:
        raise malformed(problem)
    packet_id = None
    if qos:
        packet_id = read_packet_id(data, pos, end, "PUBLISH")
        pos += 2
    return new_publish(topic, data[pos:end], qos, bool(flags & 0x01), dup, packet_id)


def _ack_reader(cls: type[Puback | Pubrec | Pubrel | Pubcomp | Unsuback]) -> Reader:
    """A reader for the packets whose body is exactly a packet id (§3.4-§3.7, §3.11)."""
    name = cls.__name__.upper()

    def read_ack(data: bytes, pos: int, end: int, flags: int) -> Packet:
        if end - pos != 2:
            raise malformed(f"{name} remaining length is {end - pos}, not 2")
        return cls(read_packet_id(data, pos, end, name))

    return read_ack


def _read_filter(data: bytes, pos: int, end: int) -> tuple[str, int]:
    """One topic filter of a SUBSCRIBE or UNSUBSCRIBE, checked (MQTT 3.1.1 §4.7.1)."""
    topic_filter, pos = read_utf8(data, pos, end, "topic filter")
    problem = filter_problem(topic_filter)
    if problem is not None:
        raise malformed(problem)
    return topic_filter, pos


def _read_subscribe(data: bytes, pos: int, end: int, flags: int) -> Subscribe:
    """SUBSCRIBE (MQTT 3.1.1 §3.8)."""
    packet_id = read_packet_id(data, pos, end, "SUBSCRIBE")
    pos += 2
    if pos == end:
        raise malformed("SUBSCRIBE has no topic filter (MQTT 3.1.1 §3.8.3)")
    topics = []
    while pos < end:
        topic_filter, pos = _read_filter(data, pos, end)
        if pos == end:
            raise malformed("SUBSCRIBE requested QoS is cut off (MQTT 3.1.1 §3.8.3)")
        options = data[pos]
        pos += 1
        if options & 0xFC:
            raise malformed("SUBSCRIBE reserved option bits are set (MQTT 3.1.1 §3.8.3.1)")
        if options == 3:
            raise malformed("SUBSCRIBE requested QoS is 3 (MQTT 3.1.1 §3.8.3.1)")
        topics.append((topic_filter, options))
    return Subscribe(packet_id, tuple(topics))


def _read_suback(data: bytes, pos: int, end: int, flags: int) -> Suback:
    """SUBACK (MQTT 3.1.1 §3.9)."""
    packet_id = read_packet_id(data, pos, end, "SUBACK")
    codes = tuple(data[pos + 2 : end])
    if not codes:
        raise malformed("SUBACK has no return code (MQTT 3.1.1 §3.9.3)")
    for code in codes:
        if code > 2 and code != SUBACK_FAILURE:
            raise malformed(f"SUBACK return code {code:#x} is reserved (MQTT 3.1.1 §3.9.3)")
    return Suback(packet_id, codes)


def _read_unsubscribe(data: bytes, pos: int, end: int, flags: int) -> Unsubscribe:
    """UNSUBSCRIBE (MQTT 3.1.1 §3.10)."""
    packet_id = read_packet_id(data, pos, end, "UNSUBSCRIBE")
    pos += 2
    if pos == end:
        raise malformed("UNSUBSCRIBE has no topic filter (MQTT 3.1.1 §3.10.3)")
    topics = []
    while pos < end:
        topic_filter, pos = _read_filter(data, pos, end)
        topics.append(topic_filter)
    return Unsubscribe(packet_id, tuple(topics))


def _empty_reader(packet: Pingreq | Pingresp | Disconnect) -> Reader:
    """A reader for the packets without a body (§3.12-§3.14)."""
    name = type(packet).__name__.upper()

    def read_empty(data: bytes, pos: int, end: int, flags: int) -> Packet:
        if end != pos:
            raise malformed(f"{name} remaining length is {end - pos}, not 0")
        return packet

    return read_empty


READERS: tuple[Reader | None, ...] = (
    None,  # 0 is reserved (MQTT 3.1.1 §2.2.1)
    _read_connect,
    _read_connack,
    read_publish,
    _ack_reader(Puback),
    _ack_reader(Pubrec),
    _ack_reader(Pubrel),
    _ack_reader(Pubcomp),
    _read_subscribe,
    _read_suback,
    _read_unsubscribe,
    _ack_reader(Unsuback),
    _empty_reader(Pingreq()),
    _empty_reader(Pingresp()),
    _empty_reader(Disconnect()),
    None,  # 15 is reserved
)
"""The reader for each packet type, indexed by the high nibble of the first byte."""

_REQUIRED_FLAGS = {
    PacketType.PUBREL: 0x02,
    PacketType.SUBSCRIBE: 0x02,
    PacketType.UNSUBSCRIBE: 0x02,
}
FIRST_BYTES: frozenset[int] = frozenset(
    [(t << 4) | _REQUIRED_FLAGS.get(t, 0) for t in PacketType if t is not PacketType.PUBLISH]
    + [0x30 | flags for flags in range(16) if _publish_flags_problem(flags) is None]
)
"""Every first byte with a known type and allowed flags (MQTT 3.1.1 §2.2.1, §2.2.2, §3.3.1)."""


def check_first_byte(first: int) -> None:
    """Refuse a reserved packet type or wrong fixed-header flags (MQTT 3.1.1 §2.2.1-§2.2.2)."""
    if first not in FIRST_BYTES:
        packet_type = first >> 4
        if packet_type == 0 or packet_type == 15:
            raise malformed(f"packet type {packet_type} is reserved (MQTT 3.1.1 §2.2.1)")
        if packet_type == PacketType.PUBLISH:
            raise malformed(str(_publish_flags_problem(first & 0x0F)))
        raise malformed(
            f"{PacketType(packet_type).name} fixed-header flags are {first & 0x0F:#06b}"
            " (MQTT 3.1.1 §2.2.2)"
        )
