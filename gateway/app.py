"""Composition root: config -> components, one TaskGroup, readiness and watchdog.

Nothing else wires components together. Start order follows the data flow (store, registry,
hub, listeners); readiness (``READY=1`` and the runtime file other commands find the hub by) is
announced only once every listener is bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import hubcerts, memory
from gateway.agent import Supervisor
from gateway.api.lazy import LazyApi
from gateway.broker.broker import Broker
from gateway.broker.devicetls import DeviceTls
from gateway.broker.listener import Admission, raise_fd_limit
from gateway.broker.sessions import SessionStore
from gateway.config import Config
from gateway.endpoints.manager import EndpointManager
from gateway.files.forward import for_upstream
from gateway.files.store import FileStore
from gateway.hub.auth import Authenticator
from gateway.hub.c2d import C2DQueues
from gateway.hub.c2dfed import C2DForwarder
from gateway.hub.c2dsvc import C2DService
from gateway.hub.connstr import ConnectionString
from gateway.hub.drops import EnrichedDrops
from gateway.hub.enrollments import EnrollmentGroup, EnrollmentStore
from gateway.hub.federated import Federation
from gateway.hub.hub import Hub
from gateway.hub.methods import MethodService
from gateway.hub.modinputs import ModuleInputService
from gateway.hub.onbehalf import OnBehalf
from gateway.hub.provisioning import ProvisioningService
from gateway.hub.quota import DailyQuota
from gateway.hub.registry import Device, Module, Registry
from gateway.hub.twinstore import TwinStore
from gateway.hub.twinsvc import TwinService
from gateway.metrics import Metrics
from gateway.notify import Notifier
from gateway.routingsvc import RoutingService
from gateway.store.db import Database
from gateway.store.files import private_directory
from gateway.store.log import MessageLog
from gateway.tasks import TaskSet
from gateway.ui.logbuf import RingHandler
from gateway.upstream.c2dmirror import C2DMirror
from gateway.upstream.configpush import ConfigPush
from gateway.upstream.downlink import Downlink
from gateway.upstream.idmirror import IdentityMirror
from gateway.upstream.modulepush import ModulePush
from gateway.upstream.policy import from_config
from gateway.upstream.provision import provision_until_done
from gateway.upstream.reported import ReportedQueue
from gateway.upstream.routes import routed_policy, routed_select
from gateway.upstream.service import Upstream

if TYPE_CHECKING:
    from gateway.amqp.server import AmqpServer
    from gateway.api.server import ServiceApi

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


def dial_address(bind: str) -> str:
    """Where a local client reaches a listener bound to ``bind``: the wildcard means loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind, bind)


def bind_addresses(config: Config) -> list[str]:
    """The specific addresses the listeners are bound to (several hubs on one machine, each on
    its own loopback address): the server certificate must name them."""
    found = set()
    for bind in (config.mqtt.bind, config.mqtt.local_bind, config.api.bind):
        with contextlib.suppress(ValueError):  # a host name: its addresses are not ours to pin
            address = ipaddress.ip_address(bind)
            if not address.is_unspecified:
                found.add(str(address))
    return sorted(found)


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
    api: LazyApi  # the service API, built with its first connection
    log: MessageLog
    certs: hubcerts.HubCertificates
    runtime: dict[str, object] = field(default_factory=dict)
    routing: RoutingService | None = None
    upstream: Upstream | None = None


async def run(config: Config, *, ready: asyncio.Future[Gateway] | None = None,
              stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None)."""
    data_dir = config.data_dir
    private_directory(data_dir)  # 0700: an existing wider one is tightened, or we refuse
    notifier = Notifier()
    admission = Admission.within_fd_limit(
        config.limits.max_connections, config.limits.max_connections_per_address,
        raise_fd_limit())
    host_names = [config.hub.host_name, *config.hub.aliases]
    certs = await asyncio.to_thread(  # cryptography only when a file must be (re)made
        hubcerts.ensure, data_dir, host_names=host_names,
        addresses=[*local_addresses(), *config.hub.addresses, *bind_addresses(config)],
    )
    db = Database(data_dir / "hub.db", synchronous=config.store.sync)
    await db.open()
    registry = await Registry.open(data_dir / "registry.db")
    broker: Broker | None = None
    api: LazyApi | None = None
    amqp: AmqpServer | None = None
    tasks_ = TaskSet()
    ring = RingHandler()  # the UI's live log tail
    restart = asyncio.Event()
    logging.getLogger().addHandler(ring)
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
        broker = Broker(config.mqtt, hub, sessions,
                        pending_bytes_total=config.limits.pending_bytes_total,
                        admission=admission)
        hub.methods = MethodService(broker, hub.children)
        hub.federation = Federation(  # identities behind child gateways
            registry, broker, is_self=(config.hub.device_id or config.hub.host_name).__eq__,
            twins=twin_store.get)
        broker.ready_hooks.append(hub.federation.on_ready)
        hub.methods.federation = hub.federation
        broker.close_hooks.append(hub.federation.on_closed)
        if config.hub.on_behalf:
            hub.on_behalf = OnBehalf(registry, tasks_)
        if config.hub.daily_message_quota:
            hub.quota = DailyQuota(config.hub.daily_message_quota)
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
        # messages an endpoint's enrichments push over the size limit (IoT Hub ref §10.4):
        # dropped for it, counted per endpoint for its health and /metrics
        drops = EnrichedDrops()
        inputs = ModuleInputService(message_log, hub.router,
                                    broker=broker, registry=registry, tasks=tasks_,
                                    max_message_bytes=hub.max_message_bytes, drops=drops)
        endpoints = EndpointManager(message_log, hub_name=config.hub.host_name, data_dir=data_dir,
                                    max_message_bytes=hub.max_message_bytes, drops=drops)
        routing = RoutingService(db, hub=hub, inputs=inputs, endpoints=endpoints, drops=drops)
        await routing.open(config)  # the router, module inputs and endpoints, live from here
        broker.ready_hooks.append(inputs.on_ready)
        broker.puback_hooks.append(inputs.on_puback)
        broker.close_hooks.append(inputs.on_closed)
        registry.add_listener(inputs.identity_changed)
        # Any client certificate passes the handshake, on 8883 and 443 alike: auth.py decides
        # (ref §8), and every refusal is logged with its reason. The pyOpenSSL context is
        # built with the first TLS connection (the idle footprint, issue 16).
        device_tls = DeviceTls(certs.server_cert, certs.server_key)
        provisioning = await _provisioning(config, db, registry, hub, certs, tasks_)
        registry.add_listener(broker.identity_changed, updates=True)
        registry.add_certificate_listener(broker.ca_certificate_changed)
        await broker.start(
            tls_context=device_tls,
            unix_path=data_dir / "mqtt.sock" if config.mqtt.unix_socket else None,
        )
        gateway_id = config.hub.device_id or config.hub.host_name  # the bridges' device
        reported = ReportedQueue(db)  # federation: reported patches on their way up
        await reported.open()
        hub.federation.apply_reported = hub.twins.federated_reported
        identities = IdentityMirror(registry, db, local_gateway=gateway_id)  # from the parent
        await identities.open()
        config_push = ConfigPush(  # routing and modules set in our twin at the parent
            routing, db, ModulePush(hub.twins, gateway_id=gateway_id))
        await config_push.open()
        routing.owner_of = config_push.owner_of  # parent-owned items: marked, not changed here
        hub.twins.configured_owner = config_push.modules_owner  # and parent-owned modules
        c2d_mirror = C2DMirror(hub.c2d, db)  # C2D handed down by the parent
        await c2d_mirror.open()
        c2d_queues.settle_hooks.append(c2d_mirror.on_queue_settled)  # whatever settled it
        c2d_forwarder = C2DForwarder(c2d_queues, hub.federation)  # and handed down by us
        hub.c2d.forwarder = c2d_forwarder
        hub.federation.settle_here = c2d_forwarder.settle_here
        hub.federation.ready_hooks.append(c2d_forwarder.on_ready)
        hub.federation.has_parent = lambda: upstream.settings is not None
        current_router = lambda: hub.router  # noqa: E731 - swapped live by the routing service
        upstream = Upstream(data_dir=data_dir, cfg=config.upstream, log_=message_log, db=db,
                            local_gateway=gateway_id, refuse=hub.refuse_telemetry,
                            credentials=partial(_sas_key, registry),
                            select=routed_select(current_router),
                            policy_of=routed_policy(current_router, from_config(config.upstream)),
                            downlink=Downlink(hub.methods, hub.federation,
                                              local_gateway=gateway_id, twins=hub.twins,
                                              reported=reported, identities=identities,
                                              c2d=c2d_mirror, config=config_push,
                                              refresh=config.upstream.federation_refresh))
        routing.upstream_status = upstream.status
        metrics = Metrics(db, broker, message_log,
                          lambda: upstream.status() if upstream.settings else None,
                          enriched_drops=drops.counts)
        files = await _files(config, db, message_log)
        file_store = files[0] if files is not None else None
        file_forwarder = (for_upstream(file_store, config.files, upstream, gateway_id)
                          if file_store is not None else None)
        if config.amqp.enabled:  # back ends over AMQP: Event Hubs reads, C2D (gateway/amqp)
            amqp = await _amqp(config, message_log, authenticator, hub, certs, routing,
                               file_store)
        # Listening from here; the routes below are built with the first connection.
        api = LazyApi(partial(
            _service_api, config, registry=registry, authenticator=authenticator,
            log_=message_log, hub=hub, broker=broker, routing=routing, upstream=upstream,
            metrics=metrics, provisioning=provisioning, files=files, amqp=amqp, ring=ring,
            # The web page's restart: a clean stop, then the same command again (gateway run).
            restart=restart.set if stop is None else None, started=time.time()),
            modules=API_MODULES + (("gateway.amqp.websocket",) if amqp is not None else ()))
        await api.start(config.api.bind, config.api.port, device_tls, admission=admission,
                        header_timeout=config.api.header_timeout,
                        body_timeout=config.api.body_timeout)
        owner = registry.get_policy("iothubowner")
        assert owner is not None
        write_private(data_dir / OWNER_FILE, str(ConnectionString(
            host_name=config.hub.host_name, shared_access_key_name=owner.name,
            shared_access_key=owner.primary_key)) + "\n")
        runtime: dict[str, object] = {
            "pid": os.getpid(),
            "host_name": config.hub.host_name,
            "device_id": gateway_id,
            "api_host": dial_address(config.api.bind),
            "api_port": api.port,
            "mqtt_host": dial_address(config.mqtt.bind),
            "mqtt_local_host": dial_address(config.mqtt.local_bind),
            "mqtt_tls_port": broker.ports.get("tls"),
            "mqtt_local_port": broker.ports.get("local"),
            "mqtt_unix_socket": broker.ports.get("unix"),
            "amqp_port": amqp.port if amqp is not None else None,
            "event_hub_name": amqp.services.event_hub if amqp is not None else None,
            "ca_file": str(certs.ca_cert),
        }
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
        # Written once the modules' identities exist: whoever finds the hub by this file can
        # address them at once (a test, a technician's `gateway module ...`).
        write_private(data_dir / RUNTIME_FILE, json.dumps(runtime, indent=2) + "\n")
        gateway = Gateway(config=config, registry=registry, hub=hub, broker=broker, api=api,
                          log=message_log, certs=certs, runtime=runtime, routing=routing,
                          upstream=upstream)
        stop_event = stop or _signal_stop()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(message_log.run_retention(), name="retention")
            tasks.create_task(hub.c2d.run(), name="c2d-timers")
            tasks.create_task(endpoints.run(), name="endpoints")
            if file_store is not None:
                tasks.create_task(file_store.run(), name="file-expiry")
            if file_forwarder is not None:
                tasks.create_task(file_forwarder.run(), name="file-forward")
            tasks.create_task(supervisor.run(), name="modules")
            tasks.create_task(upstream.run(), name="upstream")
            tasks.create_task(_relay(restart, stop_event), name="ui-restart")
            tasks.create_task(provision_until_done(data_dir, config.upstream),
                              name="upstream-provisioning")
            if amqp is not None:
                tasks.create_task(amqp.serve(), name="amqp")
            tasks.create_task(api.run(), name="service-api")
            if notifier.watchdog_interval:
                tasks.create_task(_watchdog(notifier), name="watchdog")
            notifier.ready(f"serving: mqtt {broker.ports}, https {api.port}")
            log.info("hub ready host_name=%s data_dir=%s", config.hub.host_name, data_dir)
            if ready is not None and not ready.done():
                ready.set_result(gateway)
            memory.trim()  # what start-up freed goes back to the kernel (idle footprint)
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
        logging.getLogger().removeHandler(ring)
        if restart.is_set():
            from gateway.ui.server import reexec

            reexec()


async def _amqp(config: Config, message_log: MessageLog, authenticator: Authenticator,
                hub: Hub, certs: hubcerts.HubCertificates, routing: RoutingService,
                files: FileStore | None) -> AmqpServer | None:
    """The AMQP listener, when Apache Qpid Proton is installed (the ``amqp`` extra; it has no
    wheels on PyPI, so the appliance image leaves it out). Its WebSocket route comes with the
    service API (:func:`_service_api`)."""
    try:
        from gateway.amqp import make_services
        from gateway.amqp.server import AmqpServer, amqp_ssl_context
    except ImportError as exc:
        log.warning("amqp listener off: %s (pip install 'edge-gateway[amqp]')", exc)
        return None
    server = AmqpServer(make_services(config.amqp, host_name=config.hub.host_name,
                                      log=message_log, authenticator=authenticator, c2d=hub.c2d,
                                      files=files, events=routing),
                        amqp_ssl_context(certs.server_cert, certs.server_key))
    await server.start()
    return server


API_MODULES = ("gateway.api.server", "gateway.api.routing_api", "gateway.api.enrollments",
               "gateway.api.files", "gateway.upstream.api", "gateway.ui.server")
"""What :func:`_service_api` imports: gateway.api.lazy loads them in a worker thread first."""


def _service_api(config: Config, port: int, *, registry: Registry,
                 authenticator: Authenticator, log_: MessageLog, hub: Hub, broker: Broker,
                 routing: RoutingService, upstream: Upstream, metrics: Metrics,
                 provisioning: ProvisioningService | None, files: tuple[FileStore, bytes] | None,
                 amqp: AmqpServer | None, ring: RingHandler, restart: Callable[[], None] | None,
                 started: float) -> ServiceApi:
    """The HTTPS service API and every component's routes on it, in the order they were
    always registered (the first route that matches a request serves it); built by
    gateway.api.lazy with the first connection to ``port``."""
    from gateway.api.enrollments import add_enrollment_routes
    from gateway.api.files import add_file_routes
    from gateway.api.server import ServiceApi
    from gateway.ui.server import UiServer
    from gateway.upstream.api import add_upstream_routes

    api = ServiceApi(host_name=config.hub.host_name, registry=registry,
                     authenticator=authenticator, log=log_, hub=hub, broker=broker,
                     events_page_bytes=config.api.events_page_bytes, routing=routing)
    add_upstream_routes(api, upstream)
    metrics.add_route(api)
    if provisioning is not None:
        add_enrollment_routes(api, provisioning)
    if files is not None:  # devices upload to the port the API listens on
        store, key = files
        add_file_routes(api, hub, store, key=key, blob_host=config.files.blob_host or (
            config.hub.host_name if port == 443 else f"{config.hub.host_name}:{port}"))
    if amqp is not None:
        amqp.add_websocket_route(api.app)
    UiServer(config=config, api=api, upstream=upstream, ring=ring, broker=broker,
             restart=restart, started=started).add_routes()
    return api


async def _provisioning(config: Config, db: Database, registry: Registry, hub: Hub,
                        certs: hubcerts.HubCertificates,
                        tasks: TaskSet) -> ProvisioningService | None:
    """The DPS for downstream devices, on the hub's own MQTT port (ref §12)."""
    if not config.provisioning.enabled:
        return None
    store = EnrollmentStore(db)
    await store.open()

    async def initial_twin(device_id: str, group: EnrollmentGroup) -> None:
        if group.initial_tags or group.initial_desired:
            await hub.twins.service_update(
                device_id, None, {"tags": dict(group.initial_tags),
                                  "properties": {"desired": dict(group.initial_desired)}},
                if_match=None, replace=False)

    service = ProvisioningService(
        store, registry, assigned_hub=config.provisioning.assigned_hub or config.hub.host_name,
        ca_pems=[certs.ca_cert.read_text()], initial_twin=initial_twin, tasks=tasks,
        clock=time.time)
    hub.authenticator.provisioning = service
    hub.provisioning = service
    return service


async def _files(config: Config, db: Database,
                 message_log: MessageLog) -> tuple[FileStore, bytes] | None:
    """File upload (ref §11): files under DATA_DIR/files, counted in the store's byte cap; the
    store and the key of its upload tokens (the routes come with the service API)."""
    if not config.files.enabled:
        return None
    store = FileStore(db, config.data_dir / "files", config.files,
                      store_cap=config.store.max_bytes,
                      used_by_log=lambda: message_log.stats().bytes,
                      drop_oldest=config.store.overflow == "drop-oldest")
    await store.open()
    key_file = config.data_dir / "files.key"
    if not key_file.exists():
        write_private(key_file, secrets.token_hex(32) + "\n")
    return store, bytes.fromhex(key_file.read_text().strip())


def _drop_c2d_queue(tasks: TaskSet, queues: C2DQueues, event: str,
                    identity: Device | Module) -> None:
    """A deleted device's C2D queue goes with it, without feedback (ref §3.3)."""
    if event == "deleted" and isinstance(identity, Device):
        tasks.spawn(queues.drop_device(identity.device_id), "c2d-drop")


def _sas_key(registry: Registry, device_id: str, module_id: str | None) -> str | None:
    """An identity's own SAS key (the upstream link's identity mode connects with it)."""
    identity = (registry.get_module(device_id, module_id) if module_id
                else registry.get_device(device_id))
    if identity is None or identity.auth_type != "sas":
        return None
    return identity.primary_key


async def _relay(event: asyncio.Event, stop: asyncio.Event) -> None:
    await event.wait()
    stop.set()


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
