#!/usr/bin/env python3
"""The hub's footprint on a small box: idle memory, memory per idle connection, start to READY,
each beside Debian's Mosquitto measured in the same run.

1. Start to READY: from ``exec`` of ``python -m gateway run`` until ``hub.json`` exists (the
   hub writes it, and sends systemd ``READY=1``, only once every listener is bound; see
   gateway/app.py) and its MQTT/TLS port accepts a connection; Mosquitto: from ``exec`` until
   its port accepts. Best and median of ``--starts`` starts (a fresh data directory is created
   once: the first start makes the certificates, later ones reuse them as a reboot does).
   Python bytecode is cached as an installed hub has it (pip and the image compile it): the
   bench clears PYTHONDONTWRITEBYTECODE for the hub and points PYTHONPYCACHEPREFIX into its
   temporary directory, so the first start compiles and the later ones load bytecode
   (``--no-bytecode``: every start compiles).
2. Idle RSS: VmRSS (and its anonymous and file-backed parts, and PSS) of the hub
   ``--settle`` seconds after READY with no devices, and again with ``--conns`` registered
   devices and nothing connected; Mosquitto's after it started.
3. Per idle connection: ``--conns`` MQTT clients connect (CONNECT with a SAS token, CONNACK,
   one SUBSCRIBE, as a device SDK does) over plain TCP (the hub's local listener, still
   authenticated) and then over TLS (port 8883's listener; TLS 1.2/1.3, server-authenticated),
   and stay idle; (RSS with them - RSS before) / conns, after ``--settle`` seconds. The
   clients come from several loopback source addresses (127.0.21.x) so the per-address
   connection cap is not what is measured.

The hub runs with its defaults (``log_level`` info, no modules, the bench's 127.0.21.1
address). Figures vary with the machine's load: read the ratios from one run.

    python tests/bench/footprint.py
    python tests/bench/footprint.py --conns 1000 --starts 5 --json-out bench.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gateway.mqtt.codec import Decoder, encode  # noqa: E402
from gateway.mqtt.packets import Connack, Connect, Suback, Subscribe  # noqa: E402
from tests.bench.peers import tls_files  # noqa: E402
from tests.hubproc import HubProcess  # noqa: E402

ADDRESS = "127.0.21.1"  # this bench's hub (the footprint helper's loopback range)
CLIENT_ADDRESSES = [f"127.0.21.{i}" for i in range(10, 30)]
API_VERSION = "2021-04-12"
perf = time.perf_counter


@dataclass(frozen=True, slots=True)
class Memory:
    rss_kb: int
    anon_kb: int
    file_kb: int
    pss_kb: int


def memory(pid: int) -> Memory:
    """VmRSS, RssAnon, RssFile (proc(5) status) and Pss (smaps_rollup) of a process, in KB."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0])
    pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return Memory(fields["VmRSS"], fields["RssAnon"],
                  fields["RssFile"] + fields.get("RssShmem", 0), pss)


def wait_port(host: str, port: int, deadline: float) -> None:
    while True:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            if perf() > deadline:
                raise SystemExit(f"{host}:{port} never accepted") from None
            time.sleep(0.002)


# -- the hub -------------------------------------------------------------------------------------

def proc_cpu(pid: int) -> float:
    """utime + stime of a process in seconds (proc(5) stat fields 14-15)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hub_start(hub: HubProcess, env: dict[str, str]) -> tuple[float, float]:
    """Start the hub: seconds from exec until hub.json exists and the TLS port accepts, and
    the CPU seconds the hub had used by then (the figure the machine's load does not
    inflate: on an idle machine the wall time is about this plus the disk's fsyncs)."""
    runtime = hub.data_dir / "hub.json"
    if runtime.exists():
        runtime.unlink()
    hub._log = open(hub.log_path, "ab")  # as HubProcess.start, polling at 2 ms, not 50
    t0 = perf()
    hub.proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--log-level", hub.log_level, "run",
         "--data-dir", str(hub.data_dir), "--config", str(hub.config_file)],
        stdout=hub._log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    deadline = t0 + 60
    while True:
        if hub.proc.poll() is not None:
            raise SystemExit(f"hub exited with {hub.proc.returncode}:\n{hub.log_text()}")
        if runtime.exists():
            cpu = proc_cpu(hub.proc.pid)
            try:
                hub.info = json.loads(runtime.read_text())
                break
            except ValueError:
                pass
        if perf() > deadline:
            raise SystemExit("hub did not become ready")
        time.sleep(0.002)
    wait_port(ADDRESS, hub.port("mqtt_tls_port"), deadline)
    return perf() - t0, cpu


def register(hub: HubProcess, count: int) -> list[tuple[str, str, str]]:
    """``count`` SAS devices through the service API: (client id, username, token)."""
    from gateway.hub.sas import generate_sas_token
    from gateway.hubclient import HubClient

    client = HubClient(hub.data_dir)
    out = []
    expiry = int(time.time()) + 7200
    for i in range(count):
        device_id = f"dev-{i}"
        device = client.request("PUT", f"/devices/{device_id}",
                                {"deviceId": device_id, "authentication": {"type": "sas"}})
        key = device["authentication"]["symmetricKey"]["primaryKey"]
        out.append((device_id, f"{hub.host_name}/{device_id}/?api-version={API_VERSION}",
                    generate_sas_token(f"{hub.host_name}/devices/{device_id}", key, expiry)))
    return out


# -- Mosquitto -------------------------------------------------------------------------------------

def mosquitto_start(conf_dir: Path, tls: tuple[str, str, str]) -> tuple[subprocess.Popen[bytes],
                                                                          int, int, float]:
    """Mosquitto with its defaults on ADDRESS: a plain and a TLS listener (process, tcp port,
    tls port, seconds from exec until both accept)."""
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind((ADDRESS, 0))
            ports.append(int(s.getsockname()[1]))
    conf = conf_dir / "mosquitto.conf"
    conf.write_text("\n".join([
        "per_listener_settings false", "allow_anonymous true", "persistence false",
        "log_type error", f"listener {ports[0]} {ADDRESS}", f"listener {ports[1]} {ADDRESS}",
        f"cafile {tls[0]}", f"certfile {tls[1]}", f"keyfile {tls[2]}"]) + "\n")
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    t0 = perf()
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for port in ports:
        wait_port(ADDRESS, port, t0 + 10)
    return proc, ports[0], ports[1], perf() - t0


# -- idle MQTT clients ---------------------------------------------------------------------------

async def connect(port: int, ctx: ssl.SSLContext | None, source: str,
                  creds: tuple[str, str | None, str | None],
                  topic: str) -> asyncio.StreamWriter:
    client_id, username, password = creds
    kw: dict[str, Any] = {"ssl": ctx, "server_hostname": "localhost"} if ctx else {}
    reader, writer = await asyncio.open_connection(ADDRESS, port, local_addr=(source, 0), **kw)
    writer.write(encode(Connect(client_id=client_id, clean_session=True, keepalive=1800,
                                username=username,
                                password=password.encode() if password else None)))
    writer.write(encode(Subscribe(packet_id=1, topics=((topic, 0),))))
    decoder = Decoder()
    got: list[Any] = []
    while len(got) < 2:
        data = await asyncio.wait_for(reader.read(4096), 30)
        if not data:
            raise SystemExit(f"{client_id}: connection closed before CONNACK/SUBACK")
        got += decoder.feed(data)
    if not isinstance(got[0], Connack) or got[0].return_code != 0 or \
            not isinstance(got[1], Suback):
        raise SystemExit(f"{client_id}: refused: {got[:2]}")
    return writer


async def idle_connections(pid: int, port: int, ctx: ssl.SSLContext | None,
                           creds: list[tuple[str, str | None, str | None]], topic: str,
                           settle: float) -> tuple[Memory, Memory]:
    """Memory of ``pid`` before and with ``len(creds)`` idle connections."""
    await asyncio.sleep(settle)
    before = memory(pid)
    gate = asyncio.Semaphore(20)

    async def one(i: int) -> asyncio.StreamWriter:
        async with gate:
            return await connect(port, ctx, CLIENT_ADDRESSES[i % len(CLIENT_ADDRESSES)],
                                 creds[i], topic.format(creds[i][0]))

    writers = await asyncio.gather(*(one(i) for i in range(len(creds))))
    await asyncio.sleep(settle)
    after = memory(pid)
    for w in writers:
        w.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    await asyncio.sleep(min(settle, 2))  # the server notices the closes before the next phase
    return before, after


# -- the run ---------------------------------------------------------------------------------------

def per_conn_kb(pair: tuple[Memory, Memory], conns: int) -> float:
    return (pair[1].rss_kb - pair[0].rss_kb) / conns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=1000, help="idle connections per phase")
    ap.add_argument("--starts", type=int, default=5, help="hub starts timed")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds before each reading")
    ap.add_argument("--no-bytecode", action="store_true",
                    help="keep PYTHONDONTWRITEBYTECODE: every start compiles the sources")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.conns + 256)), hard))
    tmp = Path(tempfile.mkdtemp(prefix="bench-footprint-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not args.no_bytecode:  # as installed (pip and the image compile it): cached bytecode
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")  # the first start writes it
    mosq_dir = Path(tempfile.mkdtemp(prefix="bench-footprint-mosquitto-"))
    hub = HubProcess(tmp / "hub", host_name="bench.local", log_level="info", address=ADDRESS,
                     amqp_config=f'port = 0\nbind = "{ADDRESS}"\n')
    mosq = None
    results: dict[str, Any] = {}
    try:
        starts, start_cpu = [], []
        for i in range(args.starts):
            wall, cpu = hub_start(hub, env)
            starts.append(wall)
            start_cpu.append(cpu)
            if i + 1 < args.starts:
                hub.stop()
        time.sleep(args.settle)
        hub_empty = memory(hub.pid)
        creds = register(hub, args.conns)
        time.sleep(args.settle)
        hub_idle = memory(hub.pid)
        ctx = ssl.create_default_context(cafile=hub.ca_file)
        hub_tcp = asyncio.run(idle_connections(
            hub.pid, hub.port("mqtt_local_port"), None, list(creds),
            "devices/{}/messages/devicebound/#", args.settle))
        hub_tls = asyncio.run(idle_connections(
            hub.pid, hub.port("mqtt_tls_port"), ctx, list(creds),
            "devices/{}/messages/devicebound/#", args.settle))

        mosq, mtcp, mtls, mosq_start_s = mosquitto_start(mosq_dir,
                                                         tls_files(hub.data_dir, mosq_dir))
        time.sleep(args.settle)
        mosq_idle = memory(mosq.pid)
        anon = [(c[0], None, None) for c in creds]
        mosq_tcp = asyncio.run(idle_connections(mosq.pid, mtcp, None, anon, "dev/{}/#",
                                                args.settle))
        mosq_tls = asyncio.run(idle_connections(mosq.pid, mtls, ctx, anon, "dev/{}/#",
                                                args.settle))
    finally:
        if mosq is not None:
            mosq.send_signal(signal.SIGTERM)
            mosq.wait(10)
        hub.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(mosq_dir, ignore_errors=True)

    c = args.conns
    results = {
        "start_s": {"hub_best": min(starts[1:] or starts),
                    "hub_median": statistics.median(starts[1:] or starts),
                    "hub_all": starts, "hub_cpu_all": start_cpu, "mosquitto": mosq_start_s},
        "idle": {"hub_no_devices": asdict(hub_empty), "hub": asdict(hub_idle),
                 "mosquitto": asdict(mosq_idle)},
        "per_conn_kb": {"hub_tcp": per_conn_kb(hub_tcp, c), "hub_tls": per_conn_kb(hub_tls, c),
                        "mosquitto_tcp": per_conn_kb(mosq_tcp, c),
                        "mosquitto_tls": per_conn_kb(mosq_tls, c)},
    }
    load = os.getloadavg()[0]
    print(f"footprint: {c} registered devices, {c} idle connections per phase, "
          f"load average {load:.1f}")
    print(f"{'':28} {'hub':>10} {'mosquitto':>10} {'ratio':>7}")
    s = results["start_s"]
    print(f"{'start to READY, s (best)':28} {s['hub_best']:>10.3f} {s['mosquitto']:>10.3f} "
          f"{s['hub_best'] / s['mosquitto']:>6.1f}x   (hub median {s['hub_median']:.3f} s "
          f"of {max(len(starts) - 1, 1)} restarts; the first, making certificates"
          f"{'' if args.no_bytecode else ' and bytecode'}: {starts[0]:.3f} s)")
    print(f"{'  CPU s used by READY (best)':28} {min(start_cpu[1:] or start_cpu):>10.3f} "
          f"{'':>10} {'':>7}   (the first start: {start_cpu[0]:.3f} s)")
    for label, h, m in (("idle RSS, no devices, MB", hub_empty.rss_kb, mosq_idle.rss_kb),
                        ("  anonymous, MB", hub_empty.anon_kb, mosq_idle.anon_kb),
                        ("  file-backed, MB", hub_empty.file_kb, mosq_idle.file_kb),
                        ("  PSS, MB", hub_empty.pss_kb, mosq_idle.pss_kb),
                        (f"idle RSS, {c} devices, MB", hub_idle.rss_kb, mosq_idle.rss_kb)):
        print(f"{label:28} {h / 1024:>10.1f} {m / 1024:>10.1f} {h / max(m, 1):>6.1f}x")
    p = results["per_conn_kb"]
    for label, h, m in (("per idle TCP connection, KB", p["hub_tcp"], p["mosquitto_tcp"]),
                        ("per idle TLS connection, KB", p["hub_tls"], p["mosquitto_tls"])):
        print(f"{label:28} {h:>10.1f} {m:>10.1f} {h / m if m > 0 else 0:>6.1f}x")
    if args.json_out:
        with open(args.json_out, "a") as fh:
            fh.write(json.dumps({"bench": "footprint", "params": vars(args), "load": load,
                                 **results}) + "\n")


if __name__ == "__main__":
    main()
