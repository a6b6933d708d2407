"""MQTT over WebSocket at ``/$iothub/websocket`` and the device HTTP API, on the hub's HTTPS
port, against a real hub process: paho-mqtt and aiohttp's WebSocket client for the first,
aiohttp's HTTP client with SAS tokens (or a client certificate) for the second. Telemetry is
read back from the built-in endpoint with ``gateway monitor-events``; C2D messages are sent
through the service API (``POST /devices/{id}/messages/deviceBound``)."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.hub.sas import generate_sas_token
from gateway.hubclient import HubClient
from gateway.mqtt.codec import Decoder, encode
from gateway.mqtt.packets import (
    Connack,
    Connect,
    Packet,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Will,
)
from tests.e2e.test_01_connect import tls, wait_for_log
from tests.e2e.test_02_telemetry import monitor, publish_with_paho
from tests.hubproc import HubProcess, create_device, device_token, username

WS_PATH = "/$iothub/websocket"


@pytest.fixture
def device(hub: HubProcess) -> tuple[str, str]:
    info = create_device(hub, "dev1")
    return "dev1", info["authentication"]["symmetricKey"]["primaryKey"]


def client_ssl(hub: HubProcess, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=hub.ca_file)
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def base_url(hub: HubProcess, scheme: str = "https") -> str:
    return f"{scheme}://localhost:{hub.port('api_port')}"


# -- MQTT over WebSocket --------------------------------------------------------------------


class WsClosed(Exception):
    pass


class WsMqtt:
    """Raw MQTT packets over aiohttp's WebSocket client, with our codec."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.decoder = Decoder()
        self.pending: list[Packet] = []

    async def send(self, *packets: Packet) -> None:
        await self.ws.send_bytes(b"".join(encode(p) for p in packets))

    async def recv(self, timeout: float = 10.0) -> Packet:
        while not self.pending:
            msg = await self.ws.receive(timeout)
            if msg.type is not aiohttp.WSMsgType.BINARY:
                raise WsClosed(str(msg.type))
            self.pending.extend(self.decoder.feed(msg.data))
        return self.pending.pop(0)

    async def connect(self, hub: HubProcess, device: tuple[str, str], **kw: Any) -> Packet:
        await self.send(Connect(client_id=device[0], clean_session=False, keepalive=60,
                                username=username(hub, device[0]),
                                password=device_token(hub, *device).encode(), **kw))
        return await self.recv()

    async def expect_closed(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    await self.recv(timeout)
                except WsClosed:
                    return


async def open_ws(session: aiohttp.ClientSession, hub: HubProcess,
                  cert: tuple[Path, Path] | None = None) -> WsMqtt:
    ws = await session.ws_connect(base_url(hub, "wss") + WS_PATH, protocols=("mqtt",),
                                  ssl=client_ssl(hub, cert))
    assert ws.protocol == "mqtt"
    return WsMqtt(ws)


def test_paho_over_websocket_publishes_qos1_in_order(hub: HubProcess,
                                                     device: tuple[str, str]) -> None:
    publish_with_paho(hub, device, 200, port=hub.port("api_port"), timeout=20,
                      websocket_path=WS_PATH)
    wait_for_log(hub, "listener=websocket auth=sas")
    events = monitor(hub, "dev1")
    assert [e["properties"]["application"]["n"] for e in events] == [str(i) for i in range(200)]
    assert events[0]["annotations"]["iothub-connection-device-id"] == "dev1"
    assert events[0]["payload"] == {"i": 0}


async def test_frames_need_not_align_with_packets(hub: HubProcess,
                                                  device: tuple[str, str]) -> None:
    connect = encode(Connect(client_id="dev1", clean_session=True, keepalive=60,
                             username=username(hub, "dev1"),
                             password=device_token(hub, *device).encode()))
    publishes = b"".join(
        encode(Publish(topic=f"devices/dev1/messages/events/k={i}", payload=b"%d" % i, qos=1,
                       packet_id=i)) for i in (1, 2, 3))
    async with aiohttp.ClientSession() as session:
        c = await open_ws(session, hub)
        # CONNECT one byte, then the rest with the first PUBLISH's first half; then the others.
        stream = connect + publishes
        cut = len(connect) + 7
        for frame in (stream[:1], stream[1:cut], stream[cut:]):
            await c.ws.send_bytes(frame)
        assert await c.recv() == Connack(session_present=False, return_code=0)
        assert [await c.recv() for _ in range(3)] == [Puback(1), Puback(2), Puback(3)]
        await c.ws.close()
    assert [e["payload"] for e in monitor(hub, "dev1")] == ["1", "2", "3"]


async def test_twin_get_over_websocket(hub: HubProcess, device: tuple[str, str]) -> None:
    async with aiohttp.ClientSession() as session:
        c = await open_ws(session, hub)
        assert await c.connect(hub, device) == Connack(session_present=False, return_code=0)
        await c.send(Subscribe(packet_id=1, topics=(("$iothub/twin/res/#", 1),)))
        assert await c.recv() == Suback(1, (1,))
        await c.send(Publish(topic="$iothub/twin/GET/?$rid=7", payload=b" ", qos=1, packet_id=2))
        packets = [await c.recv(), await c.recv()]
        response = next(p for p in packets if isinstance(p, Publish))
        assert Puback(2) in packets
        assert response.topic == "$iothub/twin/res/200/?$rid=7"
        assert json.loads(response.payload)["desired"]["$version"] == 1


async def test_bad_token_gets_connack_5_and_the_websocket_closes(
        hub: HubProcess, device: tuple[str, str]) -> None:
    async with aiohttp.ClientSession() as session:
        c = await open_ws(session, hub)
        ack = await c.connect(hub, (device[0], "A" * 43 + "="))
        assert ack == Connack(session_present=False, return_code=5)
        await c.expect_closed()
    wait_for_log(hub, "connection refused client_id='dev1'")
    assert "listener=websocket reason=bad signature" in hub.log_text()


async def test_forbidden_publish_closes_the_websocket(hub: HubProcess,
                                                      device: tuple[str, str]) -> None:
    async with aiohttp.ClientSession() as session:
        c = await open_ws(session, hub)
        assert (await c.connect(hub, device)).return_code == 0  # type: ignore[attr-defined]
        await c.send(Publish(topic="devices/other/messages/events/", payload=b"x", qos=1,
                             packet_id=1))
        await c.expect_closed()
        assert c.ws.closed
    wait_for_log(hub, "disconnected client_id='dev1'")


async def test_text_frame_is_a_protocol_error(hub: HubProcess, device: tuple[str, str]) -> None:
    async with aiohttp.ClientSession() as session:
        c = await open_ws(session, hub)
        assert (await c.connect(hub, device)).return_code == 0  # type: ignore[attr-defined]
        await c.ws.send_str("hello")
        await c.expect_closed()
    wait_for_log(hub, "MQTT in a text frame")


async def test_closing_the_websocket_ends_the_mqtt_connection_and_sends_the_will(
        hub: HubProcess, device: tuple[str, str]) -> None:
    async with aiohttp.ClientSession() as session:
        c = await open_ws(session, hub)
        ack = await c.connect(hub, device, will=Will(
            topic="devices/dev1/messages/events/", payload=b"gone", qos=1, retain=False))
        assert ack == Connack(session_present=False, return_code=0)
        await c.ws.close()  # a WebSocket close, no MQTT DISCONNECT
    wait_for_log(hub, "disconnected client_id='dev1'")
    [event] = monitor(hub, "dev1")
    assert event["payload"] == "gone"
    assert event["properties"]["application"]["iothub-MessageType"] == "Will"


async def test_websocket_connection_is_taken_over_by_a_tls_one(
        hub: HubProcess, device: tuple[str, str]) -> None:
    async with aiohttp.ClientSession() as session:
        c = await open_ws(session, hub)
        assert (await c.connect(hub, device)).return_code == 0  # type: ignore[attr-defined]
        other = tls(hub)
        assert other.connect("dev1", username(hub, "dev1"),
                             device_token(hub, *device)).return_code == 0  # type: ignore[union-attr]
        await c.expect_closed()
        other.close()


@pytest.mark.parametrize("protocols,headers", [
    ((), {}),
    (("mqttv3.1",), {}),
])
async def test_upgrade_without_the_mqtt_subprotocol_is_refused(
        hub: HubProcess, protocols: tuple[str, ...], headers: dict[str, str]) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(base_url(hub, "wss") + WS_PATH, protocols=protocols,
                                     ssl=client_ssl(hub))
        assert info.value.status == 400


async def test_plain_get_on_the_websocket_path_is_400(hub: HubProcess) -> None:
    async with aiohttp.ClientSession() as session, \
            session.get(base_url(hub) + WS_PATH, ssl=client_ssl(hub)) as response:
        assert response.status == 400


async def test_x509_device_over_websocket(hub: HubProcess, tmp_path: Path) -> None:
    from gateway.pki import make_self_signed_certificate

    cert, key = make_self_signed_certificate("xdev", tmp_path)
    hub.cli("device", "create", "xdev", "--x509-cert", str(cert))
    async with aiohttp.ClientSession() as session:
        c = await open_ws(session, hub, cert=(cert, key))
        await c.send(Connect(client_id="xdev", clean_session=True, keepalive=60,
                             username=username(hub, "xdev")))
        assert await c.recv() == Connack(session_present=False, return_code=0)
        await c.send(Publish(topic="devices/xdev/messages/events/", payload=b"{}", qos=1,
                             packet_id=5))
        assert await c.recv() == Puback(5)
    [event] = monitor(hub, "xdev")
    assert json.loads(event["annotations"]["iothub-connection-auth-method"])["type"] == \
        "x509Certificate"


# -- device HTTP API: telemetry ---------------------------------------------------------------


def events_url(hub: HubProcess, device_id: str, module_id: str | None = None) -> str:
    path = f"/devices/{device_id}" + (f"/modules/{module_id}" if module_id else "")
    return base_url(hub) + path + "/messages/events?api-version=2020-03-13"


async def post_event(hub: HubProcess, url: str, body: bytes, headers: dict[str, str],
                     cert: tuple[Path, Path] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, \
            session.post(url, data=body, headers=headers, ssl=client_ssl(hub, cert)) as response:
        return response.status, await response.text()


async def test_http_telemetry_is_stored_like_the_same_message_over_mqtt(
        hub: HubProcess, device: tuple[str, str]) -> None:
    status, _ = await post_event(hub, events_url(hub, "dev1"), b'{"t": 21.5}', {
        "Authorization": device_token(hub, *device),
        "iothub-messageid": "42", "iothub-correlationid": "c-1", "iothub-userid": "u",
        "Content-Type": "application/json", "Content-Encoding": "utf-8",
        "iothub-app-alert": "high", "iothub-app-plus": "a+b c", "iothub-app-empty": "",
    })
    assert status == 204
    c = tls(hub)
    assert c.connect("dev1", username(hub, "dev1"),
                     device_token(hub, *device)).return_code == 0  # type: ignore[union-attr]
    c.send(Publish(topic="devices/dev1/messages/events/%24.mid=42&%24.cid=c-1&%24.uid=u"
                         "&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high&plus=a%2Bb%20c&empty=",
                   payload=b'{"t": 21.5}', qos=1, packet_id=1))
    assert c.recv() == Puback(1)
    over_http, over_mqtt = monitor(hub, "dev1")
    assert over_http["payload"] == {"t": 21.5}
    assert over_http["properties"] == over_mqtt["properties"]
    assert over_http["properties"]["system"] == {
        "message_id": "42", "correlation_id": "c-1", "user_id": "u",
        "content_type": "application/json", "content_encoding": "utf-8"}
    assert over_http["properties"]["application"] == {"alert": "high", "plus": "a+b c",
                                                      "empty": ""}
    skip = {"iothub-enqueuedtime", "x-opt-sequence-number"}
    assert {k: v for k, v in over_http["annotations"].items() if k not in skip} == \
        {k: v for k, v in over_mqtt["annotations"].items() if k not in skip}
    assert over_http["annotations"]["iothub-connection-device-id"] == "dev1"


async def test_sdk_header_names_win_and_generic_http_headers_are_ignored(
        hub: HubProcess, device: tuple[str, str]) -> None:
    status, _ = await post_event(hub, events_url(hub, "dev1"), b"<x/>", {
        "Authorization": device_token(hub, *device),
        "Content-Type": "application/octet-stream",
        "iothub-contenttype": "application/xml", "iothub-contentencoding": "utf-8",
        "iothub-creation-time-utc": "2024-01-01T00:00:00Z",
    })
    assert status == 204
    status, _ = await post_event(hub, events_url(hub, "dev1"), b"raw", {
        "Authorization": device_token(hub, *device), "Content-Type": "application/octet-stream"})
    assert status == 204
    first, second = monitor(hub, "dev1")
    # no message id was sent, so none is shown (IoT Hub assigns none)
    assert first["properties"]["system"] == {"content_type": "application/xml",
                                             "content_encoding": "utf-8",
                                             "creation_time": "2024-01-01T00:00:00Z"}
    assert second["properties"]["system"] == {}
    assert second["payload"] == "raw"


async def test_module_telemetry_over_http(hub: HubProcess, device: tuple[str, str]) -> None:
    module = json.loads(hub.cli("module", "create", "dev1", "m1").stdout)
    key = module["authentication"]["symmetricKey"]["primaryKey"]
    token = device_token(hub, "dev1", key, module_id="m1")
    status, _ = await post_event(hub, events_url(hub, "dev1", "m1"), b"{}",
                                 {"Authorization": token})
    assert status == 204
    # A module's token does not open its device's route, nor the other way round.
    assert (await post_event(hub, events_url(hub, "dev1"), b"{}",
                             {"Authorization": token}))[0] == 401
    assert (await post_event(hub, events_url(hub, "dev1", "m1"), b"{}",
                             {"Authorization": device_token(hub, *device)}))[0] == 401
    [event] = monitor(hub, "dev1")
    assert event["module"] == "m1"
    assert event["annotations"]["iothub-connection-module-id"] == "m1"


@pytest.mark.parametrize("case", ["missing", "bad-signature", "expired", "other-device",
                                  "unknown-device", "malformed"])
async def test_http_telemetry_refusals_are_401_and_store_nothing(
        hub: HubProcess, device: tuple[str, str], case: str) -> None:
    create_device(hub, "dev2")
    dev, key = device
    url = events_url(hub, dev)
    headers = {"Authorization": device_token(hub, dev, key)}
    if case == "missing":
        headers = {}
    elif case == "bad-signature":
        headers["Authorization"] = device_token(hub, dev, "A" * 43 + "=")
    elif case == "expired":
        headers["Authorization"] = generate_sas_token(f"{hub.host_name}/devices/{dev}", key,
                                                      int(time.time()) - 600)
    elif case == "other-device":
        url = events_url(hub, "dev2")
    elif case == "unknown-device":
        url = events_url(hub, "ghost")
    elif case == "malformed":
        headers["Authorization"] = "SharedAccessSignature garbage"
    status, text = await post_event(hub, url, b"{}", headers)
    assert status == 401, text
    assert json.loads(text)["Message"].startswith("ErrorCode:IotHubUnauthorizedAccess;")
    assert monitor(hub, dev) == [] and monitor(hub, "dev2") == []


@pytest.mark.parametrize("body_size,extra", [
    (262_145, {}),                                  # the body alone (Content-Length check)
    (262_100, {"iothub-app-big": "v" * 100}),       # body + properties (the hub's count)
])
async def test_http_telemetry_over_256kb_is_413(hub: HubProcess, device: tuple[str, str],
                                                body_size: int, extra: dict[str, str]) -> None:
    status, text = await post_event(hub, events_url(hub, "dev1"), b"x" * body_size,
                                    {"Authorization": device_token(hub, *device), **extra})
    assert status == 413, text
    assert json.loads(text)["Message"].startswith("ErrorCode:MessageTooLarge;")
    status, _ = await post_event(hub, events_url(hub, "dev1"), b"x" * 261_000,
                                 {"Authorization": device_token(hub, *device)})
    assert status == 204
    assert [len(e["payload"]) for e in monitor(hub, "dev1")] == [261_000]


async def test_x509_device_posts_telemetry_with_its_client_certificate(
        hub: HubProcess, tmp_path: Path) -> None:
    from gateway.pki import make_self_signed_certificate

    cert, key = make_self_signed_certificate("xdev", tmp_path)
    hub.cli("device", "create", "xdev", "--x509-cert", str(cert))
    status, _ = await post_event(hub, events_url(hub, "xdev"), b"{}", {}, cert=(cert, key))
    assert status == 204
    [event] = monitor(hub, "xdev")
    assert json.loads(event["annotations"]["iothub-connection-auth-method"])["type"] == \
        "x509Certificate"


# -- device HTTP API: cloud-to-device ---------------------------------------------------------


def send_c2d(hub: HubProcess, device_id: str, body: str, **properties: str) -> None:
    HubClient(hub.data_dir).request("POST", f"/devices/{device_id}/messages/deviceBound",
                                    {"body": body, "properties": properties})


class DeviceHttp:
    """A device's C2D calls; ``signer`` is whose key signs them (default: the device's)."""

    def __init__(self, session: aiohttp.ClientSession, hub: HubProcess,
                 device: tuple[str, str], bound: str = "deviceBound",
                 signer: tuple[str, str] | None = None) -> None:
        self.session, self.hub, self.signer = session, hub, signer or device
        self.url = f"{base_url(hub)}/devices/{device[0]}/messages/{bound}"
        self.ssl = client_ssl(hub)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": device_token(self.hub, *self.signer)}

    async def receive(self) -> tuple[int, Mapping[str, str], bytes]:
        """(status, headers (case-insensitive), body) of ``GET .../deviceBound``."""
        async with self.session.get(self.url + "?api-version=2020-03-13",
                                    headers=self._headers(), ssl=self.ssl) as r:
            return r.status, r.headers.copy(), await r.read()

    async def settle(self, etag: str, action: str) -> int:
        token = etag.strip('"')
        if action == "abandon":
            method, url = "POST", f"{self.url}/{token}/abandon?api-version=2020-03-13"
        elif action == "reject":
            method, url = "DELETE", f"{self.url}/{token}?api-version=2020-03-13&reject"
        else:
            method, url = "DELETE", f"{self.url}/{token}?api-version=2020-03-13"
        async with self.session.request(method, url, headers=self._headers(),
                                        ssl=self.ssl) as r:
            return r.status


async def test_c2d_send_receive_complete_over_http(hub: HubProcess,
                                                   device: tuple[str, str]) -> None:
    send_c2d(hub, "dev1", "hello", messageId="m-1", correlationId="c-1",
             contentType="text/plain", contentEncoding="utf-8", ack="full", color="blue")
    async with aiohttp.ClientSession() as session:
        d = DeviceHttp(session, hub, device)
        status, headers, body = await d.receive()
        assert status == 200 and body == b"hello"
        assert headers["iothub-messageid"] == "m-1"
        assert headers["iothub-correlationid"] == "c-1"
        assert headers["iothub-to"] == "/devices/dev1/messages/devicebound"
        assert headers["iothub-ack"] == "full"
        assert headers["iothub-deliverycount"] == "1"
        assert headers["iothub-app-color"] == "blue"
        assert headers["Content-Type"] == "text/plain"
        assert headers["Content-Encoding"] == "utf-8"
        assert headers["iothub-expiry"].endswith("Z")
        etag = headers["ETag"]
        assert etag.startswith('"') and etag.endswith('"') and len(etag) > 2
        # Locked: not handed out again while the lock holds.
        assert (await d.receive())[0] == 204
        assert await d.settle(etag, "complete") == 204
        assert await d.settle(etag, "complete") == 412  # already settled
        assert (await d.receive())[0] == 204
    feedback = HubClient(hub.data_dir).raw("GET", "/messages/serviceBound/feedback")
    assert feedback is not None
    [record] = feedback[0]
    assert record["originalMessageId"] == "m-1" and record["statusCode"] == "Success"


async def test_c2d_abandon_redelivers_with_a_new_lock_and_reject_dead_letters(
        hub: HubProcess, device: tuple[str, str]) -> None:
    send_c2d(hub, "dev1", "retry me", messageId="m-2", ack="negative")
    async with aiohttp.ClientSession() as session:
        d = DeviceHttp(session, hub, device, bound="devicebound")  # the Java/C SDK spelling
        _, first, _ = await d.receive()
        assert await d.settle(first["ETag"], "abandon") == 204
        status, second, body = await d.receive()
        assert status == 200 and body == b"retry me"
        assert second["iothub-deliverycount"] == "2"
        assert second["ETag"] != first["ETag"]
        assert await d.settle(first["ETag"], "complete") == 412  # superseded lock
        assert await d.settle(second["ETag"], "reject") == 204
        assert (await d.receive())[0] == 204
    feedback = HubClient(hub.data_dir).raw("GET", "/messages/serviceBound/feedback")
    assert feedback is not None
    [record] = feedback[0]
    assert record["originalMessageId"] == "m-2" and record["statusCode"] == "Rejected"


async def test_c2d_over_http_needs_the_devices_own_token(hub: HubProcess,
                                                         device: tuple[str, str]) -> None:
    info = create_device(hub, "dev2")
    other = ("dev2", info["authentication"]["symmetricKey"]["primaryKey"])
    send_c2d(hub, "dev1", "private")
    async with aiohttp.ClientSession() as session:
        intruder = DeviceHttp(session, hub, device, signer=other)
        assert (await intruder.receive())[0] == 401
        status, headers, body = await DeviceHttp(session, hub, device).receive()
        assert status == 200 and body == b"private"
        assert await intruder.settle(headers["ETag"], "complete") == 401
        assert await DeviceHttp(session, hub, device).settle(headers["ETag"], "complete") == 204
