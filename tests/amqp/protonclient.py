"""A small blocking AMQP 1.0 client for the tests: Qpid Proton's client engine over a real
TLS socket (a different peer than the Azure clients, and one that lets a test attach any link
and read the exact error condition the hub sends)."""

from __future__ import annotations

import select
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from typing import Any

from proton import Condition, Connection, Data, Delivery, Described, Link, Message, Transport, symbol


class ProtonClient:
    def __init__(self, host: str, port: int, *, ca_file: str, server_hostname: str,
                 hub_name: str, sasl: str | None = "ANONYMOUS") -> None:
        raw = socket.create_connection((host, port), timeout=10)
        ctx = ssl.create_default_context(cafile=ca_file)
        self.sock = ctx.wrap_socket(raw, server_hostname=server_hostname)
        self.sock.setblocking(False)
        self.transport = Transport()
        if sasl is not None:
            self.transport.sasl().allowed_mechs(sasl)
        self.conn = Connection()
        self.conn.hostname = hub_name
        self.transport.bind(self.conn)
        self.conn.open()
        self.session = self.conn.session()
        self.session.open()
        self.eof = False
        self.received = b""  # raw bytes, for tests that look at the wire

    # -- I/O ----------------------------------------------------------------------------------

    def io(self, wait: float = 0.05) -> None:
        transport = self.transport
        pending = transport.pending()
        if pending > 0:
            data = transport.peek(pending) or b""
            try:
                self.sock.sendall(data)
            except (ssl.SSLWantWriteError, BlockingIOError):
                select.select([], [self.sock], [], wait)
                return
            except OSError:
                self.eof = True
            transport.pop(pending)
        if self.eof:
            time.sleep(wait)
            return
        if not self.sock.pending():
            select.select([self.sock], [], [], wait)
        try:
            data = self.sock.recv(65536)
        except (ssl.SSLWantReadError, BlockingIOError):
            return
        except OSError:
            data = b""
        if not data:
            self.eof = True
            transport.close_tail()
            return
        self.received += data
        view = memoryview(data)
        while view and transport.capacity() > 0:
            room = transport.capacity()
            transport.push(bytes(view[:room]))
            view = view[room:]

    def until(self, done: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError("the AMQP exchange did not finish in time")
            self.io()

    def close(self) -> None:
        try:
            self.conn.close()
            self.until(lambda: self.eof or self.transport.pending() < 0, timeout=3)
        except AssertionError:
            pass
        self.sock.close()

    @property
    def remote_closed(self) -> bool:
        return bool(self.conn.state & Connection.REMOTE_CLOSED)

    # -- links --------------------------------------------------------------------------------

    def receiver(self, address: str, *, selector: str | None = None,
                 credit: int = 100) -> Link:
        link = self.session.receiver(f"r-{uuid.uuid4().hex[:8]}")
        link.source.address = address
        link.target.address = f"client-{uuid.uuid4().hex[:6]}"
        if selector is not None:
            data: Data = link.source.filter
            data.put_map()
            data.enter()
            data.put_symbol(symbol("apache.org:selector-filter:string"))
            data.put_object(Described(symbol("apache.org:selector-filter:string"), selector))
            data.exit()
        link.open()
        link.flow(credit)
        self.settled(link)
        return link

    def sender(self, address: str) -> Link:
        link = self.session.sender(f"s-{uuid.uuid4().hex[:8]}")
        link.target.address = address
        link.source.address = f"client-{uuid.uuid4().hex[:6]}"
        link.open()
        self.settled(link)
        return link

    def settled(self, link: Link, timeout: float = 20.0) -> None:
        """Wait until the hub answered the attach (opened it, or refused it)."""
        self.until(lambda: bool(link.state & Link.REMOTE_ACTIVE or link.state & Link.REMOTE_CLOSED)
                   or self.remote_closed, timeout)
        if link.state & Link.REMOTE_ACTIVE:
            # a refusal is an attach followed at once by a detach: give it a moment
            end = time.monotonic() + 0.3
            while time.monotonic() < end and not link.state & Link.REMOTE_CLOSED:
                self.io(0.02)

    @staticmethod
    def refused(link: Link) -> Condition | None:
        if link.state & Link.REMOTE_CLOSED:
            return link.remote_condition or Condition("(none)")
        return None

    def send(self, link: Link, message: Message, timeout: float = 20.0) -> Delivery:
        self.until(lambda: link.credit > 0, timeout)
        delivery = link.delivery(uuid.uuid4().hex)
        link.send(message.encode())
        link.advance()
        self.until(lambda: bool(delivery.remote_state) or delivery.settled, timeout)
        return delivery

    def receive(self, link: Link, timeout: float = 20.0) -> Message:
        def ready() -> bool:
            d = link.current
            return d is not None and d.readable and not d.partial

        self.until(ready, timeout)
        delivery = link.current
        data = link.recv(delivery.pending)
        link.advance()
        delivery.update(Delivery.ACCEPTED)
        delivery.settle()
        message = Message()
        message.decode(data)
        return message

    def request(self, node: str, message: Message, timeout: float = 20.0) -> Message:
        """A request/response exchange with ``$cbs`` or ``$management``."""
        reply_to = f"{node}-reply-{uuid.uuid4().hex[:6]}"
        receiver = self.session.receiver(f"{node}-r-{uuid.uuid4().hex[:6]}")
        receiver.source.address = node
        receiver.target.address = reply_to
        receiver.open()
        receiver.flow(10)
        sender = self.sender(node)
        self.settled(receiver)
        message.reply_to = reply_to
        message.id = uuid.uuid4()
        self.send(sender, message, timeout)
        reply = self.receive(receiver, timeout)
        sender.close()
        receiver.close()
        return reply

    def put_token(self, token: str, audience: str) -> tuple[int, str]:
        request = Message(body=token)
        request.properties = {"operation": "put-token", "type": "servicebus.windows.net:sastoken",
                              "name": audience}
        reply = self.request("$cbs", request)
        props: dict[Any, Any] = dict(reply.properties or {})
        return int(props["status-code"]), str(props["status-description"])
