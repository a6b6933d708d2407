"""Zero-touch registration of the gateway itself at its parent's provisioning service.

First boot (gateway/firstboot.py) turns a ``gateway-setup.toml`` group enrollment (ID scope and
group key) into the gateway's own derived device key, writes the ``[upstream]`` connection
string with it, and leaves ``DATA_DIR/provisioning.json``. Until that file says
``registered``, the hub registers with the Device Provisioning Service's MQTT protocol (IoT Hub
ref §12) at the parent's MQTT address (a parent that is this software serves DPS on its own
port; ``gateway enrollment`` there), retrying with backoff while the parent is unreachable, so
the parent creates the gateway's identity and the upstream link's next connect is accepted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import ssl
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

from gateway.config import UpstreamConfig
from gateway.errors import UpstreamError
from gateway.hub import dps
from gateway.hub.connstr import parse_connection_string
from gateway.hub.sas import generate_sas_token
from gateway.tasks import checkpoint

log = logging.getLogger(__name__)

STATE_FILE = "provisioning.json"
API_VERSION = "2019-03-31"


def _parse_response(topic: str) -> tuple[int, dict[str, str]]:
    """``$dps/registrations/res/{status}/?$rid=..&retry-after=..`` -> status, properties."""
    head, _, query = topic.partition("?")
    status = int(head.rstrip("/").rsplit("/", 1)[-1])
    return status, dict(parse_qsl(query))


async def register(*, host: str, port: int, ca_file: str | None, id_scope: str,
                   registration_id: str, key: str | None, timeout: float = 60.0,
                   cert_file: str | None = None, key_file: str | None = None) -> dict[str, Any]:
    """Register ``registration_id`` and poll until the operation ends; returns the final
    ``registrationState``. Raises UpstreamError when the service refuses or fails it.
    ``key`` signs a SAS token (symmetric-key attestation); without it the TLS client
    certificate ``cert_file``/``key_file`` attests (X.509, CN = registration id, ref §12)."""
    tls = ssl.create_default_context(cafile=ca_file or None)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        tls.load_cert_chain(cert_file, key_file or None)
    token = generate_sas_token(dps.token_resource(id_scope, registration_id), key,
                               int(time.time()) + 3600) if key else None
    username = (f"{id_scope}/registrations/{registration_id}/api-version={API_VERSION}"
                f"&ClientVersion={quote('edge-gateway/0.1', safe='')}")
    import aiomqtt  # here, not at start: most hubs never provision at a parent

    async with asyncio.timeout(timeout), aiomqtt.Client(
            hostname=host, port=port, identifier=registration_id, username=username,
            password=token, tls_context=tls, clean_session=True) as client:
        await client.subscribe(dps.RESPONSES_FILTER, qos=1)
        rid = uuid.uuid4().hex
        body = json.dumps({"registrationId": registration_id, "payload": None})
        await client.publish(f"{dps.REGISTER_PREFIX}?$rid={rid}", body, qos=1)
        async for message in client.messages:
            status, props = _parse_response(str(message.topic))
            if props.get("$rid") != rid:
                continue
            answer = json.loads(bytes(message.payload) if isinstance(
                message.payload, bytes | bytearray) else str(message.payload))
            if status >= 300:
                raise UpstreamError(f"provisioning refused ({status}): "
                                    f"{answer.get('message') or answer}")
            if answer.get("status") == "assigning":
                await asyncio.sleep(float(props.get("retry-after", "2")))
                rid = uuid.uuid4().hex
                await client.publish(f"{dps.POLL_PREFIX}?$rid={rid}&operationId="
                                     f"{answer['operationId']}", " ", qos=1)
                continue
            state = answer.get("registrationState") or {}
            if answer.get("status") != "assigned":
                raise UpstreamError(f"provisioning {answer.get('status')}: "
                                    f"{state.get('errorMessage', 'no reason given')}")
            return dict(state)
    raise UpstreamError("the provisioning service closed the connection")  # pragma: no cover


def pending(data_dir: Path) -> dict[str, Any] | None:
    """The first-boot registration still to do, or None."""
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return None if not isinstance(state, dict) or state.get("registered") else state


def save_state(data_dir: Path, state: dict[str, Any]) -> None:
    """Write ``provisioning.json`` (atomically, 0600)."""
    tmp = data_dir / (STATE_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh, indent=2)
    os.replace(tmp, data_dir / STATE_FILE)


async def provision_until_done(data_dir: Path, cfg: UpstreamConfig, *,
                               minimum: float = 2.0, maximum: float = 300.0) -> None:
    """Register once (with jittered backoff while the parent cannot be reached)."""
    state = pending(data_dir)
    if state is None or not cfg.connection_string:
        return
    cs = parse_connection_string(cfg.connection_string)
    if not cs.shared_access_key or not cs.device_id:
        log.error("provisioning skipped: the upstream connection string has no device key")
        return
    host = cfg.host or cs.gateway_host_name or cs.host_name
    delay = minimum
    import aiomqtt  # only a hub with a registration pending at its parent gets here

    while True:
        checkpoint()  # aiomqtt may have dropped a cancel (gateway.tasks.checkpoint)
        try:
            result = await register(host=host, port=cfg.port, ca_file=cfg.ca_file or None,
                                    id_scope=str(state["idScope"]),
                                    registration_id=str(state.get("registrationId") or
                                                        cs.device_id),
                                    key=cs.shared_access_key)
        except (UpstreamError, aiomqtt.MqttError, OSError, TimeoutError) as exc:
            log.warning("provisioning at the parent failed host=%s reason=%s retry_in=%.0fs",
                        host, exc, delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, maximum)
            continue
        state["registered"] = {"assignedHub": result.get("assignedHub"),
                               "deviceId": result.get("deviceId"),
                               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if result.get("assignedHub") and result["assignedHub"] != cs.host_name:
            log.warning("provisioned to %s, but the upstream connection string names %s",
                        result["assignedHub"], cs.host_name)
        save_state(data_dir, state)
        log.info("provisioned at the parent registration_id=%s assigned_hub=%s",
                 result.get("registrationId"), result.get("assignedHub"))
        return
