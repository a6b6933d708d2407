#!/usr/bin/env python3
"""Raspberry Pi 4 estimate: the same durable QoS 1 ingest as tests/bench/ingest.py (its
generator, tests/bench/loadgen.py, and the same hub and Mosquitto set-up), with the broker
pinned to one core and held to a fraction of it.

Method. A Pi 4 core (Cortex-A72, 1.5-1.8 GHz) runs Python at about a quarter of one core of
this machine (the issue's calibration; ``--quota`` changes it). So the broker under test (the
hub, then Mosquitto, each in turn) is

1. pinned to one core with ``taskset -a -p -c CPU PID`` (all its threads: the hub's store
   thread competes with its event loop for that core, as on a Pi where the other cores are
   busy with bridges), and
2. given ``--quota`` percent of that core by the kernel's CFS bandwidth control, through the
   first of these that works here: ``systemd-run --scope -p CPUQuota=Q%`` around the broker
   (``--pin-only`` skips it), a cgroup v2 directory with ``cpu.max``, a cgroup v1 ``cpu``
   directory with ``cpu.cfs_quota_us``. The period is short (``--period-us``, 10 ms), so the
   broker is paused for at most 7.5 ms at a time, as a slower core would be slower, not
   stalled. Where none is usable the broker runs pinned only and the figures printed are the
   one-core figures scaled by the quota (the documented fallback; the output says which).

The generator runs unconstrained on the other cores (``taskset`` to every core but CPU). Each
broker gets a calibration first: a pure-Python loop in a child process under the same pinning
and quota, against the same loop pinned only, which shows the share of the core it really got.

    python tests/bench/pi.py                                  # 100 conns x 10, TCP, 25 %
    python tests/bench/pi.py --conns 1000 --window 1 --msgs 40000 --tls
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.peers import LOADGEN, loadgen_credentials, loadgen_path, start_mosquitto, tls_files  # noqa: E402
from tests.hubproc import HubProcess  # noqa: E402

CALIBRATION = ("import time\nt=time.perf_counter();c=time.process_time();k=0\n"
               "while time.perf_counter()-t<{s}:\n"
               "    for i in range(1000): i*i%7\n"
               "    k+=1\n"
               "w=time.perf_counter()-t\n"
               "print(k*1000/w, (time.process_time()-c)/w)")


# -- the CPU budget ----------------------------------------------------------------------------

class Budget:
    """One core at ``quota`` percent for the processes put into it."""

    def __init__(self, cpu: int, quota: float, period_us: int, pin_only: bool) -> None:
        self.cpu = cpu
        self.quota = quota
        self.period_us = period_us
        self.method = "taskset only (scaled by the quota)"
        self.cgroup: Path | None = None
        self._scope: subprocess.Popen[bytes] | None = None
        self._made = False  # we made self.cgroup (systemd removes its scope itself)
        if pin_only:
            return
        quota_us = int(period_us * quota / 100)
        name = f"gw-bench-pi-{os.getpid()}"
        if _systemd_running() and self._systemd_scope(name, quota):
            self.method = (f"taskset + systemd-run --scope -p CPUQuota={quota:g}% "
                           f"-p CPUQuotaPeriodSec={period_us}us")
            return
        for root, kind in ((Path("/sys/fs/cgroup"), "v2"), (Path("/sys/fs/cgroup/cpu"), "v1")):
            if kind == "v2" and not (root / "cgroup.controllers").exists():
                continue
            if kind == "v2" and "cpu" not in (root / "cgroup.controllers").read_text().split():
                continue
            if kind == "v1" and not (root / "cpu.cfs_quota_us").exists():
                continue
            path = root / name
            try:
                if kind == "v2":
                    (root / "cgroup.subtree_control").write_text("+cpu\n")
                path.mkdir()
                if kind == "v2":
                    (path / "cpu.max").write_text(f"{quota_us} {period_us}\n")
                else:
                    (path / "cpu.cfs_period_us").write_text(f"{period_us}\n")
                    (path / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")
            except OSError:
                with_rmdir(path)
                continue
            self.cgroup, self._made = path, True
            self.method = (f"taskset + cgroup {kind} CPU quota {quota:g} % "
                           f"({quota_us} us per {period_us} us)")
            return

    def _systemd_scope(self, name: str, quota: float) -> bool:
        """A transient scope holding a placeholder process; its cgroup takes the brokers."""
        proc = subprocess.Popen(
            ["systemd-run", "--scope", "--quiet", f"--unit={name}", "-p", f"CPUQuota={quota:g}%",
             "-p", f"CPUQuotaPeriodSec={self.period_us}us", "sleep", "infinity"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(50):
            try:
                children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                target = int(children[0]) if children else proc.pid  # systemd-run execs sleep
                line = Path(f"/proc/{target}/cgroup").read_text().splitlines()[-1]
            except (OSError, ValueError, IndexError):
                line = ""
            if line.endswith(f"{name}.scope"):
                relative = line.split(":", 2)[2]
                for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                    if (root / relative.lstrip("/")).is_dir():
                        self.cgroup, self._scope = root / relative.lstrip("/"), proc
                        return True
            if proc.poll() is not None:
                return False
            time.sleep(0.1)
        proc.terminate()
        return False

    @property
    def enforced(self) -> bool:
        return self.cgroup is not None

    def apply(self, pid: int) -> None:
        subprocess.run(["taskset", "-a", "-p", "-c", str(self.cpu), str(pid)], check=True,
                       capture_output=True)
        if self.cgroup is not None:
            (self.cgroup / "cgroup.procs").write_text(f"{pid}\n")

    def close(self) -> None:
        if self._scope is not None:
            self._scope.terminate()  # the scope ends with its last process
            self._scope.wait(10)
        if self.cgroup is not None and self._made:
            with_rmdir(self.cgroup)


def with_rmdir(path: Path) -> None:
    for _ in range(50):  # a cgroup can be removed once its processes have exited
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)


def _systemd_running() -> bool:
    try:
        out = subprocess.run(["systemctl", "is-system-running"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out in ("running", "degraded")


def calibrate(budget: Budget, seconds: float = 2.0) -> list[tuple[float, float]]:
    """A Python loop pinned only, then pinned under the budget: (iterations per second, the
    share of wall-clock time it got on the core)."""
    rates = []
    for limited in (False, True):
        proc = subprocess.Popen([sys.executable, "-c", CALIBRATION.format(s=seconds)],
                                stdout=subprocess.PIPE, text=True)
        subprocess.run(["taskset", "-a", "-p", "-c", str(budget.cpu), str(proc.pid)],
                       check=True, capture_output=True)
        if limited and budget.cgroup is not None:
            (budget.cgroup / "cgroup.procs").write_text(f"{proc.pid}\n")
        out, _ = proc.communicate(timeout=60)
        rate, share = out.split()
        rates.append((float(rate), float(share)))
    return rates


# -- the run -------------------------------------------------------------------------------------

def run_loadgen(loadgen: Path, args: argparse.Namespace, port: int, pid: int, label: str,
                extra: list[str], others: str) -> dict[str, Any]:
    cmd = ["taskset", "-c", others, sys.executable, str(loadgen), "--port", str(port),
           "--conns", str(args.conns), "--window", str(args.window), "--msgs", str(args.msgs),
           "--qos", "1", "--payload-size", "200", "--broker-pid", str(pid), "--label", label,
           *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"loadgen failed for {label}:\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=100)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--msgs", type=int, default=60_000)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--sync", choices=["full", "normal"], default="full")
    ap.add_argument("--quota", type=float, default=25.0,
                    help="percent of one core (a Pi 4 core ~ 25 %% of this machine's)")
    ap.add_argument("--period-us", type=int, default=10_000)
    ap.add_argument("--cpu", type=int, default=None, help="the core (default: the last)")
    ap.add_argument("--pin-only", action="store_true", help="no quota: one core, full speed")
    ap.add_argument("--loadgen", default=str(LOADGEN))
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    if not shutil.which("taskset"):
        raise SystemExit("taskset not found (apt-get install util-linux)")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs two cores: one for the broker, the rest for the generator")
    cpu = cores[-1] if args.cpu is None else args.cpu
    others = ",".join(str(c) for c in cores if c != cpu)
    loadgen = loadgen_path(args.loadgen)
    budget = Budget(cpu, args.quota, args.period_us, args.pin_only)
    tmp = Path(tempfile.mkdtemp(prefix="bench-pi-"))
    mosq_dir = Path(tempfile.mkdtemp(prefix="bench-pi-mosquitto-"))
    results: dict[str, dict[str, Any]] = {}
    try:
        calibration = calibrate(budget)
        hub = HubProcess(tmp / "hub", host_name="bench.local", log_level="info",
                         extra_config=f'[store]\nsync = "{args.sync}"\n')
        hub.start()
        creds = loadgen_credentials(hub.data_dir, "bench.local", args.conns, tmp / "creds.tsv")
        tls = tls_files(hub.data_dir, mosq_dir) if args.tls else None
        tls_args = ["--tls", "--ca-file", hub.ca_file, "--tls-server-name", "localhost"] \
            if args.tls else []
        mosq, mport = start_mosquitto(mosq_dir, tls)
        try:
            budget.apply(mosq.pid)
            results["mosquitto"] = run_loadgen(loadgen, args, mport, mosq.pid, "mosquitto",
                                               tls_args, others)
        finally:
            mosq.terminate()
            mosq.wait()
        port = hub.port("mqtt_tls_port" if args.tls else "mqtt_local_port")
        try:
            budget.apply(hub.pid)
            results["hub"] = run_loadgen(loadgen, args, port, hub.pid, "hub",
                                         ["--cred-file", str(creds), *tls_args], others)
        finally:
            hub.stop()
    finally:
        budget.close()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(mosq_dir, ignore_errors=True)
    report(args, budget, cpu, calibration, results)


def report(args: argparse.Namespace, budget: Budget, cpu: int,
           calibration: list[tuple[float, float]], results: dict[str, dict[str, Any]]) -> None:
    (full, full_share), (limited, limited_share) = calibration
    scale = 1.0 if budget.enforced else args.quota / 100
    print(f"Raspberry Pi 4 estimate: durable QoS1 ingest, {args.conns} conns x {args.window} "
          f"in flight, {args.msgs} msgs, 200-byte JSON, {'TLS' if args.tls else 'TCP'}, "
          f"hub sync={args.sync}; mosquitto = its defaults")
    print(f"broker on core {cpu}: {budget.method}; load average {os.getloadavg()[0]:.1f}")
    print(f"calibration: a Python loop on the core got {limited_share * 100:.0f} % of "
          f"wall-clock time under the budget ({limited:,.0f} iterations/s), "
          f"{full_share * 100:.0f} % pinned only ({full:,.0f}/s; other jobs share the core)")
    # CPU time is not stretched by the quota: a message costs the same CPU microseconds of
    # this machine; on a core 100/quota times slower it costs that many times more.
    print(f"{'':10} {'msg/s':>10} {'cpu us/msg':>11} {'on the Pi':>10} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'errors':>6}")
    for label in ("mosquitto", "hub"):
        r = results[label]
        print(f"{label:10} {r['msgs_per_s'] * scale:>10,.0f} "
              f"{r['broker_cpu_us_per_msg']:>11.2f} "
              f"{r['broker_cpu_us_per_msg'] * 100 / args.quota:>10.1f} {r['lat_p50_ms']:>8.2f} "
              f"{r['lat_p99_ms']:>8.2f} {len(r['errors']):>6}")
    h, m = results["hub"], results["mosquitto"]
    ratio = h["msgs_per_s"] / m["msgs_per_s"]
    print(f"ratio hub/mosquitto: rate {ratio:.2f}x, cpu per message "
          f"{h['broker_cpu_us_per_msg'] / m['broker_cpu_us_per_msg']:.2f}x"
          + ("" if budget.enforced else "  (not enforced: rates x quota, latencies as measured)"))
    if args.json_out:
        with open(args.json_out, "a") as fh:
            fh.write(json.dumps({"bench": "pi", "params": vars(args), "method": budget.method,
                                 "calibration": calibration,
                                 "scale": scale, **results}) + "\n")


if __name__ == "__main__":
    main()
