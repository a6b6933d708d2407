"""Zero-touch setup of the appliance: ``python -m gateway.firstboot`` (gateway-firstboot.service).

Runs as root at every boot, before ``gateway.service``, in two steps:

1. **Import** (only when the boot partition holds ``gateway-setup.toml``): validate it
   (:mod:`gateway.setupfile`); write the hub's ``gateway.toml`` (``[hub]``, ``[api]``,
   ``[upstream]``; other sections of an existing file are kept), ``admin.json`` (the technician
   UI's password hash, 0600), the host name, the time servers and SSH's authorized keys to the
   data partition; then overwrite the file in place on FAT with its redacted copy (the same
   clusters, so the secrets' bytes are gone, not just unlinked) and rename it
   ``gateway-setup.applied.toml``. An invalid file is left as it is, with the one-line reason
   in ``gateway-setup.error.txt`` beside it and in the journal.
2. **Activate** what the data partition holds, because the root file system is read-only and
   an A/B update replaces it: set the host name, hand timesyncd its servers through a
   ``/run`` drop-in, make SSH host keys on first use. ``ssh.service`` runs only if
   ``DATA/ssh/authorized_keys`` exists (a drop-in condition in the image). With ``--grow``
   (as the image runs it), the data partition grows to the end of the disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway import setupfile
from gateway.config import load_config
from gateway.errors import ConfigError, GatewayError

log = logging.getLogger("gateway.firstboot")

APPLIED_NAME = "gateway-setup.applied.toml"
ERROR_NAME = "gateway-setup.error.txt"
ADMIN_FILE = "admin.json"
OWNED_SECTIONS = ("hub", "api", "upstream")


@dataclass(frozen=True, slots=True)
class Paths:
    """Where things live. The image's defaults; tests point every one at a temp dir."""

    boot_dirs: tuple[Path, ...] = (Path("/boot/firmware"), Path("/boot/efi"))
    data: Path = Path("/data")  # the data partition
    run: Path = Path("/run")
    hub_data_dir: str = "/var/lib/gateway"  # DATA/gateway as the hub sees it (a bind mount)
    owner: str = "gateway"  # the hub's user: owns gateway.toml and admin.json
    set_hostname: Callable[[str], None] = field(default=socket.sethostname)

    @property
    def gateway(self) -> Path:
        return self.data / "gateway"

    @property
    def etc(self) -> Path:
        return self.data / "etc"

    @property
    def ssh(self) -> Path:
        return self.data / "ssh"


def _write(path: Path, text: str, mode: int = 0o644, owner: str | None = None) -> None:
    """Write atomically and durably with ``mode`` (and ``owner`` when that user exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fchmod(fd, mode)
        if owner is not None:
            try:
                user = pwd.getpwnam(owner)
            except KeyError:
                log.warning("no user %s: %s stays owned by root", owner, path)
            else:
                os.fchown(fd, user.pw_uid, user.pw_gid)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _sync_dir(path.parent)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError:  # FAT directories may refuse fsync; the file's own fsync still ran
        pass
    finally:
        os.close(fd)


def merge_gateway_toml(existing: str, ours: str) -> str:
    """``ours`` replaces the sections we own (``[hub]``, ``[api]``, ``[upstream]`` and their
    sub-tables) in ``existing``; every other section stays as the user left it."""
    kept: list[str] = []
    dropping = False
    for line in existing.splitlines():
        header = re.match(r"^\s*\[\[?\s*([A-Za-z0-9_-]+)", line)
        if header:
            dropping = header.group(1) in OWNED_SECTIONS
        elif not kept and not line.strip():
            continue
        if not dropping and not line.startswith("# Written by gateway-firstboot"):
            kept.append(line)
    rest = "\n".join(kept).strip()
    return ours + ("\n" + rest + "\n" if rest else "")


def find_setup(paths: Paths) -> Path | None:
    for directory in paths.boot_dirs:
        candidate = directory / setupfile.FILE_NAME
        if candidate.is_file():
            return candidate
    return None


def import_setup(source: Path, paths: Paths) -> setupfile.Setup:
    """Apply ``source`` to the data partition, then scrub it from the boot partition."""
    text = source.read_text(encoding="utf-8")
    error_file = source.with_name(ERROR_NAME)
    try:
        setup = setupfile.parse(text)
        config_text = _gateway_config(setup, paths)
    except ConfigError as exc:
        _write(error_file, f"{setupfile.FILE_NAME}: {exc}\n")
        raise
    _write(paths.gateway / "gateway.toml", config_text, 0o600, paths.owner)
    if setup.admin_password_hash:
        _write(paths.gateway / ADMIN_FILE, json.dumps(
            {"scheme": "scrypt", "password_hash": setup.admin_password_hash}, indent=2) + "\n",
            0o600, paths.owner)
    if setup.upstream is not None and setup.upstream.id_scope:
        _write(paths.gateway / "provisioning.json", json.dumps(
            {"idScope": setup.upstream.id_scope, "registrationId": setup.upstream.registration_id,
             "attestation": "symmetricKey (derived from the enrollment group key)",
             "assignedHub": setup.upstream.host}, indent=2) + "\n", 0o600, paths.owner)
    _write(paths.etc / "hostname", setup.hostname + "\n")
    if setup.time_servers:
        _write(paths.etc / "timesyncd.conf",
               "[Time]\nNTP=" + " ".join(setup.time_servers) + "\n")
    else:
        (paths.etc / "timesyncd.conf").unlink(missing_ok=True)
    paths.ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    if setup.ssh_keys:
        _write(paths.ssh / "authorized_keys", "\n".join(setup.ssh_keys) + "\n", 0o600)
    else:
        (paths.ssh / "authorized_keys").unlink(missing_ok=True)
    copy = setupfile.redacted(text)
    _write(paths.data / "setup" / APPLIED_NAME, copy, 0o600)
    _scrub(source, copy)
    error_file.unlink(missing_ok=True)
    log.info("setup applied hostname=%s upstream=%s admin_password=%s time_servers=%d "
             "ssh_keys=%d", setup.hostname,
             "none" if setup.upstream is None else
             ("group-enrollment" if setup.upstream.id_scope else "connection-string"),
             "set" if setup.admin_password_hash else "unset", len(setup.time_servers),
             len(setup.ssh_keys))
    return setup


def _gateway_config(setup: setupfile.Setup, paths: Paths) -> str:
    ca_file = ""
    if setup.upstream is not None and setup.upstream.ca_pem:
        _write(paths.gateway / "upstream-ca.pem", setup.upstream.ca_pem.strip() + "\n", 0o644,
               paths.owner)
        ca_file = f"{paths.hub_data_dir}/upstream-ca.pem"
    ours = setupfile.gateway_toml(setup, ca_file=ca_file)
    existing = paths.gateway / "gateway.toml"
    text = merge_gateway_toml(existing.read_text(encoding="utf-8"), ours) \
        if existing.exists() else ours
    check = paths.gateway / ".gateway.toml.check"
    _write(check, text, 0o600)
    try:
        load_config(paths.gateway, check)  # the hub must accept what we give it
    finally:
        check.unlink(missing_ok=True)
    return text


def _scrub(source: Path, copy: str) -> None:
    """Overwrite ``source`` in place (FAT rewrites the same clusters) with the redacted copy,
    padded to the old length, so no secret stays on the card; then rename it."""
    size = source.stat().st_size
    data = copy.encode("utf-8")
    data += b"\n" * max(0, size - len(data))
    with open(source, "r+b") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    target = source.with_name(APPLIED_NAME)
    os.replace(source, target)
    _sync_dir(source.parent)


def activate(paths: Paths) -> None:
    """Bring the running system in line with what the data partition holds."""
    hostname_file = paths.etc / "hostname"
    if hostname_file.exists():
        name = hostname_file.read_text(encoding="utf-8").strip()
        if name and name != socket.gethostname():
            paths.set_hostname(name)
            log.info("host name set hostname=%s", name)
    dropin = paths.run / "systemd" / "timesyncd.conf.d" / "gateway.conf"
    servers = paths.etc / "timesyncd.conf"
    if servers.exists():
        _write(dropin, servers.read_text(encoding="utf-8"))
    else:
        dropin.unlink(missing_ok=True)
    if (paths.ssh / "authorized_keys").exists():
        keys = paths.ssh / "etc" / "ssh"
        if not (keys / "ssh_host_ed25519_key").exists():
            keys.mkdir(parents=True, exist_ok=True)
            # Ed25519 only: made in milliseconds (an RSA key takes minutes on a slow board)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "",
                            "-f", str(keys / "ssh_host_ed25519_key")], check=True,
                           stdout=subprocess.DEVNULL)
            log.info("ssh host keys made dir=%s", keys)


def grow_data(mount_point: Path) -> None:
    """Grow the data partition (the last one) and its ext4 file system to the end of the
    disk: the image is small, the card or disk it is written to is not. A no-op once done."""
    source = subprocess.run(["findmnt", "-nvo", "SOURCE", str(mount_point)],
                            check=False, capture_output=True, text=True).stdout.strip()
    name = Path(source).name
    number = Path(f"/sys/class/block/{name}/partition")
    if not source.startswith("/dev/") or not number.exists():
        return
    disk = Path(f"/sys/class/block/{name}").resolve().parent.name
    grow = subprocess.run(["growpart", f"/dev/{disk}", number.read_text().strip()],
                          check=False, capture_output=True, text=True)
    if grow.returncode == 0:  # 1 with NOCHANGE: already at the end of the disk
        subprocess.run(["resize2fs", source], check=True, capture_output=True)
        log.info("data partition grown device=%s %s", source, grow.stdout.strip())
    elif "NOCHANGE" not in grow.stdout:
        log.warning("data partition not grown device=%s reason=%s", source,
                    (grow.stdout + grow.stderr).strip().splitlines()[-1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.firstboot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boot", action="append", help="boot partition directory (repeatable)")
    parser.add_argument("--data", default="/data", help="the data partition's mount point")
    parser.add_argument("--check", metavar="FILE", help="only validate a setup file and exit")
    parser.add_argument("--grow", action="store_true",
                        help="grow the data partition to the end of its disk (the image does)")
    args = parser.parse_args(argv)
    # Plain lines on stderr: the unit sends them to the journal and the console alike.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.check:
        try:
            setupfile.parse(Path(args.check).read_text(encoding="utf-8"))
        except (ConfigError, OSError) as exc:
            print(f"{args.check}: {exc}", file=sys.stderr)
            return 1
        print(f"{args.check}: ok")
        return 0
    paths = Paths(data=Path(args.data))
    if args.boot:
        paths = Paths(boot_dirs=tuple(Path(b) for b in args.boot), data=Path(args.data))
    status = 0
    source = find_setup(paths)
    if source is not None:
        try:
            import_setup(source, paths)
        except (GatewayError, OSError) as exc:
            log.error("setup refused file=%s reason=%s", source, exc)
            status = 1
    activate(paths)
    if args.grow:
        try:
            grow_data(paths.data)
        except (OSError, subprocess.CalledProcessError) as exc:
            log.warning("data partition not grown reason=%s", exc)
    return status


if __name__ == "__main__":
    sys.exit(main())
