"""The Raspberry Pi (arm64) image: its partition table and file systems checked, its files
read without mounting (mtools, debugfs), then booted in qemu's generic arm64 machine with its
own kernel and initrd and a gateway-setup.toml, until the hub is active.

Runs only when ``GATEWAY_IMAGE_ARM64`` names an image built by ``image/build --arch arm64``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image.guest import Guest, fat

IMAGE = os.environ.get("GATEWAY_IMAGE_ARM64", "")
pytestmark = [pytest.mark.slow, pytest.mark.image, pytest.mark.timeout(1800),
              pytest.mark.skipif(not IMAGE, reason="GATEWAY_IMAGE_ARM64 is not set "
                                 "(./dev.sh image-test arm64 builds the image)")]
HOSTNAME = "gw-pi-ci"


def partitions(image: Path) -> list[dict[str, object]]:
    out = subprocess.run(["sfdisk", "-J", str(image)], capture_output=True, text=True,
                         check=True).stdout
    table = json.loads(out)["partitiontable"]
    assert table["label"] == "dos"
    return table["partitions"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each partition as a file of its own (sparse copies)."""
    work = tmp_path_factory.mktemp("arm64")
    files = {}
    for name, part in zip(("boot", "root", "slot_b", "data"), partitions(Path(IMAGE))):
        path = work / f"{name}.img"
        subprocess.run(["dd", f"if={IMAGE}", f"of={path}", "bs=512", f"skip={part['start']}",
                        f"count={part['size']}", "conv=sparse", "status=none"], check=True)
        files[name] = path
    return files


def debugfs(fs: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(fs)], capture_output=True,
                          text=True, check=True).stdout


def test_partition_table_has_room_for_a_b() -> None:
    parts = partitions(Path(IMAGE))
    assert [p["type"] for p in parts] == ["c", "83", "83", "83"]
    assert parts[0].get("bootable") is True
    assert parts[1]["size"] == parts[2]["size"]  # slot B as big as slot A


def test_file_systems_are_clean(extracted: dict[str, Path]) -> None:
    subprocess.run(["fsck.vfat", "-n", str(extracted["boot"])], check=True,
                   capture_output=True)
    for name in ("root", "data"):
        subprocess.run(["e2fsck", "-fn", str(extracted[name])], check=True, capture_output=True)
    labels = {name: subprocess.run(["blkid", "-s", "LABEL", "-o", "value", str(path)],
                                   check=False, capture_output=True, text=True).stdout.strip()
              for name, path in extracted.items()}
    assert labels == {"boot": "GWBOOT", "root": "gwroot-a", "slot_b": "", "data": "GWDATA"}


def test_pi_boot_partition(extracted: dict[str, Path]) -> None:
    names = fat(Path(IMAGE), "mdir", "-b", "::/").stdout.split()
    base = {n.removeprefix("::/") for n in names}
    for wanted in ("config.txt", "cmdline.txt", "start4.elf", "fixup4.dat",
                   "bcm2711-rpi-4-b.dtb", "bcm2837-rpi-3-b.dtb", "gateway-setup.example.toml"):
        assert wanted in base, (wanted, sorted(base))
    assert any(n.startswith("vmlinuz-") for n in base) and any(n.startswith("initrd.img-")
                                                              for n in base)
    cmdline = fat(Path(IMAGE), "mtype", "::/cmdline.txt").stdout
    assert "root=LABEL=gwroot-a" in cmdline and " ro " in f" {cmdline} "
    assert "arm_64bit=1" in fat(Path(IMAGE), "mtype", "::/config.txt").stdout


def test_root_file_system_holds_the_gateway_for_arm64(extracted: dict[str, Path],
                                                      tmp_path: Path) -> None:
    root = extracted["root"]
    assert "Type: regular" in debugfs(root, "stat /opt/gateway/venv/bin/gateway")
    for unit in ("multi-user.target.wants/gateway.service",
                 "sysinit.target.wants/gateway-firstboot.service"):
        assert "Type: symlink" in debugfs(root, f"stat /etc/systemd/system/{unit}")
    python = tmp_path / "python3"
    debugfs(root, f"dump /usr/bin/python3.11 {python}")
    header = python.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 0xB7  # aarch64
    # the interpreter, the kernel's loader and the venv's compiled wheels are all for aarch64
    site = "/opt/gateway/venv/lib/python3.11/site-packages"
    binaries = {"python3.11": "/usr/bin/python3.11",
                "ld.so": "/usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1",
                "systemd": "/usr/lib/systemd/systemd"}
    for package in ("uvloop", "orjson", "cryptography/hazmat/bindings"):
        found = [line.split()[-1] for line in debugfs(root, f"ls -l {site}/{package}").splitlines()
                 if ".so" in line]
        assert found, f"no compiled module in {package}"
        binaries[package] = f"{site}/{package}/{found[0]}"
    for name, path in binaries.items():
        local = tmp_path / name.replace("/", "_")
        debugfs(root, f"dump {path} {local}")
        kind = subprocess.run(["file", "-bL", str(local)], capture_output=True, text=True,
                              check=True).stdout
        assert "ELF 64-bit" in kind and "ARM aarch64" in kind, (name, kind)
    lock = debugfs(root, "cat /opt/gateway/requirements.lock")
    assert "edge-gateway==" in lock and "pymodbus==" in lock and "bleak==" in lock
    shadow = [line.split(":") for line in debugfs(root, "cat /etc/shadow").splitlines()]
    assert shadow and all(f[1][:1] in ("*", "!") for f in shadow)  # no password anywhere
    assert "gateway-setup" not in debugfs(root, "ls -l /boot/firmware")  # on FAT only


@pytest.fixture(scope="module")
def pi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    work = tmp_path_factory.mktemp("pi")
    disk = work / "disk.img"
    subprocess.run(["cp", "--sparse=always", IMAGE, str(disk)], check=True)
    names = fat(disk, "mdir", "-b", "::/").stdout.split()
    kernel = work / "vmlinuz"
    initrd = work / "initrd.img"
    fat(disk, "mcopy", next(n for n in names if n.startswith("::/vmlinuz-")), str(kernel))
    fat(disk, "mcopy", next(n for n in names if n.startswith("::/initrd.img-")), str(initrd))
    g = Guest(image=disk, workdir=work, arch="arm64", kernel=(kernel, initrd),
              ports={22: 2223}, memory_mib=1536)
    pubkey = g.ssh_keypair()
    setup = work / "gateway-setup.toml"
    setup.write_text(f'hostname = "{HOSTNAME}"\n[ssh]\nauthorized_keys = ["{pubkey}"]\n')
    fat(disk, "mcopy", str(setup), "::/gateway-setup.toml")
    start = time.monotonic()
    g.boot()
    try:
        ssh_s = g.wait_for_ssh(timeout=900)
        g.wait("systemctl is-active gateway", timeout=600, interval=5)
        print(f"\narm64 boot: ssh after {ssh_s:.0f} s, gateway active after "
              f"{time.monotonic() - start:.0f} s")
        yield g
    finally:
        g.shutdown()


@pytest.mark.skipif(os.environ.get("GATEWAY_IMAGE_BOOT_ARM64", "1") == "0",
                    reason="GATEWAY_IMAGE_BOOT_ARM64=0 (CI_BOOT_ARM64=0 in .ci/run): the arm64 "
                           "boot under full emulation (about 5 min) is left out")
def test_pi_image_boots_sets_itself_up_and_runs_the_hub(pi: Guest) -> None:
    assert pi.ssh("uname -m").stdout.strip() == "aarch64"
    assert pi.ssh("hostname").stdout.strip() == HOSTNAME
    assert pi.ssh("systemctl is-active gateway").stdout.strip() == "active"
    assert "gateway-setup.applied.toml" in pi.ssh("ls /boot/firmware").stdout.split()
    assert "ro" in pi.ssh("findmnt -no OPTIONS /").stdout.split(",")
    assert pi.ssh("systemctl --failed --no-legend --plain").stdout.strip() == ""
