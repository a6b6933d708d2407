"""The AMQP listener of a real hub process, driven by a Qpid Proton client over TLS:
authorization before any link, the refusals and their conditions, C2D into the same queue
REST uses, reads that match the REST stream."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from proton import Delivery, Message

from gateway.hub.sas import generate_sas_token
from gateway.hubclient import HubClient
from tests.amqp.protonclient import ProtonClient
from tests.hubproc import HubProcess, create_device

ADDRESS = "127.0.8.2"
PARTITION = "testhub/ConsumerGroups/$Default/Partitions/0"


@pytest.fixture(scope="module")
def amqp_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    proc = HubProcess(tmp_path_factory.mktemp("amqp") / "data",
                      hub_config=f'addresses = ["{ADDRESS}"]\n',
                      amqp_config=f'port = 0\nbind = "{ADDRESS}"\nauth_timeout = 3\n'
                                  'consumer_groups = ["analytics"]\n')
    proc.start()
    yield proc
    proc.stop()


def wait_until(check: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def policy_key(hub: HubProcess, name: str) -> str:
    cs = hub.cli("policy", "connection-string", name).stdout.strip()
    return dict(p.split("=", 1) for p in cs.split(";"))["SharedAccessKey"]


def token(hub: HubProcess, policy: str = "service", ttl: int = 3600) -> str:
    return generate_sas_token(hub.host_name, policy_key(hub, policy), int(time.time()) + ttl,
                              policy)


def client(hub: HubProcess, **kw: str | None) -> ProtonClient:
    return ProtonClient(ADDRESS, hub.port("amqp_port"), ca_file=hub.ca_file,
                        server_hostname=ADDRESS, hub_name=hub.host_name, **kw)  # type: ignore[arg-type]


@pytest.fixture
def authed(amqp_hub: HubProcess) -> Iterator[ProtonClient]:
    c = client(amqp_hub)
    assert c.put_token(token(amqp_hub), f"sb://{amqp_hub.host_name}/testhub") == (200, "OK")
    yield c
    c.close()


def test_links_are_refused_before_a_token(amqp_hub: HubProcess) -> None:
    c = client(amqp_hub)
    try:
        for link in (c.receiver(PARTITION), c.sender("/messages/devicebound"),
                     c.receiver("$management")):
            condition = c.refused(link)
            assert condition is not None and condition.name == "amqp:unauthorized-access"
    finally:
        c.close()


def test_token_refusals(amqp_hub: HubProcess) -> None:
    c = client(amqp_hub)
    try:
        # a good token of a policy without ServiceConnect is taken (and keeps the connection
        # from the auth timeout), but opens nothing
        assert c.put_token(token(amqp_hub, "registryRead"), "sb://x") == (200, "OK")
        condition = c.refused(c.receiver(PARTITION))
        assert condition is not None and condition.name == "amqp:unauthorized-access"
        assert "lacks ServiceConnect" in condition.description
        wrong = generate_sas_token(amqp_hub.host_name, "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXk=",
                                   int(time.time()) + 600, "service")
        status, description = c.put_token(wrong, "sb://x")
        assert (status, description) == (401, "Unauthorized: bad signature")
        status, description = c.put_token(token(amqp_hub, ttl=-3600), "sb://x")
        assert (status, description) == (401, "Unauthorized: token expired")
        other = generate_sas_token("elsewhere.example", policy_key(amqp_hub, "service"),
                                   int(time.time()) + 600, "service")
        assert c.put_token(other, "sb://x")[0] == 401
    finally:
        c.close()


def test_address_refusals(amqp_hub: HubProcess, authed: ProtonClient) -> None:
    cases = {
        "testhub/ConsumerGroups/nosuch/Partitions/0": "amqp:not-found",
        "othername/ConsumerGroups/$Default/Partitions/0": "amqp:not-found",
        "testhub/ConsumerGroups/$Default/Partitions/1": "com.microsoft:argument-out-of-range",
        "/messages/devicebound": "amqp:not-allowed",  # the hub receives there, never sends
        "/no/such/node": "amqp:not-found",
    }
    for address, expected in cases.items():
        condition = authed.refused(authed.receiver(address))
        assert condition is not None, address
        assert condition.name == expected, (address, condition)
    condition = authed.refused(authed.receiver("testhub/ConsumerGroups/$Default/Partitions/0",
                                               selector="amqp.annotation.x-opt-offset < '5'"))
    assert condition is not None and condition.name == "amqp:invalid-field"
    # consumer groups are case-insensitive, like Event Hubs'
    assert authed.refused(authed.receiver("testhub/ConsumerGroups/ANALYTICS/Partitions/0")) is None


def test_no_token_in_time_closes_the_connection(amqp_hub: HubProcess) -> None:
    c = client(amqp_hub)
    try:
        c.until(lambda: c.remote_closed, timeout=15)
        condition = c.conn.remote_condition
        assert condition is not None and condition.name == "amqp:unauthorized-access"
    finally:
        c.close()


def test_sasl_is_required(amqp_hub: HubProcess) -> None:
    c = client(amqp_hub, sasl=None)
    try:
        c.until(lambda: c.eof, timeout=10)
        assert c.received.startswith(b"AMQP\x03\x01\x00\x00")
    finally:
        c.close()


def test_plain_mechanism_is_refused(amqp_hub: HubProcess) -> None:
    c = client(amqp_hub, sasl="PLAIN")
    try:
        c.until(lambda: c.eof, timeout=10)
        assert not c.conn.state & c.conn.REMOTE_ACTIVE
    finally:
        c.close()


def c2d(to: str, body: bytes = b"hi", **props: str) -> Message:
    message = Message(body=body, inferred=True)
    message.address = to
    message.id = f"amqp-{uuid.uuid4().hex[:6]}"
    message.properties = props or None
    return message


def test_c2d_goes_into_the_queue_rest_uses(amqp_hub: HubProcess, authed: ProtonClient) -> None:
    device_id = f"c2d-{uuid.uuid4().hex[:6]}"
    create_device(amqp_hub, device_id)
    link = authed.sender("/messages/devicebound")
    assert authed.refused(link) is None
    ok = authed.send(link, c2d(f"/devices/{device_id}/messages/devicebound", b"one",
                              **{"iothub-ack": "full", "colour": "red"}))
    assert ok.remote_state == Delivery.ACCEPTED
    bad = authed.send(link, c2d("/devices/no-such-device/messages/devicebound"))
    assert bad.remote_state == Delivery.REJECTED
    assert bad.remote.condition is not None and bad.remote.condition.name == "amqp:not-found"
    bad = authed.send(link, c2d("/somewhere/else"))
    assert bad.remote_state == Delivery.REJECTED
    assert bad.remote.condition.name == "amqp:invalid-field"
    bad = authed.send(link, c2d(f"/devices/{device_id}/messages/devicebound", b"x",
                                **{"iothub-ack": "sometimes"}))
    assert bad.remote.condition.name == "amqp:invalid-field"
    device = json.loads(amqp_hub.cli("device", "show", device_id).stdout)
    assert device["cloudToDeviceMessageCount"] == 1  # one queue behind REST and AMQP
    purged = HubClient(amqp_hub.data_dir).request("DELETE", f"/devices/{device_id}/commands")
    assert purged["totalMessagesPurged"] == 1
    # the purge produced feedback (iothub-ack full); the AMQP feedback receiver gets it
    feedback = authed.receiver("/messages/servicebound/feedback")
    message = authed.receive(feedback, timeout=30)
    records = json.loads(bytes(message.body))
    assert str(message.content_type) == "application/vnd.microsoft.iothub.feedback.json"
    assert any(r["deviceId"] == device_id and r["statusCode"] == "Purged" for r in records)


def test_reads_match_the_rest_stream(amqp_hub: HubProcess, authed: ProtonClient) -> None:
    api = HubClient(amqp_hub.data_dir)
    device_id = f"rd-{uuid.uuid4().hex[:6]}"
    create_device(amqp_hub, device_id)  # appends a lifecycle event
    wait_until(lambda: any(e["event"]["origin"] == device_id
                           for e in api.request("GET", "/messages/events", query={"start": "earliest", "limit": "5000"})))
    rest = [e for e in api.request("GET", "/messages/events", query={"start": "earliest", "limit": "5000"})
            if e["event"]["origin"] == device_id]
    seq = rest[-1]["seq"]
    link = authed.receiver(PARTITION, selector=f"amqp.annotation.x-opt-sequence-number >= '{seq}'")
    message = authed.receive(link)
    annotations = {str(k): v for k, v in (message.annotations or {}).items()}
    assert annotations["x-opt-sequence-number"] == seq
    assert annotations["x-opt-offset"] == str(seq)
    assert annotations["iothub-connection-device-id"] == device_id
    assert annotations["iothub-message-source"] == "deviceLifecycleEvents"
    assert json.loads(bytes(message.body))["deviceId"] == device_id
    # $management's view of the partition agrees with the log
    request = Message()
    request.properties = {"operation": "READ", "type": "com.microsoft:partition",
                          "name": "testhub", "partition": "0"}
    reply = authed.request("$management", request)
    assert dict(reply.properties or {})["status-code"] == 200
    body = reply.body
    assert body["last_enqueued_sequence_number"] >= seq and body["partition"] == "0"


def test_an_oversized_message_closes_its_link(amqp_hub: HubProcess, authed: ProtonClient) -> None:
    link = authed.sender("/messages/devicebound")
    message = c2d("/devices/x/messages/devicebound", b"x" * (300 * 1024))
    delivery = link.delivery("big")
    link.send(message.encode())
    link.advance()
    authed.until(lambda: bool(link.state & link.REMOTE_CLOSED))
    assert link.remote_condition is not None
    assert link.remote_condition.name == "amqp:link:message-size-exceeded"
    del delivery
    # the connection and its other links go on
    other = authed.sender("/messages/devicebound")
    assert authed.refused(other) is None


def test_file_notifications_over_amqp(amqp_hub: HubProcess, authed: ProtonClient) -> None:
    """A stored file's notification reaches the AMQP receiver (ref §11), the same queue as
    REST; accepting it completes it there."""
    import json as _json
    import ssl as _ssl
    import urllib.request

    from tests.hubproc import create_device, device_token

    key = create_device(amqp_hub, "cam-amqp")["authentication"]["symmetricKey"]["primaryKey"]
    base = f"https://127.0.0.1:{amqp_hub.port('api_port')}"
    ctx = _ssl.create_default_context(cafile=amqp_hub.ca_file)
    ctx.check_hostname = False

    def call(method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        req = urllib.request.Request(base + path, data=body, method=method, headers=headers)
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return bytes(r.read())

    auth = {"Authorization": device_token(amqp_hub, "cam-amqp", key),
            "Content-Type": "application/json"}
    info = _json.loads(call("POST", "/devices/cam-amqp/files",
                            _json.dumps({"blobName": "a.jpg"}).encode(), auth))
    call("PUT", f"/{info['containerName']}/{info['blobName']}{info['sasToken']}", b"jpeg",
         {"x-ms-blob-type": "BlockBlob"})
    call("POST", "/devices/cam-amqp/files/notifications", _json.dumps(
        {"correlationId": info["correlationId"], "isSuccess": True, "statusCode": 200,
         "statusDescription": "ok"}).encode(), auth)
    receiver = authed.receiver("/messages/servicebound/filenotifications")
    message = authed.receive(receiver, timeout=30)
    note = _json.loads(bytes(message.body))
    assert note["blobName"] == "cam-amqp/a.jpg" and note["blobSizeInBytes"] == 4
    assert str(message.content_type) == "application/json"
