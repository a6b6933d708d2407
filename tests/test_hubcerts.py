"""gateway.hubcerts: the certificate files checked with Python's ssl at start, reused when good
(without importing cryptography), made or repaired by gateway.pki otherwise."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway import hubcerts, pki
from gateway.errors import ConfigError
from gateway.hubcerts import HubCertificates, ensure, reusable, wanted_names

REPO = Path(__file__).resolve().parents[1]
NAMES = ["gw.example", "10.1.2.3"]
ADDRESSES = ["192.168.7.9", "2001:db8::5"]


def files(certs: HubCertificates) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (certs.ca_cert, certs.ca_key, certs.server_cert,
                                             certs.server_key)}


def ok(certs: HubCertificates, host_names: list[str] = NAMES,
       addresses: list[str] = ADDRESSES) -> bool:
    return reusable(certs, *wanted_names(host_names, addresses))


@pytest.fixture
def certs(tmp_path: Path) -> HubCertificates:
    return pki.ensure_certificates(tmp_path / "data", host_names=NAMES, addresses=ADDRESSES)


def test_good_files_are_reused_without_importing_cryptography(certs: HubCertificates) -> None:
    before = files(certs)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from gateway import hubcerts\n"
        f"hubcerts.ensure(Path({str(certs.ca_cert.parent)!r}), host_names={NAMES!r},"
        f" addresses={ADDRESSES!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('cryptography', 'OpenSSL')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    assert files(certs) == before


def test_the_files_pki_makes_pass_every_check(certs: HubCertificates) -> None:
    assert ok(certs)
    assert ok(certs, ["GW.Example."], [])  # a subset, in any case, with a trailing dot
    assert ensure(certs.ca_cert.parent, host_names=NAMES, addresses=ADDRESSES) == certs


def test_a_name_not_covered_reissues_the_server_certificate(certs: HubCertificates) -> None:
    before = files(certs)
    for host_names, addresses in ((["other.example"], []), (NAMES, ["10.9.9.9"]),
                                  (NAMES, ["2001:db8::6"])):
        assert not ok(certs, host_names, addresses)
    ensure(certs.ca_cert.parent, host_names=["other.example"], addresses=ADDRESSES)
    after = files(certs)
    assert after["ca.pem"] == before["ca.pem"] and after["ca.key"] == before["ca.key"]
    assert after["server.pem"] != before["server.pem"]
    assert ok(certs, ["other.example"], ADDRESSES)


@pytest.mark.parametrize("age_days", [3 * 365, 710])  # expired; expiring within RENEW_BEFORE
def test_an_expired_or_expiring_server_certificate_is_reissued(tmp_path: Path,
                                                               age_days: int) -> None:
    made = datetime.now(UTC) - timedelta(days=age_days)
    certs = pki.ensure_certificates(tmp_path, host_names=NAMES, addresses=ADDRESSES, now=made)
    before = files(certs)
    assert not ok(certs)
    ensure(tmp_path, host_names=NAMES, addresses=ADDRESSES)
    after = files(certs)
    assert after["server.pem"] != before["server.pem"] and after["ca.pem"] == before["ca.pem"]
    assert ok(certs)


def test_a_certificate_valid_only_later_is_not_reused(certs: HubCertificates) -> None:
    later = datetime.now(UTC) + timedelta(days=3 * 365)  # past the server certificate's end
    assert not reusable(certs, *wanted_names(NAMES, ADDRESSES), now=later.timestamp())


def test_keys_that_do_not_match_are_repaired(certs: HubCertificates) -> None:
    server_key, ca_key = certs.server_key.read_bytes(), certs.ca_key.read_bytes()
    certs.server_key.write_bytes(ca_key)
    assert not ok(certs)
    ensure(certs.ca_cert.parent, host_names=NAMES, addresses=ADDRESSES)
    assert ok(certs)
    certs.ca_key.write_bytes(server_key)  # ca.key is not ca.pem's key (it signs renewals)
    assert not ok(certs)
    ensure(certs.ca_cert.parent, host_names=NAMES, addresses=ADDRESSES)
    assert ok(certs)


def test_a_server_certificate_from_another_ca_is_reissued(certs: HubCertificates,
                                                          tmp_path: Path) -> None:
    other = pki.ensure_certificates(tmp_path / "other", host_names=NAMES, addresses=ADDRESSES)
    certs.server_cert.write_bytes(other.server_cert.read_bytes())
    certs.server_key.write_bytes(other.server_key.read_bytes())
    assert not ok(certs)  # a pair, with every name, but our CA did not sign it
    ensure(certs.ca_cert.parent, host_names=NAMES, addresses=ADDRESSES)
    assert ok(certs) and certs.server_cert.read_bytes() != other.server_cert.read_bytes()


@pytest.mark.parametrize("name", ["server.pem", "server.key", "ca.pem", "ca.key"])
def test_missing_or_damaged_files_are_made_again(certs: HubCertificates, name: str) -> None:
    path = certs.ca_cert.parent / name
    path.unlink()
    assert not ok(certs)
    ensure(certs.ca_cert.parent, host_names=NAMES, addresses=ADDRESSES)
    assert ok(certs)
    path.write_text("not a PEM file\n")
    assert not ok(certs)
    ensure(certs.ca_cert.parent, host_names=NAMES, addresses=ADDRESSES)
    assert ok(certs)


def test_a_fresh_directory_gets_everything(tmp_path: Path) -> None:
    certs = ensure(tmp_path / "new", host_names=NAMES, addresses=ADDRESSES)
    assert certs == HubCertificates.in_dir(tmp_path / "new") and ok(certs)


def test_wanted_names() -> None:
    dns, ips = wanted_names(["GW.Example.", "10.1.2.3", "::2"], ["192.168.7.9"])
    assert dns == {"gw.example", "localhost"}
    assert {str(ip) for ip in ips} == {"10.1.2.3", "::2", "192.168.7.9", "127.0.0.1", "::1"}


@pytest.mark.parametrize(("host_names", "addresses", "path"), [
    (["bad name"], [], "host_names"), ([""], [], "host_names"), (["gw/x"], [], "host_names"),
    (["ünï.example"], [], "host_names"), ([], ["gw.example"], "addresses"),
])
def test_bad_names_are_config_errors(tmp_path: Path, host_names: list[str],
                                     addresses: list[str], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        ensure(tmp_path, host_names=host_names, addresses=addresses)
    assert err.value.path == path


def test_pki_reexports_what_moved() -> None:
    assert pki.HubCertificates is hubcerts.HubCertificates
    assert pki.thumbprints is hubcerts.thumbprints
    assert pki.RENEW_BEFORE == hubcerts.RENEW_BEFORE
