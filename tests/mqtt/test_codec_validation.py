"""Each MQTT 3.1.1 rule the decoder enforces, one malformed packet at a time.

Every case is also fed to the streaming Decoder, whose inline fast paths must refuse the same
bytes as the general readers.
"""

from __future__ import annotations

import pytest

from gateway.errors import LocalProtocolError, RemoteProtocolError
from gateway.mqtt.codec import Decoder, decode, encode, encode_publish
from gateway.mqtt.packets import (
    Connack,
    ConnackCode,
    Connect,
    Disconnect,
    Pingreq,
    Publish,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    Will,
)
from tests.mqtt.wire import connect_body, frame, publish, string, u16


def assert_malformed(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode(data)
    with pytest.raises(RemoteProtocolError, match=match):
        Decoder().feed(data)
    decoder = Decoder()  # byte by byte: refused at the latest when the packet is complete
    with pytest.raises(RemoteProtocolError, match=match):
        for index in range(len(data)):
            decoder.feed(data[index : index + 1])


# -- fixed header (§2.2) -------------------------------------------------------------------


@pytest.mark.parametrize("first", [0x00, 0x0F, 0xF0, 0xFF])
def test_reserved_packet_types_are_malformed(first: int) -> None:
    assert_malformed(bytes([first, 0]), "reserved")


def test_reserved_type_is_refused_from_the_first_byte() -> None:
    with pytest.raises(RemoteProtocolError):
        decode(b"\x00")
    with pytest.raises(RemoteProtocolError):
        Decoder().feed(b"\xf0")


@pytest.mark.parametrize(
    ("first", "body"),
    [
        (0x60, u16(1)),  # PUBREL needs 0b0010
        (0x63, u16(1)),
        (0x80, u16(1) + string("a") + b"\x00"),  # SUBSCRIBE needs 0b0010
        (0x8A, u16(1) + string("a") + b"\x00"),
        (0xA0, u16(1) + string("a")),  # UNSUBSCRIBE needs 0b0010
        (0x11, connect_body()),  # the others need 0
        (0x42, u16(1)),
        (0x41, u16(1)),
        (0xC1, b""),
        (0xE8, b""),
        (0x28, b"\x00\x00"),
        (0x92, u16(1) + b"\x00"),
    ],
)
def test_wrong_fixed_header_flags_are_malformed(first: int, body: bytes) -> None:
    assert_malformed(frame(first, body), "flags")


def test_pubrel_subscribe_unsubscribe_with_flags_0010_decode() -> None:
    assert decode(frame(0x62, u16(5)))[0] == Pubrel(5)  # type: ignore[index]
    assert decode(frame(0x82, u16(5) + string("a/+") + b"\x01"))[0] == Subscribe(  # type: ignore[index]
        5, (("a/+", 1),)
    )
    assert decode(frame(0xA2, u16(5) + string("a/#")))[0] == Unsubscribe(5, ("a/#",))  # type: ignore[index]


def test_remaining_length_over_four_bytes_is_malformed_at_the_fourth() -> None:
    with pytest.raises(RemoteProtocolError, match="4 bytes"):
        decode(b"\xc0\x80\x80\x80\x80")
    with pytest.raises(RemoteProtocolError, match="4 bytes"):
        Decoder().feed(b"\xc0\x80\x80\x80\x80")


def test_non_minimal_remaining_length_is_accepted() -> None:
    assert decode(b"\xc0\x80\x00") == (Pingreq(), 3)  # §2.2.3 does not demand the shortest form
    assert Decoder().feed(b"\xc0\x80\x80\x00") == [Pingreq()]


# -- strings (§1.5.3) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"\xc3\x28", b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"a\xe2\x82"],
    ids=["bad continuation", "0xff", "surrogate", "overlong", "above U+10FFFF", "cut off"],
)
@pytest.mark.parametrize("first", [0x30, 0x32, 0x33, 0x3A])
def test_ill_formed_utf8_topic_is_malformed(raw: bytes, first: int) -> None:
    assert_malformed(publish(raw, first=first), "UTF-8")


def test_u0000_in_a_string_is_malformed() -> None:
    assert_malformed(publish(b"a\x00b"), "U\\+0000")
    assert_malformed(publish(b"a\x00b", first=0x30), "U\\+0000")
    assert_malformed(frame(0x10, connect_body(payload=string(b"c\x00"))), "U\\+0000")
    assert_malformed(frame(0x82, u16(1) + string(b"a\x00") + b"\x00"), "U\\+0000")


def test_bom_is_kept_not_stripped() -> None:
    assert decode(publish("\ufeffa"))[0].topic == "\ufeffa"  # type: ignore[index, union-attr]


def test_string_longer_than_its_packet_is_malformed() -> None:
    assert_malformed(frame(0x32, u16(50) + b"abc"), "past the end")
    assert_malformed(frame(0x30, u16(50) + b"abc"), "past the end")
    assert_malformed(frame(0x10, u16(4) + b"MQ"), "past the end")


# -- PUBLISH (§3.3) --------------------------------------------------------------------------


@pytest.mark.parametrize("first", [0x30, 0x32, 0x3B])
def test_empty_topic_is_malformed(first: int) -> None:
    assert_malformed(publish(b"", first=first), "empty")


@pytest.mark.parametrize("topic", ["a/+", "+", "a/#", "#", "a+b", "a#"])
@pytest.mark.parametrize("first", [0x30, 0x31, 0x32, 0x3B])
def test_wildcard_in_topic_name_is_malformed(topic: str, first: int) -> None:
    assert_malformed(publish(topic, first=first), "wildcard")


@pytest.mark.parametrize("first", [0x36, 0x37, 0x3E, 0x3F])
def test_qos_3_is_malformed(first: int) -> None:
    assert_malformed(publish("t", first=first), "QoS is 3")


def test_qos_3_is_refused_from_the_first_byte() -> None:
    with pytest.raises(RemoteProtocolError, match="QoS is 3"):
        Decoder().feed(b"\x36")


@pytest.mark.parametrize("first", [0x38, 0x39])
def test_dup_on_qos_0_is_malformed(first: int) -> None:
    assert_malformed(publish("t", first=first), "DUP")


@pytest.mark.parametrize("first", [0x32, 0x34, 0x3A, 0x3D])
def test_packet_id_zero_with_qos_is_malformed(first: int) -> None:
    assert_malformed(publish("t", first=first, packet_id=0), "packet id is 0")


@pytest.mark.parametrize("first", [0x32, 0x34])
def test_publish_cut_before_its_packet_id_is_malformed(first: int) -> None:
    assert_malformed(frame(first, string("t") + b"\x01"), "cut off")


def test_publish_flags_decode() -> None:
    assert decode(publish("t", b"p", first=0x3D, packet_id=3))[0] == Publish(  # type: ignore[index]
        "t", b"p", qos=2, retain=True, dup=True, packet_id=3
    )
    assert Decoder().feed(publish("t", b"", first=0x31)) == [Publish("t", b"", retain=True)]
    assert Decoder().feed(publish("t", b"", first=0x30)) == [Publish("t", b"")]


# -- CONNECT (§3.1) --------------------------------------------------------------------------


def test_connect_protocol_name_must_be_mqtt() -> None:
    assert_malformed(frame(0x10, connect_body(name="MQTX")), "protocol name")
    assert_malformed(frame(0x10, connect_body(name="mqtt")), "protocol name")


def test_connect_mqtt_4_and_mqisdp_3_decode() -> None:
    assert decode(frame(0x10, connect_body()))[0] == Connect("c", True, 60)  # type: ignore[index]
    legacy = decode(frame(0x10, connect_body(name="MQIsdp", level=3)))[0]  # type: ignore[index]
    assert legacy == Connect("c", True, 60, protocol_name="MQIsdp", protocol_level=3)


@pytest.mark.parametrize(("name", "level"), [("MQTT", 5), ("MQTT", 3), ("MQIsdp", 4), ("MQTT", 0)])
def test_connect_with_another_level_decodes_its_header_only(name: str, level: int) -> None:
    body = connect_body(name=name, level=level, flags=0x00, keepalive=30, payload=b"\x05\x11\x00")
    packet = decode(frame(0x10, body))[0]  # type: ignore[index]
    assert packet == Connect("", False, 30, protocol_name=name, protocol_level=level)
    with pytest.raises(LocalProtocolError):
        encode(packet)


def test_connect_reserved_flag_is_malformed() -> None:
    assert_malformed(frame(0x10, connect_body(flags=0x03)), "reserved CONNECT flag")


@pytest.mark.parametrize("flags", [0x08, 0x10, 0x18, 0x20, 0x28])
def test_will_qos_or_retain_without_will_flag_is_malformed(flags: int) -> None:
    assert_malformed(frame(0x10, connect_body(flags=flags)), "without the will flag")


def test_will_qos_3_is_malformed() -> None:
    payload = string("c") + string("w") + string(b"m")
    assert_malformed(frame(0x10, connect_body(flags=0x1C, payload=payload)), "will QoS is 3")


def test_will_fields_decode() -> None:
    payload = string("c") + string("w/t") + string(b"bye")
    packet = decode(frame(0x10, connect_body(flags=0x36, payload=payload)))[0]  # type: ignore[index]
    assert packet == Connect("c", True, 60, will=Will("w/t", b"bye", 2, True))


def test_will_topic_with_wildcard_is_malformed() -> None:
    payload = string("c") + string("w/#") + string(b"bye")
    assert_malformed(frame(0x10, connect_body(flags=0x06, payload=payload)), "will topic")


def test_will_flag_without_will_fields_is_malformed() -> None:
    assert_malformed(frame(0x10, connect_body(flags=0x06)), "will topic")


def test_password_without_username_is_malformed() -> None:
    payload = string("c") + string(b"secret")
    assert_malformed(frame(0x10, connect_body(flags=0x42, payload=payload)), "password flag")


def test_username_and_password_decode() -> None:
    payload = string("c") + string("user") + string(b"\x00\xffpw")
    packet = decode(frame(0x10, connect_body(flags=0xC2, payload=payload)))[0]  # type: ignore[index]
    assert packet == Connect("c", True, 60, username="user", password=b"\x00\xffpw")


def test_username_flag_without_username_is_malformed() -> None:
    assert_malformed(frame(0x10, connect_body(flags=0x82)), "user name")


def test_connect_with_trailing_bytes_is_malformed() -> None:
    assert_malformed(frame(0x10, connect_body(payload=string("c") + b"\x00")), "after its payload")


def test_connect_cut_in_its_variable_header_is_malformed() -> None:
    assert_malformed(frame(0x10, string("MQTT") + b"\x04\x02"), "cut off")


# -- CONNACK (§3.2) --------------------------------------------------------------------------


def test_connack_decodes() -> None:
    assert decode(b"\x20\x02\x01\x00")[0] == Connack(True, ConnackCode.ACCEPTED)  # type: ignore[index]
    assert decode(b"\x20\x02\x00\x05")[0] == Connack(False, ConnackCode.NOT_AUTHORIZED)  # type: ignore[index]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x20\x02\x02\x00", "acknowledge flags"),
        (b"\x20\x02\x00\x06", "reserved"),
        (b"\x20\x02\x01\x04", "session present"),
        (b"\x20\x03\x00\x00\x00", "not 2"),
        (b"\x20\x01\x00", "not 2"),
    ],
)
def test_bad_connack_is_malformed(data: bytes, match: str) -> None:
    assert_malformed(data, match)


def test_connack_encoding_checks_its_fields() -> None:
    with pytest.raises(LocalProtocolError):
        encode(Connack(True, ConnackCode.NOT_AUTHORIZED))
    with pytest.raises(LocalProtocolError):
        encode(Connack(False, 6))


# -- packet identifiers and acks (§2.3.1, §3.4-§3.7, §3.11) -------------------------------


@pytest.mark.parametrize("first", [0x40, 0x50, 0x62, 0x70, 0xB0])
def test_ack_with_packet_id_zero_is_malformed(first: int) -> None:
    assert_malformed(frame(first, u16(0)), "packet id is 0")


@pytest.mark.parametrize("first", [0x40, 0x50, 0x62, 0x70, 0xB0])
@pytest.mark.parametrize("body", [b"", b"\x00", b"\x00\x01\x00"])
def test_ack_body_must_be_two_bytes(first: int, body: bytes) -> None:
    assert_malformed(frame(first, body), "not 2")


@pytest.mark.parametrize("first", [0xC0, 0xD0, 0xE0])
def test_empty_packets_must_be_empty(first: int) -> None:
    assert_malformed(frame(first, b"\x00"), "not 0")


def test_unsuback_and_disconnect_decode() -> None:
    assert Decoder().feed(frame(0xB0, u16(3)) + frame(0xE0, b"")) == [Unsuback(3), Disconnect()]


# -- SUBSCRIBE, SUBACK, UNSUBSCRIBE (§3.8-§3.10) ----------------------------------------------


def test_subscribe_without_filters_is_malformed() -> None:
    assert_malformed(frame(0x82, u16(1)), "no topic filter")


def test_subscribe_packet_id_zero_is_malformed() -> None:
    assert_malformed(frame(0x82, u16(0) + string("a") + b"\x00"), "packet id is 0")


def test_subscribe_requested_qos_3_is_malformed() -> None:
    assert_malformed(frame(0x82, u16(1) + string("a") + b"\x03"), "QoS is 3")


@pytest.mark.parametrize("options", [0x04, 0x80, 0xFC, 0x41])
def test_subscribe_reserved_option_bits_are_malformed(options: int) -> None:
    assert_malformed(frame(0x82, u16(1) + string("a") + bytes([options])), "reserved option")


def test_subscribe_without_requested_qos_is_malformed() -> None:
    assert_malformed(frame(0x82, u16(1) + string("a")), "cut off")


@pytest.mark.parametrize(
    ("topic_filter", "match"),
    [
        ("", "empty"),
        ("a/#/b", "'#'"),
        ("a#", "'#'"),
        ("#/", "'#'"),
        ("a/b+", "'\\+'"),
        ("+a", "'\\+'"),
    ],
)
def test_subscribe_with_invalid_filter_is_malformed(topic_filter: str, match: str) -> None:
    assert_malformed(frame(0x82, u16(1) + string(topic_filter) + b"\x01"), match)
    assert_malformed(frame(0xA2, u16(1) + string(topic_filter)), match)
    with pytest.raises(LocalProtocolError):
        encode(Subscribe(1, ((topic_filter, 0),)))
    with pytest.raises(LocalProtocolError):
        encode(Unsubscribe(1, (topic_filter,)))


def test_subscribe_decodes_several_filters() -> None:
    body = (
        u16(9) + string("a/+/c") + b"\x00" + string("#") + b"\x02" + string("$iothub/#") + b"\x01"
    )
    assert decode(frame(0x82, body))[0] == Subscribe(  # type: ignore[index]
        9, (("a/+/c", 0), ("#", 2), ("$iothub/#", 1))
    )


def test_suback_codes() -> None:
    assert decode(frame(0x90, u16(2) + b"\x00\x01\x02\x80"))[0] == Suback(2, (0, 1, 2, 0x80))  # type: ignore[index]
    assert_malformed(frame(0x90, u16(2) + b"\x00\x03"), "reserved")
    assert_malformed(frame(0x90, u16(2)), "no return code")
    with pytest.raises(LocalProtocolError):
        encode(Suback(2, (3,)))
    with pytest.raises(LocalProtocolError):
        encode(Suback(2, ()))


def test_unsubscribe_without_filters_is_malformed() -> None:
    assert_malformed(frame(0xA2, u16(1)), "no topic filter")


def test_unsubscribe_string_cut_off_is_malformed() -> None:
    assert_malformed(frame(0xA2, u16(1) + b"\x00"), "cut off")


# -- the encoder refuses what the decoder would refuse ------------------------------------------


@pytest.mark.parametrize(
    "packet",
    [
        Publish("", b""),
        Publish("a/+", b""),
        Publish("a\x00", b""),
        Publish("\ud800", b""),
        Publish("t", b"", qos=3, packet_id=1),
        Publish("t", b"", qos=1),
        Publish("t", b"", qos=1, packet_id=0),
        Publish("t", b"", qos=0, packet_id=1),
        Publish("t", b"", qos=0, dup=True),
        Connect("c", True, 70_000),
        Connect("c", True, 60, password=b"pw"),
        Connect("c", True, 60, will=Will("w/#", b"", 0, False)),
        Connect("c", True, 60, will=Will("w", b"", 3, False)),
        Connect("c", True, 60, protocol_level=5),
        Connect("x" * 70_000, True, 60),
        Subscribe(1, ()),
        Subscribe(1, (("a", 3),)),
        Subscribe(0, (("a", 1),)),
        Unsubscribe(1, ()),
    ],
    ids=repr,
)
def test_encoding_an_invalid_packet_is_a_local_error(packet: object) -> None:
    with pytest.raises(LocalProtocolError):
        encode(packet)  # type: ignore[arg-type]


def test_encode_refuses_a_non_packet() -> None:
    with pytest.raises(LocalProtocolError):
        encode("PUBLISH")  # type: ignore[arg-type]


def test_encode_publish_refuses_qos_3_and_wildcards() -> None:
    with pytest.raises(LocalProtocolError):
        encode_publish("t", b"", 3, 1)
    with pytest.raises(LocalProtocolError):
        encode_publish("a/#", b"", 1, 1)
