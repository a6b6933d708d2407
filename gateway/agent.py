"""The module supervisor: the hub runs each configured bridge as a module process.

For every ``[modules.NAME]`` the supervisor makes sure the gateway's own device identity
(``hub.device_id``, default the host name) and the module identity exist, then starts
``python -m hw BRIDGE`` with the module's connection string and the hub's local MQTT socket in
its environment (never on the command line, where ``ps`` would show the key), and restarts it
with exponential backoff (1 s doubling to 60 s; reset after a minute of uptime) whenever it
exits. On shutdown every bridge gets SIGTERM, then SIGKILL after 10 s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from gateway.config import ModuleSpec
from gateway.hub.connstr import ConnectionString
from gateway.hub.registry import Registry

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, specs: tuple[ModuleSpec, ...], *, registry: Registry, host_name: str,
                 device_id: str, unix_socket: Path | None, tls_port: int | None,
                 ca_file: Path) -> None:
        self.specs = [s for s in specs if s.enabled]
        self.registry = registry
        self.host_name = host_name
        self.device_id = device_id
        self.unix_socket = unix_socket
        self.tls_port = tls_port
        self.ca_file = ca_file
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.restarts: dict[str, int] = {}

    async def ensure_identities(self) -> None:
        if not self.specs:
            return
        if self.registry.get_device(self.device_id) is None:
            await self.registry.put_device(
                {"deviceId": self.device_id, "capabilities": {"iotEdge": True}},
                device_id=self.device_id, if_match=None)
            log.info("created the gateway device identity device_id=%s", self.device_id)
        for spec in self.specs:
            if self.registry.get_module(self.device_id, spec.name) is None:
                await self.registry.put_module(
                    {"deviceId": self.device_id, "moduleId": spec.name,
                     "managedBy": "gateway"},
                    device_id=self.device_id, module_id=spec.name, if_match=None)
                log.info("created module identity module=%s/%s", self.device_id, spec.name)

    def _environment(self, spec: ModuleSpec) -> dict[str, str]:
        module = self.registry.get_module(self.device_id, spec.name)
        assert module is not None and module.primary_key
        cs = ConnectionString(host_name=self.host_name, device_id=self.device_id,
                              module_id=spec.name, shared_access_key=module.primary_key)
        env = {**os.environ, "GATEWAY_CONNECTION_STRING": str(cs),
               "GATEWAY_CA_FILE": str(self.ca_file),
               "GATEWAY_STATUS_INTERVAL": str(spec.status_interval)}
        if self.unix_socket is not None:
            env["GATEWAY_UNIX_SOCKET"] = str(self.unix_socket)
        elif self.tls_port is not None:
            env["GATEWAY_MQTT_PORT"] = str(self.tls_port)
        return env

    async def run(self) -> None:
        """Supervise every bridge until cancelled."""
        if not self.specs:
            return
        async with asyncio.TaskGroup() as tasks:
            for spec in self.specs:
                tasks.create_task(self._supervise(spec), name=f"module {spec.name}")

    async def _supervise(self, spec: ModuleSpec) -> None:
        backoff = 1.0
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hw", spec.bridge, env=self._environment(spec),
                stdin=asyncio.subprocess.DEVNULL)
            self.processes[spec.name] = proc
            log.info("module started module=%s bridge=%s pid=%s", spec.name, spec.bridge, proc.pid)
            try:
                code = await proc.wait()
            except asyncio.CancelledError:
                await self._stop(proc)
                raise
            if loop.time() - started > 60:
                backoff = 1.0
            self.restarts[spec.name] = self.restarts.get(spec.name, 0) + 1
            log.warning("module exited module=%s code=%s; restarting in %.0f s",
                        spec.name, code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 60.0)

    @staticmethod
    async def _stop(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await asyncio.shield(proc.wait())
        except TimeoutError:
            proc.kill()
            await proc.wait()
