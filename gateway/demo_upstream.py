"""The demo's upstream: a second hub, the parent, on loopback, and a link that is cut now and
then, so a newcomer sees store-and-forward at work (README "Run the demo").

The parent runs in the same process (its own data directory, ports and CA); the demo gateway's
identity there is an edge device, and the upstream link dials it through a small relay that
the demo cuts for ``cut_for`` seconds every ``cut_every`` seconds: the backlog grows while the
link is down and drains when it is back, and the parent shows each message with its origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from gateway import app
from gateway.api.events import entry_json
from gateway.config import ApiConfig, HubConfig, MqttConfig, load_config
from gateway.demo_federation import edge_identity, run_top
from gateway.hub.connstr import ConnectionString
from gateway.upstream.settings import from_connection_string

PARENT_NAME = "plant-hub"


class CuttableRelay:
    """TCP relay child -> parent; :meth:`cut` closes every connection and refuses new ones."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.down = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()

    def cut(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            with contextlib.suppress(Exception):
                w.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers -= {writer, up_writer}


async def run_parent(data_dir: Path, child: app.Gateway, *, cut_every: float = 60.0,
                     cut_for: float = 15.0) -> None:
    """Start the parent, link ``child`` to it, show arrivals, cut the link on a schedule."""
    logging.getLogger("gateway.upstream").setLevel(logging.ERROR)  # the status line tells it
    config = load_config(data_dir,
                         hub=HubConfig(host_name=PARENT_NAME, device_id=PARENT_NAME),
                         mqtt=MqttConfig(tls_port=0, local_port=0, unix_socket=False),
                         api=ApiConfig(bind="127.0.0.1", port=0))
    ready: asyncio.Future[app.Gateway] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(app.run(config, ready=ready, stop=stop))
        parent = await ready
        try:
            gw_id = str(child.runtime["device_id"])
            device = await edge_identity(parent, gw_id)
            relay = CuttableRelay(("127.0.0.1", int(str(parent.runtime["mqtt_tls_port"]))))
            await relay.start()
            assert device.primary_key and child.upstream is not None
            cs = ConnectionString(host_name=PARENT_NAME, device_id=gw_id,
                                  shared_access_key=device.primary_key)
            await child.upstream.set(from_connection_string(
                str(cs), ca_file=str(parent.certs.ca_cert), host="localhost", port=relay.port))
            print(f"  upstream: parent hub {PARENT_NAME!r} on localhost (HTTPS API port "
                  f"{parent.runtime['api_port']}); the link is cut for {cut_for:.0f} s every "
                  f"{cut_every:.0f} s", flush=True)
            tasks.create_task(_parent_printer(parent))
            tasks.create_task(_status_printer(child))
            tasks.create_task(_cutter(relay, cut_every, cut_for))
            tasks.create_task(run_top(data_dir.with_name(data_dir.name + "-top"), parent, child))
            await asyncio.Event().wait()
        finally:
            stop.set()


async def _cutter(relay: CuttableRelay, every: float, length: float) -> None:
    while True:
        await asyncio.sleep(max(0.0, every - length))
        relay.down = True
        relay.cut()
        print(f"  !! upstream link cut for {length:.0f} s: messages wait in the store", flush=True)
        await asyncio.sleep(length)
        relay.down = False
        print("  !! upstream link back: the backlog drains", flush=True)


async def _parent_printer(parent: app.Gateway) -> None:
    """Once a second: what arrived at the parent, per origin."""
    after = parent.log.last_seq
    while True:
        await asyncio.sleep(1.0)
        entries, after = await parent.log.scan(after, 10_000, kinds={"telemetry"})
        if not entries:
            continue
        origins: dict[str, int] = {}
        for entry in entries:
            e = entry_json(entry, PARENT_NAME)["event"]
            who = e["origin"] + (f"/{e['module']}" if e["module"] else "")
            origins[who] = origins.get(who, 0) + 1
        listed = ", ".join(f"{k} x{v}" for k, v in sorted(origins.items()))
        print(f"{time.strftime('%H:%M:%S')}  parent {PARENT_NAME}: +{len(entries)} from {listed}",
              flush=True)


async def _status_printer(child: app.Gateway) -> None:
    while True:
        await asyncio.sleep(5.0)
        if child.upstream is not None:
            s = child.upstream.status()
            print(f"{time.strftime('%H:%M:%S')}  upstream {s['state']}: backlog {s['backlog']}, "
                  f"oldest {s['oldestAgeSeconds']:.0f} s, sent {s['sent']}"
                  + (f", last error: {s['lastError']}" if s["state"] != "connected" and
                     s["lastError"] else ""), flush=True)
