"""Topic addresses (IoT Hub ref §1.2, §1.5, §2.1, §3.1, §4.1, §5.1, §6.1, §16.1)."""

from __future__ import annotations

from urllib.parse import quote, unquote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gateway.errors import ForbiddenError, LocalProtocolError, RemoteProtocolError
from gateway.hub.addresses import (
    C2DFilter,
    C2DMessage,
    ChildrenFilter,
    ChildReportedPatch,
    DeliveryAddress,
    DesiredPatch,
    DesiredPatchesFilter,
    MethodRequest,
    MethodRequestsFilter,
    MethodResponse,
    ModuleInput,
    ModuleInputsFilter,
    Telemetry,
    TwinGet,
    TwinReportedPatch,
    TwinResponse,
    TwinResponsesFilter,
    c2d_topic,
    desired_patch_topic,
    method_request_topic,
    module_input_topic,
    parse_delivery_topic,
    parse_publish_topic,
    parse_subscribe_filter,
    twin_response_topic,
)
from gateway.hub.propbag import encode_bag

SDK_BAG = "%24.mid=42&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high"

# Legal id characters (ref §1.2): letters, digits and - . + % _ # * ? ! ( ) , : = @ $ '
ID_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + "-.+%_#*?!(),:=@$'"
)
ids = st.text(alphabet=ID_ALPHABET, min_size=1, max_size=128)
rids = st.text(min_size=1, max_size=40)
bags = st.lists(
    st.tuples(st.text(min_size=1, max_size=8), st.one_of(st.none(), st.text(max_size=8))),
    max_size=4,
).map(encode_bag)


def pub(topic: str, device_id: str = "dev1", module_id: str | None = None) -> object:
    return parse_publish_topic(topic, device_id=device_id, module_id=module_id)


def sub(topic: str, device_id: str = "dev1", module_id: str | None = None) -> object:
    return parse_subscribe_filter(topic, device_id=device_id, module_id=module_id)


# -- telemetry (ref §2.1) ---------------------------------------------------------------------

TELEMETRY_FORMS = [
    ("", ""),
    ("/", ""),
    ("/" + SDK_BAG, SDK_BAG),
    ("/" + SDK_BAG + "/", SDK_BAG),
    ("/?" + SDK_BAG, SDK_BAG),
    ("/?" + SDK_BAG + "/", SDK_BAG),
    ("/?", ""),
]


@pytest.mark.parametrize(("suffix", "bag"), TELEMETRY_FORMS)
def test_device_telemetry_accepts_every_edgehub_form(suffix: str, bag: str) -> None:
    assert pub("devices/dev1/messages/events" + suffix) == Telemetry("dev1", None, bag)


@pytest.mark.parametrize(("suffix", "bag"), TELEMETRY_FORMS)
def test_module_telemetry_accepts_every_edgehub_form(suffix: str, bag: str) -> None:
    topic = "devices/gw/modules/modbus/messages/events" + suffix
    assert pub(topic, "gw", "modbus") == Telemetry("gw", "modbus", bag)


def test_module_output_name_stays_in_the_bag() -> None:
    topic = "devices/gw/modules/m/messages/events/%24.on=alert"
    assert pub(topic, "gw", "m") == Telemetry("gw", "m", "%24.on=alert")


def test_python_sdk_percent_encoded_ids_match_the_identity() -> None:
    # The Python SDK builds "devices/" + quote(device_id, safe="") (mqtt_topic_iothub.py).
    device, module = "dev+1#$?", "mod:(1)"
    topic = f"devices/{quote(device, safe='')}/modules/{quote(module, safe='')}/messages/events/a=1"
    assert pub(topic, device, module) == Telemetry(device, module, "a=1")


def test_raw_ids_with_question_mark_and_dollar_are_not_split() -> None:
    topic = "devices/a?b$c/messages/events/x=1"
    assert pub(topic, "a?b$c") == Telemetry("a?b$c", None, "x=1")


@pytest.mark.parametrize(
    ("topic", "device", "module"),
    [
        ("devices/dev2/messages/events/", "dev1", None),
        ("devices/dev10/messages/events/", "dev1", None),
        ("devices/dev/messages/events/", "dev1", None),
        ("devices/dev1/modules/m/messages/events/", "dev1", None),
        ("devices/dev1/messages/events/", "dev1", "m"),
        ("devices/dev1/modules/m2/messages/events/", "dev1", "m"),
        ("devices/dev2/modules/m/messages/events/", "dev1", "m"),
        ("devices/dev%2B1/messages/events/", "dev1", None),
        ("devices/dev%zz/messages/events/", "dev1", None),
    ],
)
def test_foreign_identity_topics_are_refused(topic: str, device: str, module: str | None) -> None:
    with pytest.raises(ForbiddenError, match="topic not allowed for "):
        pub(topic, device, module)


def test_the_refusal_names_identity_and_topic() -> None:
    with pytest.raises(ForbiddenError) as info:
        pub("devices/other/messages/events/", "dev1", "m1")
    assert "dev1/m1" in str(info.value) and "devices/other/messages/events/" in str(info.value)


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "#",
        "devices/dev1",
        "devices/dev1/",
        "devices/dev1/messages",
        "devices/dev1/messages/eventsX",
        "devices/dev1/messages/events/a=1/b=2",
        "devices/dev1/messages/events//x",
        "devices/dev1/messages/devicebound/a=1",
        "devices/dev1/messages/events/../../dev2/messages/events",
        "$iothub/twin/res/200/?$rid=1",
        "$iothub/twin/PATCH/properties/desired/?$version=1",
        "$iothub/methods/POST/reboot/?$rid=1",
        "$iothub/twin/GET",
        "$iothub/twin/GET/",
        "$dps/registrations/PUT/iotdps-register/?$rid=1",
        "$SYS/broker/uptime",
    ],
)
def test_unknown_publish_forms_are_refused(topic: str) -> None:
    with pytest.raises(ForbiddenError):
        pub(topic)


# -- twin and method publishes (ref §4.1, §5.1) -----------------------------------------------


@pytest.mark.parametrize(
    ("topic", "address"),
    [
        ("$iothub/twin/GET/?$rid=6a2d3e5c-2c7e-4a53-8c3c-2b7d7f1a9e01", TwinGet("6a2d3e5c-2c7e-4a53-8c3c-2b7d7f1a9e01")),
        ("$iothub/twin/GET/?$rid=1", TwinGet("1")),
        ("$iothub/twin/GET/?%24rid=1", TwinGet("1")),
        ("$iothub/twin/GET/?$rid=a%2Fb%20c", TwinGet("a/b c")),
        ("$iothub/twin/GET/?$rid=1&foo=bar", TwinGet("1")),
        ("$iothub/twin/GET/?$rid=1&$rid=2", TwinGet("1")),
        ("$iothub/twin/PATCH/properties/reported/?$rid=7", TwinReportedPatch("7", None)),
        ("$iothub/twin/PATCH/properties/reported/?$rid=7&$version=12", TwinReportedPatch("7", 12)),
        ("$iothub/methods/res/200/?$rid=9", MethodResponse(200, "9")),
        ("$iothub/methods/res/-1/?$rid=9", MethodResponse(-1, "9")),
        ("$iothub/methods/res/404/?$rid=x%2By", MethodResponse(404, "x+y")),
    ],
)
def test_twin_and_method_publishes_parse_their_query(topic: str, address: object) -> None:
    assert pub(topic) == address
    assert pub(topic, "gw", "mod") == address  # same topics for modules


@pytest.mark.parametrize(
    "topic",
    [
        "$iothub/twin/GET/?",
        "$iothub/twin/GET/?rid=1",
        "$iothub/twin/GET/?$rid",
        "$iothub/twin/GET/?$rid=",
        "$iothub/twin/PATCH/properties/reported/?$version=3",
        "$iothub/twin/PATCH/properties/reported/?$rid=1&$version=x",
        "$iothub/twin/PATCH/properties/reported/?$rid=1&$version=-1",
        "$iothub/twin/PATCH/properties/reported/?$rid=1&$version=",
        "$iothub/twin/PATCH/properties/reported/?$rid=1&$version=²",
        "$iothub/methods/res/ok/?$rid=1",
        "$iothub/methods/res//?$rid=1",
        "$iothub/methods/res/200?$rid=1",
        "$iothub/methods/res/200/?rid=1",
    ],
)
def test_twin_and_method_publishes_without_rid_or_with_bad_numbers_are_refused(topic: str) -> None:
    with pytest.raises(ForbiddenError):
        pub(topic)


def test_malformed_escape_in_a_query_is_a_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError):
        pub("$iothub/twin/GET/?$rid=%zz")


# -- subscription filters (ref §1.5) ----------------------------------------------------------


def test_device_filters_from_the_sdks() -> None:
    assert sub("devices/dev1/messages/devicebound/#") == C2DFilter("dev1")
    assert sub("$iothub/twin/res/#") == TwinResponsesFilter()
    assert sub("$iothub/twin/PATCH/properties/desired/#") == DesiredPatchesFilter()
    assert sub("$iothub/methods/POST/#") == MethodRequestsFilter()


def test_module_filters_from_the_python_and_c_sdks() -> None:
    expected = ModuleInputsFilter("gw", "m")
    assert sub("devices/gw/modules/m/inputs/#", "gw", "m") == expected
    assert sub("devices/gw/modules/m/#", "gw", "m") == expected
    assert sub("$iothub/methods/POST/#", "gw", "m") == MethodRequestsFilter()


def test_encoded_ids_in_filters_match_the_identity() -> None:
    assert sub("devices/a%2Bb/messages/devicebound/#", "a+b") == C2DFilter("a+b")


def test_the_children_document_filter_is_for_modules_only() -> None:
    assert sub("$gateway/children/#", "gw", "m") == ChildrenFilter()
    assert ChildrenFilter().topic == "$gateway/children/#"
    with pytest.raises(ForbiddenError):
        sub("$gateway/children/#", "dev1")
    with pytest.raises(ForbiddenError):
        sub("$gateway/#", "gw", "m")


def test_reported_properties_on_a_childs_behalf_are_for_modules_only() -> None:
    address = parse_publish_topic("$gateway/children/reported/plant7%2Bgps",
                                  device_id="gw", module_id="m")
    assert address == ChildReportedPatch("plant7+gps")
    assert address.topic == "$gateway/children/reported/plant7%2Bgps"
    for topic, module in (("$gateway/children/reported/x", None),
                          ("$gateway/children/reported/", "m"),
                          ("$gateway/children/reported/a/b", "m"),
                          ("$gateway/children/document", "m")):
        with pytest.raises(ForbiddenError):
            parse_publish_topic(topic, device_id="gw", module_id=module)


def test_c2d_filter_is_for_devices_only() -> None:
    with pytest.raises(ForbiddenError, match="C2D is for devices only"):
        sub("devices/gw/messages/devicebound/#", "gw", "m")


@pytest.mark.parametrize(
    ("topic_filter", "device", "module"),
    [
        ("devices/dev1/modules/m/inputs/#", "dev1", None),
        ("devices/dev1/modules/m/#", "dev1", None),
        ("devices/dev2/messages/devicebound/#", "dev1", None),
        ("devices/gw/modules/other/inputs/#", "gw", "m"),
        ("devices/+/messages/devicebound/#", "dev1", None),
        ("devices/dev1/messages/devicebound/+", "dev1", None),
        ("devices/dev1/messages/devicebound", "dev1", None),
        ("devices/dev1/#", "dev1", None),
        ("devices/dev1/messages/events/#", "dev1", None),
        ("#", "dev1", None),
        ("$iothub/#", "dev1", None),
        ("$iothub/twin/res/+", "dev1", None),
        ("$iothub/twin/PATCH/properties/desired", "dev1", None),
        ("$dps/registrations/res/#", "dev1", None),
        ("devices/gw/modules/m/inputs/in1", "gw", "m"),
    ],
)
def test_filters_outside_the_table_are_refused(
    topic_filter: str, device: str, module: str | None
) -> None:
    with pytest.raises(ForbiddenError):
        sub(topic_filter, device, module)


# -- hub -> device topics ---------------------------------------------------------------------


def sdk_query(topic: str) -> dict[str, str]:
    """What the Python SDK does with the '?' part: split '&', split '=', index [1]."""
    out = {}
    for entry in topic.split("?")[1].split("&"):
        pair = entry.split("=")
        out[unquote(pair[0]).lstrip("$")] = unquote(pair[1])  # IndexError if no "=" (pitfall 8)
    return out


def test_twin_response_topics_are_exact_and_every_parameter_has_a_value() -> None:
    assert twin_response_topic(200, "1") == "$iothub/twin/res/200/?$rid=1"
    assert twin_response_topic(204, "1", 6) == "$iothub/twin/res/204/?$rid=1&$version=6"
    assert sdk_query(twin_response_topic(204, "a b/c", 6)) == {"rid": "a b/c", "version": "6"}
    assert twin_response_topic(204, "x", 6).split("/")[3] == "204"  # SDK: status = parts[3]


def test_desired_patch_and_method_request_topics_are_exact() -> None:
    assert desired_patch_topic(8) == "$iothub/twin/PATCH/properties/desired/?$version=8"
    assert method_request_topic("reboot", "5") == "$iothub/methods/POST/reboot/?$rid=5"
    topic = method_request_topic("do it/now", "r&1")
    assert unquote(topic.split("/")[3]) == "do it/now"  # SDK: name = unquote(parts[3])
    assert sdk_query(topic) == {"rid": "r&1"}


def test_c2d_topic_carries_the_sdk_encoded_id_and_the_bag_after_one_slash() -> None:
    bag = encode_bag([("$.mid", "m1"), ("$.to", "/devices/a+b/messages/devicebound"), ("k", "v")])
    topic = c2d_topic("a+b", bag)
    assert topic == (
        "devices/a%2Bb/messages/devicebound/"
        "%24.mid=m1&%24.to=%2Fdevices%2Fa%2Bb%2Fmessages%2Fdevicebound&k=v"
    )
    # Python SDK: is_c2d_topic is a substring test with quote(id); the bag is parts[4].
    assert f"devices/{quote('a+b', safe='')}/messages/devicebound" in topic
    assert topic.split("/")[4] == bag
    assert c2d_topic("dev1", "") == "devices/dev1/messages/devicebound/"


def test_module_input_topic_matches_the_python_sdk_parse() -> None:
    topic = module_input_topic("gw", "m", "in 1", "%24.cdid=gw&%24.cmid=sender")
    assert topic == "devices/gw/modules/m/inputs/in%201/%24.cdid=gw&%24.cmid=sender"
    parts = topic.split("/")
    assert parts[4] == "inputs" and unquote(parts[5]) == "in 1"
    assert parts[6] == "%24.cdid=gw&%24.cmid=sender"


@pytest.mark.parametrize("bag", ["a=b/c", "a=b+c", "a=#"])
def test_builders_refuse_unencoded_bags(bag: str) -> None:
    with pytest.raises(LocalProtocolError):
        c2d_topic("dev1", bag)
    with pytest.raises(LocalProtocolError):
        module_input_topic("gw", "m", "in", bag)


def test_builders_refuse_empty_method_and_input_names() -> None:
    with pytest.raises(LocalProtocolError):
        method_request_topic("", "1")
    with pytest.raises(LocalProtocolError):
        module_input_topic("gw", "m", "", "")


@pytest.mark.parametrize(
    ("topic", "device", "module", "address"),
    [
        ("devices/dev1/messages/devicebound/a=1", "dev1", None, C2DMessage("dev1", "a=1")),
        ("devices/dev1/messages/devicebound", "dev1", None, C2DMessage("dev1", "")),
        ("devices/gw/modules/m/inputs/in1/a=1", "gw", "m", ModuleInput("gw", "m", "in1", "a=1")),
        ("devices/gw/modules/m/inputs/in1", "gw", "m", ModuleInput("gw", "m", "in1", "")),
        ("$iothub/twin/res/200/?$rid=1", "dev1", None, TwinResponse(200, "1")),
        ("$iothub/twin/res/204/?$rid=1&$version=6", "dev1", None, TwinResponse(204, "1", 6)),
        ("$iothub/twin/PATCH/properties/desired/?$version=3", "d", None, DesiredPatch(3)),
        ("$iothub/methods/POST/reboot/?$rid=1", "dev1", None, MethodRequest("reboot", "1")),
    ],
)
def test_delivery_topics_parse_for_our_own_client(
    topic: str, device: str, module: str | None, address: object
) -> None:
    assert parse_delivery_topic(topic, device_id=device, module_id=module) == address


@pytest.mark.parametrize(
    ("topic", "module"),
    [
        ("devices/dev2/messages/devicebound/a=1", None),
        ("devices/dev1/messages/devicebound/a/b", None),
        ("devices/dev1/messages/devicebound/a=1", "m"),
        ("$iothub/twin/res/200/?rid=1", None),
        ("$iothub/twin/res/200/?$rid=1&$version=x", None),
        ("$iothub/twin/PATCH/properties/desired/?", None),
        ("$iothub/methods/POST//?$rid=1", None),
        ("$iothub/methods/POST/a/b/?$rid=1", None),
        ("devices/dev1/modules/m/inputs/", "m"),
        ("devices/dev1/modules/m/inputs/in/a/b", "m"),
    ],
)
def test_unexpected_delivery_topics_are_protocol_errors(topic: str, module: str | None) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_delivery_topic(topic, device_id="dev1", module_id=module)


# -- properties -------------------------------------------------------------------------------


@given(ids, st.one_of(st.none(), ids), bags)
def test_telemetry_topic_round_trips_for_any_legal_ids(
    device: str, module: str | None, bag: str
) -> None:
    address = Telemetry(device, module, bag)
    assert pub(address.topic, device, module) == address
    # Clients that send the ids raw are matched too (ids without MQTT wildcards).
    if not any(c in device + (module or "") for c in "+#"):
        raw = "devices/" + device + (f"/modules/{module}" if module else "")
        assert pub(raw + "/messages/events/" + bag, device, module) == address


@given(ids, ids, bags)
def test_telemetry_of_another_device_is_always_refused(mine: str, other: str, bag: str) -> None:
    # A topic level equal to my raw id is mine, whoever else it could encode.
    assume(other != mine and quote(other, safe="") != mine)
    with pytest.raises(ForbiddenError):
        pub(Telemetry(other, None, bag).topic, mine)


@given(ids, ids)
def test_filters_round_trip_for_any_legal_ids(device: str, module: str) -> None:
    assert sub(C2DFilter(device).topic, device) == C2DFilter(device)
    assert sub(ModuleInputsFilter(device, module).topic, device, module) == ModuleInputsFilter(
        device, module
    )


@given(rids, st.one_of(st.none(), st.integers(0, 2**63)), st.integers(-(2**31), 2**31))
def test_twin_and_method_publishes_round_trip(rid: str, version: int | None, status: int) -> None:
    assert pub(TwinGet(rid).topic) == TwinGet(rid)
    assert pub(TwinReportedPatch(rid, version).topic) == TwinReportedPatch(rid, version)
    assert pub(MethodResponse(status, rid).topic) == MethodResponse(status, rid)


@given(ids, ids, rids, st.text(min_size=1, max_size=20), bags, st.integers(0, 2**40))
def test_delivery_topics_round_trip(
    device: str, module: str, rid: str, name: str, bag: str, version: int
) -> None:
    cases: list[tuple[DeliveryAddress, str | None]] = [
        (C2DMessage(device, bag), None),
        (ModuleInput(device, module, name, bag), module),
        (TwinResponse(200, rid, version), None),
        (TwinResponse(404, rid), None),
        (DesiredPatch(version), None),
        (MethodRequest(name, rid), None),
    ]
    for address, mod in cases:
        assert parse_delivery_topic(address.topic, device_id=device, module_id=mod) == address


@given(st.text(alphabet=st.sampled_from("devices/dev1modul$iothubtwinGETres?=&%#+2F"), max_size=60))
def test_arbitrary_topics_parse_or_raise_gateway_errors(topic: str) -> None:
    for parse in (parse_publish_topic, parse_subscribe_filter):
        try:
            parse(topic, device_id="dev1", module_id=None)
        except (ForbiddenError, RemoteProtocolError):
            pass
    try:
        parse_delivery_topic(topic, device_id="dev1", module_id=None)
    except RemoteProtocolError:
        pass
