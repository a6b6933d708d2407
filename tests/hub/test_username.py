"""The MQTT CONNECT username grammar (IoT Hub ref §1.2)."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import AuthError
from gateway.hub.username import parse_username

PY_UA = "azure-iot-device-iothub-py%2F2.14.0%283.11.4%3BLinux%206.1%3Bx86_64%29"


def test_python_device_sdk_username() -> None:
    u = parse_username(f"myhub.azure-devices.net/dev1/?api-version=2019-10-01"
                       f"&DeviceClientType={PY_UA}")
    assert (u.host, u.device_id, u.module_id) == ("myhub.azure-devices.net", "dev1", None)
    assert u.api_version == "2019-10-01"
    assert u.client_type == "azure-iot-device-iothub-py/2.14.0(3.11.4;Linux 6.1;x86_64)"
    assert u.model_id is None and u.auth_chain is None
    assert u.client_id == "dev1"


def test_python_module_username() -> None:
    u = parse_username(f"hub/dev1/mod1/?api-version=2019-10-01&DeviceClientType={PY_UA}")
    assert (u.device_id, u.module_id, u.client_id) == ("dev1", "mod1", "dev1/mod1")


def test_pnp_username_carries_the_decoded_model_id() -> None:
    u = parse_username("hub/dev1/?api-version=2020-09-30&DeviceClientType=x"
                       "&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1")
    assert u.model_id == "dtmi:com:example:Thermostat;1"
    assert u.api_version == "2020-09-30"


def test_c_sdk_and_edge_usernames() -> None:
    c = parse_username("hub/dev1/?api-version=2020-09-30&DeviceClientType=iothubclient%2F1.9.0")
    assert c.client_type == "iothubclient/1.9.0"
    e = parse_username("hub/edge1/$edgeHub/?api-version=2018-06-30"
                       "&auth-chain=leaf%3Bedge1%3Bparent")
    assert (e.module_id, e.auth_chain) == ("$edgeHub", "leaf;edge1;parent")


@pytest.mark.parametrize("device_id", [
    "dev+1", "dev#1", "dev?1", "?dev", "$dev", "dev%1", "a-b.c_d*e!f(g)h,i:j=k@l'm", "x" * 128,
    "dev?api-version=1",
])
def test_ids_with_mqtt_and_url_special_characters_are_taken_raw(device_id: str) -> None:
    u = parse_username(f"hub/{device_id}/?api-version=1")
    assert (u.device_id, u.module_id) == (device_id, None)
    m = parse_username(f"hub/{device_id}/{device_id}/?api-version=1")
    assert (m.device_id, m.module_id) == (device_id, device_id)


def test_legacy_usernames_without_question_mark() -> None:
    d = parse_username("hub/dev1/api-version=2016-11-14&DeviceClientType=x")
    assert (d.device_id, d.module_id, d.api_version) == ("dev1", None, "2016-11-14")
    m = parse_username("hub/dev1/mod1/api-version=2016-11-14")
    assert (m.device_id, m.module_id) == ("dev1", "mod1")


def test_unencoded_slash_in_a_query_value_stays_a_device_username() -> None:
    u = parse_username("hub/dev1/?api-version=1&DeviceClientType=paho/2.0")
    assert (u.device_id, u.module_id, u.client_type) == ("dev1", None, "paho/2.0")


def test_unknown_keys_ignored_first_duplicate_wins_plus_kept() -> None:
    u = parse_username("hub/d/?foo=bar&api-version=a+b&api-version=2&flag&DeviceClientType=")
    assert u.api_version == "a+b"
    assert u.client_type is None


def test_any_host_segment_is_accepted() -> None:
    assert parse_username("/d/?api-version=1").host == ""
    assert parse_username("upstream.azure-devices.net/d/?api-version=1").host == (
        "upstream.azure-devices.net")


@pytest.mark.parametrize("username", [
    "",
    "hub",
    "hub/",
    "hub/dev1",
    "hub//?api-version=1",
    "hub/dev1/",
    "hub/dev1/?",
    "hub/dev1/?DeviceClientType=x",
    "hub/dev1/?api-version=",
    "hub/dev1/?api-version=%20",
    "hub/dev1/mod1/",
    "hub/dev1//?api-version=1",
    "hub/dev1/mod1/x/?api-version=1",
    "hub/dev1/?api-version=1" + "&x=y" * 2000,
])
def test_malformed_usernames_raise_connack_4(username: str) -> None:
    with pytest.raises(AuthError) as info:
        parse_username(username)
    assert info.value.connack == 4


_id = st.text(alphabet="abcXYZ019-.+%_#*?!(),:=@$'", min_size=1, max_size=128)


@given(host=st.text(alphabet="abc.-", max_size=30), device=_id, module=st.none() | _id,
       client_type=st.text(max_size=40))
def test_sdk_shaped_usernames_round_trip(host: str, device: str, module: str | None,
                                         client_type: str) -> None:
    path = device if module is None else f"{device}/{module}"
    u = parse_username(f"{host}/{path}/?api-version=2019-10-01"
                       f"&DeviceClientType={quote(client_type, safe='')}")
    assert (u.host, u.device_id, u.module_id) == (host, device, module)
    assert u.client_type == (client_type or None)


@given(st.text(max_size=200))
def test_arbitrary_text_parses_or_raises_auth_error(text: str) -> None:
    try:
        parse_username(text)
    except AuthError as exc:
        assert exc.connack == 4
