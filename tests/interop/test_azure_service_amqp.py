"""Back ends over AMQP on the SDKs' fixed ports: telemetry from the unmodified
azure-iot-device SDK (MQTT 8883) read with EventHubConsumerClient on 5671; C2D sent with
IoTHubRegistryManager.send_c2d_message (uamqp, 5671) delivered to the device SDK; its feedback
read over AMQP.

Neither SDK can be given a port, so this hub listens on 8883 and 5671 -- on 127.0.8.4 only,
this suite's own loopback address, and calls itself that (its certificate has the address as
a SAN), so it needs no share of localhost's fixed ports (or their lock)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hubproc import HubProcess
from tests.interop.conftest import DeviceSession, run_sdk
from tests.interop.test_azure_eventhub import Consumer

pytestmark = pytest.mark.interop

ADDRESS = "127.0.8.4"


@pytest.fixture(scope="module")
def iot_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    proc = HubProcess(tmp_path_factory.mktemp("service-amqp") / "data", host_name=ADDRESS,
                      tls_port=8883, mqtt_bind=ADDRESS,
                      hub_config=f'addresses = ["{ADDRESS}"]\n',
                      amqp_config=f'port = 5671\nbind = "{ADDRESS}"\n').start()
    yield proc
    proc.stop()


def _partition_last(python: Path, hub: HubProcess) -> int:
    probe = Consumer(python, hub, endpoint=None, properties=True, start="@latest", count=1,
                     timeout=5)
    try:
        props = probe.next("properties")["properties"]
    finally:
        probe.close()
    return int(props["partition"]["last_enqueued_sequence_number"])


def test_device_sdk_telemetry_read_as_an_event_hub(iot_hub: HubProcess,
                                                    azure_python: Path) -> None:
    device_id = f"ehsdk-{uuid.uuid4().hex[:8]}"
    iot_hub.cli("device", "create", device_id)
    before = _partition_last(azure_python, iot_hub)
    cs = iot_hub.connection_string(device_id)
    run_sdk(azure_python, "send_telemetry.py",
            {"connection_string": cs, "ca_file": iot_hub.ca_file, "count": 2, "prefix": "sdk"})
    # the real client on the real port: Endpoint=sb://127.0.8.4/ -> 127.0.8.4:5671
    consumer = Consumer(azure_python, iot_hub, endpoint=None, start={"sequence": before},
                        count=6)
    try:
        events = []
        while len(events) < 2:
            event = consumer.next("event")["event"]
            if event["annotations"].get("iothub-connection-device-id") == device_id and \
                    event["annotations"].get("iothub-message-source") == "Telemetry":
                events.append(event)
    finally:
        consumer.close()
    first = events[0]
    assert json.loads(first["body"])["seq"] == 0
    assert first["message_id"] == "sdk-0" and first["content_type"] == "application/json"
    assert first["system"]["correlation-id"] == "corr-0"
    assert first["properties"] == {"seq": "0", "alert level": "high & low=1/2"}
    annotations = first["annotations"]
    assert json.loads(annotations["iothub-connection-auth-method"]) == {
        "scope": "device", "type": "sas", "issuer": "iothub", "acceptingIpFilterRule": None}
    assert annotations["iothub-connection-auth-generation-id"]
    assert first["sequence_number"] > before
    assert events[1]["sequence_number"] > first["sequence_number"]


def test_registry_manager_c2d_and_feedback_over_amqp(iot_hub: HubProcess,
                                                     azure_python: Path) -> None:
    device_id = f"c2damqp-{uuid.uuid4().hex[:8]}"
    iot_hub.cli("device", "create", device_id)
    session = DeviceSession(azure_python, iot_hub.connection_string(device_id),
                            iot_hub.ca_file)
    owner = iot_hub.cli("policy", "connection-string", "service").stdout.strip()
    try:
        sent = run_sdk(azure_python, "service_amqp.py", {
            "connection_string": owner, "ca_file": iot_hub.ca_file, "op": "send",
            "device": device_id, "body": "over amqp",
            "properties": {"messageId": "amqp-1", "correlationId": "corr-amqp",
                           "contentType": "text/plain", "iothub-ack": "full", "colour": "blue"}})
        assert sent == {"sent": True}
        got = session.expect("c2d")["c2d"]
        assert got["body"] == "over amqp" and got["message_id"] == "amqp-1"
        assert got["correlation_id"] == "corr-amqp" and got["content_type"] == "text/plain"
        assert got["props"] == {"colour": "blue"}
        feedback = run_sdk(azure_python, "service_amqp.py", {
            "connection_string": owner, "ca_file": iot_hub.ca_file, "op": "feedback",
            "count": 1, "timeout": 40}, timeout=90)
        assert "error" not in feedback, feedback
        records = [r for batch in feedback["feedback"] for r in batch["body"]]
        mine = [r for r in records if r["deviceId"] == device_id]
        assert mine and mine[0]["originalMessageId"] == "amqp-1"
        assert mine[0]["statusCode"] == "Success" and mine[0]["description"] == "Success"
        assert feedback["feedback"][0]["content_type"] == \
            "application/vnd.microsoft.iothub.feedback.json"
        # an unknown device is refused by the hub (the registry manager reports the failure)
        refused = run_sdk(azure_python, "service_amqp.py", {
            "connection_string": owner, "ca_file": iot_hub.ca_file, "op": "send",
            "device": "no-such-device", "body": "x"})
        assert "C2D message send failure" in refused.get("error", ""), refused
    finally:
        session.close()
