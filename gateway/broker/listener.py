"""Accepting connections within bounds: a cap in total and per source address, and a hub
that keeps accepting when the process runs out of file descriptors.

asyncio's ``create_server`` accepts whoever comes and, when ``accept()`` fails with EMFILE,
logs it on every attempt and waits; uvloop's closes the listener for good. So each listening
socket here has its own small accept loop: a connection over a cap is closed at once (its
descriptor freed before it can hold anything), and running out of descriptors is logged once
per burst, after which accepting resumes as soon as any connection closes (or every
:data:`RETRY_SECONDS`). :func:`raise_fd_limit` lifts ``RLIMIT_NOFILE`` to its hard limit at
start, and the connection cap is kept below it, so the cap, not the descriptor table, says no.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger(__name__)

RETRY_SECONDS: Final = 0.05
"""How soon accepting is retried after running out of descriptors."""

BURST_GAP_SECONDS: Final = 10.0
"""Running out of descriptors again within this time is the same burst (not logged again)."""

ACCEPTS_PER_WAKEUP: Final = 256
"""Connections accepted per readiness event before other work runs."""

FD_RESERVE: Final = 256
"""Descriptors kept for everything that is not a client connection (databases, logs, ...)."""

_OUT_OF_FDS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def raise_fd_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (systemd and login shells start
    services at 1024); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("file descriptor limit raised from %d to %d", soft, target)
            return target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the file descriptor limit from %d: %s", soft, exc)
    return soft


class Admission:
    """Live connections per source address and in total; refuses beyond either cap. One
    instance for all listeners (MQTT, HTTPS), since they share the descriptor table."""

    def __init__(self, max_connections: int, max_per_address: int) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.total = 0
        self.by_address: dict[str, int] = {}
        self._refusing: dict[str, int] = {}  # "total" or an address -> refused in this burst
        self._starved: list[Listener] = []

    @classmethod
    def within_fd_limit(cls, max_connections: int, max_per_address: int,
                        fd_limit: int) -> Admission:
        """Caps as configured, the total lowered to what ``fd_limit`` leaves."""
        allowed = max(fd_limit - FD_RESERVE, 16)
        if max_connections > allowed:
            log.warning("max_connections lowered from %d to %d (file descriptor limit %d)",
                        max_connections, allowed, fd_limit)
            max_connections = allowed
        return cls(max_connections, max_per_address)

    def admit(self, address: str | None) -> bool:
        """Count a new connection from ``address`` (None: a unix socket, no per-address cap);
        False if a cap refuses it (logged once per burst of refusals)."""
        if self.total >= self.max_connections:
            self._refuse("total", f"connection cap reached ({self.max_connections} open)")
            return False
        if address is not None:
            held = self.by_address.get(address, 0)
            if held >= self.max_per_address:
                self._refuse(address, f"per-address connection cap reached for {address} "
                                      f"({self.max_per_address} open)")
                return False
            self.by_address[address] = held + 1
            if self._refusing and address in self._refusing:
                self._recovered(address)
        if self._refusing and "total" in self._refusing:
            self._recovered("total")
        self.total += 1
        return True

    def release(self, address: str | None) -> None:
        self.total -= 1
        if address is not None:
            held = self.by_address.get(address, 0) - 1
            if held > 0:
                self.by_address[address] = held
            else:
                self.by_address.pop(address, None)
        if self._starved:  # a descriptor came free: accept again now
            starved, self._starved = self._starved, []
            for listener in starved:
                listener.resume()

    def wake_on_release(self, listener: Listener) -> None:
        """``listener`` ran out of descriptors: resume it when a connection closes."""
        if listener not in self._starved:
            self._starved.append(listener)

    def _refuse(self, key: str, line: str) -> None:
        count = self._refusing.get(key, 0)
        if count == 0:
            log.warning("refusing connections: %s", line)
        self._refusing[key] = count + 1

    def _recovered(self, key: str) -> None:
        count = self._refusing.pop(key)
        log.info("accepting connections again%s (%d refused)",
                 "" if key == "total" else f" from {key}", count)


class _Counted(asyncio.Protocol):
    """Stands in front of a connection's protocol to give its admission slot back when the
    connection ends. ``data_received`` is the inner protocol's own bound method, set on the
    instance (a slot: no instance dict), so reads cost nothing extra; the rare events are
    forwarded. A subclass may list other methods in ``FORWARDED`` and define its own."""

    FORWARDED: tuple[str, ...] = ("data_received",)
    __slots__ = ("inner", "_admission", "_address", "released", "made", "data_received")

    def __init__(self, inner: asyncio.BaseProtocol, admission: Admission,
                 address: str | None) -> None:
        self.inner = inner
        self._admission = admission
        self._address = address
        self.released = False
        self.made = False
        for name in self.FORWARDED:
            method = getattr(inner, name, None)
            if method is not None:
                setattr(self, name, method)

    def eof_received(self) -> bool | None:
        eof_received = getattr(self.inner, "eof_received", None)
        return eof_received() if eof_received is not None else None

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()
        self.inner.connection_lost(exc)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission.release(self._address)


class Listener:
    """One listening socket and its accept loop; connections get ``factory()`` protocols,
    over TLS when ``ssl_context`` is given (asyncio's TLS, for the HTTPS port)."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.BaseProtocol],
                 admission: Admission, *, name: str, ssl_context: ssl.SSLContext | None = None,
                 handshake_timeout: float = 60.0,
                 wrap: Callable[[asyncio.BaseProtocol, Admission, str | None], _Counted] | None = None,
                 ) -> None:
        self.sock = sock
        self.name = name
        self._factory = factory
        self._admission = admission
        self._ssl = ssl_context
        self._handshake_timeout = handshake_timeout
        self._wrap = wrap or _Counted
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._starved_since: float | None = None  # start of the current burst
        self._last_starved = 0.0
        self._starved_count = 0
        self._retry: asyncio.TimerHandle | None = None
        self._opening: set[asyncio.Task[Any]] = set()
        self._tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        sock.setblocking(False)

    @property
    def port(self) -> int | str:
        name = self.sock.getsockname()
        return int(name[1]) if isinstance(name, tuple) else str(name)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.resume()

    def resume(self) -> None:
        if self._loop is None or self._reading or self.sock.fileno() < 0:
            return
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._reading = True
        self._loop.add_reader(self.sock.fileno(), self._accept)
        self._loop.call_soon(self._accept)  # what waited in the backlog meanwhile

    def _pause(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False

    def _accept(self) -> None:
        if not self._reading:
            return
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    self._out_of_descriptors(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the peer gave up while waiting in the backlog
                log.error("accept failed listener=%s: %s", self.name, exc)
                return
            address = addr[0] if self._tcp and isinstance(addr, tuple) else None
            if not self._admission.admit(address):
                conn.close()
                continue
            self._open(conn, address)

    def _out_of_descriptors(self, exc: OSError) -> None:
        """Stop reading the listener (it would spin), log once for the burst, and come
        back when a connection closes or after :data:`RETRY_SECONDS`."""
        self._pause()
        now = time.monotonic()
        if self._starved_since is None or now - self._last_starved > BURST_GAP_SECONDS:
            if self._starved_since is not None and self._starved_count > 1:
                log.warning("listener=%s ran out of file descriptors %d times in the last burst",
                            self.name, self._starved_count)
            self._starved_since, self._starved_count = now, 0
            log.error("out of file descriptors listener=%s (%s; %d connections open): accepting "
                      "resumes as soon as one closes", self.name, exc.strerror,
                      self._admission.total)
        self._last_starved = now
        self._starved_count += 1
        self._admission.wake_on_release(self)
        assert self._loop is not None
        self._retry = self._loop.call_later(RETRY_SECONDS, self.resume)

    def _open(self, conn: socket.socket, address: str | None) -> None:
        conn.setblocking(False)
        if self._tcp:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        counted = self._wrap(self._factory(), self._admission, address)
        assert self._loop is not None
        task = self._loop.create_task(self._connect(conn, counted), name=f"accept {self.name}")
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _connect(self, conn: socket.socket, counted: _Counted) -> None:
        assert self._loop is not None
        try:
            if self._ssl is None:
                await self._loop.connect_accepted_socket(lambda: counted, conn)
            else:
                await self._loop.connect_accepted_socket(
                    lambda: counted, conn, ssl=self._ssl,
                    ssl_handshake_timeout=self._handshake_timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, asyncio.CancelledError) as exc:
            if not counted.made:  # never reached the protocol: give the slot back here
                counted.release()
                conn.close()
                log.debug("connection not opened listener=%s: %r", self.name, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    def close(self) -> None:
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
        for task in list(self._opening):
            task.cancel()
        self.sock.close()


def listening_socket(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A bound, listening TCP socket (IPv6 when ``host`` is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def unix_listening_socket(path: str, backlog: int = 1024) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
