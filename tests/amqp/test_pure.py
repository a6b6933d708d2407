"""The pure parts of gateway.amqp: addresses and filters, message mapping, SASL, padding."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from proton import Connection, Message, Transport, symbol

from gateway.amqp.addresses import (
    StartPosition,
    device_of_to,
    node_of,
    parse_partition,
    parse_selector,
)
from gateway.amqp.convert import c2d_properties, event_message, feedback_message
from gateway.amqp.pad import FramePadder
from gateway.amqp.wire import EventEncoder, encode_event
from gateway.amqp.sasl import SASL_HEADER, SaslServer
from gateway.errors import InvalidRequestError
from gateway.hub.c2d import Feedback
from gateway.hub.messages import Message as HubMessage


def test_addresses() -> None:
    assert node_of("amqps://hub.example/messages/devicebound") == "/messages/devicebound"
    assert node_of("$cbs") == "$cbs" and node_of(None) == ""
    where = parse_partition("hub/ConsumerGroups/%24Default/Partitions/0")
    assert where is not None and (where.event_hub, where.consumer_group, where.partition) == \
        ("hub", "$Default", "0")
    assert parse_partition("hub/consumergroups/g/partitions/3/") is not None
    assert parse_partition("hub/Partitions/0") is None
    assert device_of_to("/devices/d%2B1/messages/devicebound") == "d+1"
    with pytest.raises(InvalidRequestError):
        device_of_to("/devices/d1/messages/events")


@pytest.mark.parametrize("text, expected", [
    ("amqp.annotation.x-opt-offset > '@latest'", StartPosition("latest")),
    ("amqp.annotation.x-opt-offset > '-1'", StartPosition("offset", 0)),
    ("amqp.annotation.x-opt-offset >= '12'", StartPosition("offset", 12, inclusive=True)),
    ("amqp.annotation.x-opt-sequence-number > '7'", StartPosition("sequence", 7)),
    ("amqp.annotation.x-opt-enqueued-time > '1700000000000'",
     StartPosition("time", 1700000000000)),
])
def test_selectors(text: str, expected: StartPosition) -> None:
    assert parse_selector(text) == expected


@pytest.mark.parametrize("text", [
    "amqp.annotation.x-opt-offset < '5'", "x-opt-offset > '5'", "amqp.annotation.x-opt-offset > 'a'",
    "amqp.annotation.x-opt-enqueued-time > '-5'", "",
])
def test_bad_selectors(text: str) -> None:
    with pytest.raises(InvalidRequestError):
        parse_selector(text)


def test_event_message_carries_iot_hub_properties_and_annotations() -> None:
    hub = HubMessage(body=b'{"t": 1}', system={
        "message-id": "m1", "correlation-id": "c1", "content-type": "application/json",
        "content-encoding": "utf-8", "iothub-connection-device-id": "d1",
        "iothub-connection-module-id": "m", "iothub-enqueuedtime": "2026-01-02T03:04:05.1234567Z",
        "iothub-message-source": "Telemetry",
    }, application={"a": "1", "bare": None})
    wire = Message()
    wire.decode(event_message(hub, seq=42, enqueued_ms=1767323045123).encode())
    assert bytes(wire.body) == b'{"t": 1}'
    assert wire.id == "m1" and wire.correlation_id == "c1"
    assert str(wire.content_type) == "application/json"
    annotations = {str(k): v for k, v in wire.annotations.items()}
    assert annotations["x-opt-sequence-number"] == 42 and annotations["x-opt-offset"] == "42"
    assert annotations["x-opt-enqueued-time"] == 1767323045123
    assert annotations["iothub-enqueuedtime"] == 1767323045123
    assert annotations["iothub-connection-device-id"] == "d1"
    assert annotations["iothub-connection-module-id"] == "m"
    assert wire.properties == {"a": "1", "bare": None}


def test_c2d_properties() -> None:
    message = Message(body=b"hello", inferred=True)
    message.address = "/devices/dev1/messages/devicebound"
    message.id = "mid"
    message.correlation_id = "cid"
    message.content_type = symbol("text/plain")
    message.expiry_time = 1800000000.0
    message.properties = {"iothub-ack": "full", "n": 3}
    wire = Message()
    wire.decode(message.encode())
    device, body, props = c2d_properties(wire)
    assert (device, body) == ("dev1", b"hello")
    assert props == {"messageId": "mid", "correlationId": "cid", "contentType": "text/plain",
                     "expiryTimeUtc": "2027-01-15T08:00:00Z", "iothub-ack": "full", "n": "3"}
    wire.properties = {"to": "x"}
    with pytest.raises(InvalidRequestError):
        c2d_properties(wire)


def test_feedback_message() -> None:
    record = Feedback("m1", "d1", "g1", "Success", "Success", "2026-01-01T00:00:00Z")
    message = feedback_message([record], host_name="hub.local", lock="L")
    assert str(message.content_type) == "application/vnd.microsoft.iothub.feedback.json"
    assert message.user_id == b"hub"
    assert b'"originalMessageId": "m1"' in bytes(message.body)


def _sasl_init(mechanism: str) -> bytes:
    body = b"\x00\x53\x41" + bytes([0xC0, 3 + len(mechanism), 1, 0xA3, len(mechanism)]) + \
        mechanism.encode()
    return struct.pack(">I", 8 + len(body)) + b"\x02\x01\x00\x00" + body


def test_sasl_offers_the_azure_mechanisms_and_hands_over_the_rest() -> None:
    server = SaslServer()
    out, result = server.feed(SASL_HEADER[:5])
    assert (out, result) == (b"", None)
    out, result = server.feed(SASL_HEADER[5:])
    assert out.startswith(SASL_HEADER) and b"MSSBCBS" in out and b"ANONYMOUS" in out
    init = _sasl_init("MSSBCBS")
    out, result = server.feed(init[:7])
    assert result is None
    out, result = server.feed(init[7:] + b"AMQP\x00\x01\x00\x00rest")
    assert result is not None and result.ok and result.mechanism == "MSSBCBS"
    assert result.rest == b"AMQP\x00\x01\x00\x00rest"
    assert out.endswith(b"\x00\x53\x44\xc0\x04\x02\x50\x00\x40")  # sasl-outcome ok


@pytest.mark.parametrize("first", [b"AMQP\x00\x01\x00\x00", b"GET / HTTP/1.1\r\n"])
def test_sasl_is_required(first: bytes) -> None:
    out, result = SaslServer().feed(first)
    assert out == SASL_HEADER and result is not None and not result.ok


def test_sasl_refuses_other_mechanisms() -> None:
    server = SaslServer()
    server.feed(SASL_HEADER)
    out, result = server.feed(_sasl_init("PLAIN"))
    assert result is not None and not result.ok and "PLAIN" in result.error
    assert out.endswith(b"\x50\x01\x40")  # outcome code 1 (auth)


def _frames(data: bytes) -> list[bytes]:
    frames, pos = [], 0
    while pos < len(data):
        if data[pos:pos + 4] == b"AMQP":
            pos += 8
            continue
        size = struct.unpack_from(">I", data, pos)[0]
        frames.append(data[pos:pos + size])
        pos += size
    return frames


def _engine_output() -> bytes:
    """What Proton's server engine writes for an open, with a peer's open fed in."""
    client = Transport()
    client_conn = Connection()
    client.bind(client_conn)
    client_conn.open()
    server = Transport(Transport.SERVER)
    server_conn = Connection()
    server.bind(server_conn)
    server.push(bytes(client.peek(client.pending()) or b""))
    server_conn.open()
    return bytes(server.peek(server.pending()) or b"")


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=20))
def test_padding_fills_every_field_in_any_chunking(cuts: list[int]) -> None:
    raw = _engine_output()
    padder = FramePadder()
    out, pos = b"", 0
    for cut in cuts:
        out += padder.feed(raw[pos:pos + cut])
        pos += cut
    out += padder.feed(raw[pos:])
    [open_frame] = _frames(out)
    assert open_frame[8:11] == b"\x00\x53\x10"
    assert open_frame[11] == 0xC0 and open_frame[13] == 10  # open has all ten fields
    # and Proton itself still reads the padded frame
    client = Transport()
    conn = Connection()
    client.bind(conn)
    conn.open()
    client.push(out)
    assert conn.state & Connection.REMOTE_ACTIVE


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
_system = st.fixed_dictionaries({}, optional={
    "message-id": _text, "correlation-id": _text, "user-id": _text, "to": _text,
    "content-type": _text, "content-encoding": _text,
    "creation-time": st.sampled_from(["2026-01-02T03:04:05.1234567Z", "not a time"]),
    "absolute-expiry-time": st.just("2027-01-02T03:04:05Z"),
    "iothub-connection-device-id": _text, "iothub-message-source": _text,
    "iothub-enqueuedtime": st.sampled_from(["2026-01-02T03:04:05.1234567Z", "bad"]),
    "dt-subject": _text,
})


def _decoded(data: bytes) -> tuple[object, ...]:
    m = Message()
    m.decode(data)
    return (bytes(m.body), m.id, m.correlation_id, m.user_id, m.address, str(m.content_type),
            str(m.content_encoding), m.creation_time, m.expiry_time,
            {str(k): v for k, v in (m.annotations or {}).items()}, m.properties)


@given(_system, st.dictionaries(_text, st.one_of(st.none(), _text), max_size=5),
       st.binary(max_size=600), st.integers(min_value=0, max_value=2**62))
def test_fast_event_encoding_matches_proton(system: dict[str, str],
                                            application: dict[str, str | None], body: bytes,
                                            seq: int) -> None:
    hub = HubMessage(body=body, system=system, application=application)
    reference = event_message(hub, seq=seq, enqueued_ms=1767323045123).encode()
    assert _decoded(encode_event(hub, seq=seq, enqueued_ms=1767323045123)) == _decoded(reference)
    encoder = EventEncoder(cache=4)  # small: the cache fills and is emptied along the way
    for _ in range(3):
        assert _decoded(encoder.encode(hub, seq=seq, enqueued_ms=1767323045123)) == \
            _decoded(reference)
