"""A small synchronous client for the running hub's service API, used by the CLI.

It finds the hub through the data directory: ``hub.json`` (written when the hub is ready) gives
the HTTPS port and the CA file; ``owner.connstr`` (mode 0600) holds the ``iothubowner`` policy
connection string that signs each request.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError
from gateway.hub.connstr import parse_connection_string
from gateway.hub.sas import generate_sas_token

API_VERSION = "2021-04-12"


class HubNotRunning(GatewayError):
    pass


class ApiError(GatewayError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HubClient:
    def __init__(self, data_dir: Path) -> None:
        runtime = data_dir / "hub.json"
        try:
            info = json.loads(runtime.read_text())
            owner = parse_connection_string((data_dir / "owner.connstr").read_text().strip())
        except FileNotFoundError:
            from gateway import config

            system = config.SYSTEM_DATA_DIR
            hint = (f"; {system} exists but is not readable by you: run as the hub's user or "
                    "root" if system.exists() and not config.is_ours(system) else "")
            raise HubNotRunning(
                f"no running hub found in {data_dir} (start one with: gateway run --data-dir "
                f"{data_dir}){hint}") from None
        except PermissionError as exc:
            raise GatewayError(f"cannot read the hub's files in {data_dir}: {exc.strerror} "
                               "(run as the hub's user or root)") from None
        self.info = info
        self.host_name: str = info["host_name"]
        host = str(info.get("api_host") or "localhost")  # hubs side by side: each its address
        self.base = f"https://{f'[{host}]' if ':' in host else host}:{info['api_port']}"
        self.ssl = ssl.create_default_context(cafile=info["ca_file"])
        assert owner.shared_access_key and owner.shared_access_key_name
        self._key = owner.shared_access_key
        self._policy = owner.shared_access_key_name

    def _token(self) -> str:
        return generate_sas_token(self.host_name, self._key, int(time.time()) + 3600, self._policy)

    def _open(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None,
              timeout: float | None = 30.0, headers: dict[str, str] | None = None) -> Any:
        params = {"api-version": API_VERSION, **(query or {})}
        url = f"{self.base}{urllib.parse.quote(path)}?{urllib.parse.urlencode(params)}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", self._token())
        if data is not None:
            request.add_header("Content-Type", "application/json; charset=utf-8")
        for k, v in (headers or {}).items():
            request.add_header(k, v)
        try:
            return urllib.request.urlopen(request, context=self.ssl, timeout=timeout)
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                message = json.loads(text).get("ExceptionMessage") or text
            except (ValueError, AttributeError):
                message = text or exc.reason
            raise ApiError(exc.code, f"{message} (HTTP {exc.code})") from None
        except urllib.error.URLError as exc:
            raise HubNotRunning(f"cannot reach the hub at {self.base}: {exc.reason}") from None

    def raw(self, method: str, path: str, body: Any = None,
            **kw: Any) -> tuple[Any, str] | None:
        """Like :meth:`request`, also giving the ETag header (a lock token); None on 204."""
        with self._open(method, path, body, **kw) as response:
            if response.status == 204:
                return None
            return json.loads(response.read()), response.headers.get("ETag", "").strip('"')

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        with self._open(method, path, body, **kw) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def download(self, path: str, out: Any, query: dict[str, str] | None = None) -> int:
        """Copy a route's raw body to the binary file ``out``; returns the byte count."""
        n = 0
        with self._open("GET", path, query=query, timeout=300) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                n += len(chunk)
        return n

    def stream(self, path: str, query: dict[str, str],
               idle_timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Newline-delimited JSON from a streaming route. Blank heartbeat lines are skipped;
        the stream ends after ``idle_timeout`` seconds without a message (None: never)."""
        last = time.monotonic()
        with self._open("GET", path, query={**query, "stream": "true"},
                        timeout=idle_timeout) as response:
            while True:
                try:
                    line = response.readline()
                except TimeoutError:
                    return
                if not line:
                    raise HubNotRunning("the hub closed the event stream")
                if line.strip():
                    last = time.monotonic()
                    yield json.loads(line)
                elif idle_timeout is not None and time.monotonic() - last >= idle_timeout:
                    return
