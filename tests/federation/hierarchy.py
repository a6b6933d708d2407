"""Three hubs on loopback for federation tests: leaf -> site -> top (``$FED_NET``.0/24,
default 127.0.23.0/24, so that two runs on one machine can use different networks).

The leaf's MQTT TLS port is 8883 on its own address, so an unmodified Azure SDK device (which
always dials 8883) reaches it with ``GatewayHostName=$FED_NET.3``; top and site keep fixed
ports picked at start so that a restart comes back where the child dials.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.hubproc import HubProcess, create_device
from tests.upstream.federation import free_port

NET = os.environ.get("FED_NET", "127.0.23")
TOP, SITE, LEAF = f"{NET}.1", f"{NET}.2", f"{NET}.3"
UPSTREAM = ("[upstream]\nreconnect_min = 0.05\nreconnect_max = 0.5\nkeepalive = 5\n"
            "ack_timeout = 5.0\nstatus_interval = 1.0\n")


@dataclass
class Hierarchy:
    top: HubProcess
    site: HubProcess
    leaf: HubProcess

    def hubs(self) -> list[HubProcess]:
        return [self.top, self.site, self.leaf]

    def stop(self) -> None:
        for hub in reversed(self.hubs()):
            hub.stop()


TOP_PROXY, SITE_PROXY = f"{NET}.4", f"{NET}.5"  # fault proxies in front of top and site


def _hub(tmp: Path, name: str, address: str, port: int, extra: str = "",
         alias: str = "", host_name: str = "", api_port: int = 0) -> HubProcess:
    return HubProcess(tmp / name, host_name=host_name or f"{name}.local", address=address,
                      tls_port=port, api_port=api_port, log_level="debug", extra_config=extra,
                      hub_config=f'addresses = ["{alias}"]\n' if alias else "")


def start(tmp: Path, dial: Callable[[str, int], tuple[str, int]] | None = None,
          leaf_extra: str = "", service_sdk: bool = False) -> Hierarchy:
    """Start the three hubs and link them: ``site`` (--edge) and ``leaf`` (--edge --parent
    site) at the top, ``leaf`` (--edge) at the site; the leaf's and the site's upstream set.
    ``dial(parent address, port)``: where the child dials instead (a fault proxy; the
    certificates of top and site also name TOP_PROXY and SITE_PROXY). ``leaf_extra``: more
    of the leaf's gateway.toml (sections with their headers). ``service_sdk``: the top's host
    name is its address and its service API listens on 443 there, so that the unmodified
    ``azure-iot-hub`` registry manager (which dials ``https://{HostName}``) reaches it."""
    top = _hub(tmp, "top", TOP, free_port(TOP), alias=TOP_PROXY if dial else "",
               host_name=TOP if service_sdk else "", api_port=443 if service_sdk else 0)
    site = _hub(tmp, "site", SITE, free_port(SITE), UPSTREAM, alias=SITE_PROXY if dial else "")
    leaf = _hub(tmp, "leaf", LEAF, 8883, UPSTREAM + leaf_extra)
    h = Hierarchy(top, site, leaf)
    try:  # a hub that fails to start stops those started before it (no process left behind)
        for hub in h.hubs():
            hub.start()
        create_device(top, "site", "--edge")
        create_device(top, "leaf", "--edge", "--parent", "site")
        create_device(site, "leaf", "--edge")
        for child, parent, gw, address in ((site, top, "site", TOP), (leaf, site, "leaf", SITE)):
            host, port = address, parent.port("mqtt_tls_port")
            if dial is not None:
                host, port = dial(address, port)
            child.cli("upstream", "set", "--connection-string", parent.connection_string(gw),
                      "--ca-file", parent.ca_file, "--host", host, "--port", str(port))
        for hub in (site, leaf):
            wait(lambda hub=hub: status(hub)["state"] == "connected", 30, f"{hub.host_name} linked")
    except BaseException:
        h.stop()
        raise
    return h


def status(hub: HubProcess) -> dict[str, Any]:
    return json.loads(hub.cli("upstream", "status", "--json").stdout)  # type: ignore[no-any-return]


def wait(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def show(hub: HubProcess, device_id: str) -> dict[str, Any] | None:
    out = hub.cli("device", "show", device_id, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def leaf_device(h: Hierarchy, device_id: str) -> dict[str, Any]:
    """A device behind both gateways, created at the top as the leaf's child; returns it
    once it has flowed down to the leaf."""
    created = create_device(h.top, device_id, "--parent", "leaf")
    wait(lambda: show(h.leaf, device_id), 15, f"{device_id} at the leaf")
    return created


def invoke(hub: HubProcess, device_id: str, name: str, payload: Any = None, *,
           timeout: int = 10, connect_timeout: int = 0,
           module: str | None = None) -> tuple[dict[str, Any] | None, str, float]:
    """``gateway method invoke`` at ``hub``: (answer or None, stderr, seconds taken)."""
    args = ["method", "invoke", device_id, name, "--payload", json.dumps(payload),
            "--timeout", str(timeout), "--connect-timeout", str(connect_timeout)]
    if module:
        args += ["--module", module]
    start_ = time.monotonic()
    out = hub.cli(*args, check=False, timeout=timeout + connect_timeout + 30)
    took = time.monotonic() - start_
    try:
        answer = json.loads(out.stdout) if out.stdout.strip() else None
    except ValueError:
        answer = None
    return answer, out.stderr, took


def hubs_iter(h: Hierarchy) -> Iterator[HubProcess]:
    yield from h.hubs()
