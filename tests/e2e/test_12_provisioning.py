"""The hub's provisioning service over raw MQTT (issue 12 item 4): the register and poll
exchange byte for byte, and every refusal (wrong key, disabled group, unknown scope, foreign
topics, an identity that exists already), plus persistence across a restart. The unmodified
SDK's side is in tests/interop/test_azure_provisioning.py."""

from __future__ import annotations

import json
import time

import pytest

from gateway.hub.dps import derive_device_key
from gateway.hub.sas import generate_sas_token
from gateway.mqtt.packets import Publish, Subscribe
from tests.e2e.test_01_connect import tls, wait_for_log
from tests.hubproc import HubProcess, create_device, device_token, username
from tests.mqttraw import RawClient

API = "api-version=2019-03-31&ClientVersion=raw"


@pytest.fixture
def group(hub: HubProcess) -> dict[str, object]:
    return json.loads(hub.cli("enrollment", "create", "plant").stdout)  # type: ignore[no-any-return]


def scope(hub: HubProcess) -> str:
    return hub.cli("enrollment", "id-scope").stdout.strip()


def dps_connect(hub: HubProcess, registration: str, key: str, *, id_scope: str | None = None,
                resource: str | None = None) -> tuple[RawClient, int]:
    s = id_scope or scope(hub)
    token = generate_sas_token(resource or f"{s}/registrations/{registration}", key,
                               int(time.time()) + 600)
    c = tls(hub)
    ack = c.connect(registration, f"{s}/registrations/{registration}/{API}", token)
    return c, ack.return_code  # type: ignore[union-attr]


def register(c: RawClient, registration: str) -> dict[str, object]:
    """Register and poll until the operation ends; returns the final answer's body."""
    c.send(Subscribe(packet_id=1, topics=[("$dps/registrations/res/#", 1)]))
    c.recv()
    body = json.dumps({"registrationId": registration, "payload": None}).encode()
    c.send(Publish(topic="$dps/registrations/PUT/iotdps-register/?$rid=r1", payload=body,
                   qos=1, packet_id=2))
    first, second = c.recv(), c.recv()
    assert type(first).__name__ == "Puback"  # the answer never overtakes the PUBACK
    assert isinstance(second, Publish)
    assert second.topic == "$dps/registrations/res/202/?$rid=r1&retry-after=1"
    operation = json.loads(second.payload)
    assert operation["status"] == "assigning"
    c.send(Publish(topic="$dps/registrations/GET/iotdps-get-operationstatus/?$rid=r2"
                         f"&operationId={operation['operationId']}", payload=b" ", qos=0))
    final = c.recv()
    assert isinstance(final, Publish) and final.topic == "$dps/registrations/res/200/?$rid=r2"
    return json.loads(final.payload)  # type: ignore[no-any-return]


def test_register_poll_then_connect_as_the_device(hub: HubProcess,
                                                  group: dict[str, object]) -> None:
    key = derive_device_key(group["attestation"]["symmetricKey"]["primaryKey"], "meter-9")  # type: ignore[index]
    c, code = dps_connect(hub, "meter-9", key)
    assert code == 0
    answer = register(c, "meter-9")
    state = answer["registrationState"]
    assert answer["status"] == "assigned"
    assert state["assignedHub"] == hub.host_name and state["deviceId"] == "meter-9"  # type: ignore[index]
    c.close()
    d = tls(hub)
    ack = d.connect("meter-9", username(hub, "meter-9"), device_token(hub, "meter-9", key))
    assert ack.return_code == 0  # type: ignore[union-attr]
    secondary = derive_device_key(group["attestation"]["symmetricKey"]["secondaryKey"], "meter-9")  # type: ignore[index]
    shown = json.loads(hub.cli("device", "show", "meter-9").stdout)
    assert shown["authentication"]["symmetricKey"] == {"primaryKey": key, "secondaryKey": secondary}


def test_refusals(hub: HubProcess, group: dict[str, object]) -> None:
    group_key = group["attestation"]["symmetricKey"]["primaryKey"]  # type: ignore[index]
    key = derive_device_key(group_key, "dev-a")
    assert dps_connect(hub, "dev-a", group_key)[1] == 5  # the group key itself is not a device key
    wait_for_log(hub, "no enrollment group derives this key")
    assert dps_connect(hub, "dev-a", key, id_scope="0neFFFFFFFF")[1] == 5
    wait_for_log(hub, "unknown ID scope")
    assert dps_connect(hub, "dev-a", key, resource=f"{scope(hub)}/registrations/dev-b")[1] == 5
    assert dps_connect(hub, "dev-b", key)[1] == 5  # dev-a's key does not admit dev-b

    c, code = dps_connect(hub, "dev-a", key)  # a provisioning client has only $dps topics
    assert code == 0
    c.send(Publish(topic="devices/dev-a/messages/events/", payload=b"{}", qos=1, packet_id=5))
    c.expect_closed()
    c, _ = dps_connect(hub, "dev-a", key)
    c.send(Subscribe(packet_id=1, topics=[("devices/dev-a/messages/devicebound/#", 1)]))
    c.expect_closed()

    body = json.loads(hub.cli("enrollment", "show", "plant").stdout)
    body["provisioningStatus"] = "disabled"
    hub.cli("enrollment", "delete", "plant")
    disabled = hub.cli("enrollment", "create", "plant", "--disabled", "--primary-key", group_key,
                       "--secondary-key", body["attestation"]["symmetricKey"]["secondaryKey"])
    assert json.loads(disabled.stdout)["provisioningStatus"] == "disabled"
    assert dps_connect(hub, "dev-a", key)[1] == 5
    wait_for_log(hub, "enrollment group plant disabled")

    dup = hub.cli("enrollment", "create", "plant", check=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    bad = hub.cli("enrollment", "create", "other", "--primary-key", "not base64!", check=False)
    assert bad.returncode == 1 and "base64" in bad.stderr


def test_an_existing_identity_is_never_taken_over(hub: HubProcess,
                                                  group: dict[str, object]) -> None:
    own_key = create_device(hub, "boiler-1")["authentication"]["symmetricKey"]["primaryKey"]
    live = tls(hub)  # the device's own connection, with the same client id
    assert live.connect("boiler-1", username(hub, "boiler-1"),  # type: ignore[union-attr]
                        device_token(hub, "boiler-1", own_key)).return_code == 0
    key = derive_device_key(group["attestation"]["symmetricKey"]["primaryKey"], "boiler-1")  # type: ignore[index]
    c, code = dps_connect(hub, "boiler-1", key)
    assert code == 0
    answer = register(c, "boiler-1")
    assert answer["status"] == "failed"
    assert "already exists" in answer["registrationState"]["errorMessage"]  # type: ignore[index]
    shown = json.loads(hub.cli("device", "show", "boiler-1").stdout)
    assert shown["authentication"]["symmetricKey"]["primaryKey"] == own_key
    live.send(Publish(topic="devices/boiler-1/messages/events/", payload=b"{}", qos=1,
                      packet_id=3))
    assert type(live.recv()).__name__ == "Puback"  # the DPS client did not take its session


def test_enrollments_and_registrations_survive_a_restart(hub: HubProcess,
                                                         group: dict[str, object]) -> None:
    before = scope(hub)
    key = derive_device_key(group["attestation"]["symmetricKey"]["primaryKey"], "th-1")  # type: ignore[index]
    c, _ = dps_connect(hub, "th-1", key)
    assert register(c, "th-1")["status"] == "assigned"
    c.close()
    hub.stop()
    hub.start()
    assert scope(hub) == before
    listed = json.loads(hub.cli("enrollment", "list").stdout)
    assert [g["enrollmentGroupId"] for g in listed] == ["plant"]
    assert listed[0]["attestation"]["symmetricKey"]["primaryKey"] is None  # lists hide keys
    [state] = json.loads(hub.cli("enrollment", "registrations", "plant").stdout)
    assert state["deviceId"] == "th-1" and state["status"] == "assigned"
    c, _ = dps_connect(hub, "th-1", key)
    again = register(c, "th-1")
    assert again["registrationState"]["substatus"] == "reprovisionedToInitialAssignment"  # type: ignore[index]
