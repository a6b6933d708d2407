"""Hypothesis strategies for every MQTT 3.1.1 packet (importable by other test packages).

Everything generated here is valid: ``encode`` accepts it and ``decode`` gives it back.
``packets()`` draws any packet; ``client_packets()`` only what a client may send to this
server after CONNECT (QoS 0/1 PUBLISH, PUBACK, SUBSCRIBE, UNSUBSCRIBE, PINGREQ).
"""

from __future__ import annotations

from hypothesis import strategies as st

from gateway.mqtt.packets import (
    SUBACK_FAILURE,
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
    Will,
)

__all__ = [
    "binary",
    "client_packets",
    "connacks",
    "connects",
    "packet_ids",
    "packets",
    "publishes",
    "subscribes",
    "text",
    "topic_filters",
    "topic_names",
    "unsubscribes",
    "wills",
]

packet_ids = st.integers(min_value=1, max_value=0xFFFF)

_chars = st.characters(codec="utf-8", exclude_characters="\x00")
text = st.text(_chars, max_size=30)
"""Any string MQTT may carry: no surrogates, no U+0000 (MQTT 3.1.1 §1.5.3)."""

_level = st.one_of(
    st.sampled_from(["", "a", "devices", "$iothub", "messages", "events", "twin", "é", "\u4e2d"]),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00/+#"), max_size=8),
)

topic_names = st.lists(_level, min_size=1, max_size=6).map("/".join).filter(bool)
"""Valid topic names (§4.7): levels joined by '/', no wildcard, at least one character."""


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    """Valid topic filters (§4.7.1): plain levels, '+' levels, and maybe a final '#'."""
    levels = draw(st.lists(st.one_of(_level, st.just("+")), min_size=0, max_size=6))
    if draw(st.booleans()) or not levels:
        levels.append("#")
    topic_filter = "/".join(levels)
    return topic_filter if topic_filter else "#"


binary = st.one_of(
    st.binary(max_size=300),
    st.integers(min_value=0, max_value=70_000).map(lambda n: b"\xa5" * n),
)
"""Payloads: mostly short, sometimes long enough for a 3-byte remaining length."""

wills = st.builds(
    Will,
    topic=topic_names,
    payload=st.binary(max_size=100),
    qos=st.integers(0, 2),
    retain=st.booleans(),
)


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    """CONNECT as MQTT 3.1.1 ("MQTT", 4) or 3.1 ("MQIsdp", 3)."""
    name, level = draw(st.sampled_from([("MQTT", 4), ("MQIsdp", 3)]))
    username = draw(st.none() | text)
    password = draw(st.none() | st.binary(max_size=200)) if username is not None else None
    return Connect(
        client_id=draw(text),
        clean_session=draw(st.booleans()),
        keepalive=draw(st.integers(0, 0xFFFF)),
        username=username,
        password=password,
        will=draw(st.none() | wills),
        protocol_name=name,
        protocol_level=level,
    )


@st.composite
def connacks(draw: st.DrawFn) -> Connack:
    code = draw(st.sampled_from(ConnackCode))
    present = draw(st.booleans()) if code == ConnackCode.ACCEPTED else False
    return Connack(present, code)


@st.composite
def publishes(draw: st.DrawFn, qos: st.SearchStrategy[int] | None = None) -> Publish:
    """PUBLISH at any QoS (or at a QoS drawn from ``qos``)."""
    level = draw(qos if qos is not None else st.integers(0, 2))
    return Publish(
        topic=draw(topic_names),
        payload=draw(binary),
        qos=level,
        retain=draw(st.booleans()),
        dup=draw(st.booleans()) if level else False,
        packet_id=draw(packet_ids) if level else None,
    )


subscribes = st.builds(
    Subscribe,
    packet_id=packet_ids,
    topics=st.lists(st.tuples(topic_filters(), st.integers(0, 2)), min_size=1, max_size=5).map(
        tuple
    ),
)
subacks = st.builds(
    Suback,
    packet_id=packet_ids,
    return_codes=st.lists(st.sampled_from([0, 1, 2, SUBACK_FAILURE]), min_size=1, max_size=8).map(
        tuple
    ),
)
unsubscribes = st.builds(
    Unsubscribe,
    packet_id=packet_ids,
    topics=st.lists(topic_filters(), min_size=1, max_size=5).map(tuple),
)

PACKET_STRATEGIES: dict[type, st.SearchStrategy[Packet]] = {
    Connect: connects(),
    Connack: connacks(),
    Publish: publishes(),
    Puback: st.builds(Puback, packet_ids),
    Pubrec: st.builds(Pubrec, packet_ids),
    Pubrel: st.builds(Pubrel, packet_ids),
    Pubcomp: st.builds(Pubcomp, packet_ids),
    Subscribe: subscribes,
    Suback: subacks,
    Unsubscribe: unsubscribes,
    Unsuback: st.builds(Unsuback, packet_ids),
    Pingreq: st.just(Pingreq()),
    Pingresp: st.just(Pingresp()),
    Disconnect: st.just(Disconnect()),
}
"""One strategy per packet type."""


def packets() -> st.SearchStrategy[Packet]:
    """Any valid MQTT 3.1.1 packet."""
    return st.one_of(list(PACKET_STRATEGIES.values()))


def client_packets() -> st.SearchStrategy[Packet]:
    """What a connected client may send this server (no QoS 2, no CONNECT, no DISCONNECT)."""
    return st.one_of(
        publishes(qos=st.integers(0, 1)),
        st.builds(Puback, packet_ids),
        subscribes,
        unsubscribes,
        st.just(Pingreq()),
    )
