"""Composition root: config -> components, one TaskGroup, readiness and watchdog.

Nothing else wires components together. Start order follows the data flow (store, registry,
hub, listeners); readiness (``READY=1`` and the runtime file other commands find the hub by) is
announced only once every listener is bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import ssl
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from gateway import pki
from gateway.agent import Supervisor
from gateway.amqp import make_services
from gateway.amqp.server import AmqpServer, amqp_ssl_context
from gateway.api.server import ServiceApi
from gateway.broker.broker import Broker
from gateway.broker.sessions import SessionStore
from gateway.config import Config
from gateway.hub.auth import Authenticator
from gateway.hub.c2d import C2DQueues
from gateway.hub.c2dsvc import C2DService
from gateway.hub.connstr import ConnectionString
from gateway.hub.hub import Hub
from gateway.hub.methods import MethodService
from gateway.hub.modinputs import ModuleInputService
from gateway.hub.registry import Device, Module, Registry
from gateway.hub.twinstore import TwinStore
from gateway.hub.twinsvc import TwinService
from gateway.notify import Notifier
from gateway.routing.routes import RouteTable
from gateway.store.db import Database
from gateway.store.log import MessageLog
from gateway.tasks import TaskSet

log = logging.getLogger(__name__)

RUNTIME_FILE = "hub.json"
OWNER_FILE = "owner.connstr"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def local_addresses() -> list[str]:
    found = {"127.0.0.1", "::1"}
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(str(info[4][0]))
    return sorted(found)


@dataclass
class Gateway:
    """The running hub's parts, for tests and the demo to reach into."""

    config: Config
    registry: Registry
    hub: Hub
    broker: Broker
    api: ServiceApi
    log: MessageLog
    certs: pki.HubCertificates
    runtime: dict[str, object] = field(default_factory=dict)


async def run(config: Config, *, ready: asyncio.Future[Gateway] | None = None,
              stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None)."""
    data_dir = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    notifier = Notifier()
    host_names = [config.hub.host_name, *config.hub.aliases]
    certs = await asyncio.to_thread(
        pki.ensure_certificates, data_dir, host_names=host_names,
        addresses=[*local_addresses(), *config.hub.addresses],
    )
    db = Database(data_dir / "hub.db", synchronous=config.store.sync)
    await db.open()
    registry = await Registry.open(data_dir / "registry.db")
    broker: Broker | None = None
    api: ServiceApi | None = None
    amqp: AmqpServer | None = None
    tasks_ = TaskSet()
    try:
        message_log = MessageLog(
            db, retention_s=config.store.retention_days * 86400,
            max_bytes=config.store.max_bytes, overflow=config.store.overflow,
        )
        await message_log.open()
        sessions = SessionStore(db)
        await sessions.open()
        twin_store = TwinStore(db)
        await twin_store.open()
        authenticator = Authenticator(registry, host_names=host_names,
                                      ca_pems=[certs.ca_cert.read_text()])
        hub = Hub(host_name=config.hub.host_name, registry=registry, authenticator=authenticator,
                  log=message_log, twin_store=twin_store,
                  max_message_bytes=config.mqtt.max_message_bytes)
        broker = Broker(config.mqtt, hub, sessions)
        hub.methods = MethodService(broker, hub.children)
        hub.children.broker = broker
        broker.ready_hooks.append(hub.children.on_ready)
        registry.add_listener(hub.children.identity_changed, updates=True)
        hub.twins = TwinService(twin_store, hub=hub, broker=broker, tasks=tasks_)
        registry.add_listener(hub.twins.identity_changed)
        c2d_queues = C2DQueues(db)
        await c2d_queues.open()
        hub.c2d = C2DService(c2d_queues, broker=broker, registry=registry, tasks=tasks_)
        broker.ready_hooks.append(hub.c2d.on_ready)
        broker.puback_hooks.append(hub.c2d.on_puback)
        broker.close_hooks.append(hub.c2d.on_closed)
        registry.add_listener(partial(_drop_c2d_queue, tasks_, c2d_queues))
        inputs = ModuleInputService(message_log, RouteTable.parse(dict(config.routes)),
                                    broker=broker, registry=registry, tasks=tasks_)
        await inputs.open()
        broker.ready_hooks.append(inputs.on_ready)
        broker.puback_hooks.append(inputs.on_puback)
        broker.close_hooks.append(inputs.on_closed)
        registry.add_listener(inputs.identity_changed)
        mqtt_tls = pki.server_ssl_context(certs, extra_trust_pems=registry.registered_certificates())
        registry.add_listener(broker.identity_changed, updates=True)
        registry.add_listener(partial(_trust_certificate, mqtt_tls), updates=True)
        await broker.start(
            tls_context=mqtt_tls,
            unix_path=data_dir / "mqtt.sock" if config.mqtt.unix_socket else None,
        )
        api = ServiceApi(host_name=config.hub.host_name, registry=registry,
                         authenticator=authenticator, log=message_log, hub=hub, broker=broker)
        if config.amqp.enabled:  # back ends over AMQP: Event Hubs reads, C2D (gateway/amqp)
            amqp = AmqpServer(make_services(config.amqp, host_name=config.hub.host_name,
                                            log=message_log, authenticator=authenticator,
                                            c2d=hub.c2d),
                              amqp_ssl_context(certs.server_cert, certs.server_key))
            amqp.add_websocket_route(api.app)
            await amqp.start()
        # The MQTT listener's context: X.509 devices (self-signed ones too) work over WSS.
        await api.start(config.api.bind, config.api.port, mqtt_tls)
        owner = registry.get_policy("iothubowner")
        assert owner is not None
        write_private(data_dir / OWNER_FILE, str(ConnectionString(
            host_name=config.hub.host_name, shared_access_key_name=owner.name,
            shared_access_key=owner.primary_key)) + "\n")
        gateway_id = config.hub.device_id or config.hub.host_name  # the bridges' device
        runtime: dict[str, object] = {
            "pid": os.getpid(),
            "host_name": config.hub.host_name,
            "device_id": gateway_id,
            "api_port": api.port,
            "mqtt_tls_port": broker.ports.get("tls"),
            "mqtt_local_port": broker.ports.get("local"),
            "mqtt_unix_socket": broker.ports.get("unix"),
            "amqp_port": amqp.port if amqp is not None else None,
            "event_hub_name": amqp.services.event_hub if amqp is not None else None,
            "ca_file": str(certs.ca_cert),
        }
        write_private(data_dir / RUNTIME_FILE, json.dumps(runtime, indent=2) + "\n")
        supervisor = Supervisor(
            config.modules, registry=registry, host_name=config.hub.host_name,
            device_id=gateway_id,
            unix_socket=data_dir / "mqtt.sock" if config.mqtt.unix_socket else None,
            tls_port=int(broker.ports["tls"]), ca_file=certs.ca_cert)
        await supervisor.ensure_identities()
        for spec in supervisor.specs:  # children registered by earlier runs' twins
            twin = twin_store.get(supervisor.device_id, spec.name)
            if twin is not None:
                await hub.children.module_desired(supervisor.device_id, spec.name, twin.desired)
        gateway = Gateway(config=config, registry=registry, hub=hub, broker=broker, api=api,
                          log=message_log, certs=certs, runtime=runtime)
        stop_event = stop or _signal_stop()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(message_log.run_retention(), name="retention")
            tasks.create_task(hub.c2d.run(), name="c2d-timers")
            tasks.create_task(supervisor.run(), name="modules")
            if amqp is not None:
                tasks.create_task(amqp.serve(), name="amqp")
            if notifier.watchdog_interval:
                tasks.create_task(_watchdog(notifier), name="watchdog")
            notifier.ready(f"serving: mqtt {broker.ports}, https {api.port}")
            log.info("hub ready host_name=%s data_dir=%s", config.hub.host_name, data_dir)
            if ready is not None and not ready.done():
                ready.set_result(gateway)
            await stop_event.wait()
            notifier.stopping()
            raise _Stop
    except* _Stop:
        pass
    finally:
        with contextlib.suppress(FileNotFoundError):
            (data_dir / RUNTIME_FILE).unlink()
        if broker is not None:
            await broker.stop()
        if api is not None:
            await api.stop()
        if amqp is not None:
            await amqp.stop()
        await tasks_.close()
        await registry.close()
        await db.close()
        log.info("hub stopped")


def _trust_certificate(context: ssl.SSLContext, event: str, identity: Device | Module) -> None:
    """A self-signed device certificate registered while the hub runs becomes a TLS trust
    anchor for new handshakes at once. (OpenSSL cannot remove anchors from a live context: a
    deleted device's certificate stays trusted at the TLS level until restart, but the
    identity check in auth.py refuses it.)"""
    if event != "deleted" and identity.certificate_pem:
        context.load_verify_locations(cadata=identity.certificate_pem)


def _drop_c2d_queue(tasks: TaskSet, queues: C2DQueues, event: str,
                    identity: Device | Module) -> None:
    """A deleted device's C2D queue goes with it, without feedback (ref §3.3)."""
    if event == "deleted" and isinstance(identity, Device):
        tasks.spawn(queues.drop_device(identity.device_id), "c2d-drop")


class _Stop(Exception):
    """Raised inside the TaskGroup to cancel its tasks on shutdown."""


def _signal_stop() -> asyncio.Event:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


async def _watchdog(notifier: Notifier) -> None:
    assert notifier.watchdog_interval is not None
    while True:
        notifier.watchdog()
        await asyncio.sleep(notifier.watchdog_interval)
