"""The comparison peer for the benchmarks: Debian's Mosquitto, started the same way for all.

By default Mosquitto runs as users run it: its defaults, in particular without
``set_tcp_nodelay``, so it coalesces small writes (Nagle). ``tuned=True`` adds
``set_tcp_nodelay true`` (what the benches used to compare against; with it Mosquitto sends
every PUBACK in a segment of its own; issue 16 measured its defaults 1.1-1.7x faster on the
pipelined TLS shape). Either way queue limits are off (``max_inflight_messages 0``,
``max_queued_messages 0``) so it never drops what the generator sends, and persistence is off
(its default). With TLS it serves the hub's own certificate, copied where the ``mosquitto`` user
can read it (started as root, Mosquitto drops to that user before loading certificates,
mosquitto.conf(5) ``user``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

HOST = "127.0.0.1"
LOADGEN = Path(__file__).resolve().with_name("loadgen.py")  # the project's own generator


def tls_files(data_dir: Path, directory: Path) -> tuple[str, str, str]:
    files = []
    for name in ("ca.pem", "server.pem", "server.key"):
        target = directory / name
        shutil.copyfile(data_dir / name, target)
        files.append(target)
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam("mosquitto")
        except KeyError:
            pass
        else:
            for path in (directory, *files):
                os.chown(path, user.pw_uid, user.pw_gid)
    return str(files[0]), str(files[1]), str(files[2])


def start_mosquitto(conf_dir: Path, tls: tuple[str, str, str] | None = None, *,
                    tuned: bool = False) -> tuple[subprocess.Popen[bytes], int]:
    """Mosquitto on a free loopback port, with its defaults (``tuned``: plus
    ``set_tcp_nodelay``); returns (process, port)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = int(s.getsockname()[1])
    lines = [f"listener {port} {HOST}", "allow_anonymous true", "persistence false",
             "max_inflight_messages 0", "max_queued_messages 0", "log_type error"]
    if tuned:
        lines.append("set_tcp_nodelay true")
    if tls is not None:
        lines += [f"cafile {tls[0]}", f"certfile {tls[1]}", f"keyfile {tls[2]}"]
    conf = conf_dir / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(100):  # 5 s
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"mosquitto did not start (try: {exe} -c {conf} -v)")


def loadgen_credentials(data_dir: Path, host_name: str, count: int, path: Path) -> Path:
    """Register ``dev-0`` .. ``dev-{count-1}`` through the service API, as an integrator
    would, and write loadgen's ``--cred-file`` (client id, username, SAS token per line)."""
    from gateway.hub.sas import generate_sas_token
    from gateway.hubclient import HubClient

    client = HubClient(data_dir)
    lines = []
    for i in range(count):
        device_id = f"dev-{i}"
        device = client.request("PUT", f"/devices/{device_id}",
                                {"deviceId": device_id, "authentication": {"type": "sas"}})
        key = device["authentication"]["symmetricKey"]["primaryKey"]
        token = generate_sas_token(f"{host_name}/devices/{device_id}", key,
                                   int(time.time()) + 7200)
        lines.append(f"{device_id}\t{host_name}/{device_id}/?api-version=2021-04-12\t{token}")
    path.write_text("\n".join(lines) + "\n")
    return path


def loadgen_path(given: str) -> Path:
    """The load generator (``--loadgen``, default tests/bench/loadgen.py), or exit."""
    path = Path(given)
    if not path.exists():
        raise SystemExit(f"loadgen not found at {path} (give --loadgen PATH)")
    return path
