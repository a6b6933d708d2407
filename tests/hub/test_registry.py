"""The identity registry (IoT Hub ref §9.1, §7.2, §8, §14.1): SQLite-backed, served from memory."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import ssl
import stat
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PreconditionFailedError,
    StoreError,
)
from gateway.hub.registry import Device, Module, Registry, Right
from gateway.pki import make_self_signed_certificate, thumbprints

KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()
FIXED = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def sas_body(device_id: str, primary: str | None = None, secondary: str | None = None,
             status: str = "enabled", iot_edge: bool = False) -> dict[str, Any]:
    """What azure-iot-hub's create_device_with_sas sends (msrest drops None fields)."""
    keys = {k: v for k, v in (("primaryKey", primary), ("secondaryKey", secondary)) if v}
    return {"deviceId": device_id, "status": status,
            "authentication": {"type": "sas", "symmetricKey": keys},
            "capabilities": {"iotEdge": iot_edge}}


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    async with await Registry.open(tmp_path / "registry.db", utcnow=lambda: FIXED) as reg:
        yield reg


# --- opening, policies, files -----------------------------------------------------------------

async def test_first_open_creates_the_five_default_policies(registry: Registry) -> None:
    rights = {p.name: p.rights for p in registry.policies()}
    assert rights == {
        "iothubowner": {"RegistryRead", "RegistryWrite", "ServiceConnect", "DeviceConnect"},
        "service": {"ServiceConnect"},
        "device": {"DeviceConnect"},
        "registryRead": {"RegistryRead"},
        "registryReadWrite": {"RegistryRead", "RegistryWrite"},
    }
    keys = [k for p in registry.policies() for k in (p.primary_key, p.secondary_key)]
    assert len(set(keys)) == 10
    assert all(len(base64.b64decode(k, validate=True)) == 32 for k in keys)
    assert registry.get_policy("service") is not None
    assert registry.get_policy("nope") is None
    assert Right.DEVICE_CONNECT in rights["device"]


async def test_database_files_are_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "registry.db"
    async with await Registry.open(path) as reg:
        await reg.put_device(sas_body("d1"), device_id="d1", if_match=None)
        for file in (path, path.with_name("registry.db-wal"), path.with_name("registry.db-shm")):
            assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_an_existing_file_is_chmodded_private(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.touch(mode=0o644)
    path.chmod(0o644)
    async with await Registry.open(path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_everything_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    async with await Registry.open(path) as reg:
        device, _ = await reg.put_device(sas_body("d1", KEY_A, KEY_B), device_id="d1",
                                         if_match=None)
        module, _ = await reg.put_module({"managedBy": "me"}, device_id="d1", module_id="m1",
                                         if_match=None)
        edge, _ = await reg.put_device(sas_body("e1", iot_edge=True), device_id="e1",
                                       if_match=None)
        policies = reg.policies()
        reg.set_connection_state("d1", None, True, "2024-01-01T00:00:00.000000Z")
    async with await Registry.open(path) as reg:
        assert reg.get_device("d1") == device      # connection state is memory-only
        assert reg.get_module("d1", "m1") == module
        assert reg.get_device("e1") == edge
        assert sorted(reg.policies(), key=lambda p: p.name) == sorted(policies,
                                                                      key=lambda p: p.name)


async def test_close_stops_the_database_thread_and_refuses_writes(tmp_path: Path) -> None:
    reg = await Registry.open(tmp_path / "r.db")
    assert any(t.name.startswith("registry-db") for t in threading.enumerate())
    await reg.close()
    await reg.close()  # idempotent
    assert not any(t.name.startswith("registry-db") for t in threading.enumerate())
    with pytest.raises(StoreError):
        await reg.put_device(sas_body("d1"), device_id="d1", if_match=None)


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer"):
        await Registry.open(path)


# --- devices: create, update, delete, etags ---------------------------------------------------

async def test_create_generates_keys_generation_id_and_etag(registry: Registry) -> None:
    device, created = await registry.put_device(sas_body("d1"), device_id="d1", if_match=None)
    assert created
    assert device.auth_type == "sas" and device.status == "enabled"
    assert device.primary_key != device.secondary_key
    for key in (device.primary_key, device.secondary_key):
        assert key is not None and len(base64.b64decode(key, validate=True)) == 32
    assert device.generation_id.isdigit() and len(device.generation_id) == 18
    assert device.etag
    assert device.created == device.status_updated == "2024-05-01T12:00:00.123456Z"
    assert registry.get_device("d1") == device
    assert registry.devices() == [device]


async def test_a_body_without_authentication_gets_sas_keys(registry: Registry) -> None:
    device, _ = await registry.put_device({}, device_id="d1", if_match=None)
    assert device.auth_type == "sas" and device.primary_key and device.secondary_key


async def test_given_keys_are_kept(registry: Registry) -> None:
    device, _ = await registry.put_device(sas_body("d1", KEY_A, KEY_B), device_id="d1",
                                          if_match=None)
    assert (device.primary_key, device.secondary_key) == (KEY_A, KEY_B)


async def test_create_of_an_existing_id_without_if_match_is_a_conflict(
        registry: Registry) -> None:
    await registry.put_device(sas_body("d1"), device_id="d1", if_match=None)
    with pytest.raises(ConflictError):
        await registry.put_device(sas_body("d1"), device_id="d1", if_match=None)


@pytest.mark.parametrize("style", ["star", "quoted-star", "bare", "quoted", "weak"])
async def test_update_with_matching_if_match(registry: Registry, style: str) -> None:
    first, _ = await registry.put_device(sas_body("d1", KEY_A, KEY_B), device_id="d1",
                                         if_match=None)
    if_match = {"star": "*", "quoted-star": '"*"', "bare": first.etag,
                "quoted": f'"{first.etag}"', "weak": f'W/"{first.etag}"'}[style]
    body = sas_body("d1", KEY_B, KEY_A, status="disabled") | {"statusReason": "maintenance"}
    second, created = await registry.put_device(body, device_id="d1", if_match=if_match)
    assert not created
    assert second.etag != first.etag
    assert second.generation_id == first.generation_id
    assert (second.primary_key, second.secondary_key) == (KEY_B, KEY_A)
    assert (second.status, second.status_reason) == ("disabled", "maintenance")
    assert second.created == first.created


async def test_update_with_a_stale_etag_fails_the_precondition(registry: Registry) -> None:
    first, _ = await registry.put_device(sas_body("d1"), device_id="d1", if_match=None)
    await registry.put_device(sas_body("d1"), device_id="d1", if_match="*")
    with pytest.raises(PreconditionFailedError):
        await registry.put_device(sas_body("d1"), device_id="d1", if_match=f'"{first.etag}"')


async def test_update_of_a_missing_device_is_not_found(registry: Registry) -> None:
    with pytest.raises(NotFoundError):
        await registry.put_device(sas_body("d1"), device_id="d1", if_match="*")


async def test_update_without_keys_keeps_the_keys(registry: Registry) -> None:
    first, _ = await registry.put_device(sas_body("d1"), device_id="d1", if_match=None)
    second, _ = await registry.put_device(sas_body("d1", status="disabled"), device_id="d1",
                                          if_match="*")
    assert (second.primary_key, second.secondary_key) == (first.primary_key, first.secondary_key)


async def test_status_updated_time_moves_only_when_status_changes(tmp_path: Path) -> None:
    times = iter([datetime(2024, 1, d, tzinfo=UTC) for d in range(1, 10)])
    async with await Registry.open(tmp_path / "r.db", utcnow=lambda: next(times)) as reg:
        a, _ = await reg.put_device(sas_body("d1"), device_id="d1", if_match=None)
        b, _ = await reg.put_device(sas_body("d1"), device_id="d1", if_match="*")
        c, _ = await reg.put_device(sas_body("d1", status="disabled"), device_id="d1",
                                    if_match="*")
    assert a.status_updated == b.status_updated == "2024-01-01T00:00:00.000000Z"
    assert c.status_updated == "2024-01-03T00:00:00.000000Z"


async def test_delete_checks_the_etag_and_removes_the_modules(registry: Registry) -> None:
    device, _ = await registry.put_device(sas_body("d1"), device_id="d1", if_match=None)
    await registry.put_module({}, device_id="d1", module_id="m1", if_match=None)
    with pytest.raises(PreconditionFailedError):
        await registry.delete_device("d1", if_match='"stale"')
    deleted = await registry.delete_device("d1", if_match=f'"{device.etag}"')
    assert deleted == device
    assert registry.get_device("d1") is None
    assert registry.get_module("d1", "m1") is None and registry.modules("d1") == []
    with pytest.raises(NotFoundError):
        await registry.delete_device("d1", if_match="*")


async def test_recreated_device_gets_a_new_generation_id(registry: Registry) -> None:
    first, _ = await registry.put_device(sas_body("d1"), device_id="d1", if_match=None)
    await registry.delete_device("d1", if_match=None)
    second, created = await registry.put_device(sas_body("d1"), device_id="d1", if_match=None)
    assert created and second.generation_id != first.generation_id


async def test_concurrent_creates_of_one_id_yield_one_conflict(registry: Registry) -> None:
    results = await asyncio.gather(
        *(registry.put_device(sas_body("d1"), device_id="d1", if_match=None) for _ in range(5)),
        return_exceptions=True)
    assert sum(isinstance(r, tuple) for r in results) == 1
    assert sum(isinstance(r, ConflictError) for r in results) == 4


async def test_a_failed_commit_leaves_memory_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    async with await Registry.open(path) as reg:
        await reg.put_device(sas_body("d1", KEY_A, KEY_B), device_id="d1", if_match=None)
        before = reg.get_device("d1")
        with sqlite3.connect(path) as other:  # a real failure inside the registry's transaction
            other.execute("CREATE TRIGGER refuse BEFORE INSERT ON devices "
                          "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
        with pytest.raises(StoreError, match="disk says no"):
            await reg.put_device(sas_body("d1", KEY_B, KEY_A), device_id="d1", if_match="*")
        with pytest.raises(StoreError):
            await reg.put_device(sas_body("d2"), device_id="d2", if_match=None)
        assert reg.get_device("d1") == before
        assert reg.get_device("d2") is None


# --- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("device_id", ["", "a/b", "a b", "x" * 129, "é", "a\nb", "a&b", "a\"b"])
async def test_invalid_device_ids_are_refused(registry: Registry, device_id: str) -> None:
    with pytest.raises(InvalidRequestError):
        await registry.put_device({}, device_id=device_id, if_match=None)


@pytest.mark.parametrize("device_id", ["dev+1", "dev#1", "dev?1", "$dev", "%", "x" * 128,
                                       "a-b.c_d*e!f(g)h,i:j=k@l'm"])
async def test_ids_with_special_characters_are_accepted(registry: Registry,
                                                        device_id: str) -> None:
    device, _ = await registry.put_device({}, device_id=device_id, if_match=None)
    assert registry.get_device(device_id) == device
    module, _ = await registry.put_module({}, device_id=device_id, module_id=device_id,
                                          if_match=None)
    assert registry.get_module(device_id, device_id) == module


@pytest.mark.parametrize("body", [
    {"deviceId": "other"},
    {"status": "paused"},
    {"status": 1},
    {"status": ["enabled"]},
    {"statusReason": 5},
    {"capabilities": {"iotEdge": "yes"}},
    {"capabilities": []},
    {"parentScopes": "scope"},
    {"parentScopes": ["a", "b"]},
    {"authentication": {"type": "password"}},
    {"authentication": {"type": ["sas"]}},
    {"authentication": "sas"},
    {"authentication": {"type": "sas", "symmetricKey": {"primaryKey": KEY_A}}},
    {"authentication": {"type": "sas", "symmetricKey": {"primaryKey": "!!", "secondaryKey": KEY_B}}},
    {"authentication": {"type": "sas", "symmetricKey": {"primaryKey": "AAAA", "secondaryKey": KEY_B}}},
    {"authentication": {"type": "selfSigned"}},
    {"authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "abc"}}},
    {"authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "G" * 40}}},
    {"authentication": {"type": "selfSigned"}, "x509Certificate": "not a pem"},
    {"authentication": {"type": "sas"}, "x509Certificate": "-----BEGIN CERTIFICATE-----"},
])
async def test_invalid_bodies_are_refused(registry: Registry, body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError):
        await registry.put_device(body, device_id="d1", if_match=None)
    assert registry.get_device("d1") is None


async def test_non_object_body_is_refused(registry: Registry) -> None:
    with pytest.raises(InvalidRequestError):
        await registry.put_device([], device_id="d1", if_match=None)  # type: ignore[arg-type]


# --- X.509 ------------------------------------------------------------------------------------

async def test_self_signed_thumbprints_are_normalised_to_upper_case(registry: Registry) -> None:
    body = {"authentication": {"type": "selfSigned", "x509Thumbprint": {
        "primaryThumbprint": "ab" * 20, "secondaryThumbprint": "cd" * 32}}}
    device, _ = await registry.put_device(body, device_id="d1", if_match=None)
    assert (device.primary_thumbprint, device.secondary_thumbprint) == ("AB" * 20, "CD" * 32)
    assert device.primary_key is None and device.certificate_pem is None
    assert registry.registered_certificates() == []


async def test_registered_certificate_supplies_the_thumbprint(
        registry: Registry, tmp_path: Path) -> None:
    cert_path, _ = make_self_signed_certificate("d1", tmp_path / "certs")
    pem = cert_path.read_text()
    body = {"authentication": {"type": "selfSigned"}}
    device, _ = await registry.put_device(body, device_id="d1", if_match=None,
                                          certificate_pem=pem)
    sha1, _sha256 = thumbprints(ssl.PEM_cert_to_DER_cert(pem))
    assert device.primary_thumbprint == sha1
    assert registry.registered_certificates() == [pem]


async def test_certificate_in_the_body_must_match_a_given_thumbprint(
        registry: Registry, tmp_path: Path) -> None:
    cert_path, _ = make_self_signed_certificate("d1", tmp_path / "certs")
    pem = cert_path.read_text()
    _sha1, sha256 = thumbprints(ssl.PEM_cert_to_DER_cert(pem))
    good = {"authentication": {"type": "selfSigned", "x509Thumbprint": {
        "primaryThumbprint": "00" * 20, "secondaryThumbprint": sha256.lower()}},
        "x509Certificate": pem}
    device, _ = await registry.put_device(good, device_id="d1", if_match=None)
    assert device.certificate_pem == pem
    bad = {"authentication": {"type": "selfSigned", "x509Thumbprint": {
        "primaryThumbprint": "00" * 20}}, "x509Certificate": pem}
    with pytest.raises(InvalidRequestError, match="neither thumbprint"):
        await registry.put_device(bad, device_id="d2", if_match=None)
    # An update that rotates the thumbprints away from the certificate drops the certificate.
    rotated = {"authentication": {"type": "selfSigned", "x509Thumbprint": {
        "primaryThumbprint": "11" * 20}}}
    device, _ = await registry.put_device(rotated, device_id="d1", if_match="*")
    assert device.certificate_pem is None
    assert registry.registered_certificates() == []


async def test_only_the_first_certificate_of_a_pem_bundle_is_kept(
        registry: Registry, tmp_path: Path) -> None:
    device_pem = make_self_signed_certificate("d1", tmp_path / "a")[0].read_text()
    extra_ca = make_self_signed_certificate("ca", tmp_path / "b")[0].read_text()
    device, _ = await registry.put_device({"authentication": {"type": "selfSigned"}},
                                          device_id="d1", if_match=None,
                                          certificate_pem=device_pem + extra_ca)
    assert device.certificate_pem == device_pem
    assert registry.registered_certificates() == [device_pem]


async def test_registered_certificates_survive_a_reopen(tmp_path: Path) -> None:
    cert_path, _ = make_self_signed_certificate("m1", tmp_path / "certs")
    pem = cert_path.read_text()
    async with await Registry.open(tmp_path / "r.db") as reg:
        await reg.put_device({}, device_id="d1", if_match=None)
        await reg.put_module({"authentication": {"type": "selfSigned"}}, device_id="d1",
                             module_id="m1", if_match=None, certificate_pem=pem)
    async with await Registry.open(tmp_path / "r.db") as reg:
        assert reg.registered_certificates() == [pem]


async def test_certificate_authority_and_none_store_no_secrets(registry: Registry) -> None:
    for auth_type in ("certificateAuthority", "none"):
        device, _ = await registry.put_device({"authentication": {"type": auth_type}},
                                              device_id=auth_type, if_match=None)
        assert device.auth_type == auth_type
        assert device.primary_key is None and device.primary_thumbprint is None


# --- edge scopes ------------------------------------------------------------------------------

async def test_edge_device_scope_is_generated_and_leaf_takes_its_parent(
        registry: Registry) -> None:
    edge, _ = await registry.put_device(sas_body("gw", iot_edge=True) | {"deviceScope": "x"},
                                        device_id="gw", if_match=None)
    assert edge.device_scope == f"ms-azure-iot-edge://gw-{edge.generation_id}"
    leaf_body = sas_body("leaf") | {"deviceScope": edge.device_scope,
                                    "parentScopes": [edge.device_scope]}
    leaf, _ = await registry.put_device(leaf_body, device_id="leaf", if_match=None)
    assert leaf.device_scope == edge.device_scope
    assert leaf.parent_scopes == (edge.device_scope,)
    again, _ = await registry.put_device(sas_body("gw", iot_edge=True), device_id="gw",
                                         if_match="*")
    assert again.device_scope == edge.device_scope


# --- REST JSON --------------------------------------------------------------------------------

async def test_device_json_has_exactly_the_iot_hub_shape(registry: Registry) -> None:
    device, _ = await registry.put_device(sas_body("d1", KEY_A, KEY_B), device_id="d1",
                                          if_match=None)
    doc = device.to_json()
    assert doc == {
        "deviceId": "d1",
        "generationId": device.generation_id,
        "etag": device.etag,
        "connectionState": "Disconnected",
        "status": "enabled",
        "statusReason": None,
        "connectionStateUpdatedTime": "0001-01-01T00:00:00Z",
        "statusUpdatedTime": "2024-05-01T12:00:00.123456Z",
        "lastActivityTime": "0001-01-01T00:00:00Z",
        "cloudToDeviceMessageCount": 0,
        "authentication": {
            "type": "sas",
            "symmetricKey": {"primaryKey": KEY_A, "secondaryKey": KEY_B},
            "x509Thumbprint": {"primaryThumbprint": None, "secondaryThumbprint": None},
        },
        "capabilities": {"iotEdge": False},
        "deviceScope": None,
        "parentScopes": [],
    }
    assert device.to_json(cloud_to_device_message_count=3)["cloudToDeviceMessageCount"] == 3


async def test_device_json_round_trips_through_put(registry: Registry) -> None:
    """A client may GET a device, edit the JSON and PUT it back with If-Match."""
    device, _ = await registry.put_device(sas_body("d1", KEY_A, KEY_B), device_id="d1",
                                          if_match=None)
    doc = device.to_json() | {"status": "disabled"}
    again, _ = await registry.put_device(doc, device_id="d1", if_match=f'"{device.etag}"')
    assert again.to_json() | {"etag": device.etag, "statusUpdatedTime": None} == (
        doc | {"statusUpdatedTime": None})


async def test_module_json_has_exactly_the_iot_hub_shape(registry: Registry) -> None:
    await registry.put_device({}, device_id="d1", if_match=None)
    body = {"deviceId": "d1", "moduleId": "m1", "managedBy": "IotEdge",
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": KEY_A,
                                                               "secondaryKey": KEY_B}}}
    module, created = await registry.put_module(body, device_id="d1", module_id="m1",
                                                if_match=None)
    assert created
    assert module.to_json() == {
        "moduleId": "m1",
        "managedBy": "IotEdge",
        "deviceId": "d1",
        "generationId": module.generation_id,
        "etag": module.etag,
        "connectionState": "Disconnected",
        "connectionStateUpdatedTime": "0001-01-01T00:00:00Z",
        "lastActivityTime": "0001-01-01T00:00:00Z",
        "cloudToDeviceMessageCount": 0,
        "authentication": {
            "type": "sas",
            "symmetricKey": {"primaryKey": KEY_A, "secondaryKey": KEY_B},
            "x509Thumbprint": {"primaryThumbprint": None, "secondaryThumbprint": None},
        },
    }


# --- modules ----------------------------------------------------------------------------------

async def test_module_lifecycle_and_etags(registry: Registry) -> None:
    with pytest.raises(NotFoundError):
        await registry.put_module({}, device_id="d1", module_id="m1", if_match=None)
    await registry.put_device({}, device_id="d1", if_match=None)
    first, _ = await registry.put_module({}, device_id="d1", module_id="m1", if_match=None)
    assert first.primary_key and first.auth_type == "sas"
    with pytest.raises(ConflictError):
        await registry.put_module({}, device_id="d1", module_id="m1", if_match=None)
    with pytest.raises(InvalidRequestError):
        await registry.put_module({"moduleId": "m2"}, device_id="d1", module_id="m1",
                                  if_match="*")
    second, created = await registry.put_module({"managedBy": "x"}, device_id="d1",
                                                module_id="m1", if_match=f'"{first.etag}"')
    assert not created and second.etag != first.etag and second.managed_by == "x"
    assert second.primary_key == first.primary_key
    with pytest.raises(PreconditionFailedError):
        await registry.delete_module("d1", "m1", if_match=first.etag)
    assert await registry.delete_module("d1", "m1", if_match=second.etag) == second
    assert registry.modules("d1") == []
    with pytest.raises(NotFoundError):
        await registry.delete_module("d1", "m1", if_match=None)


# --- listeners and connection state -----------------------------------------------------------

async def test_listeners_hear_committed_changes_in_order(registry: Registry) -> None:
    heard: list[tuple[str, str]] = []

    def listener(event: str, identity: Device | Module) -> None:
        name = identity.device_id
        if isinstance(identity, Module):
            name += "/" + identity.module_id
        heard.append((event, name))
        if isinstance(identity, Device):  # memory is updated before listeners run
            assert (registry.get_device(identity.device_id) is None) == (event == "deleted")

    def broken(event: str, identity: Device | Module) -> None:
        raise RuntimeError("listener bug")

    lifecycle_only: list[str] = []
    registry.add_listener(broken)
    registry.add_listener(listener, updates=True)
    registry.add_listener(lambda event, identity: lifecycle_only.append(event))
    await registry.put_device({}, device_id="d1", if_match=None)
    await registry.put_device({}, device_id="d1", if_match="*")
    await registry.put_module({}, device_id="d1", module_id="m1", if_match=None)
    await registry.put_module({}, device_id="d1", module_id="m1", if_match="*")
    with pytest.raises(ConflictError):
        await registry.put_device({}, device_id="d1", if_match=None)
    await registry.delete_device("d1", if_match=None)
    assert heard == [("created", "d1"), ("updated", "d1"), ("created", "d1/m1"),
                     ("updated", "d1/m1"), ("deleted", "d1/m1"), ("deleted", "d1")]
    assert lifecycle_only == ["created", "created", "deleted", "deleted"]


async def test_connection_state_is_tracked_in_memory(registry: Registry) -> None:
    await registry.put_device({}, device_id="d1", if_match=None)
    await registry.put_module({}, device_id="d1", module_id="m1", if_match=None)
    when = "2024-05-01T13:00:00.000000Z"
    registry.set_connection_state("d1", None, True, when)
    registry.set_connection_state("d1", "m1", True, when)
    registry.set_connection_state("ghost", None, True, when)  # ignored
    device = registry.get_device("d1")
    assert device is not None
    assert (device.connection_state, device.connection_state_updated, device.last_activity) == (
        "Connected", when, when)
    assert device.to_json()["connectionState"] == "Connected"
    module = registry.get_module("d1", "m1")
    assert module is not None and module.connection_state == "Connected"
    # An admin update keeps the live connection state.
    updated, _ = await registry.put_device({"status": "disabled"}, device_id="d1", if_match="*")
    assert updated.connection_state == "Connected"
    registry.set_connection_state("d1", None, False, "2024-05-01T14:00:00.000000Z")
    device = registry.get_device("d1")
    assert device is not None and device.connection_state == "Disconnected"


# --- sensor keys (extension: a child sensor's bindkey, gateway.translation) --------------------

SENSOR_KEY = "231D39C1D7CC1AB1AEE224CD096DB932"


async def test_a_sensor_key_is_kept_through_updates_that_do_not_name_it(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    async with await Registry.open(path) as reg:
        body = {"deviceId": "porch", "authentication": {"type": "none"}, "sensorKey": SENSOR_KEY}
        device, _ = await reg.put_device(body, device_id="porch", if_match=None)
        assert device.sensor_key == SENSOR_KEY.lower()
        assert device.to_json()["sensorKey"] == SENSOR_KEY.lower()
        assert SENSOR_KEY.lower() not in repr(device)
        # an SDK's full-body update knows nothing of the field: the key stays
        sdk_body = {k: v for k, v in device.to_json().items() if k != "sensorKey"}
        device, _ = await reg.put_device(sdk_body, device_id="porch", if_match="*")
        assert device.sensor_key == SENSOR_KEY.lower()
    async with await Registry.open(path) as reg:
        device = reg.get_device("porch")
        assert device is not None and device.sensor_key == SENSOR_KEY.lower()
        device, _ = await reg.put_device({**device.to_json(), "sensorKey": None},
                                         device_id="porch", if_match="*")
        assert device.sensor_key is None and "sensorKey" not in device.to_json()


@pytest.mark.parametrize("bad", ["231d39", "zz" * 16, 42, SENSOR_KEY + "00"])
async def test_a_malformed_sensor_key_is_refused_without_echoing_it(
        registry: Registry, bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="32 hex digits") as caught:
        await registry.put_device({"deviceId": "porch", "sensorKey": bad}, device_id="porch",
                                  if_match=None)
    assert str(bad) not in str(caught.value)
    assert registry.get_device("porch") is None
