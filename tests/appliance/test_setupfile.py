"""gateway-setup.toml: parsing, DPS key derivation, admin hashes, redaction (gateway/setupfile.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import tomllib

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.setupfile import (
    REDACTED,
    admin_hash,
    derive_device_key,
    gateway_toml,
    parse,
    redacted,
    verify_admin,
)

GROUP_KEY = base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOq1 tech@laptop"
CS = "HostName=hub.example.net;DeviceId=gw-plant-7;SharedAccessKey=c2VjcmV0LWtleS0xMjM0NQ=="
HASH = admin_hash("correct horse", ln=10)
FULL = f'''
hostname = "gw-plant-7"

[hub]
aliases = ["gw-plant-7.local"]
addresses = ["10.0.4.7"]

[upstream]
connection_string = "{CS}"
port = 8883

[admin]
password_hash = "{HASH}"

[time]
servers = ["ntp.plant.example", "10.0.4.1"]

[ssh]
authorized_keys = ["{PUBKEY}"]
'''


def test_full_file() -> None:
    setup = parse(FULL)
    assert setup.hostname == "gw-plant-7"
    assert setup.aliases == ("gw-plant-7.local",) and setup.addresses == ("10.0.4.7",)
    assert setup.upstream is not None and setup.upstream.connection_string == CS
    assert setup.upstream.port == 8883 and not setup.upstream.id_scope
    assert setup.admin_password_hash == HASH
    assert setup.time_servers == ("ntp.plant.example", "10.0.4.1")
    assert setup.ssh_keys == (PUBKEY,)


def test_minimal_file_means_no_ssh_no_upstream() -> None:
    setup = parse('hostname = "gw-1"\n')
    assert setup.upstream is None and setup.ssh_keys == () and setup.admin_password_hash == ""


def test_device_key_derived_as_dps_does() -> None:
    want = base64.b64encode(hmac.new(base64.b64decode(GROUP_KEY), b"gw-plant-7",
                                     hashlib.sha256).digest()).decode()
    assert derive_device_key(GROUP_KEY, "gw-plant-7") == want
    # The documented example of Azure's "derive a device key" (az iot dps enrollment-group
    # compute-device-key) for key "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJ
    # FFXJrqYKi9yegxkqIChbqOS9Egw==" and registration id "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6".
    assert derive_device_key(
        "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
        "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6") == "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="


def test_group_enrollment_gives_a_connection_string_with_the_derived_key() -> None:
    setup = parse(f'hostname = "gw-plant-7"\n[upstream]\nhost = "hub.example.net"\n'
                  f'id_scope = "0ne00AB12CD"\ngroup_key = "{GROUP_KEY}"\n')
    up = setup.upstream
    assert up is not None and up.registration_id == "gw-plant-7" and up.id_scope == "0ne00AB12CD"
    key = derive_device_key(GROUP_KEY, "gw-plant-7")
    assert up.connection_string == (f"HostName=hub.example.net;DeviceId=gw-plant-7;"
                                    f"SharedAccessKey={key}")
    assert GROUP_KEY not in up.connection_string


@pytest.mark.parametrize(("text", "path"), [
    ('', "hostname"),
    ('hostname = "bad_name"', "hostname"),
    ('hostname = "gw"\nsurname = 1', "surname"),
    ('hostname = "gw"\n[upstream]\nconnection_string = "HostName=x"', "upstream.connection_string"),
    ('hostname = "gw"\n[upstream]\nconnection_string = "HostName=x;SharedAccessKeyName=o;SharedAccessKey=k"',
     "upstream.connection_string"),
    ('hostname = "gw"\n[upstream]\nid_scope = "0ne"', "upstream"),
    (f'hostname = "gw"\n[upstream]\nid_scope = "0ne"\ngroup_key = "{GROUP_KEY}"', "upstream.host"),
    ('hostname = "gw"\n[upstream]\nhost = "h"\nid_scope = "0ne"\ngroup_key = "not base64!"',
     "upstream.group_key"),
    (f'hostname = "gw"\n[upstream]\nconnection_string = "{CS}"\nid_scope = "x"', "upstream"),
    ('hostname = "gw"\n[upstream]\nconnection_string = "x"\nport = 70000', "upstream.port"),
    ('hostname = "gw"\n[admin]\npassword_hash = "hunter2"', "admin.password_hash"),
    ('hostname = "gw"\n[ssh]\nauthorized_keys = ["hello"]', "ssh.authorized_keys[0]"),
    ('hostname = "gw"\n[ssh]\nauthorized_keys = "ssh-ed25519 AAAA"', "ssh.authorized_keys"),
    ('hostname = "gw"\n[time]\nservers = [1]', "time.servers"),
    ('hostname = "gw"\n[time]\nserver = ["a"]', "time.server"),
])
def test_errors_name_the_key(text: str, path: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(text)
    assert err.value.path == path
    assert "\n" not in str(err.value)


def test_toml_syntax_error_is_one_line() -> None:
    with pytest.raises(ConfigError, match="gateway-setup.toml: "):
        parse("hostname = ")


def test_admin_hash_roundtrip_and_format() -> None:
    stored = admin_hash("s3cret pass", ln=10)
    assert stored.startswith("$scrypt$ln=10,r=8,p=1$")
    assert verify_admin("s3cret pass", stored)
    assert not verify_admin("s3cret pasS", stored)
    assert not verify_admin("s3cret pass", stored.replace("ln=10", "ln=30"))  # bounded cost
    assert not verify_admin("x", "plain")
    assert admin_hash("a", ln=10) != admin_hash("a", ln=10)  # salted


def test_redacted_copy_has_no_secrets() -> None:
    copy = redacted(FULL)
    assert CS not in copy and HASH not in copy and "SharedAccessKey" not in copy
    parsed = tomllib.loads(copy)
    assert parsed["upstream"]["connection_string"] == REDACTED
    assert parsed["admin"]["password_hash"] == REDACTED
    assert parsed["hostname"] == "gw-plant-7" and parsed["ssh"]["authorized_keys"] == [PUBKEY]
    enrollment = f'hostname = "g"\n[upstream]\nhost = "h"\nid_scope = "s"\ngroup_key = "{GROUP_KEY}"\n'
    assert GROUP_KEY not in redacted(enrollment)
    multiline = 'hostname = "g"\n[upstream]\nconnection_string = """HostName=h;\nDeviceId=x"""\n'
    assert "HostName" not in redacted(multiline) and "DeviceId" not in redacted(multiline)
    for sneaky in (f'hostname = "g"\nupstream = {{ connection_string = "{CS}" }}\n',
                   f'hostname = "g"\nupstream.connection_string = "{CS}"\n',
                   f'hostname = "g"\n[admin]\n  "password_hash" = "{HASH}"\n'):
        assert parse(sneaky)  # valid files...
        copy = redacted(sneaky)
        assert "SharedAccessKey" not in copy and HASH not in copy  # ...whose copy keeps nothing


def test_gateway_toml_is_accepted_by_the_hub_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    setup = parse('hostname = "gw-plant-7"\n[hub]\naddresses = ["10.0.4.7"]\n')
    text = gateway_toml(setup)
    (tmp_path / "gateway.toml").write_text(text)
    config = load_config(tmp_path)
    assert config.hub.host_name == "gw-plant-7" and config.hub.addresses == ("10.0.4.7",)
    assert config.api.port == 443


def test_gateway_toml_upstream_section() -> None:
    setup = parse(FULL)
    parsed = tomllib.loads(gateway_toml(setup, ca_file="/var/lib/gateway/upstream-ca.pem"))
    assert parsed["upstream"] == {"connection_string": CS, "port": 8883,
                                  "ca_file": "/var/lib/gateway/upstream-ca.pem"}


def test_the_readme_hash_one_liner_makes_a_hash_we_accept() -> None:
    import subprocess
    import sys

    from tests.hubproc import REPO
    line = next(line for line in (REPO / "README.md").read_text().splitlines()
                if line.startswith("python3 -c 'import base64,getpass"))
    code = line.removeprefix("python3 -c '").removesuffix("'")
    out = subprocess.run([sys.executable, "-c", code], input="technician pass\n",
                         capture_output=True, text=True, check=True).stdout.strip()
    assert verify_admin("technician pass", out) and not verify_admin("technician", out)
    assert parse(f'hostname = "g"\n[admin]\npassword_hash = "{out}"\n').admin_password_hash == out
