"""Several hubs on one machine, each on its own loopback address with the same ports: the CLI
reaches each through its data directory (hub.json records the address), and each server
certificate names its address, so TLS verification by IP succeeds."""

from __future__ import annotations

import json
import socket
import ssl

from tests.hubproc import HubProcess, create_device

ADDRESSES = ("127.0.6.11", "127.0.6.12")


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def test_two_hubs_same_ports_distinct_addresses(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tls_port, api_port = _free_port(ADDRESSES[0]), _free_port(ADDRESSES[0])
    hubs = [HubProcess(tmp_path / f"hub{i}", host_name=f"hub{i}.local", tls_port=tls_port,
                       api_port=api_port, address=address, log_level="info")
            for i, address in enumerate(ADDRESSES)]
    try:
        for hub in hubs:
            hub.start()
        for i, hub in enumerate(hubs):
            assert hub.info["api_host"] == ADDRESSES[i] and hub.info["mqtt_host"] == ADDRESSES[i]
            assert hub.info["api_port"] == api_port and hub.info["mqtt_tls_port"] == tls_port
            create_device(hub, f"only-on-{i}")
        for i, hub in enumerate(hubs):
            listed = hub.cli("device", "list").stdout
            assert f"only-on-{i}" in listed and f"only-on-{1 - i}" not in listed
            # TLS to the MQTT port by IP address, verified against that hub's CA
            ctx = ssl.create_default_context(cafile=hub.ca_file)
            with socket.create_connection((ADDRESSES[i], tls_port), timeout=10) as raw, \
                    ctx.wrap_socket(raw, server_hostname=ADDRESSES[i]) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        shown = json.loads(hubs[1].cli("device", "show", "only-on-1").stdout)
        assert shown["deviceId"] == "only-on-1"
    finally:
        for hub in hubs:
            hub.stop()
