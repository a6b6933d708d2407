"""``gateway demo``: a hub on loopback, simulated devices over real MQTT/TLS, live output.

Everything a newcomer needs to see the flow in one command: the hub makes its CA, devices are
registered, each simulated device connects with its own SAS connection string and publishes
realistic telemetry at QoS 1, and the messages are printed as they reach the built-in endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import tty
from pathlib import Path
from typing import Any, Self

from gateway import app
from gateway.api.events import entry_json
from gateway.client import ClientSettings
from gateway.config import AmqpConfig, ApiConfig, HubConfig, ModuleSpec, MqttConfig, load_config
from gateway.demo_upstream import run_parent
from gateway.hub.connstr import ConnectionString
from hw.modbus.simulate import SimulatedMeter

DEVICES = {
    "boiler-room-thermostat": "thermostat",
    "pump-3-vibration": "vibration",
    "main-energy-meter": "meter",
}


START = time.time()
DEMO_GPS = "site-gps"  # the GPS as a child device of the gateway


def reading(kind: str, t: float, rng: random.Random) -> dict[str, float | str]:
    if kind == "thermostat":
        return {"temperature": round(21 + 2 * math.sin(t / 60) + rng.gauss(0, 0.1), 2),
                "humidity": round(45 + 5 * math.sin(t / 90) + rng.gauss(0, 0.5), 1)}
    if kind == "vibration":
        return {"rmsVelocity": round(abs(2.5 + rng.gauss(0, 0.3)), 3),
                "pressureBar": round(4.2 + rng.gauss(0, 0.05), 3)}
    return {"activePowerW": round(3200 + 400 * math.sin(t / 30) + rng.gauss(0, 20), 1),
            "energyKWh": round(12840 + (t - START) / 3600 * 3.2, 4), "voltageV": round(230 + rng.gauss(0, 1), 1)}


async def simulated_device(settings: ClientSettings, kind: str, interval: float) -> None:
    """One simulated device: reports its twin properties, answers direct methods
    (``getStatus``, ``setInterval``), applies desired ``interval`` and sends telemetry."""
    rng = random.Random(settings.client_id)
    state: dict[str, Any] = {"interval": interval, "last": {}}
    backoff = 1.0
    while True:
        try:
            async with settings.mqtt_client() as client:
                backoff = 1.0
                await client.subscribe([("$iothub/methods/POST/#", 1),
                                        ("$iothub/twin/res/#", 1),
                                        ("$iothub/twin/PATCH/properties/desired/#", 1)])
                reported = {"firmware": "3.2.1", "kind": kind, "interval": state["interval"]}
                await client.publish("$iothub/twin/PATCH/properties/reported/?$rid=1",
                                     json.dumps(reported), qos=1)
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(_answer(client, state))
                    tasks.create_task(_telemetry(client, settings, kind, rng, state))
        except Exception as exc:  # noqa: BLE001 - a demo device reconnects on any failure
            print(f"  {settings.client_id}: {exc}; reconnecting in {backoff:.0f} s", file=sys.stderr)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30)


async def _telemetry(client: Any, settings: ClientSettings, kind: str, rng: random.Random,
                     state: dict[str, Any]) -> None:
    n = 0
    while True:
        body = reading(kind, time.time(), rng)
        state["last"] = body
        alert = "high" if kind == "vibration" and float(body["rmsVelocity"]) > 3 else None
        topic = settings.telemetry_topic(
            {"sensorType": kind, **({"alert": alert} if alert else {})},
            message_id=f"{settings.client_id}-{n}",
            content_type="application/json", content_encoding="utf-8",
        )
        await client.publish(topic, json.dumps(body), qos=1)
        n += 1
        await asyncio.sleep(state["interval"] * rng.uniform(0.8, 1.2))


async def _answer(client: Any, state: dict[str, Any]) -> None:
    async for message in client.messages:
        topic = str(message.topic)
        if topic.startswith("$iothub/methods/POST/"):
            name = topic.split("/")[3]
            rid = topic.split("$rid=")[1]
            payload = json.loads(message.payload or b"null")
            if name == "getStatus":
                status, answer = 200, {"interval": state["interval"], "last": state["last"]}
            elif name == "setInterval" and isinstance(payload, dict) and payload.get("seconds", 0) > 0:
                state["interval"] = float(payload["seconds"])
                status, answer = 200, {"interval": state["interval"]}
            else:
                status, answer = 404, {"error": f"no method {name!r}"}
            await client.publish(f"$iothub/methods/res/{status}/?$rid={rid}", json.dumps(answer))
        elif topic.startswith("$iothub/twin/PATCH/properties/desired/"):
            patch = json.loads(message.payload)
            if isinstance(patch.get("interval"), int | float) and patch["interval"] > 0:
                state["interval"] = float(patch["interval"])
                await client.publish("$iothub/twin/PATCH/properties/reported/?$rid=2",
                                     json.dumps({"interval": state["interval"]}), qos=1)


async def _configure_bridges(gw: app.Gateway, meter_port: int, gps_path: str) -> None:
    """What a technician does through the module twins (``gateway twin update``)."""
    device = gw.config.hub.device_id
    await gw.hub.twins.service_update(device, "modbus", {"properties": {"desired": {
        "buses": {"meters": {"tcp": {"host": "127.0.0.1", "port": meter_port}, "timeout": 1.0}},
        "devices": {"main-meter": {"bus": "meters", "unit": 1, "profile": "eastron-sdm120",
                                   "interval": 2}}}}}, if_match=None, replace=False)
    await gw.hub.twins.service_update(device, "serial", {"properties": {"desired": {
        "ports": {"gps": {"path": gps_path, "sensor": "gps", "baud": 9600, "format": "nmea"}},
        # the GPS becomes a device of its own, a child of the gateway (identity translation)
        "children": {"gps": {"deviceId": DEMO_GPS}}}}},
        if_match=None, replace=False)


class SimulatedGps:
    """An NMEA 0183 GPS on a pseudo-terminal: GGA and RMC once a second, walking slowly."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)
        self.lat, self.lon = 48.1173, 11.5167

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.master)
        os.close(self.slave)

    async def run(self, period: float) -> None:
        from hw.serial.nmea import with_checksum

        while True:
            self.lat += 0.00001
            self.lon += 0.00002
            now = time.gmtime()
            hms = time.strftime("%H%M%S", now)
            lat = f"{int(self.lat):02d}{(self.lat % 1) * 60:07.4f}"
            lon = f"{int(self.lon):03d}{(self.lon % 1) * 60:07.4f}"
            for body in (f"GPGGA,{hms},{lat},N,{lon},E,1,09,0.9,545.4,M,46.9,M,,",
                         f"GPRMC,{hms},A,{lat},N,{lon},E,0.4,84.4,{time.strftime('%d%m%y', now)},,,A"):
                os.write(self.master, with_checksum(body) + b"\r\n")
            await asyncio.sleep(period)


def render(event: dict[str, Any]) -> str:
    e = event["event"]
    props = e["properties"]
    app_props = " ".join(f"{k}={v}" for k, v in props["application"].items())
    body = e["payload"]
    if isinstance(body, dict) and "readings" in body and "sensor" in body:  # a bridge's reading
        values = ", ".join(f"{r['name']}={_short(r['value'])}{r.get('unit') or ''}"
                           for r in body["readings"][:6])
        label = (f"{e['module']}:{body['sensor']}" if e["module"]
                 else f"{e['origin']} (child)")
        return f"{time.strftime('%H:%M:%S')}  #{event['seq']:<6} {label:<24} {values}"
    stamp = time.strftime("%H:%M:%S", time.localtime(e["annotations"]["iothub-enqueuedtime"] / 1000))
    return f"{stamp}  #{event['seq']:<6} {e['origin']:<24} {json.dumps(e['payload'])}  [{app_props}]"


async def run_demo(data_dir: Path | None, *, duration: float | None = None,
                   interval: float = 1.0, cut_every: float = 60.0, cut_for: float = 15.0) -> None:
    temp = None
    if data_dir is None:
        temp = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
        data_dir = temp / "data"
    config = load_config(
        data_dir,
        hub=HubConfig(host_name="localhost", device_id="demo-gateway"),
        mqtt=MqttConfig(tls_port=0, local_port=0),
        api=ApiConfig(bind="127.0.0.1", port=0),
        amqp=AmqpConfig(bind="127.0.0.1", port=0),
        modules=(ModuleSpec(name="modbus", bridge="modbus", status_interval=5.0),
                 ModuleSpec(name="serial", bridge="serial", status_interval=5.0)),
    )
    os.environ.setdefault("GATEWAY_LOG_LEVEL", "warning")  # bridge processes: problems only
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[app.Gateway] = loop.create_future()
    stop = asyncio.Event()
    print(f"gateway demo: starting a hub in {data_dir}", flush=True)
    try:
        async with contextlib.AsyncExitStack() as stack, asyncio.TaskGroup() as tasks:
            tasks.create_task(app.run(config, ready=ready, stop=stop))
            gw = await ready
            port = int(str(gw.runtime["mqtt_tls_port"]))
            print(f"  hub ready: MQTT/TLS on localhost:{port}, HTTPS API on "
                  f"localhost:{gw.runtime['api_port']}, CA {gw.certs.ca_cert}")
            start_seq = gw.log.last_seq
            for device_id, kind in DEVICES.items():
                device = gw.registry.get_device(device_id)
                if device is None:
                    device, _ = await gw.registry.put_device(
                        {"deviceId": device_id, "authentication": {"type": "sas"}},
                        device_id=device_id, if_match=None)
                assert device.primary_key
                settings = ClientSettings(
                    connection=ConnectionString(host_name="localhost", device_id=device_id,
                                                shared_access_key=device.primary_key),
                    port=port, ca_file=str(gw.certs.ca_cert))
                print(f"  device {device_id}: {settings.connection}"[:110] + "...")
                tasks.create_task(simulated_device(settings, kind, interval))
            meter = await stack.enter_async_context(SimulatedMeter("eastron-sdm120"))
            tasks.create_task(meter.run(1.0))
            gps_port = stack.enter_context(SimulatedGps())
            tasks.create_task(gps_port.run(1.0))
            await _configure_bridges(gw, meter.port, gps_port.path)
            print(f"  bridges: Modbus meter (pymodbus, SDM120 map) on 127.0.0.1:{meter.port}, "
                  f"NMEA GPS on {gps_port.path}")
            print("  messages at the built-in endpoint (Ctrl-C to stop):", flush=True)
            tasks.create_task(_printer(gw, start_seq))
            tasks.create_task(run_parent(data_dir.with_name(data_dir.name + "-parent"), gw,
                                         cut_every=cut_every,
                                         cut_for=cut_for))
            tasks.create_task(_show_method(gw))
            if duration is not None:
                await asyncio.sleep(duration)
                stop.set()
                raise _DemoOver
    except* _DemoOver:
        pass
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


async def _show_method(gw: app.Gateway) -> None:
    """A direct method round trip, as a back end would do it, a few seconds in."""
    await asyncio.sleep(2.5)
    device = "pump-3-vibration"
    try:
        status, payload = await gw.hub.methods.invoke(
            device, None, {"methodName": "getStatus", "responseTimeoutInSeconds": 10,
                           "connectTimeoutInSeconds": 10})
        print(f"  >> direct method getStatus on {device}: {status} {json.dumps(payload)}",
              flush=True)
        twin = await gw.hub.twins.twin(device, None)
        print(f"  >> twin of {device}: reported {json.dumps(twin.reported)}", flush=True)
    except Exception as exc:  # noqa: BLE001 - the demo shows the failure and goes on
        print(f"  >> direct method failed: {exc}", flush=True)


class _DemoOver(Exception):
    pass


def _short(value: object) -> str:
    return f"{value:.5g}" if isinstance(value, float) else str(value)


async def _printer(gw: app.Gateway, after: int) -> None:
    while True:
        entries, after = await gw.log.scan(  # what went to the built-in endpoint `events`
            after, 100, kinds={"telemetry"},
            where=gw.routing.select("events") if gw.routing is not None else None)
        for entry in entries:
            print(render(entry_json(entry, gw.config.hub.host_name)), flush=True)
        if len(entries) < 100:
            await gw.log.wait_beyond(after, 5.0)
