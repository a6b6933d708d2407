"""Topic names, topic filters and matching (MQTT 3.1.1 §4.7)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import RemoteProtocolError
from gateway.mqtt.topics import matches, validate_filter, validate_topic
from tests.mqtt.strategies import topic_filters, topic_names


@pytest.mark.parametrize(
    "topic_filter",
    [
        "#",
        "+",
        "a",
        "/",
        "a/b",
        "a/+",
        "+/b",
        "a/#",
        "+/+",
        "/+",
        "a//b",
        "+/#",
        "$SYS/#",
        "sport/tennis/+",
    ],
)
def test_valid_filters(topic_filter: str) -> None:
    validate_filter(topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    ["", "a#", "#a", "a/#/b", "#/", "##", "a/b#", "a+", "+a", "a/+b/c", "++", "a\x00"],
)
def test_invalid_filters(topic_filter: str) -> None:
    with pytest.raises(RemoteProtocolError):
        validate_filter(topic_filter)


@pytest.mark.parametrize("topic", ["a", "/", "a/b", "$SYS/x", " ", "a//b", "é/\u4e2d"])
def test_valid_topic_names(topic: str) -> None:
    validate_topic(topic)


@pytest.mark.parametrize("topic", ["", "+", "a/#", "a+b", "a\x00"])
def test_invalid_topic_names(topic: str) -> None:
    with pytest.raises(RemoteProtocolError):
        validate_topic(topic)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        # §4.7.1.2: '#' matches the parent level and any number of children
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/#", "sport", True),
        ("sport/#", "sports", False),
        ("#", "anything/at/all", True),
        ("#", "/", True),
        # §4.7.1.3: '+' matches exactly one level, which may be empty
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+", "sport", True),
        ("+", "/finance", False),
        ("/+", "/finance", True),
        ("+/+", "/finance", True),
        ("+/tennis/#", "sport/tennis/player1", True),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/b", "a/b", True),
        ("a/b", "a/b/", False),
        ("a/b", "A/b", False),
        # §4.7.2: wildcards at the start do not match topics starting with '$'
        ("#", "$SYS/monitor/Clients", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("$SYS/#", "$SYS/monitor/Clients", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        ("$iothub/twin/res/#", "$iothub/twin/res/200/?$rid=1", True),
        ("a/#", "a/$b", True),
    ],
)
def test_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected


@given(topic_names)
def test_a_topic_as_filter_matches_itself(topic: str) -> None:
    assert matches(topic, topic)


@given(topic_names)
def test_hash_matches_every_topic_not_starting_with_dollar(topic: str) -> None:
    assert matches("#", topic) is (not topic.startswith("$"))


@given(topic_names, st.data())
def test_replacing_levels_by_plus_still_matches(topic: str, data: st.DataObject) -> None:
    levels = topic.split("/")
    replaced = [
        "+" if data.draw(st.booleans()) and (i or not topic.startswith("$")) else level
        for i, level in enumerate(levels)
    ]
    assert matches("/".join(replaced), topic)
    cut = data.draw(st.integers(0, len(levels)))
    prefix_filter = "/".join([*replaced[:cut], "#"])
    assert matches(prefix_filter, topic) is (not (cut == 0 and topic.startswith("$")))


@given(topic_filters())
def test_generated_filters_are_valid(topic_filter: str) -> None:
    validate_filter(topic_filter)
