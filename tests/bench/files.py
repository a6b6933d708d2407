#!/usr/bin/env python3
"""File upload: into the gateway, and forwarded to its parent.

1. **Upload into the gateway**: a device uploads ``--mb`` MB as Put Block (4 MB blocks) +
   Put Block List over HTTPS to a hub (127.0.26.1, TLS, every block fsynced before its 201).
   Against: a trivial aiohttp server (``--serve``, a subprocess, the same TLS certificate)
   taking a plain PUT of the same bytes in the same 4 MB requests, writing each to a file and
   fsyncing it. Printed: both rates and their ratio, for ``--rounds`` alternations.
2. **Forwarding against the link's cap**: a leaf (127.0.26.2) forwards a ``--mb`` MB file to
   its parent with ``files.forward_bandwidth = --cap`` bytes/s, then with no cap. Printed: the
   forwarding rate, its ratio to the cap, and the uncapped rate.

    python tests/bench/files.py                 # 64 MB, cap 8 MB/s, 5 upload rounds
    python tests/bench/files.py --mb 128 --cap 16777216
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.files.federation import (
    LEAF,
    PARENT,
    device,
    files,
    free_port,
    leaf_hub,
    link,
    parent_hub,
    upload,
    wait_forwarded,
)

BLOCK = 4 << 20


def serve(address: str, port: int, cert: str, key: str, out_dir: str) -> None:
    """The trivial server: PUT /{name} -> the body to a file, fsynced; 201."""
    from aiohttp import web

    async def put(request: web.Request) -> web.Response:
        path = os.path.join(out_dir, request.match_info["name"].replace("/", "_"))
        with open(path, "wb") as fh:  # noqa: ASYNC230 - the trivial server, as simple as can be
            async for chunk in request.content.iter_chunked(256 << 10):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        return web.Response(status=201)

    app = web.Application(client_max_size=BLOCK * 2)
    app.router.add_put("/{name:.+}", put)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    web.run_app(app, host=address, port=port, ssl_context=ctx, print=None)


async def plain_puts(address: str, port: int, ca: str, data: bytes) -> float:
    import io

    import aiohttp

    ctx = ssl.create_default_context(cafile=ca)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        for _ in range(50):  # wait for the server
            try:
                async with http.put(f"https://{address}:{port}/warm", data=b"x") as r:
                    if r.status == 201:
                        break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        for i in range(0, len(data), BLOCK):
            async with http.put(f"https://{address}:{port}/b{i}",
                                data=io.BytesIO(data[i:i + BLOCK])) as r:
                assert r.status == 201
        return time.perf_counter() - t0


def bench_upload(tmp: Path, mb: int, rounds: int) -> None:
    """``rounds`` alternations of the two, on the same hub and server: the load of other jobs
    shifts between rounds, so each round's ratio is printed and their median."""
    data = os.urandom(mb << 20)
    hub = parent_hub(tmp, api_port=free_port(PARENT))
    hub.start()
    port = free_port(PARENT)
    out = tmp / "plain"
    out.mkdir()
    server = subprocess.Popen([sys.executable, __file__, "--serve", PARENT, str(port),
                               str(hub.data_dir / "server.pem"),
                               str(hub.data_dir / "server.key"), str(out)])
    ratios = []
    try:
        key = device(hub, "bench-cam")
        for n in range(rounds):
            t0 = time.perf_counter()
            asyncio.run(upload(hub, "bench-cam", key, f"bench{n}.bin", data, block=BLOCK))
            into_hub = time.perf_counter() - t0
            plain = asyncio.run(plain_puts(PARENT, port, hub.ca_file, data))
            r_hub, r_plain = mb / into_hub, mb / plain
            ratios.append(r_hub / r_plain)
            print(f"round {n + 1}: gateway {r_hub:.1f} MB/s (SAS URI + Put Block x "
                  f"{-(-mb // 4)} + Put Block List + notification), plain aiohttp PUT "
                  f"{r_plain:.1f} MB/s (same 4 MB requests, TLS, fsync each): "
                  f"ratio {r_hub / r_plain:.2f}")
    finally:
        server.terminate()
        server.wait(10)
        hub.stop()
    print(f"upload ratio gateway / plain, median of {rounds}: {statistics.median(ratios):.2f}")


def bench_forward(tmp: Path, mb: int, cap: int) -> None:
    data = os.urandom(mb << 20)
    for label, bandwidth in (("capped", cap), ("uncapped", 0)):
        run = tmp / label
        run.mkdir()
        api_port = free_port(PARENT)
        parent = parent_hub(run, api_port=api_port)
        leaf = leaf_hub(run, forward_port=api_port,
                        files=f"forward_bandwidth = {bandwidth}\n")
        parent.start()
        leaf.start()
        try:
            link(parent, leaf)
            key = device(leaf, "bench-cam")
            asyncio.run(upload(leaf, "bench-cam", key, "fwd.bin", data, block=BLOCK))
            stored = _when(files(leaf)["bench-cam/fwd.bin"]["updated"])  # the notification
            done = wait_forwarded(leaf, ["bench-cam/fwd.bin"], timeout=600)
            took = _when(done["bench-cam/fwd.bin"]["updated"]) - stored  # the leaf's clock
            assert files(parent)["bench-cam/fwd.bin"]["size"] == len(data)
        finally:
            leaf.stop()
            parent.stop()
        rate = len(data) / took
        if bandwidth:
            print(f"forwarding, cap {cap / 1e6:.1f} MB/s: {mb} MB in {took:.2f} s = "
                  f"{rate / 1e6:.2f} MB/s = {rate / cap:.2f} of the cap")
        else:
            print(f"forwarding, no cap:       {mb} MB in {took:.2f} s = {rate / 1e6:.1f} MB/s "
                  f"(leaf {LEAF} -> parent {PARENT}, TLS, on-behalf-of)")


def _when(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--cap", type=int, default=8 << 20, help="bytes/s")
    parser.add_argument("--rounds", type=int, default=5, help="upload rounds (alternating)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "up").mkdir()
        bench_upload(Path(tmp) / "up", args.mb, args.rounds)
        bench_forward(Path(tmp), args.mb, args.cap)
    print(f"load average {os.getloadavg()[0]:.1f} (other sessions share the machine: one run)")


if __name__ == "__main__":
    main()
