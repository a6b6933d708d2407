"""Run a real hub as a subprocess (``python -m gateway run``) for end-to-end tests.

The hub is found the way the CLI finds it: through ``hub.json`` in its data directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class HubProcess:
    def __init__(self, data_dir: Path, *, host_name: str = "testhub.local", tls_port: int = 0,
                 api_port: int = 0, extra_config: str = "", log_level: str = "debug",
                 address: str = "127.0.0.1", hub_config: str = "",
                 amqp_config: str = 'port = 0\nbind = "127.0.0.1"\n',
                 mqtt_bind: str | None = None) -> None:
        self.log_level = log_level
        self.data_dir = data_dir
        self.host_name = host_name
        self.config_file = data_dir.parent / f"{data_dir.name}.toml"
        self.config_file.write_text(
            f'[hub]\nhost_name = "{host_name}"\n{hub_config}'
            f"[mqtt]\ntls_port = {tls_port}\nlocal_port = 0\n"
            + (f'bind = "{mqtt_bind or address}"\n' if mqtt_bind or address != "127.0.0.1" else "")
            + (f'local_bind = "{address}"\n' if address != "127.0.0.1" else "")
            + f'[api]\nport = {api_port}\nbind = "{address}"\n'
            + f"[amqp]\n{amqp_config}" + extra_config
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    def start(self, timeout: float = 30.0) -> HubProcess:
        runtime = self.data_dir / "hub.json"
        if runtime.exists():
            runtime.unlink()
        old = getattr(self, "_log", None)
        if old is not None:
            old.close()  # a restart after kill(): the earlier process's log handle
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--log-level", self.log_level, "run",
             "--data-dir", str(self.data_dir), "--config", str(self.config_file)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()  # not left for the garbage collector (a ResourceWarning later)
                raise RuntimeError(f"hub exited with {self.proc.returncode}:\n{self.log_text()}")
            if runtime.exists():
                try:
                    self.info = json.loads(runtime.read_text())
                    return self
                except ValueError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"hub did not become ready:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def ca_file(self) -> str:
        return str(self.data_dir / "ca.pem")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def port(self, name: str) -> int:
        return int(self.info[name])

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (the durability tests rely on that)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def cli(self, *args: str, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "--data-dir", str(self.data_dir), *args],
            capture_output=True, text=True, cwd=REPO, timeout=timeout, input=input,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"gateway {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def connection_string(self, device_id: str, module_id: str | None = None, **kw: str) -> str:
        args = ["module", "connection-string", device_id, module_id] if module_id else \
            ["device", "connection-string", device_id]
        for k, v in kw.items():
            args += [f"--{k.replace('_', '-')}", v]
        return self.cli(*args).stdout.strip()


def create_device(hub: HubProcess, device_id: str, *flags: str) -> dict[str, Any]:
    return json.loads(hub.cli("device", "create", device_id, *flags).stdout)


def device_token(hub: HubProcess, device_id: str, key: str, ttl: int = 3600,
                 module_id: str | None = None) -> str:
    from gateway.hub.sas import generate_sas_token

    resource = f"{hub.host_name}/devices/{device_id}" + (f"/modules/{module_id}" if module_id else "")
    return generate_sas_token(resource, key, int(time.time()) + ttl)


def username(hub: HubProcess, device_id: str, module_id: str | None = None) -> str:
    ident = f"{device_id}/{module_id}" if module_id else device_id
    return f"{hub.host_name}/{ident}/?api-version=2021-04-12"
