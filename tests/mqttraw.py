"""A raw MQTT 3.1.1 test client over TLS or TCP, built on the hub's own codec.

It lets tests send exactly the bytes they want (garbage, QoS 2, oversize packets) and observe
exactly what the hub answers, including a closed connection.
"""

from __future__ import annotations

import socket
import ssl
import time

from gateway.mqtt.codec import Decoder, encode
from gateway.mqtt.packets import Connect, Packet


class Closed(Exception):
    pass


class RawClient:
    def __init__(self, port: int, *, ca_file: str | None = None, host: str = "localhost",
                 cert: tuple[str, str] | None = None, timeout: float = 10.0) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        if ca_file is not None:
            ctx = ssl.create_default_context(cafile=ca_file)
            if cert:
                ctx.load_cert_chain(*cert)
            sock = ctx.wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self.decoder = Decoder()
        self.pending: list[Packet] = []

    def send(self, packet: Packet) -> None:
        self.sock.sendall(encode(packet))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float = 10.0) -> Packet:
        deadline = time.monotonic() + timeout
        while not self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no packet from the hub")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError) as exc:
                raise Closed(str(exc)) from None
            if not data:
                raise Closed("connection closed by the hub")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def connect(self, client_id: str, username: str | None, password: str | None, *,
                clean: bool = False, keepalive: int = 60) -> Packet:
        self.send(Connect(client_id=client_id, clean_session=clean, keepalive=keepalive,
                          username=username, password=password.encode() if password else None))
        return self.recv()

    def expect_closed(self, timeout: float = 10.0) -> None:
        """Wait until the hub closes the connection (any packets before that are dropped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.recv(deadline - time.monotonic())
            except Closed:
                return
            except TimeoutError:
                break
        raise AssertionError("the hub did not close the connection")

    def close(self) -> None:
        self.sock.close()
