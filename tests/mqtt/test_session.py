"""The server session machine, driven as a pair: a client encodes with the codec, the session
receives, and what the session sends is decoded again (no sockets)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import LocalProtocolError, RemoteProtocolError
from gateway.mqtt.codec import Decoder, encode
from gateway.mqtt.packets import (
    Connack,
    ConnackCode,
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
from gateway.mqtt.session import (
    ConnectReceived,
    DisconnectReceived,
    Event,
    PubackReceived,
    PublishReceived,
    ServerSession,
    SessionState,
    SubscribeReceived,
    UnsubscribeReceived,
)
from tests.mqtt.strategies import client_packets
from tests.mqtt.wire import connect_body, frame

CONNECT = Connect("dev1", clean_session=False, keepalive=60)


class Pair:
    """A client (the codec) wired to a ServerSession through an in-memory byte pipe."""

    def __init__(self, now: float = 0.0, **options: int) -> None:
        options.setdefault("max_packet_size", 1 << 20)
        self.session = ServerSession(now=now, **options)
        self.decoder = Decoder()

    def send(self, *packets: Packet, now: float = 0.0) -> list[Event]:
        return self.session.receive(b"".join(encode(p) for p in packets), now)

    def received(self) -> list[Packet]:
        """What the server sent since the last call, decoded."""
        return self.decoder.feed(self.session.data_to_send())

    def connect(self, packet: Connect = CONNECT, now: float = 0.0) -> None:
        assert self.send(packet, now=now) == [ConnectReceived(packet)]
        self.session.accept(False)
        assert self.received() == [Connack(False, ConnackCode.ACCEPTED)]


def test_a_new_session_awaits_connect() -> None:
    session = ServerSession(max_packet_size=1000, now=5.0)
    assert session.state is SessionState.AWAIT_CONNECT
    assert session.deadline() == 65.0
    assert session.data_to_send() == b""


def test_connect_then_accept_sends_connack() -> None:
    pair = Pair()
    assert pair.send(CONNECT) == [ConnectReceived(CONNECT)]
    assert pair.session.state is SessionState.CONNECTED
    assert pair.session.keepalive == 60
    assert pair.received() == []  # nothing before the hub decides
    pair.session.accept(session_present=True)
    assert pair.received() == [Connack(True, ConnackCode.ACCEPTED)]


def test_mqtt_3_1_clients_never_see_session_present() -> None:
    pair = Pair()
    legacy = Connect("dev1", False, 60, protocol_name="MQIsdp", protocol_level=3)
    pair.send(legacy)
    pair.session.accept(session_present=True)
    assert pair.received() == [Connack(False, ConnackCode.ACCEPTED)]


def test_refuse_sends_the_code_and_closes() -> None:
    pair = Pair()
    pair.send(CONNECT, Publish("t", b"x"))
    pair.session.refuse(ConnackCode.NOT_AUTHORIZED)
    assert pair.session.state is SessionState.CLOSED
    assert pair.received() == [Connack(False, ConnackCode.NOT_AUTHORIZED)]
    assert pair.send(Publish("t", b"x")) == []


def test_refuse_needs_a_refusing_code() -> None:
    pair = Pair()
    pair.send(CONNECT)
    with pytest.raises(LocalProtocolError):
        pair.session.refuse(ConnackCode.ACCEPTED)


def test_connect_is_answered_once() -> None:
    pair = Pair()
    with pytest.raises(LocalProtocolError):
        pair.session.accept(False)  # no CONNECT yet
    pair.connect()
    with pytest.raises(LocalProtocolError):
        pair.session.accept(False)
    with pytest.raises(LocalProtocolError):
        pair.session.refuse(ConnackCode.NOT_AUTHORIZED)


@pytest.mark.parametrize(
    "answer",
    [
        lambda session: session.ack(1),
        lambda session: session.ack_many([1]),
        lambda session: session.suback(1, [0]),
        lambda session: session.unsuback(1),
        lambda session: session.publish("t", b"", 0),
    ],
    ids=["ack", "ack_many", "suback", "unsuback", "publish"],
)
def test_answers_before_accept_are_a_local_error(answer: Callable[[ServerSession], object]) -> None:
    pair = Pair()
    pair.send(CONNECT)
    with pytest.raises(LocalProtocolError, match="accept"):
        answer(pair.session)


def test_pipelined_pingreq_is_answered_after_connack() -> None:
    pair = Pair()
    assert pair.send(CONNECT, Pingreq(), Pingreq()) == [ConnectReceived(CONNECT)]
    assert pair.received() == []
    pair.session.accept(False)
    assert pair.received() == [Connack(False, ConnackCode.ACCEPTED), Pingresp(), Pingresp()]


def test_pipelined_pingreq_is_not_answered_after_refuse() -> None:
    pair = Pair()
    pair.send(CONNECT, Pingreq())
    pair.session.refuse(ConnackCode.BAD_USERNAME_OR_PASSWORD)
    assert pair.received() == [Connack(False, ConnackCode.BAD_USERNAME_OR_PASSWORD)]


def test_pipelined_packets_follow_connect_in_order() -> None:
    pair = Pair()
    subscribe = Subscribe(1, (("a/#", 1),))
    publish = Publish("a/b", b"x", 1, packet_id=2)
    assert pair.send(CONNECT, subscribe, publish) == [
        ConnectReceived(CONNECT),
        SubscribeReceived(subscribe),
        PublishReceived(publish),
    ]


@pytest.mark.parametrize(
    "first", [Publish("t", b""), Pingreq(), Subscribe(1, (("a", 0),)), Disconnect()], ids=repr
)
def test_first_packet_must_be_connect(first: Packet) -> None:
    pair = Pair()
    with pytest.raises(RemoteProtocolError, match="not CONNECT"):
        pair.send(first)
    assert pair.session.state is SessionState.CLOSED
    assert pair.send(CONNECT) == []


def test_second_connect_is_a_protocol_violation() -> None:
    pair = Pair()
    pair.connect()
    with pytest.raises(RemoteProtocolError, match="second CONNECT"):
        pair.send(CONNECT)
    assert pair.session.state is SessionState.CLOSED


def test_qos_2_publish_is_refused() -> None:
    pair = Pair()
    pair.connect()
    with pytest.raises(RemoteProtocolError, match="QoS 2 not supported"):
        pair.send(Publish("t", b"x", 2, packet_id=1))
    assert pair.session.state is SessionState.CLOSED


@pytest.mark.parametrize("packet", [Pubrec(1), Pubrel(1), Pubcomp(1)], ids=repr)
def test_qos_2_flow_packets_are_refused(packet: Packet) -> None:
    pair = Pair()
    pair.connect()
    with pytest.raises(RemoteProtocolError, match="QoS 2"):
        pair.send(packet)


@pytest.mark.parametrize(
    "packet",
    [Connack(False, 0), Suback(1, (0,)), Unsuback(1), Pingresp()],
    ids=repr,
)
def test_server_only_packets_from_a_client_are_refused(packet: Packet) -> None:
    pair = Pair()
    pair.connect()
    with pytest.raises(RemoteProtocolError, match="only a server sends"):
        pair.send(packet)
    assert pair.session.state is SessionState.CLOSED


def test_malformed_bytes_close_the_session() -> None:
    pair = Pair()
    pair.connect()
    with pytest.raises(RemoteProtocolError):
        pair.session.receive(b"\x00\x00", 1.0)
    assert pair.session.state is SessionState.CLOSED
    assert pair.session.receive(encode(Pingreq()), 2.0) == []
    assert pair.session.deadline() is None


def test_oversize_packet_closes_the_session() -> None:
    pair = Pair(max_packet_size=100)
    pair.connect()
    with pytest.raises(RemoteProtocolError, match="too large"):
        pair.session.receive(encode(Publish("t", bytes(200)))[:3], 1.0)


def test_unsupported_protocol_level_is_refused_with_connack_1() -> None:
    pair = Pair()
    mqtt5 = frame(0x10, connect_body(level=5, payload=b"\x00\x00\x01c"))
    with pytest.raises(RemoteProtocolError, match="protocol level 5"):
        pair.session.receive(mqtt5 + encode(Pingreq()), 0.0)
    assert pair.session.state is SessionState.CLOSED
    assert pair.received() == [Connack(False, ConnackCode.UNACCEPTABLE_PROTOCOL)]


@pytest.mark.parametrize(
    "connect",
    [
        Connect("", clean_session=False, keepalive=60),
        Connect("", clean_session=True, keepalive=60, protocol_name="MQIsdp", protocol_level=3),
    ],
    ids=["3.1.1 without clean session", "3.1"],
)
def test_empty_client_id_without_clean_session_is_rejected(connect: Connect) -> None:
    pair = Pair()
    with pytest.raises(RemoteProtocolError, match="client identifier"):
        pair.send(connect)
    assert pair.received() == [Connack(False, ConnackCode.IDENTIFIER_REJECTED)]


def test_empty_client_id_with_clean_session_is_accepted() -> None:
    pair = Pair()
    pair.connect(Connect("", clean_session=True, keepalive=0))


def test_pingreq_is_answered_without_an_event() -> None:
    pair = Pair()
    pair.connect()
    assert pair.send(Pingreq(), Pingreq()) == []
    assert pair.received() == [Pingresp(), Pingresp()]


def test_publish_events_and_acks() -> None:
    pair = Pair()
    pair.connect()
    qos0 = Publish("a/b", b"zero")
    qos1 = [Publish("a/b", bytes([i]), 1, packet_id=i) for i in range(1, 6)]
    events = pair.send(qos0, *qos1)
    assert events == [PublishReceived(qos0), *(PublishReceived(p) for p in qos1)]
    assert all(type(event) is PublishReceived for event in events)
    pair.session.ack(1)
    pair.session.ack_many([2, 3, 4])
    pair.session.ack_many([])
    pair.session.ack_many(iter([5]))
    assert pair.received() == [Puback(1), Puback(2), Puback(3), Puback(4), Puback(5)]


def test_subscribe_and_unsubscribe_round_trip() -> None:
    pair = Pair()
    pair.connect()
    subscribe = Subscribe(
        7, (("devices/d/messages/devicebound/#", 1), ("$iothub/methods/POST/#", 2))
    )
    unsubscribe = Unsubscribe(8, ("$iothub/methods/POST/#",))
    assert pair.send(subscribe, unsubscribe) == [
        SubscribeReceived(subscribe),
        UnsubscribeReceived(unsubscribe),
    ]
    pair.session.suback(7, [1, 0x80])
    pair.session.unsuback(8)
    assert pair.received() == [Suback(7, (1, 0x80)), Unsuback(8)]


def test_suback_codes_are_checked() -> None:
    pair = Pair()
    pair.connect()
    with pytest.raises(LocalProtocolError):
        pair.session.suback(7, [3])


def test_disconnect_closes_and_ignores_what_follows() -> None:
    pair = Pair()
    pair.connect()
    publish = Publish("t", b"", 1, packet_id=1)
    assert pair.send(publish, Disconnect(), Publish("t", b"after")) == [
        PublishReceived(publish),
        DisconnectReceived(),
    ]
    assert pair.session.state is SessionState.CLOSED
    assert pair.send(Pingreq()) == []
    assert pair.session.deadline() is None


def test_answers_after_close_are_dropped() -> None:
    pair = Pair()
    pair.connect()
    pair.send(Publish("t", b"", 1, packet_id=1), Disconnect())
    pair.session.ack(1)
    pair.session.ack_many([1])
    pair.session.suback(1, [0])
    pair.session.unsuback(1)
    assert pair.received() == []
    with pytest.raises(LocalProtocolError):
        pair.session.publish("t", b"", 0)


def test_close_keeps_queued_bytes() -> None:
    pair = Pair()
    pair.connect()
    pair.send(Pingreq())
    pair.session.close()
    assert pair.session.state is SessionState.CLOSED
    assert pair.received() == [Pingresp()]


class TestOutboundPublish:
    def test_qos_0_has_no_packet_id(self) -> None:
        pair = Pair()
        pair.connect()
        assert pair.session.publish("c2d/x", b"hello", 0, retain=True) is None
        assert pair.received() == [Publish("c2d/x", b"hello", 0, retain=True)]
        assert pair.session.inflight == 0

    def test_qos_1_allocates_ids_and_puback_releases_them(self) -> None:
        pair = Pair()
        pair.connect()
        ids = [pair.session.publish("t", bytes([i]), 1) for i in range(3)]
        assert ids == [1, 2, 3]
        assert pair.received() == [Publish("t", bytes([i]), 1, packet_id=i + 1) for i in range(3)]
        assert pair.session.inflight == 3
        events = pair.send(Puback(2), Puback(999), Puback(2))
        assert events == [PubackReceived(2)] and type(events[0]) is PubackReceived
        assert pair.session.inflight == 2

    def test_inflight_is_bounded(self) -> None:
        pair = Pair(max_inflight=2)
        pair.connect()
        pair.session.publish("t", b"", 1)
        assert not pair.session.inflight_full
        pair.session.publish("t", b"", 1)
        assert pair.session.inflight_full
        with pytest.raises(LocalProtocolError, match="in flight"):
            pair.session.publish("t", b"", 1)
        assert pair.session.publish("t", b"", 0) is None  # QoS 0 is not limited
        pair.send(Puback(1))
        assert not pair.session.inflight_full
        assert pair.session.publish("t", b"", 1) == 3

    def test_ids_wrap_and_skip_ids_in_flight(self) -> None:
        pair = Pair(max_inflight=3)
        pair.connect()
        session = pair.session
        assert session.publish("t", b"", 1) == 1  # stays in flight throughout
        for expected in range(2, 0x10000):
            assert session.publish("t", b"", 1) == expected
            session.receive(b"\x40\x02" + expected.to_bytes(2, "big"), 0.0)
        assert session.publish("t", b"", 1) == 2  # wrapped past 65535, skipped 1
        assert session.publish("t", b"", 1) == 3
        assert session.inflight == 3

    def test_qos_2_is_a_local_error(self) -> None:
        pair = Pair()
        pair.connect()
        with pytest.raises(LocalProtocolError, match="QoS 2"):
            pair.session.publish("t", b"", 2)

    def test_invalid_topic_is_a_local_error(self) -> None:
        pair = Pair()
        pair.connect()
        with pytest.raises(LocalProtocolError):
            pair.session.publish("t/#", b"", 1)
        assert pair.session.inflight == 0

    def test_resend_inflight_sets_dup(self) -> None:
        pair = Pair()
        pair.connect()
        pair.session.publish("t", b"a", 1)
        pair.session.publish("t", b"b", 1)
        pair.send(Puback(1))
        pair.received()
        pair.session.resend_inflight()
        assert pair.received() == [Publish("t", b"b", 1, dup=True, packet_id=2)]

    def test_max_inflight_must_fit_packet_ids(self) -> None:
        with pytest.raises(ValueError):
            ServerSession(max_packet_size=100, max_inflight=0, now=0.0)
        with pytest.raises(ValueError):
            ServerSession(max_packet_size=100, max_inflight=65536, now=0.0)


class TestDeadline:
    def test_connect_timeout_runs_from_creation(self) -> None:
        session = ServerSession(max_packet_size=1000, connect_timeout=10.0, now=100.0)
        session.receive(encode(CONNECT)[:5], 105.0)  # a partial CONNECT does not count
        assert session.deadline() == 110.0

    def test_keepalive_runs_from_the_last_packet(self) -> None:
        pair = Pair(now=100.0)
        pair.connect(Connect("d", True, keepalive=60), now=110.0)
        assert pair.session.deadline() == 110.0 + 90.0
        pair.send(Pingreq(), now=150.0)
        assert pair.session.deadline() == 150.0 + 90.0
        pair.send(Publish("t", b""), now=170.5)
        assert pair.session.deadline() == 170.5 + 90.0

    def test_partial_packets_do_not_reset_it(self) -> None:
        pair = Pair()
        pair.connect(Connect("d", True, keepalive=10), now=0.0)
        raw = encode(Publish("t", b"x" * 100))
        pair.session.receive(raw[:50], 12.0)
        assert pair.session.deadline() == 15.0
        pair.session.receive(raw[50:], 14.0)
        assert pair.session.deadline() == 29.0

    def test_keepalive_zero_means_no_deadline(self) -> None:
        pair = Pair()
        pair.connect(Connect("d", True, keepalive=0))
        assert pair.session.deadline() is None

    def test_keepalive_applies_before_accept(self) -> None:
        session = ServerSession(max_packet_size=1000, now=0.0)
        session.receive(encode(Connect("d", True, keepalive=4)), 1.0)
        assert session.deadline() == 7.0


@settings(max_examples=200)
@given(st.lists(client_packets(), max_size=20), st.data())
def test_client_packets_in_any_chunking_give_events_in_order(
    packets: list[Packet], data: st.DataObject
) -> None:
    """Whatever a client may send, in any chunking, becomes one event per packet (PINGREQ and
    unknown PUBACKs excepted), in order, and a PINGRESP per PINGREQ."""
    pair = Pair()
    pair.connect()
    out_ids = [pair.session.publish("to/client", b"", 1) for _ in range(5)]
    stream = b"".join(encode(p) for p in packets)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    events: list[Event] = []
    for start, stop in zip([0, *cuts], [*cuts, len(stream)]):
        events += pair.session.receive(stream[start:stop], 1.0)
    expected: list[Event] = []
    in_flight = set(out_ids)
    for packet in packets:
        if isinstance(packet, Publish):
            expected.append(PublishReceived(packet))
        elif isinstance(packet, Puback):
            if packet.packet_id in in_flight:
                in_flight.discard(packet.packet_id)
                expected.append(PubackReceived(packet.packet_id))
        elif isinstance(packet, Subscribe):
            expected.append(SubscribeReceived(packet))
        elif isinstance(packet, Unsubscribe):
            expected.append(UnsubscribeReceived(packet))
    assert events == expected
    assert pair.session.inflight == len(in_flight)
    sent = pair.received()
    assert sent.count(Pingresp()) == sum(isinstance(p, Pingreq) for p in packets)
