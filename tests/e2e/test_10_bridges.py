"""Southbound bridges as hub modules, end to end: the hub's supervisor runs the real serial and
Modbus bridges as processes, configured through their module twins; readings reach the
built-in endpoint as module telemetry; desired changes apply without a restart; a direct
method writes a register."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.hubclient import HubClient
from hw.modbus.registers import Table
from hw.modbus.simulate import SimulatedMeter
from hw.serial.nmea import with_checksum
from tests.hubproc import HubProcess
from tests.hw.modbus.peers import pty_pair, tcp_peer
from tests.waiting import eventually

GW = "testhub.local"
MODULES = ('[modules.serial]\nbridge = "serial"\nstatus_interval = 1.0\n'
           '[modules.modbus]\nbridge = "modbus"\n')


def readings(hub: HubProcess, module: str) -> list[dict[str, Any]]:
    """The module's telemetry in the built-in endpoint so far (one batch read)."""
    batch = HubClient(hub.data_dir).request("GET", "/messages/events", query={
        "start": "earliest", "deviceId": GW, "kinds": "telemetry", "limit": "5000"})
    return [item["event"] for item in batch if item["event"]["module"] == module]


async def wait_for(predicate: Callable[[], Any], timeout: float = 30.0,
                   what: str = "condition") -> Any:
    return await eventually(predicate, timeout, what, interval=0.5, blocking=True)


@pytest.fixture
def bridge_hub(tmp_path: Path) -> Any:
    if shutil.which("socat") is None:
        pytest.fail("socat is required (dev.sh installs it)")
    hub = HubProcess(tmp_path / "data", host_name=GW, extra_config=MODULES).start()
    yield hub
    hub.stop()


def test_serial_and_modbus_bridges_end_to_end(bridge_hub: HubProcess, tmp_path: Path) -> None:
    hub = bridge_hub
    api = HubClient(hub.data_dir)

    async def scenario() -> None:
        async with pty_pair(tmp_path) as ends:
            a, b = map(Path, ends)
            async with SimulatedMeter("eastron-sdm120") as meter:
                await run(meter, a, b)

    async def run(meter: SimulatedMeter, a: Path, b: Path) -> None:
        await asyncio.to_thread(api.request, "PATCH", f"/twins/{GW}/modules/serial", {
            "properties": {"desired": {"ports": {"gps": {
                "path": str(b), "sensor": "gps", "baud": 9600, "format": "nmea"}}}}})
        await asyncio.to_thread(api.request, "PATCH", f"/twins/{GW}/modules/modbus", {
            "properties": {"desired": {
                "buses": {"sim": {"tcp": {"host": "127.0.0.1", "port": meter.port}, "timeout": 1.0}},
                "devices": {"meter1": {"bus": "sim", "unit": 1, "profile": "eastron-sdm120",
                                       "interval": 1},
                            "setpoint": {"bus": "sim", "unit": 1, "interval": 30, "registers": {
                                "sp": {"address": 10, "writable": True}}}}}}})
        gga = with_checksum("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,") + b"\r\n"
        bad = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*00\r\n"
        with open(a, "wb", buffering=0) as tty:
            async def feed(stop: asyncio.Event) -> None:
                while not stop.is_set():
                    tty.write(bad)
                    tty.write(gga)
                    await asyncio.sleep(0.3)
            stop = asyncio.Event()
            feeder = asyncio.create_task(feed(stop))
            try:
                gps = await wait_for(lambda: readings(hub, "serial"), 40, "GPS readings")
                body = json.loads(gps[0]["payload"]) if isinstance(gps[0]["payload"], str) else gps[0]["payload"]
                assert body["sensor"] == "gps"
                values = {r["name"]: r["value"] for r in body["readings"]}
                assert values["latitude"] == pytest.approx(48.1173, abs=1e-4)
                assert values["longitude"] == pytest.approx(11.516667, abs=1e-5)
                notes = gps[0]["annotations"]
                assert notes["iothub-connection-device-id"] == GW
                assert notes["iothub-connection-module-id"] == "serial"
                # bad checksums were counted, not forwarded
                def counted() -> Any:
                    status = api.request("GET", f"/twins/{GW}/modules/serial")[
                        "properties"]["reported"].get("status") or {}
                    counts = status.get("ports", {}).get("gps", {}).get("counts", {})
                    return counts if counts.get("badChecksum", 0) >= 1 else None
                counts = await wait_for(counted, 20, "bad checksums counted in the status")
                assert counts["decoded"] >= 1
                # a desired change applies without restarting the module process
                await asyncio.to_thread(api.request, "PATCH", f"/twins/{GW}/modules/serial", {
                    "properties": {"desired": {"ports": {"gps": {"sensor": "gps-renamed"}}}}})
                await wait_for(lambda: any(
                    (json.loads(e["payload"]) if isinstance(e["payload"], str) else e["payload"])
                    ["sensor"] == "gps-renamed" for e in readings(hub, "serial")), 30, "renamed sensor")
            finally:
                stop.set()
                await feeder
        meter_events = await wait_for(lambda: [
            e for e in readings(hub, "modbus")
            if (json.loads(e["payload"]) if isinstance(e["payload"], str) else e["payload"])[
                "sensor"] == "meter1"], 40, "meter readings")
        body = meter_events[-1]["payload"]
        body = json.loads(body) if isinstance(body, str) else body
        values = {r["name"]: r for r in body["readings"]}
        assert body["sensor"] == "meter1"
        assert 220 < values["voltage"]["value"] < 240 and values["voltage"]["unit"] == "V"
        result = await asyncio.to_thread(api.request, "POST", f"/twins/{GW}/modules/modbus/methods", {
            "methodName": "write_register", "payload": {"bus": "sim", "unit": 1, "address": 10,
                                                         "value": 1234},
            "responseTimeoutInSeconds": 15})
        assert result["status"] == 200, result
        assert await meter.get(Table.HOLDING, 10) == [1234]
        assert hub.log_text().count("module started module=serial") == 1
        assert hub.log_text().count("module started module=modbus") == 1

    asyncio.run(scenario())


def test_sensor_as_child_device_of_the_gateway(bridge_hub: HubProcess, tmp_path: Path) -> None:
    """Identity translation: a GPS registered as its own device, child of the gateway; its
    telemetry is filed as the child's, and its direct methods reach the bridge."""
    hub = bridge_hub
    api = HubClient(hub.data_dir)

    async def scenario() -> None:
        async with pty_pair(tmp_path) as ends:
            a, b = map(Path, ends)
            await asyncio.to_thread(api.request, "PATCH", f"/twins/{GW}/modules/serial", {
                "properties": {"desired": {
                    "ports": {"gps": {"path": str(b), "sensor": "gps", "baud": 9600,
                                      "format": "nmea"}},
                    "children": {"gps": {"deviceId": "plant7-gps"}}}}})
            child = await wait_for(lambda: _get(api, "/devices/plant7-gps"), 20, "the child")
            gateway = api.request("GET", f"/devices/{GW}")
            assert gateway["capabilities"]["iotEdge"] and gateway["deviceScope"]
            assert child["parentScopes"] == [gateway["deviceScope"]]
            assert child["authentication"]["type"] == "none"
            gga = with_checksum("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,")

            def child_reported() -> dict[str, Any]:
                twin: dict[str, Any] = api.request("GET", "/twins/plant7-gps")
                return twin["properties"]["reported"]

            # ready when the bridge speaks for the child (it knows the children document) and
            # has the port open: only then is a sentence read, and read as the child's
            await wait_for(lambda: (child_reported().get("status") or {}).get("state") == "up",
                           60, "the bridge to serve the child with its port open")

            def child_events() -> list[dict[str, Any]]:
                batch = api.request("GET", "/messages/events", query={
                    "start": "earliest", "deviceId": "plant7-gps", "kinds": "telemetry"})
                return [i["event"] for i in batch]

            def gga_arrived() -> list[dict[str, Any]]:
                with open(a, "wb", buffering=0) as tty:
                    tty.write(gga + b"\r\n")
                return child_events()

            [event, *_] = await wait_for(gga_arrived, 30, "the child's telemetry")
            assert event["origin"] == "plant7-gps" and event["module"] == ""
            assert event["annotations"]["iothub-connection-device-id"] == "plant7-gps"
            assert "gateway-child" not in event["properties"]["application"]
            assert readings(hub, "serial") == []  # not also filed as the module's
            result = await asyncio.to_thread(api.request, "POST", "/twins/plant7-gps/methods", {
                "methodName": "listPorts", "payload": {}, "responseTimeoutInSeconds": 10})
            assert result["status"] == 200, result

            # the child's own twin: its port's status is reported there ...
            reported = await wait_for(lambda: child_reported().get("status"), 20,
                                      "the child's status")
            assert reported["sensor"] == "gps" and reported["format"] == "nmea"
            assert child_reported()["bridge"] == {"module": "serial", "sensor": "gps"}
            # ... and its desired properties configure the sensor: a bad one is refused for
            # this child alone (the port keeps running), a good one applies without a restart
            await asyncio.to_thread(api.request, "PATCH", "/twins/plant7-gps", {
                "properties": {"desired": {"baud": "fast"}}})
            error = await wait_for(
                lambda: (child_reported().get("config") or {}).get("error"), 20,
                "the child's refusal")
            assert "ports.gps.baud" in error
            module = api.request("GET", f"/twins/{GW}/modules/serial")["properties"]["reported"]
            assert "ports.gps.baud" in module["config"]["children"]["gps"]
            assert "error" not in module["config"]
            await asyncio.to_thread(api.request, "PATCH", "/twins/plant7-gps", {
                "properties": {"desired": {"baud": None, "decoder": {"sentences": ["RMC"]}}}})
            await wait_for(lambda: not (child_reported().get("config") or {}).get("error"), 20,
                           "the child's configuration to apply")
            before = len(child_events())
            rmc = with_checksum("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,"
                                "003.1,W")

            def rmc_arrived() -> list[dict[str, Any]]:
                with open(a, "wb", buffering=0) as tty:
                    tty.write(gga + b"\r\n" + rmc + b"\r\n")
                return [e for e in child_events()[before:]
                        if any(r["name"] == "speed" for r in e["payload"]["readings"])]

            await wait_for(rmc_arrived, 20, "RMC readings after the change")
            assert not any(r["name"] == "altitude" for e in child_events()[before:]
                           for r in e["payload"]["readings"])  # GGA is no longer decoded
            assert hub.log_text().count("module started module=serial") == 1

            # the child is reachable exactly while its bridge is: connected with it, and
            # disconnected when it leaves the bridge's map (with IoT Hub's state events)
            assert api.request("GET", "/devices/plant7-gps")["connectionState"] == "Connected"
            await asyncio.to_thread(api.request, "PATCH", f"/twins/{GW}/modules/serial", {
                "properties": {"desired": {"children": None}}})
            await wait_for(lambda: api.request("GET", "/devices/plant7-gps")["connectionState"]
                           == "Disconnected", 20, "the child to disconnect")

            def states() -> list[str]:  # the events are written after the state changes
                return [i["event"]["properties"]["application"]["opType"]
                        for i in api.request("GET", "/messages/events", query={
                            "start": "earliest", "deviceId": "plant7-gps",
                            "kinds": "connectionState"})]

            await wait_for(lambda: len(states()) >= 2, 20, "the disconnect event")
            assert states() == ["deviceConnected", "deviceDisconnected"]

    asyncio.run(scenario())


def _get(api: HubClient, path: str) -> Any:
    from gateway.hubclient import ApiError

    try:
        return api.request("GET", path)
    except ApiError:
        return None


def test_a_module_cannot_speak_for_a_device_it_does_not_own(hub: HubProcess) -> None:
    from gateway.mqtt.packets import Publish
    from tests.e2e.test_01_connect import wait_for_log
    from tests.hubproc import create_device, device_token, username
    from tests.mqttraw import RawClient

    create_device(hub, "victim")
    create_device(hub, "edge")
    key = json.loads(hub.cli("module", "create", "edge", "m").stdout)[
        "authentication"]["symmetricKey"]["primaryKey"]
    c = RawClient(hub.port("mqtt_tls_port"), ca_file=hub.ca_file)
    assert c.connect("edge/m", username(hub, "edge", "m"),
                     device_token(hub, "edge", key, module_id="m")).return_code == 0  # type: ignore[union-attr]
    c.send(Publish(topic="devices/edge/modules/m/messages/events/gateway-child=victim",
                   payload=b"{}", qos=1, packet_id=1))
    c.expect_closed()
    wait_for_log(hub, "may not send as device 'victim'")


def test_the_children_channel_is_confined_to_a_modules_own_children(hub: HubProcess) -> None:
    """A module subscribing to ``$gateway/children/#`` gets its (here empty) children document
    at once; reported properties for a device that is not its child are refused and logged,
    and that device's twin is untouched."""
    from gateway.mqtt.packets import Puback, Publish, Suback, Subscribe
    from tests.e2e.test_01_connect import wait_for_log
    from tests.hubproc import create_device, device_token, username
    from tests.mqttraw import RawClient

    create_device(hub, "victim")
    create_device(hub, "edge")
    key = json.loads(hub.cli("module", "create", "edge", "m").stdout)[
        "authentication"]["symmetricKey"]["primaryKey"]
    c = RawClient(hub.port("mqtt_tls_port"), ca_file=hub.ca_file)
    try:
        assert c.connect("edge/m", username(hub, "edge", "m"),
                         device_token(hub, "edge", key, module_id="m")).return_code == 0  # type: ignore[union-attr]
        c.send(Subscribe(packet_id=1, topics=[("$gateway/children/#", 1)]))
        assert isinstance(c.recv(), Suback)
        document = c.recv()
        assert isinstance(document, Publish)
        assert document.topic == "$gateway/children/document" and json.loads(document.payload) == {}
        c.send(Publish(topic="$gateway/children/reported/victim", payload=b'{"hacked": true}',
                       qos=1, packet_id=2))
        assert isinstance(c.recv(), Puback)
        wait_for_log(hub, "child reported patch refused client_id='edge/m' device_id='victim'")
        twin = HubClient(hub.data_dir).request("GET", "/twins/victim")
        assert "hacked" not in twin["properties"]["reported"]
    finally:
        c.close()


async def test_probe_and_scan_a_bus_the_bridge_owns(tmp_path: Path) -> None:
    """``gateway modbus probe|scan --bus`` go through the running bridge's methods: the
    bridge keeps its connection and its polling, the technician gets the same tables."""
    devices = {1: {"holding": {0: [0x4366, 0x6666]}}, 2: {"holding": {0: [5]}}}
    async with tcp_peer(devices, dead={3}) as peer:
        hub = HubProcess(tmp_path / "data", host_name=GW,
                         extra_config='[modules.modbus]\nbridge = "modbus"\n'
                                      'status_interval = 0.5\n')
        await asyncio.to_thread(hub.start)
        try:
            api = HubClient(hub.data_dir)
            await asyncio.to_thread(api.request, "PATCH", f"/twins/{GW}/modules/modbus", {
                "properties": {"desired": {
                    "buses": {"plc": {"tcp": {"host": "127.0.0.1", "port": peer.port},
                                      "timeout": 0.3}},
                    "devices": {"m1": {"bus": "plc", "unit": 1, "interval": 0.5,
                                       "registers": {"r": {"address": 0}}}}}}})

            def bus_up() -> bool:
                reported = api.request("GET", f"/twins/{GW}/modules/modbus")["properties"][
                    "reported"]
                return bool(reported.get("status", {}).get("buses", {}).get("plc", {})
                            .get("state") == "up")

            await wait_for(bus_up, 30, "the bus to come up")
            out = (await asyncio.to_thread(hub.cli, "modbus", "probe", "--bus", "plc", "--unit",
                                           "1", "--address", "0", "--count", "2")).stdout
            assert out.splitlines()[0] == "bus plc unit 1, holding registers (FC 3) 0..1"
            (abcd,) = [line for line in out.splitlines()
                       if line.startswith("float32") and " ABCD " in line]
            assert abcd.split()[2] == "230.4"
            out = (await asyncio.to_thread(hub.cli, "modbus", "scan", "--bus", "plc",
                                           "--units", "1-3")).stdout
            assert "2 unit(s) answered: 1, 2" in out, out
            failed = await asyncio.to_thread(hub.cli, "modbus", "probe", "--bus", "nope",
                                             "--unit", "1", "--address", "0", "--count", "1",
                                             check=False)
            assert failed.returncode == 1 and "404" in failed.stderr and "no bus" in failed.stderr
            assert hub.log_text().count("module started module=modbus") == 1
        finally:
            await asyncio.to_thread(hub.stop)
