"""Connection strings (IoT Hub ref §7.3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ConfigError
from gateway.hub.connstr import ConnectionString, parse_connection_string

KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="  # ends in "=": split on the first "=" only


@pytest.mark.parametrize("text", [
    f"HostName=myhub.azure-devices.net;DeviceId=dev1;SharedAccessKey={KEY}",
    f"HostName=hub.local;DeviceId=dev1;ModuleId=m1;SharedAccessKey={KEY}",
    f"HostName=myhub.azure-devices.net;DeviceId=dev1;SharedAccessKey={KEY};GatewayHostName=gw",
    f"HostName=hub;DeviceId=dev1;ModuleId=m1;SharedAccessKey={KEY};GatewayHostName=gw",
    "HostName=hub;DeviceId=dev1;x509=true",
    "HostName=hub;DeviceId=dev1;GatewayHostName=gw;x509=true",
    f"HostName=hub;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}",
    ("HostName=hub;DeviceId=d;SharedAccessSignature=SharedAccessSignature sr=hub%2Fdevices%2Fd"
     "&sig=abc%3D&se=1"),
])
def test_azure_strings_round_trip_unchanged(text: str) -> None:
    assert str(parse_connection_string(text)) == text


def test_device_string_fields() -> None:
    cs = parse_connection_string(
        f"HostName=hub.local;DeviceId=dev+1#;ModuleId=$m;SharedAccessKey={KEY};GatewayHostName=gw")
    assert cs == ConnectionString(host_name="hub.local", device_id="dev+1#", module_id="$m",
                                  shared_access_key=KEY, gateway_host_name="gw")
    assert cs.resource_uri == "hub.local/devices/dev+1#/modules/$m"
    assert not cs.x509


def test_service_string_fields() -> None:
    cs = parse_connection_string(
        f"HostName=hub;SharedAccessKeyName=registryRead;SharedAccessKey={KEY}")
    assert cs.shared_access_key_name == "registryRead"
    assert cs.device_id is None
    assert cs.resource_uri == "hub"


def test_x509_value_is_case_insensitive() -> None:
    assert parse_connection_string("HostName=h;DeviceId=d;x509=True").x509


def test_str_uses_azure_key_order_regardless_of_input_order() -> None:
    cs = parse_connection_string(
        f"GatewayHostName=gw;SharedAccessKey={KEY};ModuleId=m;DeviceId=d;HostName=h")
    assert str(cs) == f"HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey={KEY};GatewayHostName=gw"


def test_whitespace_and_one_trailing_semicolon_are_tolerated() -> None:
    cs = parse_connection_string(f"  HostName=h;DeviceId=d;SharedAccessKey={KEY};\n")
    assert str(cs) == f"HostName=h;DeviceId=d;SharedAccessKey={KEY}"


@pytest.mark.parametrize("text", [
    "",
    "HostName",
    f"HostName=h;;DeviceId=d;SharedAccessKey={KEY}",
    f"hostname=h;DeviceId=d;SharedAccessKey={KEY}",            # keys are case-sensitive
    f"HostName=h;DeviceId=d;SharedAccessKey={KEY};Extra=1",     # unknown key
    f"HostName=h;HostName=h;DeviceId=d;SharedAccessKey={KEY}",  # repeated key
    "HostName=h;DeviceId=d",                                    # no credential
    f"DeviceId=d;SharedAccessKey={KEY}",                        # no host
    f"HostName=;DeviceId=d;SharedAccessKey={KEY}",              # empty host
    f"HostName=h;DeviceId=d;SharedAccessKey={KEY};x509=true",   # key and x509
    f"HostName=h;ModuleId=m;SharedAccessKey={KEY}",             # module without device
    f"HostName=h;SharedAccessKey={KEY}",                        # service without key name
    "HostName=h;SharedAccessKeyName=p;x509=true",
    f"HostName=h;DeviceId=d;SharedAccessKeyName=p;SharedAccessKey={KEY}",
    "HostName=h;DeviceId=d;x509=yes",
])
def test_invalid_strings_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_connection_string(text)


def test_constructor_refuses_values_that_would_break_the_format() -> None:
    with pytest.raises(ConfigError):
        ConnectionString(host_name="h;x", device_id="d", shared_access_key=KEY)


_value = st.text(alphabet=st.characters(codec="ascii", exclude_characters=";\r\n\x0b\x0c\x1c\x1d"
                                        "\x1e\x1f\x85 \t"), min_size=1, max_size=20)


@given(host=_value, device=_value, module=st.none() | _value, gateway=st.none() | _value,
       x509=st.booleans())
def test_device_strings_round_trip(host: str, device: str, module: str | None,
                                   gateway: str | None, x509: bool) -> None:
    cs = ConnectionString(host_name=host, device_id=device, module_id=module,
                          shared_access_key=None if x509 else KEY, gateway_host_name=gateway,
                          x509=x509)
    assert parse_connection_string(str(cs)) == cs
