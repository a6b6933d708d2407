"""The codec as a whole: round trips, prefixes, streams, fuzzing and packet size limits."""

from __future__ import annotations

import dataclasses
import pickle
import random

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from gateway.errors import LocalProtocolError, RemoteProtocolError
from gateway.mqtt._readers import PubackTwin, PublishTwin
from gateway.mqtt.codec import (
    Decoder,
    decode,
    encode,
    encode_puback,
    encode_pubacks,
    encode_publish,
)
from gateway.mqtt.packets import Connect, Packet, Puback, Publish
from tests.mqtt.strategies import PACKET_STRATEGIES, packets, publishes
from tests.mqtt.wire import frame, publish, string, u16, varint


def decode_all(data: bytes, max_packet_size: int = 268_435_455) -> list[Packet]:
    """Decode with repeated decode() calls: the reference the streaming Decoder must match."""
    out: list[Packet] = []
    view = memoryview(data)
    while True:
        result = decode(view, max_packet_size=max_packet_size)
        if result is None:
            return out
        packet, used = result
        assert used > 0
        out.append(packet)
        view = view[used:]


def outcome(run: object) -> object:
    """What a decoding call gives: its value, or the RemoteProtocolError it raised."""
    assert callable(run)
    try:
        return run()
    except RemoteProtocolError:
        return RemoteProtocolError


@pytest.mark.parametrize("kind", list(PACKET_STRATEGIES), ids=lambda kind: kind.__name__)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_packet_type_round_trips(kind: type, data: st.DataObject) -> None:
    packet = data.draw(PACKET_STRATEGIES[kind])
    encoded = encode(packet)
    assert decode(encoded) == (packet, len(encoded))
    assert decode(bytearray(encoded)) == (packet, len(encoded))
    assert decode(memoryview(encoded)) == (packet, len(encoded))
    assert Decoder().feed(encoded) == [packet]


@settings(max_examples=300)
@given(packets(), st.binary(max_size=20))
def test_decode_ignores_bytes_after_the_packet(packet: Packet, after: bytes) -> None:
    encoded = encode(packet)
    assert decode(encoded + after) == (packet, len(encoded))


@settings(max_examples=200)
@given(packets().filter(lambda p: len(encode(p)) < 2000))
def test_every_strict_prefix_needs_more_data(packet: Packet) -> None:
    encoded = encode(packet)
    for cut in range(len(encoded)):
        assert decode(encoded[:cut]) is None
        decoder = Decoder()
        assert decoder.feed(encoded[:cut]) == []
        assert decoder.buffered == cut
        assert decoder.feed(encoded[cut:]) == [packet]
        assert decoder.buffered == 0


def test_long_packets_prefixes_need_more_data() -> None:
    packet = Publish("t", b"p" * 3_000_000, 1, packet_id=9)  # a 4-byte remaining length
    encoded = encode(packet)
    assert encoded[1:5] == varint(3_000_005) and len(varint(3_000_005)) == 4
    for cut in (0, 1, 2, 3, 4, 5, 6, 7, 100, len(encoded) - 1):
        assert decode(encoded[:cut]) is None
    assert decode(encoded) == (packet, len(encoded))


@settings(max_examples=100)
@given(
    st.lists(packets(), min_size=1, max_size=6).filter(
        lambda ps: sum(len(encode(p)) for p in ps) < 1500
    )
)
def test_a_stream_split_at_every_byte_decodes_to_the_same_packets(
    stream_packets: list[Packet],
) -> None:
    stream = b"".join(encode(p) for p in stream_packets)
    for cut in range(len(stream) + 1):
        decoder = Decoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == stream_packets
    decoder = Decoder()
    one_by_one = [p for i in range(len(stream)) for p in decoder.feed(stream[i : i + 1])]
    assert one_by_one == stream_packets


@settings(max_examples=200)
@given(st.lists(packets(), max_size=12), st.data())
def test_random_chunking_decodes_to_the_same_packets(
    stream_packets: list[Packet], data: st.DataObject
) -> None:
    stream = b"".join(encode(p) for p in stream_packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = Decoder()
    got: list[Packet] = []
    for start, stop in zip([0, *cuts], [*cuts, len(stream)]):
        got += decoder.feed(memoryview(stream)[start:stop])
    assert got == stream_packets
    assert decode_all(stream) == stream_packets


def check_garbage(garbage: bytes, chunk_sizes: list[int], max_packet_size: int) -> None:
    """Garbage decodes to packets, needs more data, or raises RemoteProtocolError, and the
    streaming Decoder (fast paths) agrees with repeated decode() (general path)."""
    reference = outcome(lambda: decode_all(garbage, max_packet_size))
    decoder = Decoder(max_packet_size)
    got: list[Packet] = []
    try:
        pos = 0
        for size in [*chunk_sizes, len(garbage)]:
            got += decoder.feed(garbage[pos : pos + size])
            pos += size
        streamed: object = got
    except RemoteProtocolError:
        streamed = RemoteProtocolError
        with pytest.raises(RemoteProtocolError):  # a failed decoder stays failed
            decoder.feed(b"\xc0\x00")
    assert streamed == reference
    if isinstance(reference, list):
        for packet in reference:
            if isinstance(packet, Connect) and packet.protocol_level not in (3, 4):
                continue  # another MQTT version's CONNECT: decoded only to be refused
            assert decode(encode(packet))[0] == packet  # type: ignore[index]


@settings(max_examples=1500)
@given(st.binary(max_size=64), st.lists(st.integers(1, 16), max_size=8), st.integers(2, 80))
@example(b"\x32\x06\x00\x02\xc3\x28\x00\x01", [], 100)  # ill-formed UTF-8 on the fast path
@example(b"\x32\x05\x00\x01+\x00\x01", [3], 100)  # wildcard on the fast path
@example(b"\x40\x02\x00\x00", [1], 100)  # PUBACK packet id 0 on the fast path
@example(b"\x30\x02\x00\x00", [], 100)  # empty topic on the QoS 0 fast path
@example(b"\x32\x80", [], 100)  # two-byte length, second byte missing
def test_random_bytes_raise_only_remote_protocol_error(
    garbage: bytes, chunks: list[int], limit: int
) -> None:
    check_garbage(garbage, chunks, limit)


@settings(max_examples=1500)
@given(st.lists(packets(), min_size=1, max_size=4), st.data())
def test_mutated_packets_raise_only_remote_protocol_error(
    stream_packets: list[Packet], data: st.DataObject
) -> None:
    stream = bytearray(b"".join(encode(p) for p in stream_packets))
    assume(len(stream) < 5000)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["set", "insert", "delete"]))
        index = data.draw(st.integers(0, max(len(stream) - 1, 0)))
        if action == "set" and stream:
            stream[index] = data.draw(st.integers(0, 255))
        elif action == "insert":
            stream.insert(index, data.draw(st.integers(0, 255)))
        elif stream:
            del stream[index]
    chunks = data.draw(st.lists(st.integers(1, 300), max_size=6))
    check_garbage(bytes(stream), chunks, data.draw(st.sampled_from([64, 1000, 268_435_455])))


def test_decoded_publish_is_a_true_frozen_publish() -> None:
    made = Publish("a/b", b"payload", 1, False, False, 7)
    for decoded in (decode(encode(made))[0], Decoder().feed(encode(made))[0]):  # type: ignore[index]
        assert type(decoded) is Publish
        assert decoded == made and hash(decoded) == hash(made)
        with pytest.raises(dataclasses.FrozenInstanceError):
            decoded.qos = 0  # type: ignore[misc]
        assert dataclasses.replace(decoded, qos=0, packet_id=None) == Publish("a/b", b"payload")
        assert pickle.loads(pickle.dumps(decoded)) == made
    puback = Decoder().feed(encode_puback(9))[0]
    assert type(puback) is Puback and puback == Puback(9) and hash(puback) == hash(Puback(9))


def test_fast_twins_mirror_their_frozen_classes() -> None:
    """The decoder builds Publish/Puback through layout twins; their slots must stay equal."""
    assert PublishTwin.__slots__ == Publish.__slots__
    assert PubackTwin.__slots__ == Puback.__slots__


@settings(max_examples=300)
@given(publishes())
def test_encode_publish_matches_encode(packet: Publish) -> None:
    assert encode_publish(
        packet.topic, packet.payload, packet.qos, packet.packet_id, packet.retain, packet.dup
    ) == encode(packet)


@given(st.lists(st.integers(1, 0xFFFF), max_size=50))
def test_encode_pubacks_is_the_concatenation_of_pubacks(ids: list[int]) -> None:
    encoded = encode_pubacks(iter(ids))
    assert encoded == b"".join(encode_puback(i) for i in ids)
    assert Decoder().feed(encoded) == [Puback(i) for i in ids]


def test_puback_encoding_is_four_bytes() -> None:
    assert encode_puback(0x1234) == b"\x40\x02\x12\x34"


@pytest.mark.parametrize("bad", [0, -1, 65536])
def test_encoding_an_invalid_packet_id_is_a_local_error(bad: int) -> None:
    with pytest.raises(LocalProtocolError):
        encode_puback(bad)
    with pytest.raises(LocalProtocolError):
        encode_pubacks([1, bad])
    with pytest.raises(LocalProtocolError):
        encode(Puback(bad))


def test_publish_stream_with_mixed_lengths_and_flags_decodes() -> None:
    rng = random.Random(7)
    stream_packets: list[Packet] = [
        Publish(
            f"t/{i}",
            bytes(rng.randrange(0, 20_000)),
            qos,
            retain=bool(i % 3 == 0),
            dup=bool(qos and i % 5 == 0),
            packet_id=i + 1 if qos else None,
        )
        for i in range(200)
        for qos in [rng.choice([0, 1, 2])]
    ]
    stream = b"".join(encode(p) for p in stream_packets)
    decoder = Decoder()
    got: list[Packet] = []
    for start in range(0, len(stream), 65536):
        got += decoder.feed(stream[start : start + 65536])
    assert got == stream_packets


class TestMaxPacketSize:
    """A packet over max_packet_size is refused as soon as its fixed header is readable."""

    def test_decode_refuses_at_the_fixed_header(self) -> None:
        encoded = encode(Publish("t", b"x" * 100))
        size = len(encoded)
        assert decode(encoded, max_packet_size=size) == (Publish("t", b"x" * 100), size)
        with pytest.raises(RemoteProtocolError, match="too large"):
            decode(encoded[:2], max_packet_size=size - 1)

    def test_decoder_refuses_before_the_body_arrives(self) -> None:
        encoded = encode(Publish("t", b"x" * 1000, 1, packet_id=1))
        assert Decoder(len(encoded)).feed(encoded) == [Publish("t", b"x" * 1000, 1, packet_id=1)]
        decoder = Decoder(len(encoded) - 1)
        assert decoder.feed(encoded[:1]) == []
        assert decoder.feed(encoded[1:2]) == []  # the length is not complete yet
        with pytest.raises(RemoteProtocolError, match="too large"):
            decoder.feed(encoded[2:3])

    def test_limit_counts_the_fixed_header(self) -> None:
        encoded = frame(0xC0, b"")  # PINGREQ, 2 bytes
        assert Decoder(2).feed(encoded) != []
        with pytest.raises(RemoteProtocolError, match="too large"):
            Decoder(2).feed(frame(0x30, string("t")))  # 5 bytes

    def test_largest_length_is_refused_by_the_default_limit(self) -> None:
        with pytest.raises(RemoteProtocolError, match="too large"):
            decode(b"\x30\xff\xff\xff\x7f")
        with pytest.raises(RemoteProtocolError, match="too large"):
            Decoder().feed(b"\x30\xff\xff\xff\x7f")

    def test_decoder_checks_the_limit_on_a_packet_after_others(self) -> None:
        decoder = Decoder(100)
        with pytest.raises(RemoteProtocolError, match="too large"):
            decoder.feed(publish("t") + b"\x30\x80\x01")

    def test_limit_must_allow_a_packet(self) -> None:
        with pytest.raises(ValueError):
            Decoder(1)


def test_decoder_keeps_only_the_incomplete_tail() -> None:
    one = encode(Publish("t", b"x" * 300, 1, packet_id=1))
    decoder = Decoder()
    assert len(decoder.feed(one * 3 + one[:10])) == 3
    assert decoder.buffered == 10
    assert decoder.feed(u16(0)) == []
    assert decoder.buffered == 12


def test_encoding_refuses_an_oversize_packet() -> None:
    with pytest.raises(LocalProtocolError, match="too large"):
        encode_publish("t", bytes(268_435_455), 0, None)


def test_a_packet_bigger_than_the_chunks_is_collected_then_decoded() -> None:
    big = Publish("t/big", bytes(range(256)) * 4096, 1, packet_id=3)  # 1 MiB payload
    small = Publish("t/small", b"s", 1, packet_id=4)
    stream = encode(small) + encode(big) + encode(small)
    decoder = Decoder()
    got: list[Packet] = []
    for start in range(0, len(stream), 4096):
        got += decoder.feed(memoryview(stream)[start : start + 4096])
        assert decoder.buffered <= len(encode(big))
    assert got == [small, big, small]
    assert decoder.buffered == 0


def test_a_malformed_big_packet_fails_when_complete() -> None:
    bad = frame(0x32, string("t/#") + u16(1) + bytes(100_000))
    decoder = Decoder()
    assert decoder.feed(bad[:50_000]) == []
    assert decoder.buffered == 50_000
    with pytest.raises(RemoteProtocolError, match="wildcard"):
        decoder.feed(bad[50_000:])
