"""The identity-translation contract between the hub and bridge modules (gateway.translation)."""

from __future__ import annotations

import pytest
from hypothesis import given

from gateway.errors import ConfigError, RemoteProtocolError
from gateway.translation import (
    ChildSpec,
    child_reported_topic,
    encode_document,
    merge_patch,
    overlay,
    parse_child_reported_topic,
    parse_children,
    parse_document,
)
from tests.hub.test_addresses import ids


def test_the_children_map_of_a_module_twin() -> None:
    assert parse_children({}) == {}
    assert parse_children({"children": {"gps": {"deviceId": "plant7-gps"}}}) == {
        "gps": "plant7-gps"}
    with pytest.raises(ConfigError, match="children.gps: needs a deviceId"):
        parse_children({"children": {"gps": {"id": "x"}}})
    with pytest.raises(ConfigError, match="children"):
        parse_children({"children": ["gps"]})


def test_the_document_round_trips_and_hides_the_key_from_repr() -> None:
    specs = [ChildSpec("gps", "plant7-gps", {"baud": 4800}, None),
             ChildSpec("porch", "porch-th", {}, "231d39c1d7cc1ab1aee224cd096db932")]
    parsed = parse_document(encode_document(specs))
    assert parsed == {s.sensor: s for s in specs}
    assert "231d39" not in repr(parsed)


@pytest.mark.parametrize("payload", [b"", b"[]", b'{"gps": 1}', b'{"gps": {"deviceId": 3}}',
                                     b'{"gps": {"deviceId": "x", "desired": []}}',
                                     b'{"gps": {"deviceId": "x", "sensorKey": 5}}'])
def test_a_malformed_document_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_document(payload)


@given(ids)
def test_reported_topics_round_trip_any_device_id(device_id: str) -> None:
    """Any legal device id (IoT Hub ref §1.2), including ``+ # % $``."""
    assert parse_child_reported_topic(child_reported_topic(device_id)) == device_id


def test_merge_patch_follows_rfc_7396() -> None:
    doc = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1]}
    assert merge_patch(doc, {"a": None, "b": {"c": None, "x": 1}, "e": {"n": None, "m": 1}}) == {
        "b": {"d": 3, "x": 1}, "e": {"m": 1}}
    assert doc == {"a": 1, "b": {"c": 2, "d": 3}, "e": [1]}  # not modified


def test_overlay_merges_a_child_into_its_sensor_only() -> None:
    desired = {"ports": {"gps": {"baud": 9600, "format": "nmea"}, "other": {"baud": 1}}}
    out = overlay(desired, ("ports", "gps"), {"baud": 4800, "format": None})
    assert out == {"ports": {"gps": {"baud": 4800}, "other": {"baud": 1}}}
    assert desired["ports"]["gps"] == {"baud": 9600, "format": "nmea"}
