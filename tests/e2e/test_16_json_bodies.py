"""Issue 16: the service API parses bodies with orjson and writes method payloads and twins with
it, with exactly the behaviour of ``json`` before: the same 400 and message for a malformed
body, NaN and other things only ``json`` reads still read (and sent on as ``json`` wrote
them), a declared charset honoured, and a method payload reaching the device as the very bytes
``json`` wrote."""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from typing import Any

from gateway.hubclient import HubClient
from gateway.mqtt.packets import Publish
from tests.e2e.test_05_twins_methods import connect
from tests.hubproc import HubProcess, create_device


def raw(hub: HubProcess, method: str, path: str, body: bytes,
        content_type: str = "application/json") -> tuple[int, Any]:
    """One request with ``body`` as given (HubClient would write it with json)."""
    client = HubClient(hub.data_dir)
    conn = http.client.HTTPSConnection(str(hub.info["api_host"]), hub.port("api_port"),
                                       context=ssl.create_default_context(cafile=hub.ca_file),
                                       timeout=30)
    try:
        conn.request(method, f"{path}?api-version=2021-04-12", body=body,
                     headers={"Authorization": client._token(), "Content-Type": content_type})
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        conn.close()


def test_malformed_bodies_fail_as_json_failed(hub: HubProcess) -> None:
    for text in ('{"deviceId": ', "", "{'a': 1}", '{"a": 1} x', "\ufeff{}"):
        status, answer = raw(hub, "PUT", "/devices/j1", text.encode())
        if text == "":  # no body: nothing to parse, an empty identity
            assert status == 200, answer
            continue
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            expected = f"malformed JSON body: {exc}"
        assert status == 400 and answer["ExceptionMessage"] == expected, (text, answer)
    status, answer = raw(hub, "PUT", "/devices/j2", b"[1, 2]")
    assert status == 400 and answer["ExceptionMessage"] == "the body must be a JSON object"


def test_a_declared_charset_is_honoured(hub: HubProcess) -> None:
    create_device(hub, "j3")
    body = '{"tags": {"place": "K\u00f6ln"}}'
    status, twin = raw(hub, "PATCH", "/twins/j3", body.encode("latin-1"),
                       "application/json; charset=latin-1")
    assert status == 200 and twin["tags"]["place"] == "K\u00f6ln"
    status, twin = raw(hub, "PATCH", "/twins/j3", body.encode())
    assert status == 200 and twin["tags"]["place"] == "K\u00f6ln"
    assert HubClient(hub.data_dir).request("GET", "/twins/j3")["tags"] == {"place": "K\u00f6ln"}


def test_method_payloads_reach_the_device_as_json_wrote_them(hub: HubProcess) -> None:
    info = create_device(hub, "j4")
    c = connect(hub, ("j4", info["authentication"]["symmetricKey"]["primaryKey"]),
                "$iothub/methods/POST/#")
    payloads = ['{"x": 1, "l": [true, false, "s"]}', '{"t\u00e9": "\u20ac", "d": "\u007f"}',
                '{"small": 1e-07, "f": 0.00001, "big": 1e+16, "n": null}',
                '{"nan": NaN, "inf": -Infinity}', '{"huge": 123456789012345678901234567890}',
                '"just a string"', "12.5"]
    for text in payloads:
        result: dict[str, Any] = {}
        body = f'{{"methodName": "m", "responseTimeoutInSeconds": 10, "payload": {text}}}'

        def call() -> None:
            result["r"] = raw(hub, "POST", "/twins/j4/methods", body.encode())  # noqa: B023

        t = threading.Thread(target=call)
        t.start()
        request = c.recv()
        assert isinstance(request, Publish)
        assert request.payload == json.dumps(json.loads(text), separators=(",", ":")).encode()
        rid = request.topic.split("$rid=")[1]
        c.send(Publish(topic=f"$iothub/methods/res/200/?$rid={rid}", payload=b'{"ok": 1}'))
        t.join(10)
        assert result["r"] == (200, {"status": 200, "payload": {"ok": 1}})
