"""Your own CA (IoT Hub ref §8): registration, proof of possession, and certificateAuthority
devices chained to a verified CA through intermediates, root -> intermediate -> leaf."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.errors import (
    AuthError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PreconditionFailedError,
)
from gateway.hub.auth import Authenticator
from gateway.hub.registry import Registry
from tests.certchain import Chain, issue, three_levels

HUB = "hub.example"


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    async with await Registry.open(tmp_path / "registry.db") as reg:
        await reg.put_device({"authentication": {"type": "certificateAuthority"}},
                             device_id="cadev", if_match=None)
        yield reg


def connect(auth: Authenticator, chain: list[bytes], client_id: str = "cadev") -> None:
    import time

    auth.authenticate_mqtt(client_id=client_id, username=f"{HUB}/{client_id}/?api-version=1",
                           password=None, peer_cert_chain=chain, now=time.time())


async def upload_and_verify(registry: Registry, chain: Chain, name: str = "myca") -> None:
    await registry.put_certificate(name, {"properties": {"certificate": chain.root.pem}},
                                   if_match=None)
    code = await registry.generate_verification_code(name, if_match="*")
    assert code.verification_code and len(code.verification_code) == 48
    proof = issue(code.verification_code, chain.root, ca=False)
    cert = await registry.verify_certificate(name, proof.pem, if_match=None)
    assert cert.is_verified and cert.verification_code is None


async def test_proof_of_possession_verifies_the_ca(registry: Registry) -> None:
    chain = three_levels("cadev")
    cert, created = await registry.put_certificate(
        "myca", {"properties": {"certificate": chain.root.pem}}, if_match=None)
    assert created and not cert.is_verified
    body = cert.to_json()
    assert body["name"] == "myca" and body["etag"] == cert.etag
    props = body["properties"]
    assert props["subject"] == "CN=Test Root CA" and props["isVerified"] is False
    assert len(props["thumbprint"]) == 40 and props["expiry"].endswith("GMT")
    with pytest.raises(InvalidRequestError, match="generate one first"):
        await registry.verify_certificate("myca", chain.root.pem, if_match=None)
    code = (await registry.generate_verification_code("myca", if_match=None)).verification_code
    assert code is not None
    # wrong CN, right key
    with pytest.raises(InvalidRequestError, match="CN is not the verification code"):
        await registry.verify_certificate("myca", issue("nope", chain.root, ca=False).pem,
                                          if_match=None)
    # right CN, another key (the intermediate's): no proof of the root's key
    with pytest.raises(InvalidRequestError, match="not signed by this CA"):
        await registry.verify_certificate("myca", issue(code, chain.intermediate, ca=False).pem,
                                          if_match=None)
    assert not registry.certificate("myca").is_verified  # type: ignore[union-attr]
    verified = await registry.verify_certificate("myca", issue(code, chain.root, ca=False).pem,
                                                 if_match=None)
    assert verified.is_verified and verified.to_json()["properties"]["isVerified"] is True


async def test_a_new_code_replaces_the_old_one(registry: Registry) -> None:
    chain = three_levels("cadev")
    await registry.put_certificate("myca", {"properties": {"certificate": chain.root.pem}},
                                   if_match=None)
    old = (await registry.generate_verification_code("myca", if_match=None)).verification_code
    await registry.generate_verification_code("myca", if_match=None)
    assert old is not None
    with pytest.raises(InvalidRequestError, match="CN is not the verification code"):
        await registry.verify_certificate("myca", issue(old, chain.root, ca=False).pem,
                                          if_match=None)


async def test_three_level_chain_to_a_verified_ca_authenticates(registry: Registry) -> None:
    chain = three_levels("cadev")
    auth = Authenticator(registry, host_names=[HUB])
    device_sends = [chain.leaf.der, chain.intermediate.der]
    with pytest.raises(AuthError, match="no verified CA"):
        connect(auth, device_sends)
    await registry.put_certificate("myca", {"properties": {"certificate": chain.root.pem}},
                                   if_match=None)
    with pytest.raises(AuthError, match="no verified CA"):  # uploaded, not yet verified
        connect(auth, device_sends)
    await upload_and_verify(registry, chain, "myca2")
    connect(auth, device_sends)
    # without the intermediate nothing chains; a leaf cannot issue for another device
    with pytest.raises(AuthError, match="chain not trusted"):
        connect(auth, [chain.leaf.der])
    await registry.put_device({"authentication": {"type": "certificateAuthority"}},
                              device_id="other", if_match=None)
    forged = issue("other", chain.leaf, ca=False)
    with pytest.raises(AuthError, match="chain not trusted"):
        connect(auth, [forged.der, chain.leaf.der, chain.intermediate.der], "other")
    # CN must still be the device id
    with pytest.raises(AuthError, match="common name mismatch"):
        connect(auth, device_sends, "other")
    # deleting the CA stops its devices at once
    await registry.delete_certificate("myca2", if_match="*")
    with pytest.raises(AuthError, match="no verified CA"):
        connect(auth, device_sends)


async def test_uploaded_as_verified_needs_no_proof(registry: Registry) -> None:
    chain = three_levels("cadev")
    cert, _ = await registry.put_certificate(
        "ca", {"properties": {"certificate": chain.root.pem, "isVerified": True}}, if_match=None)
    assert cert.is_verified
    connect(Authenticator(registry, host_names=[HUB]), [chain.leaf.der, chain.intermediate.der])


async def test_bad_uploads_and_preconditions(registry: Registry) -> None:
    chain = three_levels("cadev")
    body = {"properties": {"certificate": chain.root.pem}}
    with pytest.raises(InvalidRequestError, match="not a CA certificate"):
        await registry.put_certificate("x", {"properties": {"certificate": chain.leaf.pem}},
                                       if_match=None)
    with pytest.raises(InvalidRequestError, match="not a PEM"):
        await registry.put_certificate("x", {"properties": {"certificate": "junk"}},
                                       if_match=None)
    with pytest.raises(InvalidRequestError, match="invalid certificate name"):
        await registry.put_certificate("a b", body, if_match=None)
    cert, _ = await registry.put_certificate("x", body, if_match=None)
    with pytest.raises(ConflictError):
        await registry.put_certificate("x", body, if_match=None)
    with pytest.raises(PreconditionFailedError):
        await registry.put_certificate("x", body, if_match='"stale"')
    replaced, created = await registry.put_certificate("x", body, if_match=f'"{cert.etag}"')
    assert not created and replaced.etag != cert.etag
    with pytest.raises(NotFoundError):
        await registry.delete_certificate("missing", if_match=None)
    with pytest.raises(NotFoundError):
        await registry.generate_verification_code("missing", if_match=None)


async def test_certificates_survive_a_reopen_and_the_files_stay_private(tmp_path: Path) -> None:
    chain = three_levels("cadev")
    path = tmp_path / "registry.db"
    async with await Registry.open(path) as reg:
        await upload_and_verify(reg, chain)
        await reg.put_certificate("pending", {"properties": {"certificate": chain.root.pem}},
                                  if_match=None)
    async with await Registry.open(path) as reg:
        assert reg.certificate("myca").is_verified  # type: ignore[union-attr]
        assert not reg.certificate("pending").is_verified  # type: ignore[union-attr]
        assert [c.subject.rfc4514_string() for c in reg.verified_ca_certificates()] == [
            "CN=Test Root CA"]
        for name in ("registry.db", "registry.db-wal", "registry.db-shm"):  # open: all there
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


async def test_a_registry_file_from_before_ca_certificates_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "registry.db"
    async with await Registry.open(path) as reg:
        await reg.put_device({}, device_id="old", if_match=None)
    conn = sqlite3.connect(path)  # make it what the previous release left: schema 1, no table
    conn.execute("DROP TABLE certificates")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    async with await Registry.open(path) as reg:
        assert reg.get_device("old") is not None and reg.certificates() == []
        await reg.put_certificate("ca", {"properties": {"certificate": three_levels("x").root.pem}},
                                  if_match=None)
    async with await Registry.open(path) as reg:
        assert [c.name for c in reg.certificates()] == ["ca"]
