"""The provisioning protocol's pure parts (IoT Hub ref §12): usernames, topics, derived keys."""

from __future__ import annotations

import base64
import subprocess

import pytest

from gateway.errors import AuthError, ForbiddenError
from gateway.hub import dps


def test_derived_key_matches_openssl() -> None:
    group_key = base64.b64encode(bytes(range(32))).decode()
    hexkey = bytes(range(32)).hex()
    out = subprocess.run(["openssl", "dgst", "-sha256", "-mac", "HMAC", "-macopt",
                          f"hexkey:{hexkey}", "-binary"], input=b"sensor-1",
                         capture_output=True, check=True).stdout
    assert dps.derive_device_key(group_key, "sensor-1") == base64.b64encode(out).decode()


def test_usernames() -> None:
    sdk = "0ne00A1B2C3/registrations/meter-9/api-version=2019-03-31&ClientVersion=py%2F2.14"
    assert dps.is_dps_username(sdk)
    assert not dps.is_dps_username("hub.local/registrations/?api-version=2021-04-12")
    assert not dps.is_dps_username("hub.local/dev1/?api-version=2021-04-12")
    user = dps.parse_dps_username(sdk)
    assert (user.id_scope, user.registration_id, user.api_version) == (
        "0ne00A1B2C3", "meter-9", "2019-03-31")
    with pytest.raises(AuthError):
        dps.parse_dps_username("0ne00A1B2C3/registrations/meter-9/ClientVersion=x")
    with pytest.raises(AuthError):
        dps.parse_dps_username("bad scope!/registrations/meter-9/api-version=1")


@pytest.mark.parametrize("rid", ["a", "sensor-1", "x:y.z_w-1", "A" * 128])
def test_registration_ids_accepted(rid: str) -> None:
    assert dps.check_registration_id(rid) == rid.lower()


@pytest.mark.parametrize("rid", ["", "-a", "a-", "a b", "a/b", "a" * 129, "é"])
def test_registration_ids_refused(rid: str) -> None:
    with pytest.raises(AuthError):
        dps.check_registration_id(rid)


def test_topics() -> None:
    assert dps.parse_publish("$dps/registrations/PUT/iotdps-register/?$rid=7") == dps.DpsRegister("7")
    assert dps.parse_publish(
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=8&operationId=op") == \
        dps.DpsPoll("8", "op")
    for topic in ("$dps/registrations/PUT/iotdps-register/", "$dps/registrations/PUT/x/?$rid=1",
                  "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1",
                  "devices/x/messages/events/"):
        with pytest.raises(ForbiddenError):
            dps.parse_publish(topic)
    assert dps.parse_filter("$dps/registrations/res/#") == dps.DpsResponsesFilter()
    with pytest.raises(ForbiddenError):
        dps.parse_filter("#")
    assert dps.response_topic(202, "a b", 3) == "$dps/registrations/res/202/?$rid=a%20b&retry-after=3"
