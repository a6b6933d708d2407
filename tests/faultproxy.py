"""A TCP fault proxy (asyncio) to put between a child hub and its parent.

It forwards bytes both ways and, on command or on a schedule, breaks the link the ways real
links break:

* ``cut("rst")``: every open connection is reset (SO_LINGER 0, then close: the peer gets RST);
* ``cut("fin")``: every open connection is closed cleanly (FIN both ways);
* ``stall(seconds)``: a black hole: nothing is read or forwarded (what is in flight waits in
  the kernel's buffers, as on a dead route with TCP retransmitting), new connections hang too;
* ``throttle(bytes_per_s)``: a slow link (0 lifts it).

:meth:`run_schedule` plays a seeded random schedule of these until a count of cuts is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from dataclasses import dataclass, field


@dataclass
class ProxyStats:
    connections: int = 0
    cuts_rst: int = 0
    cuts_fin: int = 0
    stalls: int = 0
    throttles: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    log: list[str] = field(default_factory=list)


class FaultProxy:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen = listen
        self.target = target
        self.stats = ProxyStats()
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._open = asyncio.Event()
        self._open.set()  # cleared while stalled
        self._rate = 0  # bytes/s per direction, 0 = unlimited
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, *self.listen)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._open.set()
        self._cut_all("fin")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- faults ------------------------------------------------------------------------------

    def cut(self, how: str) -> None:
        self._cut_all(how)
        if how == "rst":
            self.stats.cuts_rst += 1
        else:
            self.stats.cuts_fin += 1

    async def stall(self, seconds: float) -> None:
        self.stats.stalls += 1
        self._open.clear()
        try:
            await asyncio.sleep(seconds)
        finally:
            self._open.set()

    def throttle(self, bytes_per_s: int) -> None:
        if bytes_per_s:
            self.stats.throttles += 1
        self._rate = bytes_per_s

    def _cut_all(self, how: str) -> None:
        for a, b in list(self._pairs):
            for w in (a, b):
                with contextlib.suppress(Exception):
                    if how == "rst":
                        sock = w.get_extra_info("socket")
                        if sock is not None:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                            struct.pack("ii", 1, 0))
                        w.transport.abort()
                    else:
                        w.close()
        self._pairs.clear()

    async def run_schedule(self, cuts: int, *, seed: int = 1, gap: tuple[float, float] = (0.2, 0.6),
                           stall: tuple[float, float] = (0.5, 3.0),
                           stop: asyncio.Event | None = None) -> None:
        """Until ``cuts`` cuts are done: wait a random gap, then cut (RST or FIN), and now and
        then stall or throttle for a while."""
        rng = random.Random(seed)
        done = 0
        while done < cuts and not (stop and stop.is_set()):
            await asyncio.sleep(rng.uniform(*gap))
            roll = rng.random()
            if roll < 0.08:
                seconds = rng.uniform(*stall)
                self.stats.log.append(f"stall {seconds:.1f}s")
                await self.stall(seconds)
            elif roll < 0.14:
                rate = rng.choice((20_000, 100_000))
                self.stats.log.append(f"throttle {rate}")
                self.throttle(rate)
                await asyncio.sleep(rng.uniform(0.5, 1.5))
                self.throttle(0)
            else:
                how = "rst" if rng.random() < 0.5 else "fin"
                self.cut(how)
                done += 1

    # -- forwarding --------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._open.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.stats.connections += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        t1 = asyncio.get_running_loop().create_task(self._pump(reader, up_writer, up=True))
        t2 = asyncio.get_running_loop().create_task(self._pump(up_reader, writer, up=False))
        for t in (t1, t2):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        await asyncio.gather(t1, t2, return_exceptions=True)
        self._pairs.discard(pair)
        for w in pair:
            with contextlib.suppress(Exception):
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    *, up: bool) -> None:
        try:
            while True:
                await self._open.wait()
                data = await reader.read(16384 if not self._rate else max(1, self._rate // 20))
                if not data:
                    break
                await self._open.wait()  # stalled after the read: hold it
                if writer.is_closing():
                    break
                writer.write(data)
                await writer.drain()
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                if self._rate:
                    await asyncio.sleep(len(data) / self._rate)
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
