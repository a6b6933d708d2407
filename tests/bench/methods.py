#!/usr/bin/env python3
"""Direct-method round trips and twin reported patches: our hub against Debian's Mosquitto.

One run, same machine, same client code (the hub's own MQTT codec over asyncio streams, TLS
everywhere, 127.0.0.1 only). Mosquitto gets the hub's server certificate.

1. Direct methods (IoT Hub ref §5). ``--devices`` devices connect over MQTT/TLS, subscribe to
   ``$iothub/methods/POST/#`` and answer every request at once on
   ``$iothub/methods/res/200/?$rid={rid}``, echoing the payload. A back end invokes
   ``POST /twins/{id}/methods`` over HTTPS (iothubowner SAS token, ``--concurrency`` keep-alive
   connections; by default a minimal HTTP/1.1 client, as lean as the Mosquitto back end's raw
   MQTT one, ``--http-client aiohttp`` for aiohttp's) with ``--concurrency`` calls outstanding until ``--calls`` calls completed, round-robin over the
   devices. Peer: the same devices on Mosquitto, subscribed to ``req/{device}/#`` and answering
   on ``res/{device}/{rid}``; the back end is one MQTT connection publishing QoS 0 requests
   with the same concurrency and waiting for each response.
2. Twin reported patches (IoT Hub ref §4.1). Each device publishes
   ``$iothub/twin/PATCH/properties/reported/?$rid={n}`` (QoS 0) with ``{"temperature": x,
   "seq": n}``, keeping ``--window`` outstanding, until ``--patches`` patches got their answer
   on ``$iothub/twin/res/204/...``. The hub answers only after the twin is committed to SQLite
   (``--sync full``: fsynced). Peer: each device publishes ``twinreq/{device}/{rid}`` to a
   responder client that answers on ``twinres/{device}/{rid}`` (the broker-only part of the
   pattern, without durable storage).

Every phase starts with an untimed warm-up (``2 x concurrency`` calls, resp. one window per
device) so connection set-up is not in the figures. Broker CPU comes from /proc/<pid>/stat
(all threads, 10 ms ticks: coarse for the short Mosquitto phases); client CPU is this
process's getrusage. Broker and client share the machine's cores, so a client near one core
of CPU caps the rate: then the ratio flatters the slower side. Every phase is bounded by
``--phase-timeout`` (warm-ups by 10 s); what did not finish counts as an error.

    python tests/bench/methods.py
    python tests/bench/methods.py --calls 5000 --patches 5000 --json-out bench.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import resource
import shutil
import ssl
import sys
import tempfile
import time
from array import array
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import aiohttp

from gateway.hub.connstr import parse_connection_string
from gateway.hub.sas import generate_sas_token
from gateway.mqtt.codec import Decoder, encode
from gateway.mqtt.packets import Connack, Connect, Publish, Suback, Subscribe
from tests.bench.peers import start_mosquitto, tls_files
from tests.hubproc import HubProcess

API_VERSION = "2021-04-12"
HOST = "127.0.0.1"
SERVER_NAME = "localhost"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KEEPALIVE = 900  # s; longer than any bounded run, so no PINGREQ is ever needed
perf = time.perf_counter


Load = Callable[["Tally"], Coroutine[Any, Any, None]]
"""One phase's load: runs until cancelled (or done), reporting each operation to the tally."""


# -- measurement --------------------------------------------------------------------------------

def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads) in seconds (proc(5), fields 14-15)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass(frozen=True, slots=True)
class Result:
    """One measured phase against one broker."""

    ops: int  # completed successfully
    errors: int  # failed, wrong answer, or never answered before the phase deadline
    seconds: float
    per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    broker_cpu_us: float  # per successful op
    client_cpu_us: float  # per successful op (this process: back end and devices)
    reasons: tuple[str, ...] = ()  # the first few failures


class Tally:
    """Latencies and errors of one phase; ``done`` is set once ``total`` ops have ended."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.lat = array("d")
        self.errors = 0
        self.reasons: list[str] = []  # the first few failures, for the report
        self.done = asyncio.Event()

    def ok(self, seconds: float) -> None:
        self.lat.append(seconds)
        self._check()

    def fail(self, reason: str) -> None:
        self.errors += 1
        if len(self.reasons) < 3:
            self.reasons.append(reason)
        self._check()

    def _check(self) -> None:
        if len(self.lat) + self.errors >= self.total:
            self.done.set()


def quantile_ms(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of sorted seconds, in ms (0 for no samples)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1000


async def measure(pid: int, total: int, timeout: float, run: Load) -> Result:
    """Run one timed phase; whatever has not ended after ``timeout`` counts as an error."""
    tally = Tally(total)
    cpu0, mine0, t0 = proc_cpu(pid), self_cpu(), perf()
    task = asyncio.create_task(run(tally))
    try:
        await asyncio.wait_for(tally.done.wait(), timeout)
    except TimeoutError:
        pass
    elapsed = perf() - t0
    cpu, mine = proc_cpu(pid) - cpu0, self_cpu() - mine0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    ops = len(tally.lat)
    errors = total - ops
    if errors > tally.errors:
        tally.reasons.append(f"{errors - tally.errors} not answered within {timeout:g} s")
    ordered = sorted(tally.lat)
    per = max(ops, 1)
    return Result(ops=ops, errors=errors, seconds=elapsed, per_s=ops / elapsed,
                  p50_ms=quantile_ms(ordered, 0.50), p99_ms=quantile_ms(ordered, 0.99),
                  max_ms=ordered[-1] * 1000 if ordered else 0.0,
                  broker_cpu_us=cpu / per * 1e6, client_cpu_us=mine / per * 1e6,
                  reasons=tuple(tally.reasons))


# -- a raw MQTT 3.1.1 client on the hub's codec -------------------------------------------------

Handler = Callable[["Conn", Publish], None]


class Conn:
    """One MQTT connection. Incoming PUBLISHes go to ``handler`` (set per phase); outgoing
    bytes are gathered and written once per event-loop turn (fewer TLS records)."""

    def __init__(self, name: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.name = name
        self.handler: Handler = lambda conn, packet: None
        self._reader = reader
        self._writer = writer
        self._decoder = Decoder()
        self._out: list[bytes] = []
        self._subacks: dict[int, asyncio.Future[Suback]] = {}
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext, client_id: str,
                   username: str | None = None, password: str | None = None) -> Conn:
        reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx,
                                                       server_hostname=SERVER_NAME)
        conn = cls(client_id, reader, writer)
        writer.write(encode(Connect(client_id=client_id, clean_session=True, keepalive=KEEPALIVE,
                                    username=username,
                                    password=password.encode() if password else None)))
        packets: list[Any] = []
        for _ in range(10):  # a CONNACK is 4 bytes; a few reads at most
            data = await reader.read(4096)
            if not data:
                break
            packets = conn._decoder.feed(data)
            if packets:
                break
        if not packets or not isinstance(packets[0], Connack) or packets[0].return_code != 0:
            writer.close()
            raise SystemExit(f"{client_id}: CONNECT refused: {packets[:1]}")
        conn._task = asyncio.create_task(conn._read_loop())
        return conn

    def send(self, data: bytes) -> None:
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        if self._out and not self._writer.is_closing():
            self._writer.write(b"".join(self._out))
        self._out.clear()

    async def subscribe(self, *filters: str) -> None:
        packet_id = len(self._subacks) + 1
        future: asyncio.Future[Suback] = asyncio.get_running_loop().create_future()
        self._subacks[packet_id] = future
        self.send(encode(Subscribe(packet_id=packet_id, topics=tuple((f, 0) for f in filters))))
        suback = await asyncio.wait_for(future, 10)
        if any(code > 2 for code in suback.return_codes):
            raise SystemExit(f"{self.name}: SUBSCRIBE {filters} refused: {suback.return_codes}")

    async def _read_loop(self) -> None:
        while True:
            data = await self._reader.read(65536)
            if not data:
                return
            for packet in self._decoder.feed(data):
                if type(packet) is Publish:
                    self.handler(self, packet)
                elif isinstance(packet, Suback):
                    future = self._subacks.get(packet.packet_id)
                    if future is not None and not future.done():
                        future.set_result(packet)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 2)
        except (OSError, TimeoutError, ssl.SSLError):
            pass


async def open_all(make: Callable[[int], Awaitable[Conn]], count: int) -> list[Conn]:
    """Open ``count`` connections, at most 20 handshakes at a time, within 60 s."""
    gate = asyncio.Semaphore(20)

    async def one(i: int) -> Conn:
        async with gate:
            return await make(i)

    return list(await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), 60))


def query_param(topic: str, name: str) -> str:
    """A parameter of a topic's ``?a=1&b=2`` query part ('' if absent)."""
    query = topic.partition("?")[2]
    for item in query.split("&"):
        key, _, value = item.partition("=")
        if key == name:
            return value
    return ""


# -- phase 1: direct methods --------------------------------------------------------------------

def method_body(i: int) -> dict[str, Any]:
    return {"seq": i, "text": "ping"}


def hub_method_responder(conn: Conn, packet: Publish) -> None:
    """Answer ``$iothub/methods/POST/{name}/?$rid={rid}`` at once, echoing the payload."""
    if packet.topic.startswith("$iothub/methods/POST/"):
        rid = query_param(packet.topic, "$rid")
        conn.send(encode(Publish(topic=f"$iothub/methods/res/200/?$rid={rid}",
                                 payload=packet.payload)))


def hub_method_load(session: aiohttp.ClientSession, api_port: int, token: str,
                    device_ids: list[str], start: int, count: int,
                    concurrency: int) -> Load:
    """``count`` invocations (call numbers start.. start+count-1), ``concurrency`` at a time."""
    headers = {"Authorization": token, "Content-Type": "application/json; charset=utf-8"}
    urls = [f"https://{HOST}:{api_port}/twins/{d}/methods?api-version={API_VERSION}"
            for d in device_ids]

    async def worker(tally: Tally, calls: Any) -> None:
        for i in calls:
            payload = method_body(i)
            body = json.dumps({"methodName": "echo", "payload": payload,
                               "responseTimeoutInSeconds": 10}).encode()
            t0 = perf()
            try:
                async with session.post(urls[i % len(urls)], data=body, headers=headers,
                                        server_hostname=SERVER_NAME) as resp:
                    text = await resp.read()
                    good = resp.status == 200 and \
                        json.loads(text) == {"status": 200, "payload": payload}
                    reason = f"HTTP {resp.status}: {text[:200]!r}"
            except (aiohttp.ClientError, ValueError, TimeoutError) as exc:
                good, reason = False, repr(exc)
            if good:
                tally.ok(perf() - t0)
            else:
                tally.fail(reason)

    async def run(tally: Tally) -> None:
        calls = iter(range(start, start + count))  # shared: each call taken once
        await asyncio.gather(*(worker(tally, calls) for _ in range(concurrency)))

    return run


class RawHttps:
    """One keep-alive HTTPS connection speaking just enough HTTP/1.1 for the invocation (a
    fixed request head, Content-Length bodies): the back end's own CPU per call is then of
    the order of the Mosquitto back end's raw MQTT client, so the client does not cap the
    hub's rate (``--http-client aiohttp`` measures with aiohttp's client instead)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext) -> RawHttps:
        reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx,
                                                       server_hostname=SERVER_NAME)
        return cls(reader, writer)

    async def post(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        self.writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (OSError, TimeoutError, ssl.SSLError):
            pass


def raw_method_load(conns: list[RawHttps], token: str, device_ids: list[str], start: int,
                    count: int) -> Load:
    """As :func:`hub_method_load`, one call outstanding per connection of ``conns``."""
    heads = [(f"POST /twins/{d}/methods?api-version={API_VERSION} HTTP/1.1\r\n"
              f"Host: {SERVER_NAME}\r\nAuthorization: {token}\r\n"
              "Content-Type: application/json; charset=utf-8\r\n").encode()
             for d in device_ids]

    async def worker(tally: Tally, conn: RawHttps, calls: Any) -> None:
        for i in calls:
            payload = method_body(i)
            body = json.dumps({"methodName": "echo", "payload": payload,
                               "responseTimeoutInSeconds": 10}).encode()
            t0 = perf()
            try:
                status, text = await conn.post(heads[i % len(heads)], body)
                good = status == 200 and json.loads(text) == {"status": 200, "payload": payload}
                reason = f"HTTP {status}: {text[:200]!r}"
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                good, reason = False, repr(exc)
            if good:
                tally.ok(perf() - t0)
            else:
                tally.fail(reason)

    async def run(tally: Tally) -> None:
        calls = iter(range(start, start + count))
        await asyncio.gather(*(worker(tally, conn, calls) for conn in conns))

    return run


def mosquitto_method_responder(conn: Conn, packet: Publish) -> None:
    """``req/{device}/{rid}`` -> ``res/{device}/{rid}``, echoing the payload."""
    if packet.topic.startswith("req/"):
        conn.send(encode(Publish(topic="res/" + packet.topic[4:], payload=packet.payload)))


def mosquitto_method_load(backend: Conn, device_ids: list[str], start: int, count: int,
                          concurrency: int) -> Load:
    pending: dict[str, asyncio.Future[bytes]] = {}

    def on_response(conn: Conn, packet: Publish) -> None:
        future = pending.pop(packet.topic.rpartition("/")[2], None)
        if future is not None and not future.done():
            future.set_result(packet.payload)

    backend.handler = on_response

    async def worker(tally: Tally, calls: Any) -> None:
        loop = asyncio.get_running_loop()
        for i in calls:
            payload = method_body(i)
            rid = str(i)
            future: asyncio.Future[bytes] = loop.create_future()
            pending[rid] = future
            t0 = perf()
            backend.send(encode(Publish(topic=f"req/{device_ids[i % len(device_ids)]}/{rid}",
                                        payload=json.dumps(payload).encode())))
            try:
                answer = await asyncio.wait_for(future, 10)
                good, reason = json.loads(answer) == payload, f"wrong echo {answer[:200]!r}"
            except (ValueError, TimeoutError) as exc:
                pending.pop(rid, None)
                good, reason = False, repr(exc)
            if good:
                tally.ok(perf() - t0)
            else:
                tally.fail(reason)

    async def run(tally: Tally) -> None:
        calls = iter(range(start, start + count))
        await asyncio.gather(*(worker(tally, calls) for _ in range(concurrency)))

    return run


# -- phase 2: twin reported patches -------------------------------------------------------------

class PatchLoad:
    """Each device keeps ``window`` patches outstanding until ``total`` were sent; every answer
    releases the next one. ``request_topic(device_index, rid)`` names the request; the device's
    handler calls :meth:`answered` with the rid and the status (204 is success)."""

    def __init__(self, conns: list[Conn], request_topic: Callable[[int, str], str],
                 start: int, total: int, window: int) -> None:
        self.conns = conns
        self.request_topic = request_topic
        self.next = start
        self.end = start + total
        self.window = window
        self.sent: dict[str, tuple[float, int]] = {}  # rid -> (send time, device index)
        self.tally: Tally | None = None

    def _send(self, device: int) -> None:
        if self.next >= self.end:
            return
        n = self.next
        self.next += 1
        rid = str(n)
        body = json.dumps({"temperature": 20.0 + (n % 100) / 10, "seq": n}).encode()
        self.sent[rid] = (perf(), device)
        self.conns[device].send(encode(Publish(topic=self.request_topic(device, rid),
                                               payload=body)))

    def answered(self, rid: str, status: str) -> None:
        entry = self.sent.pop(rid, None)
        if entry is None or self.tally is None:
            return
        if status == "204":
            self.tally.ok(perf() - entry[0])
        else:
            self.tally.fail(f"status {status} for rid {rid}")
        self._send(entry[1])

    async def run(self, tally: Tally) -> None:
        self.tally = tally
        for device in range(len(self.conns)):
            for _ in range(self.window):
                self._send(device)
        await asyncio.Event().wait()  # answers drive the load; measure() cancels this


def hub_twin_handler(load: PatchLoad) -> Handler:
    """Answers arrive on ``$iothub/twin/res/{status}/?$rid={rid}&$version={v}``; method requests
    are still answered."""
    prefix = "$iothub/twin/res/"

    def handle(conn: Conn, packet: Publish) -> None:
        topic = packet.topic
        if topic.startswith(prefix):
            status = topic[len(prefix):topic.index("/", len(prefix))]
            load.answered(query_param(topic, "$rid"), status)
        else:
            hub_method_responder(conn, packet)

    return handle


def mosquitto_twin_handler(load: PatchLoad) -> Handler:
    def handle(conn: Conn, packet: Publish) -> None:
        if packet.topic.startswith("twinres/"):
            load.answered(packet.topic.rpartition("/")[2], "204")
        else:
            mosquitto_method_responder(conn, packet)

    return handle


def twin_responder(conn: Conn, packet: Publish) -> None:
    """``twinreq/{device}/{rid}`` -> empty ``twinres/{device}/{rid}`` (Mosquitto peer)."""
    if packet.topic.startswith("twinreq/"):
        conn.send(encode(Publish(topic="twinres/" + packet.topic[8:], payload=b"")))


# -- the run ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Setup:
    hub: HubProcess
    device_ids: list[str]
    tokens: list[str]  # device SAS tokens, same order
    owner_token: str
    ctx: ssl.SSLContext
    mosq_pid: int
    mosq_port: int


async def bench(setup: Setup, args: argparse.Namespace) -> dict[str, dict[str, Result]]:
    hub, ids, ctx = setup.hub, setup.device_ids, setup.ctx
    host = hub.host_name
    tls_port, api_port = hub.port("mqtt_tls_port"), hub.port("api_port")
    n, c, d = args.calls, args.concurrency, len(ids)
    warm = min(2 * c, n)
    timeout = args.phase_timeout
    warm_timeout = 10.0
    results: dict[str, dict[str, Result]] = {"methods": {}, "twin": {}}

    # Mosquitto: devices, a back end, a twin responder.
    async def mosq_device(i: int) -> Conn:
        conn = await Conn.open(setup.mosq_port, ctx, ids[i])
        await conn.subscribe(f"req/{ids[i]}/#", f"twinres/{ids[i]}/#")
        conn.handler = mosquitto_method_responder
        return conn

    mdevs = await open_all(mosq_device, d)
    backend, responder = await open_all(
        lambda i: Conn.open(setup.mosq_port, ctx, ("backend", "twin-responder")[i]), 2)
    await backend.subscribe("res/#")
    await responder.subscribe("twinreq/#")
    responder.handler = twin_responder

    # Hub: devices over MQTT/TLS, the back end over HTTPS.
    async def hub_device(i: int) -> Conn:
        conn = await Conn.open(tls_port, ctx, ids[i], f"{host}/{ids[i]}/?api-version={API_VERSION}",
                               setup.tokens[i])
        await conn.subscribe("$iothub/methods/POST/#", "$iothub/twin/res/#")
        conn.handler = hub_method_responder
        return conn

    hdevs = await open_all(hub_device, d)
    gc.collect()
    gc.freeze()  # set-up objects out of the collector's way: its pauses would land in the tails
    connector = aiohttp.TCPConnector(limit=c, ssl=ctx)
    session = aiohttp.ClientSession(connector=connector,
                                    timeout=aiohttp.ClientTimeout(total=20))
    raw: list[RawHttps] = []
    if args.http_client == "raw":
        raw = await open_all(lambda i: RawHttps.open(api_port, ctx), c)  # type: ignore[arg-type,return-value]

    def hub_load(start: int, count: int) -> Load:
        if raw:
            return raw_method_load(raw, setup.owner_token, ids, start, count)
        return hub_method_load(session, api_port, setup.owner_token, ids, start, count, c)

    try:
        await measure(setup.mosq_pid, warm, warm_timeout,
                      mosquitto_method_load(backend, ids, 0, warm, c))
        results["methods"]["mosquitto"] = await measure(
            setup.mosq_pid, n, timeout, mosquitto_method_load(backend, ids, warm, n, c))
        await measure(hub.pid, warm, warm_timeout, hub_load(0, warm))
        results["methods"]["hub"] = await measure(hub.pid, n, timeout, hub_load(warm, n))

        m, w = args.patches, args.window
        for label, conns, pid, topic, handler in (
            ("mosquitto", mdevs, setup.mosq_pid,
             lambda i, rid: f"twinreq/{ids[i]}/{rid}", mosquitto_twin_handler),
            ("hub", hdevs, hub.pid,
             lambda i, rid: f"$iothub/twin/PATCH/properties/reported/?$rid={rid}",
             hub_twin_handler),
        ):
            for start, total in ((0, d * w), (d * w, m)):  # warm-up, then the measured run
                load = PatchLoad(conns, topic, start, total, w)
                for conn in conns:
                    conn.handler = handler(load)
                result = await measure(pid, total, timeout if start else warm_timeout,
                                       load.run)
            results["twin"][label] = result
    finally:
        await session.close()
        await asyncio.gather(*(conn.close() for conn in raw))
        await asyncio.gather(*(conn.close() for conn in [*mdevs, backend, responder, *hdevs]))
    return results


def register(hub: HubProcess, count: int) -> tuple[list[str], list[str], str]:
    """Create the devices through the service API; device SAS tokens and the owner token."""
    from gateway.hubclient import HubClient

    client = HubClient(hub.data_dir)
    expiry = int(time.time()) + 3600
    ids, tokens = [], []
    for i in range(count):
        device_id = f"dev-{i}"
        device = client.request("PUT", f"/devices/{device_id}",
                                {"deviceId": device_id, "authentication": {"type": "sas"}})
        key = device["authentication"]["symmetricKey"]["primaryKey"]
        ids.append(device_id)
        tokens.append(generate_sas_token(f"{hub.host_name}/devices/{device_id}", key, expiry))
    owner = parse_connection_string((hub.data_dir / "owner.connstr").read_text().strip())
    assert owner.shared_access_key and owner.shared_access_key_name
    owner_token = generate_sas_token(hub.host_name, owner.shared_access_key, expiry,
                                     owner.shared_access_key_name)
    return ids, tokens, owner_token


def run_loop(coro: Awaitable[Any]) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--calls", type=int, default=20_000, help="direct-method calls (N)")
    ap.add_argument("--concurrency", type=int, default=64, help="calls outstanding (C)")
    ap.add_argument("--patches", type=int, default=20_000, help="reported patches (M)")
    ap.add_argument("--window", type=int, default=8, help="patches outstanding per device (W)")
    ap.add_argument("--sync", choices=["full", "normal"], default="full",
                    help="the hub's store sync (twin commits)")
    ap.add_argument("--phase-timeout", type=float, default=30.0,
                    help="seconds per measured phase; unfinished operations count as errors")
    ap.add_argument("--http-client", choices=["raw", "aiohttp"], default="raw",
                    help="the hub's HTTPS back end: a minimal keep-alive client (default) or "
                         "aiohttp's (its own CPU per call then caps the rate on 2 cores)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    if min(args.devices, args.calls, args.concurrency, args.patches, args.window) < 1:
        raise SystemExit("counts must be positive")
    t_start = perf()
    tmp = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    mosq_dir = Path(tempfile.mkdtemp(prefix="bench-methods-mosquitto-"))  # not under tmp (0700)
    hub = HubProcess(tmp / "hub", host_name="bench.local",
                     extra_config=f'[store]\nsync = "{args.sync}"\n', log_level="info")
    mosq = None
    try:
        hub.start()
        ids, tokens, owner_token = register(hub, args.devices)
        mosq, mport = start_mosquitto(tmp, tls_files(hub.data_dir, mosq_dir))
        ctx = ssl.create_default_context(cafile=hub.ca_file)
        setup = Setup(hub, ids, tokens, owner_token, ctx, mosq.pid, mport)
        results = run_loop(bench(setup, args))
    finally:
        if mosq is not None:
            mosq.terminate()
            mosq.wait(10)
        hub.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(mosq_dir, ignore_errors=True)
    report(args, results, perf() - t_start)


def report(args: argparse.Namespace, results: dict[str, dict[str, Result]],
           wall: float) -> None:
    ratios: dict[str, dict[str, float]] = {}
    print(f"direct methods: {args.devices} devices, {args.calls} calls, {args.concurrency} "
          f"outstanding (hub: HTTPS back end, {args.http_client} client; mosquitto: one MQTT "
          f"back end); "
          f"twin reported patches: {args.patches}, {args.window} outstanding per device, "
          f"hub sync={args.sync}, hub log level info; MQTT over TLS, QoS 0")
    print(f"{'':18} {'ops/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'broker us/op':>12} {'client us/op':>12} {'errors':>6}")
    for phase, name in (("methods", "method"), ("twin", "patch")):
        for label in ("mosquitto", "hub"):
            r = results[phase][label]
            print(f"{name + ' ' + label:18} {r.per_s:>8,.0f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} "
                  f"{r.max_ms:>7.1f} {r.broker_cpu_us:>12.1f} {r.client_cpu_us:>12.1f} "
                  f"{r.errors:>6}")
        hub_r, mosq_r = results[phase]["hub"], results[phase]["mosquitto"]
        ratios[phase] = {
            "rate": hub_r.per_s / mosq_r.per_s if mosq_r.per_s else 0.0,
            "p99": hub_r.p99_ms / mosq_r.p99_ms if mosq_r.p99_ms else 0.0,
            "cpu": hub_r.broker_cpu_us / mosq_r.broker_cpu_us if mosq_r.broker_cpu_us else 0.0,
        }
        for label in ("mosquitto", "hub"):
            for reason in results[phase][label].reasons:
                print(f"  {name} {label} error: {reason}")
        print(f"  ratio hub/mosquitto: rate {ratios[phase]['rate']:.2f}x, "
              f"p99 {ratios[phase]['p99']:.2f}x, broker cpu/op {ratios[phase]['cpu']:.1f}x")
    print(f"wall time {wall:.0f} s")
    if args.json_out:
        line = {"bench": "methods", "params": vars(args), "wall_s": wall, "ratios": ratios,
                **{phase: {k: asdict(v) for k, v in r.items()} for phase, r in results.items()}}
        with open(args.json_out, "a") as fh:
            fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
