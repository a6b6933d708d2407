"""The demo's third level: a top hub above the demo's parent (leaf -> site -> top, README
"Manage devices behind gateways"), so a newcomer sees the top reach a device two gateways down.

The top runs in the same process (its own data directory, ports and CA). The demo's parent
(``plant-hub``, the site) links up to it as an edge device; the demo gateway's devices become
known at the top as their telemetry arrives (registered by the site on their behalf). Then the
top, as a back end would, invokes a direct method on ``pump-3-vibration`` and writes a desired
property, and the demo prints the answer and the desired section the leaf now holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from gateway import app
from gateway.config import AmqpConfig, ApiConfig, HubConfig, MqttConfig, load_config
from gateway.hub.connstr import ConnectionString
from gateway.hub.identities import Device
from gateway.upstream.settings import from_connection_string

TOP_NAME = "corp-hub"
DEVICE = "pump-3-vibration"


async def edge_identity(parent: app.Gateway, device_id: str) -> Device:
    """``device_id`` at ``parent`` as an edge device (the identity a child hub links up
    with), created if it is not there yet."""
    device = parent.registry.get_device(device_id)
    if device is None:
        device, _ = await parent.registry.put_device(
            {"deviceId": device_id, "capabilities": {"iotEdge": True}}, device_id=device_id,
            if_match=None)
    return device


async def run_top(data_dir: Path, site: app.Gateway, leaf: app.Gateway) -> None:
    """Start the top, link ``site`` to it, then reach ``DEVICE`` at ``leaf`` from the top."""
    logging.getLogger("gateway.hub.federated").setLevel(logging.ERROR)
    config = load_config(data_dir,
                         hub=HubConfig(host_name=TOP_NAME, device_id=TOP_NAME),
                         mqtt=MqttConfig(tls_port=0, local_port=0, unix_socket=False),
                         api=ApiConfig(bind="127.0.0.1", port=0),
                         amqp=AmqpConfig(bind="127.0.0.1", port=0))
    ready: asyncio.Future[app.Gateway] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(app.run(config, ready=ready, stop=stop))
        top = await ready
        try:
            site_id = str(site.runtime["device_id"])
            device = await edge_identity(top, site_id)
            assert device.primary_key and site.upstream is not None
            cs = ConnectionString(host_name=TOP_NAME, device_id=site_id,
                                  shared_access_key=device.primary_key)
            await site.upstream.set(from_connection_string(
                str(cs), ca_file=str(top.certs.ca_cert), host="localhost",
                port=int(str(top.runtime["mqtt_tls_port"]))))
            print(f"  top: hub {TOP_NAME!r} above {site_id!r} (HTTPS API port "
                  f"{top.runtime['api_port']}): leaf -> site -> top", flush=True)
            await _reach_down(top, leaf)
            await asyncio.Event().wait()
        finally:
            stop.set()


async def _reach_down(top: app.Gateway, leaf: app.Gateway) -> None:
    for _ in range(200):  # the device is known at the top once its telemetry got there
        if top.registry.get_device(DEVICE) is not None and top.hub.federation is not None \
                and top.hub.federation.hops(DEVICE, None) is not None:
            break
        await asyncio.sleep(0.1)
    else:
        print(f"  >> top: {DEVICE} not known at the top yet", flush=True)
        return
    hops = top.hub.federation.hops(DEVICE, None) if top.hub.federation else None
    try:
        status, payload = await top.hub.methods.invoke(
            DEVICE, None, {"methodName": "getStatus", "responseTimeoutInSeconds": 10,
                           "connectTimeoutInSeconds": 5})
        print(f"  >> top {TOP_NAME}: direct method getStatus on {DEVICE} "
              f"(through {hops.first if hops else '?'}): {status} {json.dumps(payload)}",
              flush=True)
        twin = await top.hub.twins.service_update(
            DEVICE, None, {"properties": {"desired": {"sampleSeconds": 5}}}, if_match=None,
            replace=False)
        for _ in range(50):
            mirrored = leaf.hub.twin_store.get(DEVICE)
            if mirrored is not None and mirrored.desired.get("sampleSeconds") == 5:
                print(f"  >> top {TOP_NAME}: desired sampleSeconds=5 ($version "
                      f"{twin.desired_version}) now at the leaf: "
                      f"{json.dumps(dict(mirrored.desired))} ($version "
                      f"{mirrored.desired_version})", flush=True)
                return
            await asyncio.sleep(0.1)
        print("  >> top: the desired patch has not reached the leaf yet", flush=True)
    except Exception as exc:  # noqa: BLE001 - the demo shows the failure and goes on
        print(f"  >> top: reaching {DEVICE} failed: {exc}", flush=True)
