#!/usr/bin/env python3
"""Multi-process MQTT 3.1.1 load generator (raw asyncio TCP, hand-encoded packets): the
project's own, used by tests/bench/ingest.py and soak.py (tests/bench/test_loadgen.py runs it).

Each worker process opens many TCP connections, sends CONNECT, then publishes
~200-byte JSON telemetry to devices/{id}/messages/events/ (Azure IoT Hub D2C
topic).  QoS1: pipelined, at most --window un-acked PUBLISHes per connection;
throughput counts PUBACKs, latency is PUBLISH-write -> PUBACK-read.
QoS0: fire and forget, paced by TCP back-pressure; completion of the broker's
ingest is detected with a PINGREQ fence per connection (brokers handle one
connection's packets in order, so PINGRESP => all earlier PUBLISHes were read);
--sub N adds N subscriber connections (own process) that count deliveries.
--hold S: connect, keep the connections idle S seconds, report broker RSS.

If --broker-pid is given, the broker's CPU time and RSS are read from /proc.
Worker CPU comes from getrusage(); whole-machine busy time from /proc/stat.
Output: a human summary on stdout and, with --json-out, one JSON line appended.
"""
import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import socket
import sys
import time
from array import array

perf = time.perf_counter  # CLOCK_MONOTONIC: comparable across processes
PID_BYTES = [i.to_bytes(2, "big") for i in range(65536)]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------- encoding
def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mstr(b):
    if isinstance(b, str):
        b = b.encode()
    return len(b).to_bytes(2, "big") + b


def connect_pkt(client_id, username=None, password=None, keepalive=60):
    flags, payload = 0x02, mstr(client_id)  # clean session
    if username is not None:
        flags |= 0x80
        payload += mstr(username)
    if password is not None:
        flags |= 0x40
        payload += mstr(password)
    body = mstr("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + payload
    return b"\x10" + varint(len(body)) + body


def publish_head(topic, payload_len, qos):
    t = mstr(topic)
    return bytes([0x30 | (qos << 1)]) + varint(len(t) + (2 if qos else 0) + payload_len) + t


def subscribe_pkt(pid, topic_filter, qos=0):
    body = pid.to_bytes(2, "big") + mstr(topic_filter) + bytes([qos])
    return b"\x82" + varint(len(body)) + body


def make_payload(dev_id, size):
    """Realistic JSON telemetry, padded/trimmed to about `size` bytes."""
    d = {"deviceId": dev_id, "ts": "2024-05-01T12:00:00.000Z", "seq": 123456,
         "temperature": 21.53, "humidity": 45.21, "pressure": 1013.25,
         "vib": {"x": 0.012, "y": -0.003, "z": 0.981}, "battery": 3.71, "rssi": -67, "pad": ""}
    s = json.dumps(d, separators=(",", ":"))
    while len(s) > size and len(d) > 2:  # drop fields if a tiny size was asked for
        d.pop(list(d)[-2])
        s = json.dumps(d, separators=(",", ":"))
    d["pad"] = "x" * max(0, size - len(s))
    return json.dumps(d, separators=(",", ":")).encode()


# ------------------------------------------------------------- connection
class Conn(asyncio.Protocol):
    __slots__ = ("tr", "buf", "connack", "done", "pong", "inflight", "lat", "acked",
                 "remaining", "window", "head", "body", "pid", "err", "paused",
                 "resume", "received", "t_last_rx", "last_tx", "lat_on", "refill_at")

    def __init__(self, n_msgs, window, head, body, lat, lat_on=True, refill_at=None):
        self.tr = None
        self.refill_at = window - 1 if refill_at is None else refill_at
        self.buf = b""
        loop = asyncio.get_running_loop()
        self.connack = loop.create_future()
        self.done = loop.create_future()
        self.pong = None
        self.inflight = {}
        self.lat = lat
        self.lat_on = lat_on
        self.acked = 0
        self.remaining = n_msgs
        self.window = window
        self.head, self.body = head, body
        self.pid = 0
        self.err = None
        self.paused = False
        self.resume = None
        self.received = 0  # PUBLISHes received (subscriber)
        self.t_last_rx = 0.0
        self.last_tx = perf()

    def connection_made(self, tr):
        self.tr = tr
        tr.set_write_buffer_limits(high=256 * 1024)

    def connection_lost(self, exc):
        msg = f"connection lost: {exc!r}"
        for f in (self.connack, self.done, self.pong, self.resume):
            if f is not None and not f.done():
                f.set_exception(ConnectionError(msg))
                f.exception()  # awaiters still get it; no "never retrieved" noise otherwise
        if self.remaining or self.inflight:
            self.err = self.err or msg

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.resume is not None and not self.resume.done():
            self.resume.set_result(None)

    def data_received(self, data):
        buf = self.buf + data if self.buf else data
        n, i, now, acks = len(buf), 0, perf(), 0
        inflight, lat = self.inflight, self.lat
        while i + 2 <= n:
            b0 = buf[i]
            if b0 == 0x40:  # PUBACK, remaining length 2
                if i + 4 > n:
                    break
                t = inflight.pop((buf[i + 2] << 8) | buf[i + 3], None)
                if t is not None:
                    acks += 1
                    if self.lat_on:
                        lat.append(now - t)
                i += 4
                continue
            rl, mult, j = 0, 1, i + 1
            while j < n:
                b = buf[j]
                rl += (b & 0x7F) * mult
                mult <<= 7
                j += 1
                if not b & 0x80:
                    break
            else:
                break
            if j + rl > n or (buf[j - 1] & 0x80):
                break
            ptype = b0 >> 4
            if ptype == 3:  # PUBLISH (we are a QoS0 subscriber)
                self.received += 1
                self.t_last_rx = now
                if (b0 >> 1) & 3:  # QoS>0 delivered: ack it
                    tl = (buf[j] << 8) | buf[j + 1]
                    self.tr.write(b"\x40\x02" + buf[j + 2 + tl:j + 4 + tl])
            elif ptype == 2:  # CONNACK
                rc = buf[j + 1]
                if not self.connack.done():
                    if rc == 0:
                        self.connack.set_result(True)
                    else:
                        self.connack.set_exception(ConnectionError(f"CONNACK rc={rc}"))
            elif ptype == 13:  # PINGRESP
                if self.pong is not None and not self.pong.done():
                    self.pong.set_result(now)
            i = j + rl  # SUBACK and anything else: ignored
        self.buf = buf[i:] if i < n else b""
        if acks:
            self.acked += acks
            if len(inflight) <= self.refill_at or not self.remaining:
                self.fill(now)

    def fill(self, now=None):
        inflight = self.inflight
        k = min(self.window - len(inflight), self.remaining)
        if k > 0:
            now = now or perf()
            pid, head, body, parts = self.pid, self.head, self.body, []
            app = parts.append
            for _ in range(k):
                pid = pid + 1 if pid < 65535 else 1
                inflight[pid] = now
                app(head)
                app(PID_BYTES[pid])
                app(body)
            self.pid = pid
            self.remaining -= k
            self.tr.write(b"".join(parts))
            self.last_tx = now
        elif not inflight and self.remaining == 0 and not self.done.done():
            self.done.set_result(now or perf())

    async def ping(self, timeout=60):
        self.pong = asyncio.get_running_loop().create_future()
        self.tr.write(b"\xc0\x00")
        self.last_tx = perf()
        return await asyncio.wait_for(self.pong, timeout)

    async def run_qos0(self, chunk):
        pkt = self.head + self.body
        while self.remaining:
            k = min(chunk, self.remaining)
            self.tr.write(pkt * k)
            self.remaining -= k
            if self.paused:
                self.resume = asyncio.get_running_loop().create_future()
                await self.resume
            else:
                await asyncio.sleep(0)
        self.last_tx = perf()
        return await self.ping(timeout=600)  # fence: broker has read everything


# --------------------------------------------------------------- workers
def creds(args, i):
    dev = f"{args.prefix}{i}"
    if args.cred_lines is not None:
        f = args.cred_lines[i % len(args.cred_lines)].rstrip("\n").split("\t")
        return f[0], (f[1] if len(f) > 1 else None), (f[2] if len(f) > 2 else None)
    fmt = {"i": i, "id": dev, "prefix": args.prefix}
    u = args.username_template.format(**fmt) if args.username_template is not None else None
    p = args.password_template.format(**fmt) if args.password_template is not None else None
    return dev, u, p


async def open_conn(args, i, n_msgs, lat, sem):
    dev, user, pw = creds(args, i)
    payload = make_payload(dev, args.payload_size)
    topic = args.topic_template.format(id=dev, i=i)
    head = publish_head(topic, len(payload), args.qos)
    loop = asyncio.get_running_loop()
    async with sem:
        tr, c = await asyncio.wait_for(loop.create_connection(
            lambda: Conn(n_msgs, args.window, head, payload, lat, not args.no_latency, args.refill_at),
            args.host, args.port, ssl=tls_context(args),
            server_hostname=args.tls_server_name if args.tls else None), args.connect_timeout)
        sock = tr.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tr.write(connect_pkt(dev, user, pw, args.keepalive))
        await asyncio.wait_for(c.connack, args.connect_timeout)
    return c


_TLS = {}


def tls_context(args):
    """None for plain TCP; with --tls a client SSLContext (--ca-file, or --tls-insecure)."""
    if not args.tls:
        return None
    if "ctx" not in _TLS:
        import ssl
        ctx = ssl.create_default_context(cafile=args.ca_file)
        if args.tls_insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        _TLS["ctx"] = ctx
    return _TLS["ctx"]


async def keepalive_task(conns, keepalive):
    if keepalive <= 0:
        return
    while True:
        await asyncio.sleep(keepalive / 4)
        now = perf()
        for c in conns:
            if c.tr and not c.tr.is_closing() and now - c.last_tx > keepalive / 2:
                c.tr.write(b"\xc0\x00")
                c.last_tx = now


def rusage_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def worker_main(args, idx, lo, hi, per_conn, barrier, q):
    lat = array("d")
    sem = asyncio.Semaphore(args.connect_concurrency)
    t_c0 = perf()
    res = {"proc": idx, "conns": hi - lo, "errors": [], "acked": 0, "sent": 0}
    try:
        conns = await asyncio.gather(*[open_conn(args, i, per_conn[i], lat, sem)
                                       for i in range(lo, hi)])
    except Exception as e:  # noqa: BLE001
        res["errors"].append(f"connect: {e!r}")
        barrier.abort()
        q.put(res)
        return
    res["connect_s"] = perf() - t_c0
    ka = asyncio.ensure_future(keepalive_task(conns, args.keepalive))
    await asyncio.get_running_loop().run_in_executor(None, barrier.wait, args.connect_timeout * 4)
    cpu0, t0 = rusage_s(), perf()
    res["t_start"] = t0
    try:
        if args.hold:
            await asyncio.sleep(args.hold)
        elif args.qos == 1:
            for c in conns:
                c.fill(t0)
            await asyncio.wait_for(asyncio.gather(*[c.done for c in conns]), args.timeout)
        else:
            await asyncio.wait_for(asyncio.gather(*[c.run_qos0(args.window) for c in conns]),
                                   args.timeout)
    except Exception as e:  # noqa: BLE001
        res["errors"].append(f"run: {e!r}")
    res["t_end"] = perf()
    res["cpu_s"] = rusage_s() - cpu0
    res["acked"] = sum(c.acked for c in conns)
    res["sent"] = sum(per_conn[i] - c.remaining for i, c in zip(range(lo, hi), conns))
    res["errors"] += [c.err for c in conns if c.err][:5]
    ka.cancel()
    for c in conns:
        if not c.tr.is_closing():
            c.tr.write(b"\xe0\x00")  # DISCONNECT
            c.tr.close()
    await asyncio.sleep(0.05)
    res["lat"] = lat.tobytes()
    q.put(res)


async def sub_main(args, barrier, q):
    res = {"errors": []}
    loop = asyncio.get_running_loop()
    subs = []
    try:
        for k in range(args.sub):
            cid = f"{args.prefix}sub{k}"
            _, user, pw = creds(args, args.conns + k)
            if args.sub_username is not None:
                user = args.sub_username.format(k=k)
            if args.sub_password is not None:
                pw = args.sub_password.format(k=k)
            tr, c = await loop.create_connection(
                lambda: Conn(0, 1, b"", b"", None, False), args.host, args.port,
                ssl=tls_context(args), server_hostname=args.tls_server_name if args.tls else None)
            tr.write(connect_pkt(cid, user, pw, args.keepalive))
            await asyncio.wait_for(c.connack, args.connect_timeout)
            tr.write(subscribe_pkt(1, args.sub_topic, 0))
            subs.append(c)
    except Exception as e:  # noqa: BLE001
        barrier.abort()
        q.put({"errors": [f"subscriber connect: {e!r}"]})
        return
    await asyncio.sleep(0.3)  # let SUBACK arrive
    await loop.run_in_executor(None, barrier.wait, args.connect_timeout * 4)
    t0, cpu0 = perf(), rusage_s()
    expected = args.msgs if args.sub_topic.endswith("#") or "+" in args.sub_topic else None
    last, still = -1, 0
    while True:  # stop when counts stop growing for 2 s (or all expected arrived)
        await asyncio.sleep(0.25)
        tot = sum(c.received for c in subs)
        if expected and tot >= expected * args.sub:
            break
        still = still + 1 if tot == last else 0
        last = tot
        if (still >= 8 and tot > 0) or perf() - t0 > args.timeout:
            break
    res.update(t_start=t0, received=sum(c.received for c in subs), cpu_s=rusage_s() - cpu0,
               t_last=max(c.t_last_rx for c in subs))
    for c in subs:
        c.tr.close()
    q.put(res)


def run_worker(args, idx, lo, hi, per_conn, barrier, q):
    if args.uvloop:
        import uvloop
        uvloop.install()
    asyncio.run(worker_main(args, idx, lo, hi, per_conn, barrier, q))


def run_sub(args, barrier, q):
    if args.uvloop:
        import uvloop
        uvloop.install()
    asyncio.run(sub_main(args, barrier, q))


# ------------------------------------------------------------- /proc utils
def proc_cpu_s(pid, split=False):
    with open(f"/proc/{pid}/stat") as f:
        st = f.read().rsplit(")", 1)[1].split()
    if split:  # (user, system) seconds
        return int(st[11]) / CLK_TCK, int(st[12]) / CLK_TCK
    return (int(st[11]) + int(st[12])) / CLK_TCK  # utime + stime (fields 14, 15)


def proc_rss(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def sys_ticks():
    """Aggregate /proc/stat cpu line: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def sys_breakdown(v0, v1):
    d = [b - a for a, b in zip(v0, v1)]
    tot = sum(d) or 1
    scale = 100.0 * os.cpu_count() / tot  # percent of one core; max = 100 * ncpu
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    out = {f"sys_{n}_pct": round(x * scale, 1) for n, x in zip(names, d)}
    out["system_busy_pct"] = round((tot - d[3] - d[4]) * scale, 1)
    return out


def all_procs_cpu():
    """pid -> (ppid, utime+stime seconds) for every live process on the machine."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read().rsplit(")", 1)[1].split()
                out[int(d)] = (int(st[1]), (int(st[11]) + int(st[12])) / CLK_TCK)
            except (OSError, IndexError, ValueError):
                pass
    return out


def others_cpu(a, b, exclude):
    """CPU seconds used between snapshots a and b by processes not in `exclude`
    (user processes, and kernel threads separately) - to detect interference."""
    user = kth = 0.0
    for pid, (ppid, t) in b.items():
        if pid in exclude:
            continue
        d = t - a[pid][1] if pid in a else t
        if ppid == 2 or pid == 2:
            kth += d
        else:
            user += d
    return user, kth


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100 * len(sorted_vals))) - 1))
    return sorted_vals[k]


# ------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--conns", type=int, default=100, help="total connections")
    ap.add_argument("--procs", type=int, default=2, help="worker processes")
    ap.add_argument("--msgs", type=int, default=100000, help="total messages")
    ap.add_argument("--qos", type=int, choices=(0, 1), default=1)
    ap.add_argument("--window", type=int, default=100, help="QoS1 in-flight per conn (QoS0: burst size)")
    ap.add_argument("--refill-at", type=int, default=None,
                    help="QoS1: top the window up only when in-flight <= this (default window-1, i.e. on every ack)")
    ap.add_argument("--payload-size", type=int, default=200)
    ap.add_argument("--prefix", default="dev-", help="device id prefix; device id = prefix + index")
    ap.add_argument("--topic-template", default="devices/{id}/messages/events/")
    ap.add_argument("--username-template", default=None,
                    help="e.g. 'myhub.local/{id}/?api-version=2021-04-12'; {i},{id},{prefix} substituted")
    ap.add_argument("--password-template", default=None, help="e.g. a SAS token; {i},{id} substituted")
    ap.add_argument("--cred-file", default=None,
                    help="TSV lines 'client_id<TAB>username<TAB>password', line i -> connection i")
    ap.add_argument("--tls", action="store_true", help="MQTT over TLS (e.g. port 8883)")
    ap.add_argument("--ca-file", default=None, help="CA bundle to verify the server (with --tls)")
    ap.add_argument("--tls-insecure", action="store_true", help="do not verify the server certificate")
    ap.add_argument("--tls-server-name", default=None, help="name to verify in the certificate (default: --host)")
    ap.add_argument("--keepalive", type=int, default=60)
    ap.add_argument("--connect-concurrency", type=int, default=64, help="per process")
    ap.add_argument("--connect-timeout", type=float, default=60)
    ap.add_argument("--timeout", type=float, default=600, help="max seconds for the publish phase")
    ap.add_argument("--hold", type=float, default=0, help="idle-connection mode: hold N seconds, no publishes")
    ap.add_argument("--sub", type=int, default=0, help="subscriber connections counting deliveries")
    ap.add_argument("--sub-topic", default="devices/+/messages/events/#")
    ap.add_argument("--sub-username", default=None, help="subscriber username ({k} = subscriber index); "
                    "default: the publisher templates with index conns+k")
    ap.add_argument("--sub-password", default=None)
    ap.add_argument("--broker-pid", type=int, default=None, help="read broker CPU/RSS from /proc")
    ap.add_argument("--no-uvloop", dest="uvloop", action="store_false", help="generator uses plain asyncio")
    ap.add_argument("--no-latency", action="store_true", help="do not record latencies")
    ap.add_argument("--label", default="")
    ap.add_argument("--json-out", default=None, help="append one JSON result line to this file")
    args = ap.parse_args()
    if args.uvloop:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            args.uvloop = False
    args.cred_lines = None
    if args.cred_file:
        with open(args.cred_file) as f:
            args.cred_lines = [ln for ln in f if ln.strip() and not ln.startswith("#")]
    if args.hold:
        args.msgs = 0
    lim = args.conns // args.procs + 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < lim:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(lim, soft)), hard))

    procs = min(args.procs, args.conns)
    per_conn = [args.msgs // args.conns + (1 if i < args.msgs % args.conns else 0)
                for i in range(args.conns)]
    bounds = [(p * args.conns // procs, (p + 1) * args.conns // procs) for p in range(procs)]
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(procs + 1 + (1 if args.sub else 0))
    q, sq = ctx.Queue(), ctx.Queue()
    bpid = args.broker_pid
    rss_base = proc_rss(bpid) if bpid else None
    ps = [ctx.Process(target=run_worker, args=(args, k, lo, hi, per_conn, barrier, q), daemon=True)
          for k, (lo, hi) in enumerate(bounds)]
    if args.sub:
        ps.append(ctx.Process(target=run_sub, args=(args, barrier, sq), daemon=True))
    t_launch = perf()
    for p in ps:
        p.start()
    try:
        barrier.wait(args.connect_timeout * 4)
    except Exception:  # noqa: BLE001
        errs = []
        for qq, n in ((q, procs), (sq, 1 if args.sub else 0)):
            for _ in range(n):
                try:
                    errs += qq.get(timeout=5).get("errors", [])
                except Exception:  # noqa: BLE001
                    break
        print("connect phase failed:", errs[:5], file=sys.stderr)
        for p in ps:
            p.kill()
        sys.exit(2)
    t0 = perf()
    connect_wall = t0 - t_launch
    b_cpu0 = proc_cpu_s(bpid) if bpid else None
    b_us0 = proc_cpu_s(bpid, True) if bpid else None
    sv0 = sys_ticks()
    ap0 = all_procs_cpu()
    rss_conn, b_cpu1 = None, None
    if args.hold and bpid:
        time.sleep(min(2.0, args.hold / 2))
        rss_conn = proc_rss(bpid)
    results = []
    for _ in range(procs):
        results.append(q.get(timeout=args.timeout + args.hold + 120))
    t1 = perf()
    b_cpu1 = proc_cpu_s(bpid) if bpid else None
    b_us1 = proc_cpu_s(bpid, True) if bpid else None
    rss_end = proc_rss(bpid) if bpid else None
    sv1 = sys_ticks()
    ap1 = all_procs_cpu()
    sub_res = sq.get(timeout=args.timeout + 60) if args.sub else None
    for p in ps:
        p.join(timeout=30)

    errors = [e for r in results for e in r["errors"]]
    acked = sum(r["acked"] for r in results)
    sent = sum(r["sent"] for r in results)
    ts = min((r["t_start"] for r in results if "t_start" in r), default=t0)
    te = max(r.get("t_end", t1) for r in results)
    wall = te - ts
    lats = array("d")
    for r in results:
        lats.frombytes(r.get("lat", b""))
    lat_sorted = sorted(lats)
    gen_cpu = sum(r.get("cpu_s", 0) for r in results)
    out = {
        "label": args.label, "host": args.host, "port": args.port, "qos": args.qos,
        "conns": args.conns, "procs": procs, "msgs": args.msgs, "window": args.window,
        "payload": args.payload_size, "gen_uvloop": args.uvloop, "hold_s": args.hold,
        "connect_wall_s": round(connect_wall, 3),
        "connects_per_s": round(args.conns / connect_wall, 1) if connect_wall > 0 else None,  # incl. worker start-up
        "connect_phase_s": round(max((r.get("connect_s") or 0) for r in results), 3),  # inside workers
        "wall_s": round(wall, 3), "sent": sent, "acked": acked,
        "msgs_per_s": round((acked if args.qos == 1 else sent) / wall, 1) if wall > 0 and not args.hold else None,
        "lat_p50_ms": round(pct(lat_sorted, 50) * 1e3, 3) if lat_sorted else None,
        "lat_p99_ms": round(pct(lat_sorted, 99) * 1e3, 3) if lat_sorted else None,
        "lat_max_ms": round(lat_sorted[-1] * 1e3, 3) if lat_sorted else None,
        "gen_cpu_pct": round(100 * gen_cpu / wall, 1) if wall > 0 else None,
        "broker_cpu_pct": round(100 * (b_cpu1 - b_cpu0) / (t1 - t0), 1) if bpid else None,
        "broker_user_pct": round(100 * (b_us1[0] - b_us0[0]) / (t1 - t0), 1) if bpid else None,
        "broker_sys_pct": round(100 * (b_us1[1] - b_us0[1]) / (t1 - t0), 1) if bpid else None,
        "broker_cpu_us_per_msg": round(1e6 * (b_cpu1 - b_cpu0) / (acked if args.qos == 1 else sent), 2)
        if bpid and not args.hold and (acked or sent) else None,
        "gen_cpu_us_per_msg": round(1e6 * gen_cpu / (acked if args.qos == 1 else sent), 2)
        if not args.hold and (acked or sent) else None,
        "ncpu": os.cpu_count(),
        "broker_rss_base_mb": round(rss_base / 2**20, 2) if rss_base else None,
        "broker_rss_end_mb": round(rss_end / 2**20, 2) if rss_end else None,
        "errors": errors[:10],
    }
    out.update(sys_breakdown(sv0, sv1))
    excl = {os.getpid(), *(p.pid for p in ps)} | ({bpid} if bpid else set())
    o_user, o_kth = others_cpu(ap0, ap1, excl)
    out["others_cpu_pct"] = round(100 * o_user / (t1 - t0), 1)  # live processes of other jobs
    out["kthreads_cpu_pct"] = round(100 * o_kth / (t1 - t0), 1)
    sub_cpu = 100 * sub_res["cpu_s"] / (t1 - t0) if sub_res else 0.0
    if sub_res:
        out["sub_cpu_pct"] = round(sub_cpu, 1)
    # machine busy time not used by broker/loadgen: interference (incl. short-lived processes)
    out["unattributed_cpu_pct"] = round(out["system_busy_pct"] - (out["broker_cpu_pct"] or 0)
                                        - 100 * gen_cpu / (t1 - t0) - sub_cpu, 1)
    if args.hold and bpid and rss_conn:
        out["broker_rss_connected_mb"] = round(rss_conn / 2**20, 2)
        out["broker_rss_per_conn_kb"] = round((rss_conn - rss_base) / args.conns / 1024, 2)
    if sub_res:
        sw = sub_res["t_last"] - ts if sub_res["t_last"] else None
        out["sub_received"] = sub_res["received"]
        out["sub_msgs_per_s"] = round(sub_res["received"] / sw, 1) if sw else None
        out["sub_delivery_ratio"] = round(sub_res["received"] / max(1, sent * args.sub), 4)
    print(json.dumps(out, indent=None))
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(out) + "\n")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
