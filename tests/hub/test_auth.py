"""Authentication of MQTT CONNECTs and service API calls (IoT Hub ref §1.2, §7, §8, §14.1)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from gateway.errors import AuthError, ForbiddenError
from gateway.hub.auth import SKEW_SECONDS, Authenticator, Principal, ServicePrincipal
from gateway.hub.registry import Registry
from gateway.hub.sas import generate_sas_token
from gateway.pki import (
    HubCertificates,
    ensure_certificates,
    issue_client_certificate,
    make_self_signed_certificate,
    thumbprints,
)

HUB = "myhub.azure-devices.net"   # the IoT Hub HostName devices are configured with
GATEWAY = "gateway.local"         # our own name (GatewayHostName)
NOW = 1_700_000_000.0
NOW_DT = datetime.fromtimestamp(NOW, UTC)
KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()
KEY_C = base64.b64encode(b"c" * 32).decode()
UA = "azure-iot-device-iothub-py%2F2.14.0%283.11.4%3BLinux%3Bx86_64%29"


def sdk_username(device: str, module: str | None = None, host: str = HUB) -> str:
    path = device if module is None else f"{device}/{module}"
    return f"{host}/{path}/?api-version=2019-10-01&DeviceClientType={UA}"


def sdk_password(uri: str, key: str, expiry: float = NOW + 3600) -> bytes:
    """The Python device SDK's token: quote(uri, safe=''), sig fully encoded, upper case."""
    sr = quote(uri, safe="")
    digest = hmac.new(base64.b64decode(key), f"{sr}\n{int(expiry)}".encode(),
                      hashlib.sha256).digest()
    sig = quote(base64.b64encode(digest).decode(), safe="")
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={int(expiry)}".encode()


def service_sdk_header(host: str, policy: str, key: str, expiry: float = NOW + 3600) -> str:
    """azure-iot-hub's token: quote_plus(host), sig with quote() (leaves '/')."""
    sr = quote_plus(host)
    digest = hmac.new(base64.b64decode(key), f"{sr}\n{int(expiry)}".encode(),
                      hashlib.sha256).digest()
    sig = quote(base64.b64encode(digest).decode())
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={int(expiry)}&skn={policy}"


@dataclass
class World:
    registry: Registry
    auth: Authenticator
    certs: HubCertificates
    self_signed_der: bytes
    ca_issued_der: bytes
    tmp: Path

    def policy_key(self, name: str) -> str:
        policy = self.registry.get_policy(name)
        assert policy is not None
        return policy.primary_key


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    certs = ensure_certificates(tmp_path / "data", host_names=[GATEWAY], addresses=[],
                                now=NOW_DT)
    self_signed, _ = make_self_signed_certificate("x509dev", tmp_path / "certs", now=NOW_DT)
    ca_issued, _ = issue_client_certificate(certs, "cadev", tmp_path / "certs", now=NOW_DT)
    module_cert, _ = issue_client_certificate(certs, "cadev/camod", tmp_path / "certs",
                                              now=NOW_DT)
    assert module_cert.exists()
    async with await Registry.open(tmp_path / "registry.db") as registry:
        sas = {"authentication": {"type": "sas",
                                  "symmetricKey": {"primaryKey": KEY_A, "secondaryKey": KEY_B}}}
        await registry.put_device(sas, device_id="dev1", if_match=None)
        await registry.put_device(sas, device_id="Dev+#?$1", if_match=None)
        await registry.put_module(sas, device_id="dev1", module_id="mod1", if_match=None)
        await registry.put_device(sas | {"status": "disabled"}, device_id="off", if_match=None)
        await registry.put_module(sas, device_id="off", module_id="m", if_match=None)
        await registry.put_device({"authentication": {"type": "selfSigned"}},
                                  device_id="x509dev", if_match=None,
                                  certificate_pem=self_signed.read_text())
        await registry.put_device({"authentication": {"type": "certificateAuthority"}},
                                  device_id="cadev", if_match=None)
        await registry.put_module({"authentication": {"type": "certificateAuthority"}},
                                  device_id="cadev", module_id="camod", if_match=None)
        await registry.put_device({"authentication": {"type": "none"}}, device_id="nobody",
                                  if_match=None)
        auth = Authenticator(registry, host_names=[HUB.upper(), GATEWAY],
                             ca_pems=[certs.ca_cert.read_text()])
        yield World(registry, auth, certs, der(self_signed), der(ca_issued), tmp_path)


def connect(world: World, client_id: str, username: str | None, password: bytes | None = None,
            chain: list[bytes] | None = None, now: float = NOW) -> Principal:
    return world.auth.authenticate_mqtt(client_id=client_id, username=username,
                                        password=password, peer_cert_chain=chain, now=now)


def refused(world: World, reason: str, connack: int, client_id: str, username: str | None,
            password: bytes | None = None, chain: list[bytes] | None = None,
            now: float = NOW) -> None:
    with pytest.raises(AuthError, match=reason) as info:
        connect(world, client_id, username, password, chain, now)
    assert info.value.connack == connack


# --- SAS: device and module keys --------------------------------------------------------------

async def test_device_sdk_connect_yields_a_device_principal(world: World) -> None:
    p = connect(world, "dev1", sdk_username("dev1"), sdk_password(f"{HUB}/devices/dev1", KEY_A))
    device = world.registry.get_device("dev1")
    assert device is not None
    assert p == Principal(device_id="dev1", module_id=None, auth_type="sas",
                          generation_id=device.generation_id,
                          expires_at=NOW + 3600 + SKEW_SECONDS, model_id=None)
    assert p.client_id == "dev1"
    assert json.loads(p.auth_method_json()) == {
        "scope": "device", "type": "sas", "issuer": "iothub", "acceptingIpFilterRule": None}


async def test_module_connect_yields_a_module_principal(world: World) -> None:
    p = connect(world, "dev1/mod1", sdk_username("dev1", "mod1"),
                sdk_password(f"{HUB}/devices/dev1/modules/mod1", KEY_B))
    module = world.registry.get_module("dev1", "mod1")
    assert module is not None
    assert (p.device_id, p.module_id, p.client_id) == ("dev1", "mod1", "dev1/mod1")
    assert p.generation_id == module.generation_id
    assert json.loads(p.auth_method_json())["scope"] == "module"


async def test_special_character_ids_and_pnp_model_id(world: World) -> None:
    username = (f"{HUB}/Dev+#?$1/?api-version=2020-09-30&DeviceClientType={UA}"
                "&model-id=dtmi%3Acom%3Aexample%3BThermostat%3B1")
    p = connect(world, "Dev+#?$1", username, sdk_password(f"{HUB}/devices/Dev+#?$1", KEY_A))
    assert p.device_id == "Dev+#?$1"
    assert p.model_id == "dtmi:com:example;Thermostat;1"


async def test_sr_ids_and_host_compare_case_insensitively(world: World) -> None:
    connect(world, "dev1", sdk_username("dev1"), sdk_password(f"{HUB.upper()}/devices/DEV1",
                                                               KEY_A))


async def test_lower_case_escapes_as_in_the_docs(world: World) -> None:
    def lower_escapes(text: str) -> str:
        return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), text)

    sr = lower_escapes(quote(f"{HUB}/devices/dev1".lower(), safe=""))
    assert "%2f" in sr
    se = int(NOW + 60)
    digest = hmac.new(base64.b64decode(KEY_A), f"{sr}\n{se}".encode(), hashlib.sha256).digest()
    sig = lower_escapes(quote(base64.b64encode(digest).decode(), safe=""))
    password = f"SharedAccessSignature sr={sr}&sig={sig}&se={se}".encode()
    connect(world, "dev1", sdk_username("dev1"), password)


async def test_gateway_host_name_is_accepted_in_sr_and_other_hubs_are_not(world: World) -> None:
    connect(world, "dev1", sdk_username("dev1", host=GATEWAY),
            sdk_password(f"{GATEWAY}/devices/dev1", KEY_A))
    refused(world, "another hub", 5, "dev1", sdk_username("dev1"),
            sdk_password("evil.azure-devices.net/devices/dev1", KEY_A))


async def test_token_for_another_identity_is_refused(world: World) -> None:
    refused(world, "another identity", 5, "dev1", sdk_username("dev1"),
            sdk_password(f"{HUB}/devices/dev2", KEY_A))
    refused(world, "another identity", 5, "dev1", sdk_username("dev1"),
            sdk_password(f"{HUB}/devices/dev1/modules/mod1", KEY_A))
    refused(world, "another identity", 5, "dev1/mod1", sdk_username("dev1", "mod1"),
            sdk_password(f"{HUB}/devices/dev1", KEY_A))
    refused(world, "another identity", 5, "dev1", sdk_username("dev1"),
            sdk_password(f"{HUB}", KEY_A))


async def test_wrong_key_expired_and_skewed_tokens(world: World) -> None:
    username = sdk_username("dev1")
    uri = f"{HUB}/devices/dev1"
    refused(world, "bad signature", 5, "dev1", username, sdk_password(uri, KEY_C))
    refused(world, "token expired", 5, "dev1", username, sdk_password(uri, KEY_A, NOW - 301))
    p = connect(world, "dev1", username, sdk_password(uri, KEY_A, NOW - 299))
    assert p.expires_at == NOW - 299 + SKEW_SECONDS


async def test_key_rotation_to_the_secondary_and_new_keys(world: World) -> None:
    username, uri = sdk_username("dev1"), f"{HUB}/devices/dev1"
    connect(world, "dev1", username, sdk_password(uri, KEY_B))  # secondary key
    rotated = {"authentication": {"type": "sas", "symmetricKey": {"primaryKey": KEY_B,
                                                                  "secondaryKey": KEY_C}}}
    await world.registry.put_device(rotated, device_id="dev1", if_match="*")
    refused(world, "bad signature", 5, "dev1", username, sdk_password(uri, KEY_A))
    connect(world, "dev1", username, sdk_password(uri, KEY_B))
    connect(world, "dev1", username, sdk_password(uri, KEY_C))


async def test_unknown_and_disabled_identities(world: World) -> None:
    refused(world, "unknown device", 5, "ghost", sdk_username("ghost"),
            sdk_password(f"{HUB}/devices/ghost", KEY_A))
    refused(world, "unknown module", 5, "dev1/ghost", sdk_username("dev1", "ghost"),
            sdk_password(f"{HUB}/devices/dev1/modules/ghost", KEY_A))
    refused(world, "device disabled", 5, "off", sdk_username("off"),
            sdk_password(f"{HUB}/devices/off", KEY_A))
    refused(world, "device disabled", 5, "off/m", sdk_username("off", "m"),
            sdk_password(f"{HUB}/devices/off/modules/m", KEY_A))


async def test_client_id_must_match_the_username(world: World) -> None:
    password = sdk_password(f"{HUB}/devices/dev1", KEY_A)
    refused(world, "client id mismatch", 5, "dev2", sdk_username("dev1"), password)
    refused(world, "client id mismatch", 5, "DEV1", sdk_username("dev1"), password)
    refused(world, "client id mismatch", 5, "dev1", sdk_username("dev1", "mod1"), password)


async def test_malformed_credentials_get_connack_4(world: World) -> None:
    password = sdk_password(f"{HUB}/devices/dev1", KEY_A)
    refused(world, "missing username", 4, "dev1", None, password)
    refused(world, "malformed username", 4, "dev1", "dev1", password)
    refused(world, "malformed username", 4, "dev1", f"{HUB}/dev1/?DeviceClientType=x", password)
    refused(world, "malformed SAS", 4, "dev1", sdk_username("dev1"), b"secret")
    refused(world, "not UTF-8", 4, "dev1", sdk_username("dev1"), b"\xff\xfe")
    refused(world, "no password and no client certificate", 4, "dev1", sdk_username("dev1"),
            b"", None)


async def test_sas_for_an_x509_identity_is_refused(world: World) -> None:
    refused(world, "does not use SAS", 5, "x509dev", sdk_username("x509dev"),
            sdk_password(f"{HUB}/devices/x509dev", KEY_A))


# --- SAS: policy tokens (the gateway pattern) -------------------------------------------------

@pytest.mark.parametrize("resource", [HUB, f"{HUB}/devices", f"{HUB}/devices/", f"{HUB}/devices/dev1"])
async def test_device_policy_token_connects_on_behalf_of_a_device(world: World,
                                                                 resource: str) -> None:
    password = generate_sas_token(resource, world.policy_key("device"), int(NOW + 60),
                                  policy="device").encode()
    p = connect(world, "dev1", sdk_username("dev1"), password)
    assert (p.device_id, p.policy) == ("dev1", "device")
    assert json.loads(p.auth_method_json())["scope"] == "hub"
    # ... and for a module, by segment prefix of devices/dev1/modules/mod1
    m = connect(world, "dev1/mod1", sdk_username("dev1", "mod1"), password)
    assert m.module_id == "mod1"


async def test_policy_tokens_must_cover_the_identity_by_whole_segments(world: World) -> None:
    key = world.policy_key("device")
    for resource in (f"{HUB}/devices/dev", f"{HUB}/devices/dev12", f"{HUB}/devicesx",
                     f"{HUB}/devices/dev2", f"{HUB}/devices/dev1/modules/other"):
        password = generate_sas_token(resource, key, int(NOW + 60), policy="device").encode()
        refused(world, "another identity", 5, "dev1/mod1", sdk_username("dev1", "mod1"),
                password)


async def test_policy_without_device_connect_or_unknown_policy_is_refused(world: World) -> None:
    password = generate_sas_token(f"{HUB}/devices/dev1", world.policy_key("service"),
                                  int(NOW + 60), policy="service").encode()
    refused(world, "lacks DeviceConnect", 5, "dev1", sdk_username("dev1"), password)
    password = generate_sas_token(f"{HUB}/devices/dev1", KEY_A, int(NOW + 60),
                                  policy="nosuch").encode()
    refused(world, "unknown policy", 5, "dev1", sdk_username("dev1"), password)
    password = generate_sas_token(f"{HUB}/devices/dev1", KEY_A, int(NOW + 60),
                                  policy="device").encode()
    refused(world, "bad signature", 5, "dev1", sdk_username("dev1"), password)


async def test_iothubowner_secondary_key_works_for_devices(world: World) -> None:
    owner = world.registry.get_policy("iothubowner")
    assert owner is not None
    password = generate_sas_token(HUB, owner.secondary_key, int(NOW + 60),
                                  policy="iothubowner").encode()
    connect(world, "x509dev", sdk_username("x509dev"), password)


async def test_policy_token_for_a_disabled_device_is_refused(world: World) -> None:
    password = generate_sas_token(HUB, world.policy_key("device"), int(NOW + 60),
                                  policy="device").encode()
    refused(world, "device disabled", 5, "off", sdk_username("off"), password)


# --- X.509 ------------------------------------------------------------------------------------

async def test_self_signed_device_matches_by_thumbprint(world: World) -> None:
    p = connect(world, "x509dev", sdk_username("x509dev"), None, [world.self_signed_der])
    assert (p.auth_type, p.expires_at, p.policy) == ("x509", None, None)
    assert json.loads(p.auth_method_json()) == {
        "scope": "device", "type": "x509Certificate", "issuer": "external",
        "acceptingIpFilterRule": None}


async def test_sha256_thumbprint_in_lower_case_also_matches(world: World) -> None:
    _sha1, sha256 = thumbprints(world.self_signed_der)
    body = {"authentication": {"type": "selfSigned", "x509Thumbprint": {
        "primaryThumbprint": "00" * 20, "secondaryThumbprint": sha256.lower()}}}
    await world.registry.put_device(body, device_id="x509dev", if_match="*")
    connect(world, "x509dev", sdk_username("x509dev"), b"", [world.self_signed_der])


async def test_other_certificate_is_a_thumbprint_mismatch(world: World) -> None:
    other, _ = make_self_signed_certificate("x509dev", world.tmp / "other", now=NOW_DT)
    refused(world, "thumbprint mismatch", 5, "x509dev", sdk_username("x509dev"), None,
            [der(other)])


async def test_ca_issued_device_and_module_match_by_common_name(world: World) -> None:
    p = connect(world, "cadev", sdk_username("cadev"), None, [world.ca_issued_der])
    assert (p.device_id, p.auth_type) == ("cadev", "x509")
    module_der = der(world.tmp / "certs" / "cadev%2Fcamod.cert.pem")
    m = connect(world, "cadev/camod", sdk_username("cadev", "camod"), None, [module_der])
    assert m.client_id == "cadev/camod"
    refused(world, "common name mismatch", 5, "cadev/camod", sdk_username("cadev", "camod"),
            None, [world.ca_issued_der])


async def test_ca_identity_refuses_a_certificate_from_another_issuer(world: World) -> None:
    # Another CA stands in for any issuer TLS might trust besides the hub CA -- e.g. a
    # registered self-signed device certificate made with CA:TRUE: it must not mint "CN=cadev".
    other = ensure_certificates(world.tmp / "other-hub", host_names=["x"], addresses=[],
                                now=NOW_DT)
    forged, _ = issue_client_certificate(other, "cadev", world.tmp / "forged", now=NOW_DT)
    refused(world, "chain not trusted", 5, "cadev", sdk_username("cadev"), None,
            [der(forged)])
    # The TLS layer accepts any certificate now: without a trusted CA nothing chains.
    bare = Authenticator(world.registry, host_names=[HUB])
    with pytest.raises(AuthError, match="no verified CA certificate"):
        bare.authenticate_mqtt(client_id="cadev", username=sdk_username("cadev"), password=None,
                               peer_cert_chain=[der(forged)], now=NOW)


async def test_certificate_validity_dates_are_checked(world: World) -> None:
    old = NOW_DT - timedelta(days=30)
    expired, _ = issue_client_certificate(world.certs, "cadev", world.tmp / "old", days=2,
                                          now=old)
    refused(world, "certificate expired", 5, "cadev", sdk_username("cadev"), None,
            [der(expired)])
    refused(world, "not yet valid", 5, "cadev", sdk_username("cadev"), None,
            [world.ca_issued_der], now=NOW - 86400 * 365 * 5)


async def test_x509_for_sas_or_none_identities_and_garbage_certificates(world: World) -> None:
    refused(world, "does not use X.509", 5, "dev1", sdk_username("dev1"), None,
            [world.self_signed_der])
    refused(world, "does not use X.509", 5, "nobody", sdk_username("nobody"), None,
            [world.self_signed_der])
    refused(world, "unreadable", 5, "cadev", sdk_username("cadev"), None, [b"\x30\x03junk"])


# --- service API ------------------------------------------------------------------------------

async def test_service_sdk_token_authenticates_with_the_policy_rights(world: World) -> None:
    header = service_sdk_header(HUB, "iothubowner", world.policy_key("iothubowner"))
    principal = world.auth.authenticate_service(header, now=NOW)
    assert principal == ServicePrincipal(
        policy="iothubowner",
        rights=frozenset({"RegistryRead", "RegistryWrite", "ServiceConnect", "DeviceConnect"}),
        expires_at=NOW + 3600 + SKEW_SECONDS)
    Authenticator.require(principal, "RegistryWrite")


async def test_service_token_on_our_gateway_name_with_a_path(world: World) -> None:
    header = generate_sas_token(f"{GATEWAY}/devices/dev1", world.policy_key("registryRead"),
                                int(NOW + 60), policy="registryRead")
    principal = world.auth.authenticate_service(header, now=NOW)
    Authenticator.require(principal, "RegistryRead")
    with pytest.raises(ForbiddenError, match="RegistryWrite"):
        Authenticator.require(principal, "RegistryWrite")


async def test_service_refusals(world: World) -> None:
    auth = world.auth
    cases = [
        (None, "missing"),
        ("", "missing"),
        ("Basic abc", "malformed"),
        (generate_sas_token(f"{HUB}/devices/dev1", KEY_A, int(NOW + 60)), "policy token"),
        (service_sdk_header(HUB, "nosuch", KEY_A), "unknown policy"),
        (service_sdk_header(HUB, "service", KEY_A), "bad signature"),
        (service_sdk_header("other.hub", "service", world.policy_key("service")), "another hub"),
        (service_sdk_header(HUB, "service", world.policy_key("service"), NOW - 400), "expired"),
    ]
    for header, reason in cases:
        with pytest.raises(AuthError, match=reason):
            auth.authenticate_service(header, now=NOW)


async def test_a_remembered_service_token_still_expires_and_follows_its_policy(
        world: World) -> None:
    auth = world.auth
    header = service_sdk_header(HUB, "service", world.policy_key("service"))
    first = auth.authenticate_service(header, now=NOW)
    assert auth.authenticate_service(header, now=NOW + 10) is first  # checked once
    with pytest.raises(AuthError, match="expired"):
        auth.authenticate_service(header, now=NOW + 3600 + SKEW_SECONDS + 1)
    auth.authenticate_service(header, now=NOW)
    policy = world.registry.get_policy("service")
    assert policy is not None  # its keys rotated: the remembered check no longer counts
    world.registry._policies["service"] = replace(policy, primary_key=KEY_A, secondary_key=KEY_A)
    with pytest.raises(AuthError, match="bad signature"):
        auth.authenticate_service(header, now=NOW)


def test_authenticator_needs_host_names() -> None:
    with pytest.raises(ValueError):
        Authenticator(None, host_names=[])  # type: ignore[arg-type]
