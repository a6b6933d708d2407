"""The MQTT 3.1.1 codec: bytes to packets and back, sans I/O.

* :func:`decode` reads one packet from the start of a buffer, or says it needs more data.
* :class:`Decoder` turns a byte stream, fed in chunks of any size, into packets. It is the
  hub's hot path and is written for speed (see its docstring).
* :func:`encode`, :func:`encode_publish`, :func:`encode_puback`, :func:`encode_pubacks` write.

Malformed input raises :class:`~gateway.errors.RemoteProtocolError` and nothing else; asking to
encode something the protocol forbids raises :class:`~gateway.errors.LocalProtocolError`.

A packet's size is its fixed header plus its remaining length (MQTT 3.1.1 §2.2.3). A packet
bigger than ``max_packet_size`` is refused as soon as its fixed header is readable, with a
message containing "too large", before any of its body arrives.
"""

from __future__ import annotations

from gateway.errors import RemoteProtocolError
from gateway.mqtt._readers import (
    READERS,
    PublishTwin,
    check_first_byte,
    malformed,
    new_puback,
)
from gateway.mqtt._writers import (
    MAX_REMAINING_LENGTH,
    encode,
    encode_puback,
    encode_pubacks,
    encode_publish,
)
from gateway.mqtt.packets import Packet, Publish

__all__ = [
    "MAX_PACKET_SIZE",
    "MAX_REMAINING_LENGTH",
    "Decoder",
    "decode",
    "encode",
    "encode_puback",
    "encode_pubacks",
    "encode_publish",
]

MAX_PACKET_SIZE = MAX_REMAINING_LENGTH
"""The default packet size limit (the largest remaining length, MQTT 3.1.1 §2.2.3)."""

Buffer = bytes | bytearray | memoryview


def _too_large(size: int, limit: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"packet too large: {size} bytes, the limit is {limit}")


def _fixed_header(buf: Buffer, pos: int, limit: int) -> tuple[int, int] | None:
    """The (body offset, remaining length) of the packet starting at ``pos``, or None.

    MQTT 3.1.1 §2.2.3: the remaining length is 1-4 bytes, 7 bits each, low bits first; bit 7
    says another byte follows. Raises as soon as a fourth length byte says one more follows,
    or as soon as the length is known to exceed ``limit``. Returns None if incomplete.
    """
    check_first_byte(buf[pos])
    n = len(buf)
    length = 0
    index = pos + 1
    for shift in (0, 7, 14, 21):
        if index >= n:
            return None
        digit = buf[index]
        length |= (digit & 0x7F) << shift
        index += 1
        if digit < 0x80:
            if index - pos + length > limit:
                raise _too_large(index - pos + length, limit)
            return index, length
    raise malformed("remaining length is longer than 4 bytes (MQTT 3.1.1 §2.2.3)")


def _check_limit(max_packet_size: int) -> int:
    if not 2 <= max_packet_size:
        raise ValueError(f"max_packet_size must be at least 2, not {max_packet_size}")
    return max_packet_size


def decode(buf: Buffer, *, max_packet_size: int = MAX_PACKET_SIZE) -> tuple[Packet, int] | None:
    """One packet from the start of ``buf`` and the number of bytes it used.

    Returns None when ``buf`` is a strict prefix of a packet (more data is needed). Raises
    :class:`RemoteProtocolError` for malformed input, and only that.
    """
    if isinstance(buf, memoryview) and buf.format != "B":
        buf = buf.cast("B")
    if not buf:
        return None
    header = _fixed_header(buf, 0, max_packet_size)
    if header is None:
        return None
    start, length = header
    end = start + length
    if end > len(buf):
        return None
    first = buf[0]
    reader = READERS[first >> 4]
    assert reader is not None  # check_first_byte refused the reserved types
    if isinstance(buf, bytes):
        return reader(buf, start, end, first & 0x0F), end
    return reader(bytes(buf[start:end]), 0, length, first & 0x0F), end


class Decoder:
    """A streaming decoder: :meth:`feed` bytes as they arrive, get back complete packets.

    The hub's hot path: a broker reading 64 KiB chunks full of QoS 1 PUBLISH packets.
    ``feed`` walks the chunk by offset (no copy per packet), reads 1- and 2-byte remaining
    lengths inline, decodes the common PUBLISH and PUBACK headers inline and keeps only the
    incomplete tail, so it copies each chunk at most once. A packet bigger than a chunk is
    collected piece by piece and joined once, when it is complete. Anything unusual falls
    back to the general readers in :mod:`gateway.mqtt._readers`, which also produce the
    precise errors.

    After a :class:`RemoteProtocolError` the decoder is broken for good: every later ``feed``
    raises a RemoteProtocolError with the same message. Packets decoded earlier in the
    failing ``feed`` call are not returned (the connection is going down anyway, and none of
    them was acknowledged). Buffered data is bounded by ``max_packet_size`` plus one chunk.
    """

    __slots__ = ("_failure", "_have", "_limit", "_need", "_parts", "_tail")

    def __init__(self, max_packet_size: int = MAX_PACKET_SIZE) -> None:
        self._limit = _check_limit(max_packet_size)
        self._tail = b""  # the start of an incomplete packet whose size is not known yet
        self._parts: list[bytes] = []  # the pieces of an incomplete packet of known size...
        self._have = 0  # ...their total length...
        self._need = 0  # ...and the packet's size (0: not collecting pieces)
        self._failure: str | None = None  # why the stream is broken, once it is

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete packet are waiting for the rest."""
        return self._have if self._need else len(self._tail)

    def feed(self, data: Buffer) -> list[Packet]:
        """Every complete packet in the buffered bytes plus ``data``, in order."""
        if self._failure is not None:
            raise RemoteProtocolError(self._failure)
        if self._need:
            self._parts.append(bytes(data))
            self._have += len(data)
            if self._have < self._need:
                return []
            chunk = b"".join(self._parts)
            self._parts = []
            self._need = 0
        elif self._tail:
            chunk = self._tail + data
        elif type(data) is bytes:
            chunk = data
        else:
            chunk = bytes(data)
        try:
            packets, pos, need = self._decode_all(chunk)
        except RemoteProtocolError as error:
            self._fail(str(error))
            raise
        except UnicodeDecodeError:
            # Only the inline topic decode can get here.
            bad_topic = malformed("topic name is not well-formed UTF-8 (MQTT 3.1.1 §1.5.3)")
            self._fail(str(bad_topic))
            raise bad_topic from None
        if pos == len(chunk):
            self._tail = b""
        elif need:
            self._tail = b""
            self._parts = [chunk[pos:]]
            self._have = len(chunk) - pos
            self._need = need
        else:
            self._tail = chunk[pos:]
        return packets

    def _fail(self, reason: str) -> None:
        self._failure = reason
        self._tail = b""
        self._parts = []
        self._need = 0

    def _decode_all(self, data: bytes) -> tuple[list[Packet], int, int]:
        """The packets in ``data``, the offset after the last, and the size of the incomplete
        packet that follows (0 if its fixed header is incomplete too)."""
        packets: list[Packet] = []
        append = packets.append
        limit = self._limit
        readers = READERS
        publish_twin = PublishTwin  # see PublishTwin; inlined because calls cost ~35 ns here
        publish_class = Publish
        pos = 0
        last = len(data) - 1  # a fixed header needs at least two bytes
        while pos < last:
            first = data[pos]
            length = data[pos + 1]
            if length < 0x80:
                start = pos + 2
            elif pos + 2 <= last and data[pos + 2] < 0x80:
                length = (length & 0x7F) | (data[pos + 2] << 7)
                start = pos + 3
            else:
                header = _fixed_header(data, pos, limit)
                if header is None:
                    return packets, pos, 0
                start, length = header
            end = start + length
            if end - pos > limit:
                check_first_byte(first)
                raise _too_large(end - pos, limit)
            if end > last + 1:
                check_first_byte(first)
                return packets, pos, end - pos
            if first == 0x32 and length > 4:
                # QoS 1 PUBLISH, no DUP, no RETAIN (MQTT 3.1.1 §3.3): the hot case.
                topic_start = start + 2
                topic_end = topic_start + ((data[start] << 8) | data[start + 1])
                if topic_start < topic_end <= end - 2:
                    topic = data[topic_start:topic_end].decode()
                    packet_id = (data[topic_end] << 8) | data[topic_end + 1]
                    if packet_id and "+" not in topic and "#" not in topic and "\x00" not in topic:
                        packet = publish_twin(
                            topic, data[topic_end + 2 : end], 1, False, False, packet_id
                        )
                        packet.__class__ = publish_class  # type: ignore[assignment]
                        append(packet)  # type: ignore[arg-type]
                        pos = end
                        continue
            elif first == 0x30 and length > 2:
                # QoS 0 PUBLISH, no RETAIN.
                topic_start = start + 2
                topic_end = topic_start + ((data[start] << 8) | data[start + 1])
                if topic_start < topic_end <= end:
                    topic = data[topic_start:topic_end].decode()
                    if "+" not in topic and "#" not in topic and "\x00" not in topic:
                        packet = publish_twin(topic, data[topic_end:end], 0, False, False, None)
                        packet.__class__ = publish_class  # type: ignore[assignment]
                        append(packet)  # type: ignore[arg-type]
                        pos = end
                        continue
            elif first == 0x40 and length == 2:
                packet_id = (data[start] << 8) | data[start + 1]
                if packet_id:
                    append(new_puback(packet_id))
                    pos = end
                    continue
            check_first_byte(first)
            reader = readers[first >> 4]
            assert reader is not None  # check_first_byte refused the reserved types
            append(reader(data, start, end, first & 0x0F))
            pos = end
        if pos == last:
            check_first_byte(data[pos])
        return packets, pos, 0
