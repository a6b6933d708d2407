"""Real peers for the endpoint tests: Debian's mosquitto (restartable on a fixed port, with
persistence, TLS and a password file when asked), a paho subscriber with a persistent
session, a message log on a real database, and records as the hub stores them."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from gateway.hub.messages import props_json
from gateway.store import Database, MessageLog, Record

HOST = "127.0.5.1"


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """A broker the test can stop and start again on the same port. ``persist``: messages
    queued for a persistent session survive a restart (saved on SIGTERM)."""

    def __init__(self, work: Path, *, tls: tuple[str, str, str] | None = None,
                 users: dict[str, str] | None = None, persist: bool = True) -> None:
        self.work = work
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        work.mkdir(parents=True, exist_ok=True)
        lines = [f"listener {self.port} {HOST}", "user root", "set_tcp_nodelay true",
                 "max_inflight_messages 1", "max_queued_messages 0", "log_type error",
                 f"log_dest file {work / 'mosquitto.log'}"]
        if persist:
            lines += ["persistence true", f"persistence_location {work}/",
                      "autosave_interval 1"]
        if tls is not None:
            lines += [f"cafile {tls[0]}", f"certfile {tls[1]}", f"keyfile {tls[2]}",
                      "tls_version tlsv1.2"]
        if users:
            passwd = work / "passwd"
            for i, (user, password) in enumerate(users.items()):
                subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []),
                                str(passwd), user, password], check=True)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines += ["allow_anonymous true"]
        self.conf = work / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start: {(self.work / 'mosquitto.log').read_text()}"
                           if (self.work / "mosquitto.log").exists() else "mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"


@dataclass
class Received:
    topic: str
    payload: bytes


@dataclass
class Subscriber:
    """paho, QoS 1, persistent session (clean_session False), reconnecting by itself."""

    port: int
    topic: str = "#"
    client_id: str = "test-subscriber"
    tls_ca: str | None = None
    username: str | None = None
    password: str | None = None
    messages: list[Received] = field(default_factory=list)
    subscribed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=False)
        if self.tls_ca:
            client.tls_set(ca_certs=self.tls_ca)
        if self.username:
            client.username_pw_set(self.username, self.password)
        client.reconnect_delay_set(0.05, 0.5)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client = client

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if not rc.is_failure:
            client.subscribe(self.topic, qos=1)

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        self.messages.append(Received(message.topic, bytes(message.payload)))

    def start(self) -> Subscriber:
        self.client.connect_async(HOST, self.port, keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("subscriber did not subscribe")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def open_log(path: Path) -> tuple[Database, MessageLog]:
    db = Database(str(path), synchronous="normal")
    await db.open()
    log = MessageLog(db)
    await log.open()
    return db, log


def record(device: str, i: int, *, module: str | None = None, body: bytes | None = None,
           app: dict[str, str | None] | None = None, kind: str = "telemetry",
           content_type: str | None = "application/json") -> Record:
    """A telemetry record as the hub stores it, numbered ``i`` in its body and properties."""
    system = {"message-id": f"{device}-{i}"}
    if content_type:
        system.update({"content-type": content_type, "content-encoding": "utf-8"})
    system.update({"iothub-connection-device-id": device,
                   "iothub-connection-auth-method": '{"scope":"device","type":"sas"}',
                   "iothub-connection-auth-generation-id": "6370",
                   "iothub-enqueuedtime": "2026-12-01T10:00:00.0000000Z",
                   "iothub-message-source": "Telemetry"})
    if module is not None:
        system["iothub-connection-module-id"] = module
    application = {"i": str(i)} if app is None else app
    payload = body if body is not None else f'{{"device":"{device}","i":{i}}}'.encode()
    return Record(kind, device, module, 1_764_583_200_000 + i, props_json(system, application),
                  payload)
