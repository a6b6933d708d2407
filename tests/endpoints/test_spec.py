"""Endpoint definitions: the one JSON shape, its errors, and its inverse."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.endpoints.spec import (
    FileEndpointSpec,
    HttpEndpointSpec,
    MqttEndpointSpec,
    endpoint_json,
    parse_endpoint,
    parse_header,
)
from gateway.errors import InvalidRequestError


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, str]:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    return str(ca), str(pw)


def test_mqtt_defaults_and_round_trip(files: tuple[str, str]) -> None:
    spec = parse_endpoint("broker", {"type": "mqtt", "url": "mqtt://127.0.0.1:1883",
                                     "topic": "plant/{deviceId}/{moduleId}"})
    assert isinstance(spec, MqttEndpointSpec)
    assert (spec.qos, spec.envelope, spec.tls, spec.host, spec.port) == (1, "body", False,
                                                                         "127.0.0.1", 1883)
    full = parse_endpoint("b2", {"type": "mqtt", "url": "mqtts://broker.local", "topic": "t",
                                 "qos": 0, "envelope": "json", "caFile": files[0],
                                 "username": "u", "passwordFile": files[1]})
    assert isinstance(full, MqttEndpointSpec) and full.tls and full.port == 8883
    for s in (spec, full):
        assert parse_endpoint(s.name, endpoint_json(s, secrets=True)) == s
        assert parse_endpoint(s.name, endpoint_json(s)) == s  # nothing secret in mqtt


def test_http_and_file_round_trip(tmp_path: Path) -> None:
    http = parse_endpoint("collector", {"type": "http", "url": "https://u:pw@h.example/in",
                                        "headers": {"Authorization": "Bearer x", "X-Site": "7"},
                                        "batch": 50})
    assert isinstance(http, HttpEndpointSpec)
    assert http.headers == (("Authorization", "Bearer x"), ("X-Site", "7"))
    assert parse_endpoint("collector", endpoint_json(http, secrets=True)) == http
    shown = endpoint_json(http)
    assert shown["headers"] == {"Authorization": "***", "X-Site": "7"}
    assert shown["url"] == "https://u:***@h.example/in"
    file = parse_endpoint("archive", {"type": "file", "path": str(tmp_path / "out"),
                                      "format": "avro", "rollSeconds": 60, "rollBytes": 4096})
    assert isinstance(file, FileEndpointSpec) and file.format == "avro"
    assert parse_endpoint("archive", endpoint_json(file)) == file


@pytest.mark.parametrize(("name", "doc", "fragment"), [
    ("events", {"type": "file", "path": "/tmp/x"}, "reserved"),
    ("bad name", {"type": "file", "path": "/tmp/x"}, "1-64"),
    ("e", {"type": "smtp"}, "type must be one of"),
    ("e", {"type": "file", "path": "rel/dir"}, "absolute"),
    ("e", {"type": "file", "path": "/tmp/x", "rolSeconds": 5}, "rolSeconds is not a setting"),
    ("e", {"type": "file", "path": "/tmp/x", "rollSeconds": 0}, "between"),
    ("e", {"type": "mqtt", "url": "tcp://h:1", "topic": "t"}, "mqtt://HOST:PORT"),
    ("e", {"type": "mqtt", "url": "mqtt://u:p@h:1", "topic": "t"}, "credentials"),
    ("e", {"type": "mqtt", "url": "mqtt://h:1", "topic": "a/+/b"}, "wildcards"),
    ("e", {"type": "mqtt", "url": "mqtt://h:1", "topic": "a/{device}"}, "placeholder"),
    ("e", {"type": "mqtt", "url": "mqtt://h:1", "topic": "a/{deviceId"}, "brace"),
    ("e", {"type": "mqtt", "url": "mqtt://h:1", "topic": "t", "qos": 2}, "between 0 and 1"),
    ("e", {"type": "mqtt", "url": "mqtt://h:1", "topic": "t", "envelope": "xml"}, "envelope"),
    ("e", {"type": "mqtt", "url": "mqtts://h:1", "topic": "t", "caFile": "/nonexistent"},
     "not a readable file"),
    ("e", {"type": "mqtt", "url": "mqtt://h:1"}, "topic is required"),
    ("e", {"type": "http", "url": "ftp://h/"}, "http://"),
    ("e", {"type": "http", "url": "http://h/", "batch": 0}, "between 1 and 500"),
    ("e", {"type": "http", "url": "http://h/", "headers": {"Host": "x"}}, "set by the gateway"),
    ("e", {"type": "http", "url": "http://h/", "headers": {"A": "x\ny"}}, "one line"),
    ("e", {"type": "file", "path": "/tmp/x", "name": "other"}, "does not match"),
])
def test_bad_input_is_one_clear_line(name: str, doc: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_endpoint(name, doc)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_parse_header() -> None:
    assert parse_header("X-Api-Key:  abc ") == ("X-Api-Key", "abc")
    with pytest.raises(InvalidRequestError):
        parse_header("no colon")
