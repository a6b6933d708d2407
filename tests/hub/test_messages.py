"""Message model, system-property stamping, size, storage and monitor view (IoT Hub ref §2.3,
§2.4, §2.5, §3.1, §10.5)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import LocalProtocolError, MessageTooLargeError, StoreError
from gateway.hub.addresses import c2d_topic, parse_publish_topic
from gateway.hub.drops import EnrichedDrops
from gateway.hub.messages import (
    DEVICE_SETTABLE,
    MAX_TELEMETRY_BYTES,
    WIRE_TO_SYSTEM,
    Message,
    auth_method_json,
    connection_state_event,
    enriched,
    format_time,
    lifecycle_event,
    message_from_stored,
    message_size,
    props_json,
    split_properties,
    stamp_telemetry,
    to_monitor_json,
    twin_change_event,
    wire_pairs,
)
from gateway.hub.propbag import decode_bag, encode_bag

SDK_TOPIC = "devices/dev1/messages/events/%24.mid=42&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high"
SAS_DEVICE = '{"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}'
T0 = 1654109018.051  # 2022-06-01T18:43:38.051Z


def stamped(system: dict[str, str], module_id: str | None = None) -> dict[str, str]:
    return stamp_telemetry(
        system,
        device_id="dev1",
        module_id=module_id,
        auth_method=SAS_DEVICE,
        generation_id="637553997165220462",
    )


# -- wire -> properties (ref §2.3) ------------------------------------------------------------


def test_wire_to_system_names_are_the_event_hubs_names() -> None:
    assert WIRE_TO_SYSTEM == {
        "$.mid": "message-id",
        "$.cid": "correlation-id",
        "$.uid": "user-id",
        "$.ct": "content-type",
        "$.ce": "content-encoding",
        "$.exp": "absolute-expiry-time",
        "$.on": "output-name",
        "$.ifid": "iothub-interface-id",
        "$.ctime": "creation-time",
        "$.sub": "dt-subject",
        "$.schema": "message-schema",
        "iothub-operation": "operation",
        "$.to": "to",
    }


def test_sdk_example_topic_gives_message_id_42_and_json_content_type() -> None:
    address = parse_publish_topic(SDK_TOPIC, device_id="dev1", module_id=None)
    system, application = split_properties(decode_bag(address.bag))  # type: ignore[union-attr]
    assert system == {
        "message-id": "42",
        "content-type": "application/json",
        "content-encoding": "utf-8",
    }
    assert application == {"alert": "high"}


def test_unknown_dollar_keys_and_hub_keys_from_devices_are_application_properties() -> None:
    system, application = split_properties(
        [("$.foo", "1"), ("$.cdid", "spoof"), ("iothub-connection-device-id", "spoof"), ("bare", None)]
    )
    assert system == {}
    assert application == {
        "$.foo": "1",
        "$.cdid": "spoof",
        "iothub-connection-device-id": "spoof",
        "bare": None,
    }


def test_first_duplicate_wins_and_valueless_system_keys_are_ignored() -> None:
    system, application = split_properties(
        [("$.mid", "a"), ("$.mid", "b"), ("k", "1"), ("k", "2"), ("$.ct", None)]
    )
    assert system == {"message-id": "a"}
    assert application == {"k": "1"}


# -- stamping (ref §2.5) ----------------------------------------------------------------------


def test_stamping_uses_the_authenticated_identity_and_drops_to() -> None:
    system = stamped({"message-id": "1", "to": "/devices/x", "iothub-connection-device-id": "spoof"})
    assert system == {
        "message-id": "1",
        "iothub-connection-device-id": "dev1",
        "iothub-connection-auth-method": SAS_DEVICE,
        "iothub-connection-auth-generation-id": "637553997165220462",
        "iothub-message-source": "Telemetry",
    }


def test_stamping_adds_module_model_and_enqueued_time_when_known() -> None:
    system = stamp_telemetry(
        {"output-name": "alert", "iothub-connection-module-id": "spoof"},
        device_id="gw",
        module_id="m",
        auth_method=auth_method_json(scope="module", method="sas"),
        generation_id="1",
        model_id="dtmi:com:example:Thermostat;1",
        enqueued_time=T0,
    )
    assert system["iothub-connection-module-id"] == "m"
    assert system["output-name"] == "alert"
    assert system["dt-dataschema"] == "dtmi:com:example:Thermostat;1"
    assert system["iothub-enqueuedtime"] == "2022-06-01T18:43:38.0510000Z"
    assert '"scope":"module"' in system["iothub-connection-auth-method"]


def test_auth_method_json_is_byte_for_byte_iot_hubs() -> None:
    assert auth_method_json(scope="device", method="sas") == SAS_DEVICE
    assert auth_method_json(scope="device", method="x509") == (
        '{"scope":"device","type":"x509Certificate","issuer":"external","acceptingIpFilterRule":null}'
    )
    assert json.loads(SAS_DEVICE)["acceptingIpFilterRule"] is None


@given(st.dictionaries(st.sampled_from(sorted(DEVICE_SETTABLE | {"to", "x", "dt-dataschema"})), st.text()))
def test_stamped_identity_can_never_be_spoofed(system: dict[str, str]) -> None:
    result = stamped(system)
    assert result["iothub-connection-device-id"] == "dev1"
    assert "iothub-connection-module-id" not in result
    assert "to" not in result and "x" not in result and "dt-dataschema" not in result


# -- properties -> wire for devices (ref §3.1, §6.1) ------------------------------------------


def test_c2d_bag_uses_percent_24_keys_and_sdk_parse_recovers_the_properties() -> None:
    bag = encode_bag(
        wire_pairs(
            {"message-id": "m1", "to": "/devices/dev1/messages/devicebound", "ack": "full",
             "iothub-message-source": "ignored"},
            {"property1": "value 1"},
        )
    )
    assert bag == (
        "%24.mid=m1&%24.to=%2Fdevices%2Fdev1%2Fmessages%2Fdevicebound&iothub-ack=full"
        "&property1=value%201"
    )
    topic = c2d_topic("dev1", bag)
    sdk_keys = [p.split("=")[0] for p in topic.split("/")[4].split("&")]  # SDK: bag = parts[4]
    assert sdk_keys == ["%24.mid", "%24.to", "iothub-ack", "property1"]


def test_module_input_bag_carries_origin_connection_ids() -> None:
    pairs = wire_pairs({"iothub-connection-device-id": "gw", "iothub-connection-module-id": "s"}, {})
    assert encode_bag(pairs) == "%24.cdid=gw&%24.cmid=s"


# -- size (ref §2.4) --------------------------------------------------------------------------


def test_size_counts_body_system_values_and_application_names_and_values() -> None:
    body = b"x" * 10
    system = {"message-id": "abc", "content-type": "application/json"}  # 3 + 16
    application = {"alert": "high", "flag": None, "é": "€"}  # 5+4, 4, 2+3
    assert message_size(body, system, application) == 10 + 19 + 9 + 4 + 5
    assert MAX_TELEMETRY_BYTES == 262144


def test_a_message_at_the_limit_fits_and_one_byte_more_does_not() -> None:
    app = {"k": "v"}
    body = b"\0" * (MAX_TELEMETRY_BYTES - 2)
    assert message_size(body, {}, app) == MAX_TELEMETRY_BYTES
    assert message_size(body + b"\0", {}, app) > MAX_TELEMETRY_BYTES


# -- enrichments and size (ref §10.4, §2.4) ---------------------------------------------------


def test_an_enriched_message_at_the_limit_passes_and_one_byte_more_is_refused() -> None:
    system = {"iothub-connection-device-id": "d1", "message-id": "m"}  # 2 + 1
    message = Message(b"\0" * (MAX_TELEMETRY_BYTES - 3 - 2 - 10), system, {"k": "v"})
    assert message_size(message.body, system, message.application) == MAX_TELEMETRY_BYTES - 10
    out = enriched(message, {"site": "plant7"})  # + 4 + 6: exactly the limit
    assert message_size(out.body, out.system, out.application) == MAX_TELEMETRY_BYTES
    assert out.application == {"k": "v", "site": "plant7"} and out.system == system
    with pytest.raises(MessageTooLargeError) as err:
        enriched(message, {"site": "plant-7"})  # one byte more
    assert (err.value.size, err.value.limit) == (MAX_TELEMETRY_BYTES + 1, MAX_TELEMETRY_BYTES)
    assert "262145 bytes" in str(err.value)


def test_an_enrichment_replaces_a_property_and_the_replacement_is_what_counts() -> None:
    message = Message(b"x" * 100, {}, {"site": "a-long-original-value", "bare": None})
    out = enriched(message, {"site": "s"}, limit=100 + 4 + 1 + 4)
    assert out.application == {"site": "s", "bare": None}
    with pytest.raises(MessageTooLargeError):
        enriched(message, {"site": "s2"}, limit=100 + 4 + 1 + 4)


def test_without_enrichments_nothing_is_checked() -> None:
    message = Message(b"x" * 10, {}, {})
    assert enriched(message, {}, limit=5) is message  # it passed the hub's limit at ingress


def test_drops_are_logged_and_counted_once_per_endpoint_and_message(
        caplog: pytest.LogCaptureFixture) -> None:
    from gateway.store.log import Entry

    drops = EnrichedDrops(remember=2)
    error = MessageTooLargeError("x", size=262150, limit=262144)
    first = Entry(7, "telemetry", "d1", None, 0, "{}", b"")
    other = Entry(8, "telemetry", "d1", "m", 0, "{}", b"")
    with caplog.at_level("WARNING", logger="gateway.hub.drops"):
        assert drops.drop("archive", first, error)
        assert not drops.drop("archive", first, error)  # read again: not counted again
        assert drops.drop("events", first, error)  # another endpoint: its own count
    assert drops.counts == {"archive": 1, "events": 1}
    assert [r.getMessage() for r in caplog.records] == [
        "endpoint archive: dropped seq=7 device=d1 size=262150: over the 262144-byte limit once "
        "enriched (IoT Hub ref §10.4)",
        "endpoint events: dropped seq=7 device=d1 size=262150: over the 262144-byte limit once "
        "enriched (IoT Hub ref §10.4)"]
    assert drops.drop("archive", other, error)  # bounded memory: (archive, 7) is forgotten
    health = drops.health("archive")
    assert health["deadLettered"] == 2 and health["lastErrorTime"].endswith("Z")
    assert health["lastError"] == "dropped seq 8 of d1/m: 262150 bytes enriched, over 262144"
    assert drops.health("nowhere") == {"deadLettered": 0}


# -- stored form ------------------------------------------------------------------------------


def test_props_json_is_compact_and_ordered_as_given() -> None:
    text = props_json({"message-id": "1"}, {"b": "2", "a": None})
    assert text == '{"system":{"message-id":"1"},"application":{"b":"2","a":null}}'
    assert props_json({"message-id": "1"}, {"b": "2", "a": None}) == text


@given(
    st.dictionaries(st.text(), st.text(), max_size=5),
    st.dictionaries(st.text(), st.one_of(st.none(), st.text()), max_size=5),
    st.binary(max_size=32),
)
def test_stored_form_round_trips(
    system: dict[str, str], application: dict[str, str | None], body: bytes
) -> None:
    message = message_from_stored(props_json(system, application), body)
    assert message == Message(body, system, application)
    assert list(message.application) == list(application)


@pytest.mark.parametrize(
    "props",
    [
        "",
        "not json",
        "[]",
        '{"system":{}}',
        '{"system":[],"application":{}}',
        '{"system":{"a":1},"application":{}}',
        '{"system":{},"application":{"a":[1]}}',
    ],
)
def test_corrupt_stored_properties_raise_store_error(props: str) -> None:
    with pytest.raises(StoreError):
        message_from_stored(props, b"")


# -- monitor view -----------------------------------------------------------------------------


def telemetry(body: bytes, system: dict[str, str], application: dict[str, str | None] | None = None) -> Message:
    return Message(body, stamped(system), application or {})


def test_monitor_json_has_the_az_monitor_events_shape() -> None:
    message = telemetry(
        b'{"temperature": 21.5}',
        {"message-id": "42", "content-type": "application/json", "content-encoding": "utf-8",
         "dt-subject": "thermostat1"},
        {"alert": "high", "flag": None},
    )
    assert to_monitor_json(message, device_id="dev1", module_id=None, enqueued_time_ms=1619976150288) == {
        "event": {
            "origin": "dev1",
            "module": "",
            "interface": "",
            "component": "thermostat1",
            "properties": {
                "system": {
                    "message_id": "42",
                    "content_type": "application/json",
                    "content_encoding": "utf-8",
                },
                "application": {"alert": "high", "flag": None},
            },
            "annotations": {
                "dt-subject": "thermostat1",
                "iothub-connection-device-id": "dev1",
                "iothub-connection-auth-method": SAS_DEVICE,
                "iothub-connection-auth-generation-id": "637553997165220462",
                "iothub-message-source": "Telemetry",
                "iothub-enqueuedtime": 1619976150288,
            },
            "payload": {"temperature": 21.5},
        }
    }


def test_monitor_json_converts_a_stored_enqueued_time_to_epoch_ms() -> None:
    message = Message(b"", {"iothub-enqueuedtime": format_time(T0)}, {})
    event = to_monitor_json(message, device_id="d", module_id="m")["event"]
    assert event["annotations"]["iothub-enqueuedtime"] == 1654109018051
    assert event["module"] == "m"


@pytest.mark.parametrize(
    ("body", "system", "hint", "payload"),
    [
        (b'{"a":1}', {"content-type": "application/json"}, None, {"a": 1}),
        (b'{"a":1}', {"content-type": "application/json; charset=utf-8"}, None, {"a": 1}),
        (b'{"a":1}', {"content-type": "application/vnd.x+json"}, None, {"a": 1}),
        (b"42", {"content-type": "application/json"}, None, 42),
        (b"not json", {"content-type": "application/json"}, None, "not json"),
        (b'{"a":1}', {"content-type": "text/plain"}, None, '{"a":1}'),
        (b'{"a":1}', {"content-type": "text/plain"}, "application/json", {"a": 1}),
        (b'[1, 2]', {}, None, [1, 2]),
        (b"42", {}, None, "42"),
        (b"hello", {}, None, "hello"),
        ('{"é":1}'.encode("utf-16"), {"content-type": "application/json", "content-encoding": "utf-16"}, None, {"é": 1}),
        (b"", {}, None, ""),
    ],
)
def test_monitor_payload_is_json_or_text(
    body: bytes, system: dict[str, str], hint: str | None, payload: object
) -> None:
    event = to_monitor_json(Message(body, system, {}), device_id="d", module_id=None, content_type=hint)
    assert event["event"]["payload"] == payload
    assert "payload_encoding" not in event["event"]


def test_monitor_payload_that_is_not_text_is_base64_with_a_marker() -> None:
    event = to_monitor_json(Message(b"\xff\x00\xfe", {}, {}), device_id="d", module_id=None)["event"]
    assert event["payload"] == "/wD+"
    assert event["payload_encoding"] == "base64"


@given(st.binary(max_size=64), st.dictionaries(st.text(max_size=5), st.one_of(st.none(), st.text(max_size=5))))
def test_monitor_json_is_always_serialisable(body: bytes, application: dict[str, str | None]) -> None:
    json.dumps(to_monitor_json(Message(body, {}, application), device_id="d", module_id=None))


# -- non-telemetry events (ref §10.5) ---------------------------------------------------------

SEQ = "000000000000000001D8713FF7E0851400000002000000000000000000000007"


def test_connection_state_event_matches_the_documented_event() -> None:
    system, application, body = connection_state_event(
        hub_name="contoso-routing-hub", device_id="contoso-device-1", connected=False,
        sequence_number=SEQ, correlation_id="aaaa0000", now=T0,
    )
    assert system == {
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "correlation-id": "aaaa0000",
        "user-id": "contoso-routing-hub",
        "iothub-connection-device-id": "contoso-device-1",
        "iothub-enqueuedtime": "2022-06-01T18:43:38.0510000Z",
        "iothub-message-source": "deviceConnectionStateEvents",
    }
    assert application == {
        "hubName": "contoso-routing-hub",
        "deviceId": "contoso-device-1",
        "operationTimestamp": "2022-06-01T18:43:38.0510000Z",
        "opType": "deviceDisconnected",
        "iothub-message-schema": "deviceConnectionStateNotification",
    }
    assert json.loads(body) == {"sequenceNumber": SEQ}


def test_module_connection_event_carries_the_module_and_upper_cases_the_sequence() -> None:
    system, application, body = connection_state_event(
        hub_name="h", device_id="gw", module_id="m", connected=True,
        sequence_number=SEQ.lower(), correlation_id="c", now=0.0,
    )
    assert system["iothub-connection-module-id"] == "m"
    assert application["moduleId"] == "m" and application["opType"] == "deviceConnected"
    assert json.loads(body) == {"sequenceNumber": SEQ}


@pytest.mark.parametrize("seq", ["", "7", SEQ[:-1], SEQ + "0", SEQ[:-1] + "g", SEQ[:-1] + "é"])
def test_connection_event_refuses_a_sequence_that_is_not_64_hex_digits(seq: str) -> None:
    with pytest.raises(LocalProtocolError):
        connection_state_event(
            hub_name="h", device_id="d", connected=True, sequence_number=seq,
            correlation_id="c", now=0.0,
        )


def test_lifecycle_event_carries_the_twin_and_the_operation() -> None:
    twin = {"deviceId": "d2", "moduleId": "m1", "etag": "AAAAAAAAAAE=", "version": 2,
            "properties": {"desired": {"$metadata": {"$lastUpdated": "0001-01-01T00:00:00Z"}, "$version": 1}}}
    system, application, body = lifecycle_event(
        hub_name="h", device_id="d2", module_id="m1", created=True, twin=twin,
        correlation_id="c5a4e6986c", now=T0,
    )
    assert system["iothub-message-source"] == "deviceLifecycleEvents"
    assert application["opType"] == "createDeviceIdentity"
    assert application["iothub-message-schema"] == "deviceLifecycleNotification"
    assert application["moduleId"] == "m1"
    assert json.loads(body) == twin
    _, deleted, _ = lifecycle_event(
        hub_name="h", device_id="d2", created=False, twin={}, correlation_id="c", now=T0
    )
    assert deleted["opType"] == "deleteDeviceIdentity" and "moduleId" not in deleted


def test_twin_change_event_names_update_and_replace() -> None:
    system, application, body = twin_change_event(
        hub_name="h", device_id="d", replaced=False, body={"version": 7}, correlation_id="c", now=T0
    )
    assert system["iothub-message-source"] == "twinChangeEvents"
    assert application["opType"] == "updateTwin"
    assert application["iothub-message-schema"] == "twinChangeNotification"
    assert json.loads(body) == {"version": 7}
    _, replaced, _ = twin_change_event(
        hub_name="h", device_id="d", replaced=True, body={}, correlation_id="c", now=T0
    )
    assert replaced["opType"] == "replaceTwin"


def test_events_can_be_stored_and_monitored() -> None:
    system, application, body = connection_state_event(
        hub_name="h", device_id="d", connected=True, sequence_number=SEQ, correlation_id="c", now=T0
    )
    message = message_from_stored(props_json(system, application), body)
    event = to_monitor_json(message, device_id="d", module_id=None)["event"]
    assert event["payload"] == {"sequenceNumber": SEQ}
    assert event["properties"]["system"]["correlation_id"] == "c"
    assert event["annotations"]["iothub-message-source"] == "deviceConnectionStateEvents"


@given(st.floats(0, 4e9), st.floats(0, 4e9))
def test_format_time_is_fixed_width_and_orders_like_time(a: float, b: float) -> None:
    fa, fb = format_time(a), format_time(b)
    assert len(fa) == len(fb) == 28 and fa.endswith("Z")
    if round(a * 1e6) < round(b * 1e6):
        assert fa < fb
