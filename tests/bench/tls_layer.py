#!/usr/bin/env python3
"""CPU cost of the hub's TLS layer (gateway.broker.tls, pyOpenSSL over memory BIOs) per
message, against Python's ``ssl.MemoryBIO`` doing the same server work (the layer's design
before issue 8, which could not accept unknown client certificates).

In-process, no sockets: a Python ``ssl`` client encrypts ``--reads`` reads of ``--per-read``
200-byte messages beforehand (its cost is not counted); the server side decrypts each read,
hands it to a stub protocol, then encrypts one 4-byte acknowledgement per message, as the
hub's PUBACKs after a commit. Prints microseconds of CPU per message for both, alternating.

    python tests/bench/tls_layer.py                     # 100 messages per read
    python tests/bench/tls_layer.py --per-read 1 --reads 30000
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gateway import pki  # noqa: E402
from gateway.broker import tls  # noqa: E402

MESSAGE = 200
ACK = b"\x40\x02\x00\x01"


class Raw(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    def write(self, data: Any) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0


class Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.got = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got += len(data)


class MemoryBioServer:
    """Python's ssl server over memory BIOs: the same per-read steps as the hub's layer."""

    def __init__(self, ctx: ssl.SSLContext, inner: Sink, raw: Raw) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.inner, self.raw, self.ready = inner, raw, False
        inner.connection_made(self)

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if not self.ready:
            try:
                self.obj.do_handshake()
                self.ready = True
            except ssl.SSLWantReadError:
                pass
        chunks = []
        try:
            while True:
                chunk = self.obj.read(tls.READ_SIZE)
                if not chunk:
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        self.flush()
        if chunks:
            self.inner.data_received(b"".join(chunks))

    def write(self, data: bytes) -> None:
        self.obj.write(data)
        self.flush()

    def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.raw.write(data)


def run(kind: str, certs: pki.HubCertificates, reads: int, per_read: int) -> float:
    sink, raw = Sink(), Raw()
    server: Any
    if kind == "hub":
        server = tls.TlsServerProtocol(tls.server_context(certs.server_cert, certs.server_key),
                                       60, lambda: sink)
        server.connection_made(raw)
    else:
        server = MemoryBioServer(pki.server_ssl_context(certs), sink, raw)
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context(cafile=str(certs.ca_cert)).wrap_bio(
        cin, cout, server_hostname="localhost")
    while True:
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            server.data_received(cout.read())
            while raw.sent:
                cin.write(raw.sent.pop(0))
    if cout.pending:
        server.data_received(cout.read())
    payload = b"x" * MESSAGE * per_read
    records = []
    for _ in range(reads):
        client.write(payload)
        records.append(cout.read())
    acks = ACK * per_read
    started = time.process_time()
    for record in records:
        server.data_received(record)
        sink.transport.write(acks)
        raw.sent.clear()
    elapsed = time.process_time() - started
    assert sink.got == reads * per_read * MESSAGE
    return elapsed / (reads * per_read) * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reads", type=int, default=3000)
    ap.add_argument("--per-read", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    certs = pki.ensure_certificates(Path(tempfile.mkdtemp(prefix="bench-tls-")),
                                    host_names=["localhost"], addresses=[])
    print(f"TLS layer CPU per message, {args.per_read} x {MESSAGE}-byte messages per read")
    for n in range(args.rounds):
        base = run("ssl", certs, args.reads, args.per_read)
        hub = run("hub", certs, args.reads, args.per_read)
        print(f"round {n + 1}: ssl.MemoryBIO {base:.3f} us/msg   hub (pyOpenSSL) {hub:.3f} us/msg"
              f"   ratio {hub / base:.2f}x", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
