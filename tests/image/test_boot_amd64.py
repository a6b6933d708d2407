"""The x86-64 image booted under qemu (UEFI, TCG) with a gateway-setup.toml on its boot
partition, checked from the host (issue 12, "How it is checked").

The upstream is a hub on the host (``HubProcess`` on ``UPSTREAM_ADDRESS``, an ephemeral port)
with a DPS group enrollment; the guest reaches it only as ``10.0.2.100:8883`` through qemu's
``guestfwd`` (a socat per connection). The setup file names that address, the enrollment's ID
scope and group key and the upstream's CA, so the booted gateway derives its key, registers
itself at the upstream's provisioning service and forwards its devices' telemetry there.

Runs only when ``GATEWAY_IMAGE_AMD64`` names an image built by ``image/build`` (the image
tier of ``.ci/run`` builds one and sets it); the image itself is not modified (a sparse copy
is booted).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.setupfile import admin_hash
from tests.hubproc import HubProcess
from tests.image.guest import GUEST_ADDRESS, MIB, Guest, fat
from tests.interop.conftest import run_sdk
from tests.upstream.federation import parent_events
from tests.waiting import eventually

IMAGE = os.environ.get("GATEWAY_IMAGE_AMD64", "")
pytestmark = [pytest.mark.slow, pytest.mark.image, pytest.mark.timeout(1800),
              pytest.mark.skipif(not IMAGE, reason="GATEWAY_IMAGE_AMD64 is not set "
                                 "(the image tier of .ci/run builds the image)")]
HOSTNAME = "gw-ci-7"
UPSTREAM_ADDRESS = os.environ.get("GATEWAY_UPSTREAM_ADDRESS", "127.0.24.2")  # on the host
UPSTREAM_IN_GUEST = "10.0.2.100"  # the guestfwd address the booted gateway dials
PASSWORD_HASH = admin_hash("technician pass", ln=12)
TIMINGS: dict[str, float] = {}
GROUP_KEY: list[str] = []
BOOTED: list[float] = []  # time.monotonic() at boot  # the enrollment's group key, for the scrub check at the end


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """The parent hub on the host. Its certificate names the address the guest dials (an IP
    SAN from [hub] addresses), and that address is an alias, so the gateway's SAS tokens
    (HostName=10.0.2.100, from the group enrollment) have an audience it accepts."""
    work = tmp_path_factory.mktemp("upstream")
    hub = HubProcess(work / "data", host_name="upstream.local", address=UPSTREAM_ADDRESS,
                     log_level="info",
                     hub_config=f'aliases = ["{UPSTREAM_IN_GUEST}"]\n'
                                f'addresses = ["{UPSTREAM_IN_GUEST}"]\n',
                     extra_config=f'[provisioning]\nassigned_hub = "{UPSTREAM_IN_GUEST}"\n')
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory, upstream: HubProcess) -> Iterator[Guest]:
    work = tmp_path_factory.mktemp("guest")
    disk = work / "disk.img"
    subprocess.run(["cp", "--sparse=always", IMAGE, str(disk)], check=True)
    subprocess.run(["truncate", "-s", "+768M", str(disk)], check=True)  # a bigger disk
    g = Guest(image=disk, workdir=work, guestfwd={
        f"{UPSTREAM_IN_GUEST}:8883": f"{UPSTREAM_ADDRESS}:{upstream.port('mqtt_tls_port')}"})
    pubkey = g.ssh_keypair()
    group = json.loads(upstream.cli("enrollment", "create", "plant-gateways",
                                    "--iot-edge").stdout)
    scope = upstream.cli("enrollment", "id-scope").stdout.strip()
    group_key = group["attestation"]["symmetricKey"]["primaryKey"]
    GROUP_KEY.append(group_key)
    ca_pem = Path(upstream.ca_file).read_text().strip()
    setup = work / "gateway-setup.toml"
    setup.write_text(
        f'hostname = "{HOSTNAME}"\n\n[hub]\naddresses = ["{GUEST_ADDRESS}"]\n\n'
        f'[upstream]\nhost = "{UPSTREAM_IN_GUEST}"\nport = 8883\nid_scope = "{scope}"\n'
        f'group_key = "{group_key}"\nca_pem = """{ca_pem}\n"""\n\n'
        f'[admin]\npassword_hash = "{PASSWORD_HASH}"\n\n'
        f'[time]\nservers = ["10.0.2.2"]\n\n[ssh]\nauthorized_keys = ["{pubkey}"]\n')
    fat(disk, "mcopy", str(setup), "::/gateway-setup.toml")
    start = time.monotonic()
    BOOTED.append(start)
    g.boot()
    try:
        TIMINGS["ssh_up_s"] = g.wait_for_ssh()
        g.wait("systemctl is-active gateway", timeout=300)
        TIMINGS["gateway_active_s"] = time.monotonic() - start
        yield g
    finally:
        g.shutdown()
        (work / "timings.json").write_text(json.dumps(TIMINGS, indent=2))
        print(f"\nimage boot timings: {TIMINGS}  console: {g.console}")


def test_gateway_active_and_first_boot_applied(guest: Guest) -> None:
    assert guest.ssh("systemctl is-active gateway").stdout.strip() == "active"
    assert guest.ssh("hostname").stdout.strip() == HOSTNAME
    assert guest.ssh("cat /etc/hostname").stdout.strip() == HOSTNAME  # static, on /data
    boot = guest.ssh("ls /boot/efi").stdout.split()
    assert "gateway-setup.toml" not in boot and "gateway-setup.applied.toml" in boot
    applied = guest.ssh("cat /boot/efi/gateway-setup.applied.toml").stdout
    assert PASSWORD_HASH not in applied and f'hostname = "{HOSTNAME}"' in applied
    assert GROUP_KEY[0] not in applied and "id_scope" in applied
    admin = guest.ssh("stat -c '%a %U' /var/lib/gateway/admin.json && "
                      "cat /var/lib/gateway/admin.json").stdout.splitlines()
    assert admin[0] == "600 gateway"
    assert json.loads("\n".join(admin[1:]))["password_hash"] == PASSWORD_HASH
    assert "NTP=10.0.2.2" in guest.ssh("cat /run/systemd/timesyncd.conf.d/gateway.conf").stdout
    toml = guest.ssh("cat /var/lib/gateway/gateway.toml").stdout
    assert f'host_name = "{HOSTNAME}"' in toml and "port = 443" in toml


def test_gateway_provisioned_itself_at_the_upstream(guest: Guest, upstream: HubProcess) -> None:
    """DPS group enrollment: the parent made the gateway's identity (an edge device, with the
    key derived from the group key) and the gateway's upstream link is connected."""
    state = json.loads(guest.wait(
        "python3 -c 'import json,sys; s=json.load(open(\"/var/lib/gateway/provisioning.json\"));"
        " sys.exit(0 if s.get(\"registered\") else 1)' && cat /var/lib/gateway/provisioning.json",
        timeout=300, interval=5))
    assert state["registered"]["deviceId"] == HOSTNAME
    assert state["registered"]["assignedHub"] == UPSTREAM_IN_GUEST
    identity = json.loads(upstream.cli("device", "show", HOSTNAME).stdout)
    assert identity["capabilities"]["iotEdge"] is True
    toml = guest.ssh("cat /var/lib/gateway/gateway.toml").stdout
    assert identity["authentication"]["symmetricKey"]["primaryKey"] in toml  # derived, same
    guest.wait("gateway upstream status --json | python3 -c 'import json,sys; "
               "sys.exit(json.load(sys.stdin)[\"state\"] != \"connected\")'",
               timeout=300, interval=5)
    TIMINGS["upstream_connected_s"] = time.monotonic() - BOOTED[0]
    log = guest.ssh("journalctl -u gateway -o cat --no-pager | grep 'provisioned at the parent'"
                    ).stdout
    assert f"registration_id={HOSTNAME}" in log


def test_data_partition_grew_to_the_end_of_the_disk(guest: Guest) -> None:
    size_mib = int(guest.ssh("df -BM --output=size /data | tail -1").stdout.strip().rstrip("M"))
    assert size_mib > 900, size_mib  # 256 MiB in the image, +768 MiB of disk


def test_no_password_and_read_only_root(guest: Guest) -> None:
    shadow = guest.ssh("cat /etc/shadow").stdout
    usable = [line.split(":")[0] for line in shadow.splitlines()
              if line.split(":")[1] not in ("", "*", "!", "!*") and
              not line.split(":")[1].startswith("!")]
    assert usable == []
    assert not any(line.split(":")[1] == "" for line in shadow.splitlines())  # no empty ones
    assert "ro" in guest.ssh("findmnt -no OPTIONS /").stdout.split(",")
    assert guest.ssh("touch /usr/x", check=False).returncode != 0
    assert guest.ssh("findmnt -no SOURCE,FSTYPE /data").stdout.split()[1] == "ext4"
    assert guest.ssh("findmnt -no LABEL /data || blkid -s LABEL -o value "
                     "$(findmnt -no SOURCE /data)").stdout.strip().endswith("GWDATA")
    assert guest.ssh("systemctl is-active ssh").stdout.strip() == "active"  # the file turned it on
    assert guest.ssh("systemctl --failed --no-legend --plain").stdout.strip() == ""


def test_hardening_live(guest: Guest) -> None:
    out = guest.ssh("systemd-analyze security gateway.service --no-pager").stdout
    m = re.search(r"Overall exposure level for gateway.service: (\d+\.\d)", out)
    assert m and float(m.group(1)) <= 2.5, out[-400:]
    TIMINGS["exposure"] = float(m.group(1))
    pid = guest.ssh("systemctl show -P MainPID gateway").stdout.strip()
    status = dict(line.split(":\t", 1) for line in
                  guest.ssh(f"cat /proc/{pid}/status").stdout.splitlines() if ":\t" in line)
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
    assert int(status["CapEff"], 16) == 1 << 10  # CAP_NET_BIND_SERVICE only
    assert int(status["CapBnd"], 16) == 1 << 10
    uid = guest.ssh("id -u gateway").stdout.strip()
    assert status["Uid"].split()[0] == uid
    listening = guest.ssh("ss -Hltn").stdout
    assert ":8883 " in listening and ":443 " in listening


def test_azure_sdk_device_telemetry_reaches_the_upstream(guest: Guest, upstream: HubProcess,
                                                        azure_python: Path,
                                                        tmp_path: Path) -> None:
    guest.ssh("gateway device create boiler-1 >/dev/null")
    cs = guest.ssh(f"gateway device connection-string boiler-1 --gateway-host {GUEST_ADDRESS}"
                   ).stdout.strip()
    assert cs.startswith(f"HostName={HOSTNAME};DeviceId=boiler-1;")
    ca = tmp_path / "ca.pem"
    ca.write_text(guest.ssh("gateway ca").stdout)
    bad = re.sub(r"SharedAccessKey=[^;]+", "SharedAccessKey=" + "A" * 43 + "=", cs)
    with guest.forward(8883, 8883):  # the Azure SDK dials 8883, always
        result = run_sdk(azure_python, "send_telemetry.py",
                         {"connection_string": cs, "ca_file": str(ca), "count": 5}, timeout=180)
        # a refused connection: the same device with a wrong key
        with pytest.raises(AssertionError):
            run_sdk(azure_python, "send_telemetry.py",
                    {"connection_string": bad, "ca_file": str(ca), "count": 1}, timeout=180)
    assert result == {"sent": 5}
    out = guest.ssh("gateway monitor-events --device boiler-1 --from-beginning --timeout 3 "
                    "--json").stdout
    events = [json.loads(line)["event"] for line in out.splitlines() if line.strip()]
    assert [e["payload"]["seq"] for e in events] == [0, 1, 2, 3, 4]

    # ... and forwarded by the gateway, through guestfwd, to the upstream, with its origin
    def forwarded() -> list[dict[str, object]]:
        return [e for e in parent_events(upstream, 1.0) if e.get("origin") == "boiler-1"]

    asyncio.run(eventually(lambda: len(forwarded()) >= 5, 180,
                           "boiler-1's telemetry at the upstream", interval=2, blocking=True))
    upstream_events = forwarded()
    assert sorted(e["payload"]["seq"] for e in upstream_events) == [0, 1, 2, 3, 4]  # type: ignore[index]


def test_journal_structured_fields(guest: Guest) -> None:
    # (after the SDK test: boiler-1 connected, and was refused once with a wrong key)
    lines = [json.loads(line) for line in guest.ssh(
        "journalctl -u gateway DEVICE_ID=boiler-1 -o json --no-pager").stdout.splitlines()]
    assert lines, "no journal entries with DEVICE_ID=boiler-1"
    assert all(entry["DEVICE_ID"] == "boiler-1" for entry in lines)
    messages = [entry["MESSAGE"] for entry in lines]
    assert any(m.startswith("connected client_id='boiler-1'") for m in messages), messages
    refused = [entry for entry in lines if "REASON" in entry and "refused" in entry["MESSAGE"]]
    assert refused, messages
    reason = refused[0]["REASON"]
    by_reason = guest.ssh(f"journalctl -u gateway 'REASON={reason}' -o cat --no-pager").stdout
    assert "connection refused client_id='boiler-1'" in by_reason
    assert refused[0]["PRIORITY"] == "4" and refused[0]["SYSLOG_IDENTIFIER"] == "gateway"


def test_a_bridge_crash_leaves_the_hub_running(guest: Guest) -> None:
    guest.ssh("printf '\\n[modules.serial]\\nbridge = \"serial\"\\n' >> "
              "/var/lib/gateway/gateway.toml && systemctl restart gateway")
    guest.wait("systemctl is-active gateway", timeout=240)
    hub = guest.ssh("systemctl show -P MainPID gateway").stdout.strip()
    bridge = guest.wait(f"pgrep -P {hub} -f 'hw serial'", timeout=120).strip()
    guest.ssh(f"kill -9 {bridge}")
    again = guest.wait(f"p=$(pgrep -P {hub} -f 'hw serial') && test \"$p\" != {bridge} && "
                       "echo $p", timeout=120).strip()
    assert again and again != bridge
    assert guest.ssh("systemctl show -P MainPID gateway").stdout.strip() == hub
    assert guest.ssh("systemctl show -P NRestarts gateway").stdout.strip() == "0"
    assert guest.ssh("systemctl is-active gateway").stdout.strip() == "active"
    log = guest.ssh("journalctl -u gateway MODULE_ID=serial -o cat --no-pager").stdout
    assert "module exited module=serial code=-9" in log


def test_watchdog_restarts_a_stopped_hub(guest: Guest) -> None:
    # A short watchdog for the test, in /run (the root file system is read-only); not so short
    # that a hub starting on a loaded TCG guest misses it (8 s failed once at load 15)
    guest.ssh("mkdir -p /run/systemd/system/gateway.service.d && printf "
              "'[Service]\\nWatchdogSec=15\\n' > /run/systemd/system/gateway.service.d/wd.conf"
              " && systemctl daemon-reload && systemctl restart gateway")
    guest.wait("systemctl is-active gateway", timeout=240)
    assert guest.ssh("systemctl show -P WatchdogUSec gateway").stdout.strip() == "15s"
    before = int(guest.ssh("systemctl show -P NRestarts gateway").stdout)
    pid = guest.ssh("systemctl show -P MainPID gateway").stdout.strip()
    guest.ssh(f"kill -STOP {pid}")
    start = time.monotonic()
    guest.wait(f"test $(systemctl show -P NRestarts gateway) -gt {before} && "
               f"test $(systemctl show -P MainPID gateway) != {pid} && "
               "systemctl is-active gateway", timeout=480)
    TIMINGS["watchdog_restart_s"] = time.monotonic() - start
    log = guest.ssh("journalctl -u gateway -o cat --no-pager | grep -i watchdog").stdout
    assert "Watchdog timeout" in log
    guest.ssh("rm -r /run/systemd/system/gateway.service.d && systemctl daemon-reload")


def test_secrets_gone_from_the_fat_partition_bytes(guest: Guest) -> None:
    """Last: powers the guest off, then reads the raw boot partition."""
    guest.shutdown()
    assert guest.proc is not None and guest.proc.returncode is not None
    names = fat(guest.image, "mdir", "-b", "::/").stdout
    assert "GATEWAY-SETUP.TOML" not in names.upper().replace("GATEWAY-SETUP.APPLIED", "")
    with open(guest.image, "rb") as disk:
        disk.seek(MIB)
        boot = disk.read(256 * MIB)
    assert PASSWORD_HASH.encode() not in boot
    assert GROUP_KEY[0].encode() not in boot
    assert PASSWORD_HASH.split("$")[-1].encode() not in boot
