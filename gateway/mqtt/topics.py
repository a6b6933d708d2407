"""Topic names and topic filters (MQTT 3.1.1 §4.7).

A *topic name* is what a PUBLISH carries: at least one character, no wildcard, no U+0000.
A *topic filter* is what a SUBSCRIBE carries: levels split by ``/``, where ``+`` matches
exactly one level and ``#`` matches the parent level and any number of child levels.

Both functions that check a string come in two flavours: ``*_problem`` returns the reason a
string is invalid (or None) so the codec can raise Local- or RemoteProtocolError as fits the
direction; ``validate_*`` raises :class:`~gateway.errors.RemoteProtocolError`.
"""

from __future__ import annotations

from gateway.errors import RemoteProtocolError

__all__ = [
    "filter_problem",
    "matches",
    "topic_problem",
    "validate_filter",
    "validate_topic",
]


def topic_problem(topic: str) -> str | None:
    """Why ``topic`` is not a valid topic name, or None if it is.

    MQTT 3.1.1 §4.7.3 (at least one character), §4.7.1.1 and §3.3.2.1 (no wildcard
    characters in a topic name), §1.5.3 (no U+0000).
    """
    if not topic:
        return "topic name is empty (MQTT 3.1.1 §4.7.3)"
    if "+" in topic or "#" in topic:
        return "topic name contains a wildcard (MQTT 3.1.1 §3.3.2.1)"
    if "\x00" in topic:
        return "topic name contains U+0000 (MQTT 3.1.1 §1.5.3)"
    return None


def filter_problem(topic_filter: str) -> str | None:
    """Why ``topic_filter`` is not a valid topic filter, or None if it is.

    MQTT 3.1.1 §4.7.3 (at least one character), §4.7.1.2 (``#`` alone in its level and the
    last level), §4.7.1.3 (``+`` alone in its level), §1.5.3 (no U+0000).
    """
    if not topic_filter:
        return "topic filter is empty (MQTT 3.1.1 §4.7.3)"
    if "\x00" in topic_filter:
        return "topic filter contains U+0000 (MQTT 3.1.1 §1.5.3)"
    if "+" not in topic_filter and "#" not in topic_filter:
        return None
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            return "'#' must be the whole last level of a topic filter (MQTT 3.1.1 §4.7.1.2)"
        if "+" in level and level != "+":
            return "'+' must occupy a whole topic filter level (MQTT 3.1.1 §4.7.1.3)"
    return None


def validate_topic(topic: str) -> None:
    """Raise :class:`RemoteProtocolError` unless ``topic`` is a valid topic name (§4.7)."""
    problem = topic_problem(topic)
    if problem is not None:
        raise RemoteProtocolError(problem)


def validate_filter(topic_filter: str) -> None:
    """Raise :class:`RemoteProtocolError` unless ``topic_filter`` is a valid filter (§4.7.1)."""
    problem = filter_problem(topic_filter)
    if problem is not None:
        raise RemoteProtocolError(problem)


def matches(topic_filter: str, topic: str) -> bool:
    """Whether the valid filter ``topic_filter`` matches the valid topic name ``topic``.

    MQTT 3.1.1 §4.7.1: ``+`` matches exactly one level (which may be empty), ``#`` matches
    the parent level and any number of children (``a/#`` matches ``a``). §4.7.2: a filter
    starting with a wildcard does not match a topic starting with ``$``.
    """
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic_filter == topic
    if topic[:1] == "$" and topic_filter[0] in "+#":
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    depth = len(topic_levels)
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= depth:
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == depth
