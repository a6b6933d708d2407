"""Issue 16, the idle footprint: a hub restarted on the certificates it made checks them with
Python's ``ssl`` (gateway.hubcerts) and builds its pyOpenSSL context with the first TLS
connection (gateway.broker.devicetls), so an idle hub has neither ``cryptography`` nor
pyOpenSSL loaded; then TLS clients, SAS and X.509, work as they always did."""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from gateway.mqtt.packets import Connack, Puback, Publish
from tests.hubproc import HubProcess, create_device, device_token, username
from tests.mqttraw import RawClient


def tls_stack_mapped(pid: int) -> bool:
    """Whether cryptography's compiled module (pyOpenSSL's binding too) is loaded in process
    ``pid`` (proc(5) maps): any import of either maps it."""
    return any("/cryptography/" in line or "/OpenSSL/" in line
               for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def paho_publish(hub: HubProcess, device_id: str, key: str, count: int) -> None:
    """``count`` QoS 1 messages with paho over TLS (SAS); returns once all are acknowledged."""
    done = threading.Event()
    acked: list[int] = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=device_id,
                         protocol=paho.MQTTv311)
    client.username_pw_set(username(hub, device_id), device_token(hub, device_id, key))
    client.tls_set(ca_certs=hub.ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)

    def on_publish(c: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        acked.append(mid)
        if len(acked) == count:
            done.set()

    client.on_publish = on_publish
    client.connect("localhost", hub.port("mqtt_tls_port"))
    client.loop_start()
    try:
        for i in range(count):
            client.publish(f"devices/{device_id}/messages/events/n={i}", b"{}", qos=1)
        assert done.wait(15), f"{len(acked)} of {count} acknowledged"
    finally:
        client.disconnect()
        client.loop_stop()


def test_an_idle_hub_has_no_tls_stack_until_the_first_tls_client(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "data").start()  # makes the certificates (cryptography)
    try:
        key = create_device(hub, "dev1")["authentication"]["symmetricKey"]["primaryKey"]
        out = tmp_path / "certs"
        hub.cli("device", "create", "cam-1", "--x509-ca", "--out", str(out))
    finally:
        hub.stop()
    before = len(hub.log_text())  # the log file is appended to
    hub.start()  # a reboot: the files are reused
    try:
        time.sleep(1.0)  # idle for a moment after READY: nothing loads it on its own
        assert not tls_stack_mapped(hub.pid), "an idle hub loaded cryptography or pyOpenSSL"
        assert "device tls context built" not in hub.log_text()[before:]

        # The first TLS client (the service API's port would do too: it shares the context).
        paho_publish(hub, "dev1", key, 20)
        assert tls_stack_mapped(hub.pid)  # the check above looks at the right thing
        c = RawClient(hub.port("mqtt_tls_port"), ca_file=hub.ca_file,
                      cert=(str(out / "cam-1.cert.pem"), str(out / "cam-1.key.pem")))
        assert c.connect("cam-1", username(hub, "cam-1"), None) == Connack(False, 0)
        c.send(Publish(topic="devices/cam-1/messages/events/", payload=b"x", qos=1,
                       packet_id=1))
        assert c.recv() == Puback(1)
        c.close()
        paho_publish(hub, "dev1", key, 5)  # later clients: the same context
        assert hub.log_text()[before:].count("device tls context built") == 1
    finally:
        hub.stop()
