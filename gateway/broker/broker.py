"""The MQTT broker: listeners, the live-connection table, session takeover, subscriptions.

Policy (who may connect, what topics mean) is the hub's; this module only keeps connections
and MQTT sessions straight: one live connection per client id (a second CONNECT with the same
id closes the older one, IoT Hub ref §1.1 and pitfall 16), CleanSession=0 subscriptions kept
per identity (ref §1.6), Wills published when a link drops without DISCONNECT (MQTT 3.1.1
§3.1.2.5).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from gateway.broker.connection import MqttConnection
from gateway.broker.deadlines import Deadlines
from gateway.broker.devicetls import DeviceTls, peer_certificate_chain
from gateway.broker.listener import Admission, Listener, listening_socket, unix_listening_socket
from gateway.broker.sessions import SessionStore
from gateway.config import MqttConfig
from gateway.hub import addresses, dps
from gateway.hub.auth import Principal
from gateway.hub.hub import Hub
from gateway.hub.registry import CaCertificate, Device, Module
from gateway.mqtt.packets import Connect, Subscribe, Unsubscribe

log = logging.getLogger(__name__)

SUBACK_FAILURE = 0x80


class Broker:
    def __init__(self, config: MqttConfig, hub: Hub, sessions: SessionStore, *,
                 pending_bytes_total: int = 64 << 20, admission: Admission | None = None) -> None:
        self.config = config
        self.admission = admission or Admission(1 << 30, 1 << 30)
        # Bytes of inbound messages not yet committed, over all connections; at the total,
        # connections stop reading (they wait in ``blocked``) until commits bring it under half.
        self.pending_bytes = 0
        self.pending_bytes_total = pending_bytes_total
        self.blocked: set[MqttConnection] = set()
        self.hub = hub
        self.sessions = sessions
        self.live: dict[str, MqttConnection] = {}
        self.open_connections: set[MqttConnection] = set()
        self.deadlines = Deadlines()  # every connection's connect/keep-alive/token deadline
        self.ports: dict[str, int | str] = {}
        # client id -> kinds of IoT Hub subscriptions it holds (C2DFilter, MethodRequestsFilter..)
        self._features: dict[str, frozenset[type]] = {}
        # Every distinct set of kinds, once: most clients hold the same one or two.
        self._kind_sets: dict[frozenset[type], frozenset[type]] = {}
        self._waiters: dict[str, list[tuple[type, asyncio.Future[MqttConnection]]]] = {}
        self.ready_hooks: list[Callable[[MqttConnection, set[type]], None]] = []
        self.puback_hooks: list[Callable[[MqttConnection, int], None]] = []
        self.close_hooks: list[Callable[[MqttConnection], None]] = []
        self._listeners: list[Listener] = []

    # -- listeners ---------------------------------------------------------------------------

    async def start(self, *, tls_context: DeviceTls | None, unix_path: Path | None) -> None:
        """Bind every configured listener. Port 0 binds an ephemeral port (tests); the bound
        ports are in :attr:`ports`."""
        cfg = self.config

        def factory(name: str) -> Callable[[], MqttConnection]:
            return lambda: MqttConnection(self, name)

        def listen(name: str, sock: Any, make: Callable[[], Any]) -> None:
            listener = Listener(sock, make, self.admission, name=f"mqtt-{name}")
            listener.start()
            self._listeners.append(listener)
            self.ports[name] = listener.port

        if tls_context is not None:
            tls = factory("tls")
            listen("tls", listening_socket(cfg.bind, cfg.tls_port),
                   lambda: tls_context.protocol(cfg.connect_timeout, tls))
        listen("local", listening_socket(cfg.local_bind, cfg.local_port), factory("local"))
        if unix_path is not None:
            if unix_path.exists():
                unix_path.unlink()
            sock = unix_listening_socket(str(unix_path))
            os.chmod(unix_path, 0o660)
            listen("unix", sock, factory("unix"))
        log.info("mqtt listening %s", " ".join(f"{k}={v}" for k, v in self.ports.items()))

    async def stop(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for conn in list(self.open_connections):
            conn.close()
        await asyncio.sleep(0)  # let the transports tell their protocols
        self.deadlines.close()

    # -- connection lifecycle ----------------------------------------------------------------

    def connection_opened(self, conn: MqttConnection) -> None:
        self.open_connections.add(conn)

    def authenticate(self, conn: MqttConnection, packet: Connect) -> Principal:
        chain = peer_certificate_chain(conn.transport)
        principal = self.hub.authenticate(packet.client_id, packet.username, packet.password, chain)
        if principal.provisioning is not None:  # never takes over the device's own session
            conn.client_id = f"$dps/{principal.device_id}"
        cap = self.config.max_keepalive
        if packet.keepalive == 0 or packet.keepalive > cap:
            # IoT Hub closes a silent client after at most 1767 s, whatever it asked for
            # (ref §1.3): a keep-alive of 0 ("never") gets the cap too.
            log.info("keep-alive capped client_id=%r asked=%s cap=%s",
                     packet.client_id, packet.keepalive, cap)
            conn.session.keepalive = cap
        return principal

    def attach(self, conn: MqttConnection, clean_session: bool) -> bool:
        """Make ``conn`` the live connection of its client id; returns session_present."""
        client_id = conn.client_id
        old = self.live.get(client_id)
        if old is not None and old is not conn:
            log.info("session taken over client_id=%r old_peer=%s new_peer=%s",
                     client_id, old.peer, conn.peer)
            old._close_reason = "taken over by a new connection with the same client id"
            self.live.pop(client_id, None)
            self._publish_will(old)
            old.close()
        self.live[client_id] = conn
        assert conn.principal is not None
        provisioning = conn.principal.provisioning is not None  # always clean (ref §12.1)
        present = self.sessions.start(client_id, clean=clean_session or provisioning)
        self._features[client_id] = self._kinds(
            type(self._address(conn.principal, f)) for f in self.sessions.subscriptions(client_id))
        assert conn.principal is not None
        self.hub.connection_event(conn.principal, connected=True)
        log.info("connected client_id=%r peer=%s listener=%s auth=%s session_present=%s",
                 client_id, conn.peer, conn.listener, conn.principal.auth_type, present)
        return present

    def connection_ready(self, conn: MqttConnection) -> None:
        """Called once the CONNACK is out: restored subscriptions may now receive (queued C2D,
        module inputs), and callers waiting for this identity to come online are woken."""
        self._announce(conn, set(self._features.get(conn.client_id, ())))

    def _announce(self, conn: MqttConnection, kinds: set[type]) -> None:
        if not kinds:
            return
        waiters = self._waiters.get(conn.client_id)
        if waiters:
            keep = []
            for kind, fut in waiters:
                if kind in kinds and not fut.done():
                    fut.set_result(conn)
                elif not fut.done():
                    keep.append((kind, fut))
            self._waiters[conn.client_id] = keep
        for hook in self.ready_hooks:
            try:
                hook(conn, kinds)
            except Exception:  # a failing feature must not break the connection
                log.exception("delivery hook failed client_id=%r", conn.client_id)

    def target(self, client_id: str, kind: type) -> MqttConnection | None:
        """The live connection of ``client_id`` if it holds a subscription of ``kind``."""
        conn = self.live.get(client_id)
        if conn is not None and not conn.closed and kind in self._features.get(client_id, ()):
            return conn
        return None

    async def wait_target(self, client_id: str, kind: type, timeout: float) -> MqttConnection | None:
        """Wait up to ``timeout`` seconds for ``client_id`` to be connected with a subscription
        of ``kind`` (direct methods' connectTimeoutInSeconds, IoT Hub ref §5.2)."""
        conn = self.target(client_id, kind)
        if conn is not None or timeout <= 0:
            return conn
        fut: asyncio.Future[MqttConnection] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(client_id, []).append((kind, fut))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(client_id)
            if waiters is not None:
                waiters[:] = [(k, f) for k, f in waiters if f is not fut]
                if not waiters:
                    del self._waiters[client_id]

    def _kinds(self, kinds: Iterable[type]) -> frozenset[type]:
        """``kinds`` as the one shared frozenset holding them (a set per client costs
        about 230 bytes; the distinct sets are few)."""
        key = frozenset(kinds)
        return self._kind_sets.setdefault(key, key)

    @staticmethod
    def _address(principal: Principal, topic_filter: str) -> object:
        if principal.provisioning is not None:
            return dps.parse_filter(topic_filter)
        return addresses.parse_subscribe_filter(
            topic_filter, device_id=principal.device_id, module_id=principal.module_id)

    def connection_closed(self, conn: MqttConnection, reason: str) -> None:
        self.open_connections.discard(conn)
        live = self.live.get(conn.client_id) is conn
        if live:
            del self.live[conn.client_id]
            if not conn.clean_disconnect:
                self._publish_will(conn)
        if conn.principal is not None:  # every session that was attached, replaced ones too
            for hook in self.close_hooks:
                try:
                    hook(conn)
                except Exception:
                    log.exception("close hook failed client_id=%r", conn.client_id)
        if live:
            assert conn.principal is not None
            if conn.principal.provisioning is not None:
                self.sessions.discard(conn.client_id)
            self.hub.connection_event(conn.principal, connected=False)
            log.info("disconnected client_id=%r peer=%s reason=%s", conn.client_id, conn.peer, reason)

    def _publish_will(self, conn: MqttConnection) -> None:
        if conn.will is None or conn.principal is None:
            return
        will, conn.will = conn.will, None
        record = self.hub.telemetry_record(will.prepared, will.payload, retain=will.retain)
        self.hub.append([record]).add_done_callback(_log_failure)

    # -- subscriptions -----------------------------------------------------------------------

    def subscribe(self, conn: MqttConnection, packet: Subscribe) -> asyncio.Future[list[int]]:
        """Authorize every filter; IoT Hub closes the connection on a filter it does not allow
        rather than answering 0x80 (ref §1.5), so a forbidden filter raises ForbiddenError."""
        assert conn.principal is not None
        granted: dict[str, int] = {}
        codes: list[int] = []
        kinds: set[type] = set()
        for topic_filter, qos in packet.topics:
            kinds.add(type(self._address(conn.principal, topic_filter)))
            q = min(qos, 1)  # QoS 2 is granted as 1 (ref §1.5)
            granted[topic_filter] = q
            codes.append(q)
        self._features[conn.client_id] = self._kinds(
            self._features.get(conn.client_id, frozenset()) | kinds)

        written = self.sessions.subscribe(conn.client_id, granted)
        result: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()

        def done(fut: asyncio.Future[None]) -> None:
            if fut.exception() is not None:
                result.set_exception(fut.exception())  # type: ignore[arg-type]
            else:
                result.set_result(codes)
                if not conn.closed:
                    conn.after_flush(lambda: self._announce(conn, kinds))

        written.add_done_callback(done)
        return result

    def unsubscribe(self, conn: MqttConnection, packet: Unsubscribe) -> asyncio.Future[None]:
        assert conn.principal is not None
        remaining = set(self.sessions.subscriptions(conn.client_id)) - set(packet.topics)
        self._features[conn.client_id] = self._kinds(
            type(self._address(conn.principal, f)) for f in remaining)
        return self.sessions.unsubscribe(conn.client_id, list(packet.topics))

    def identity_changed(self, event: str, identity: Device | Module) -> None:
        """Registry listener: a deleted or disabled identity loses its live connection at
        once (IoT Hub has no in-band revocation either; the client must reconnect and is
        then refused), and so does one whose keys or certificate changed."""
        if event == "created":
            return
        module_id = identity.module_id if isinstance(identity, Module) else None
        client_id = f"{identity.device_id}/{module_id}" if module_id else identity.device_id
        conn = self.live.get(client_id)
        if conn is not None:
            status = getattr(identity, "status", None)  # modules have no status of their own
            conn.fail(f"identity {event}" + (f", status {status}" if status and event != "deleted" else ""))

    def release_pending(self, nbytes: int) -> None:
        """Commits finished for ``nbytes`` of pending messages; under half the total, the
        connections paused for the hub's bound read again."""
        self.pending_bytes -= nbytes
        if self.blocked and self.pending_bytes < self.pending_bytes_total // 2:
            for conn in list(self.blocked):
                self.blocked.discard(conn)
                conn.maybe_resume()

    def ca_certificate_changed(self, event: str, cert: CaCertificate) -> None:
        """Registry listener: a CA certificate deleted or replaced may have vouched for live
        ``certificateAuthority`` connections; they are closed, and each is checked again when
        its device reconnects (one still chained to a trusted CA gets back in)."""
        if event not in ("deleted", "replaced"):
            return  # a new CA, a new code or a verification takes no trust away
        for conn in list(self.live.values()):
            principal = conn.principal
            if principal is None or principal.auth_type != "x509":
                continue
            registry = self.hub.registry
            identity = (registry.get_device(principal.device_id) if principal.module_id is None
                        else registry.get_module(principal.device_id, principal.module_id))
            if identity is not None and identity.auth_type == "certificateAuthority":
                conn.fail(f"CA certificate {cert.name!r} {event}: reconnect to be checked again")

    def puback_received(self, conn: MqttConnection, packet_id: int) -> None:
        """A client acknowledged one of our QoS 1 publishes (a C2D completion, a module input
        delivered)."""
        for hook in self.puback_hooks:
            hook(conn, packet_id)


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("background step failed: %s", fut.exception())

