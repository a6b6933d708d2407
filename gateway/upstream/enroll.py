"""Set the upstream link by enrollment: the gateway registers itself at a Device Provisioning
Service now, and the answer (assigned hub, device id) becomes its link settings.

What ``PUT /upstream`` with an ``enrollment`` object does (the technician's Upstream screen
and REST alike; README "Connect to a parent hub")::

    {"enrollment": {"idScope": "0ne00000001", "registrationId": "site-7",
                    "groupKey": "<base64 group key>"          # symmetric-key group enrollment
                    | "x509": {"cert": "/path.pem", "key": "/path.key"},   # or a certificate
                    "provisioningHost": "global.azure-devices-provisioning.net",
                    "provisioningPort": 8883},
     "caFile": "...", "host": "...", "port": 8883}

With a group key the device key is derived from it (IoT Hub ref §12.3); with a certificate
the registration id defaults to its common name. ``host``/``port`` are where the link dials
afterwards (default: the assigned hub, 8883). The registration itself is
:func:`gateway.upstream.provision.register` (the one first boot runs).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from gateway.errors import (
    AuthError,
    ConfigError,
    GatewayTimeoutError,
    InvalidRequestError,
    UpstreamError,
)
from gateway.hub import dps
from gateway.upstream import provision
from gateway.upstream.settings import LinkSettings, from_x509

TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Enrollment:
    id_scope: str
    registration_id: str
    provisioning_host: str
    provisioning_port: int = 8883
    group_key: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def device_key(self) -> str | None:
        return dps.derive_device_key(self.group_key, self.registration_id) \
            if self.group_key else None


def _text(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequestError(f"enrollment.{name} must be a string")
    return value.strip()


def _common_name(cert_file: str) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"enrollment.x509.cert: not a PEM certificate: {exc}") \
            from None
    if not names:
        raise InvalidRequestError("enrollment.x509.cert: the certificate has no common name")
    return str(names[0].value)


def parse(data: Any) -> Enrollment:
    """The ``enrollment`` object of a request (pure but for reading a certificate's CN)."""
    if not isinstance(data, dict):
        raise InvalidRequestError("enrollment must be an object")
    known = {"idScope", "registrationId", "groupKey", "x509", "provisioningHost",
             "provisioningPort"}
    unknown = set(data) - known
    if unknown:
        raise InvalidRequestError(f"enrollment: unknown keys {sorted(unknown)}")
    scope, host = _text(data, "idScope"), _text(data, "provisioningHost")
    if not scope or not scope.isalnum() or len(scope) > 64:
        raise InvalidRequestError("enrollment.idScope: give the ID scope (letters and digits)")
    if not host:
        raise InvalidRequestError("enrollment.provisioningHost: give the provisioning "
                                  "service's address")
    port = data.get("provisioningPort", 8883)
    if port is None:
        port = 8883
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidRequestError("enrollment.provisioningPort must be a port number")
    group_key, x509 = _text(data, "groupKey"), data.get("x509")
    if bool(group_key) == (x509 is not None):
        raise InvalidRequestError("enrollment: give groupKey or x509 (cert and key), one of them")
    cert_file = key_file = None
    if group_key:
        try:
            base64.b64decode(group_key, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError("enrollment.groupKey must be base64") from None
    else:
        if not isinstance(x509, dict) or not all(isinstance(x509.get(k), str) and x509[k]
                                                 for k in ("cert", "key")):
            raise InvalidRequestError("enrollment.x509 must be {\"cert\": PATH, \"key\": PATH}")
        for name in ("cert", "key"):
            if not Path(x509[name]).is_file():
                raise InvalidRequestError(f"enrollment.x509.{name}: no such file on the "
                                          f"gateway: {x509[name]}")
        cert_file, key_file = str(Path(x509["cert"]).resolve()), str(Path(x509["key"]).resolve())
    registration_id = _text(data, "registrationId") or (
        _common_name(cert_file) if cert_file else "")
    try:
        registration_id = dps.check_registration_id(registration_id)
    except AuthError as exc:
        raise InvalidRequestError(f"enrollment.registrationId: {exc}") from None
    return Enrollment(id_scope=scope, registration_id=registration_id, provisioning_host=host,
                      provisioning_port=port, group_key=group_key or None, cert_file=cert_file,
                      key_file=key_file)


async def enroll(enrollment: Enrollment, *, data_dir: Path, ca_file: str | None = None,
                 host: str | None = None, port: int | None = None) -> LinkSettings:
    """Register now; the link settings the assignment gives. Refusals are 400s with the
    service's reason, an unreachable service a 504."""
    import aiomqtt  # with the first enrollment, not at every start (the idle footprint)

    e = enrollment
    try:
        state = await provision.register(
            host=e.provisioning_host, port=e.provisioning_port, ca_file=ca_file,
            id_scope=e.id_scope, registration_id=e.registration_id, key=e.device_key,
            cert_file=e.cert_file, key_file=e.key_file, timeout=TIMEOUT_S)
    except UpstreamError as exc:
        raise InvalidRequestError(str(exc)) from None
    except aiomqtt.MqttCodeError as exc:
        raise InvalidRequestError(f"the provisioning service refused the connection: {exc}") \
            from None
    except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
        raise GatewayTimeoutError(f"cannot reach the provisioning service at "
                                  f"{e.provisioning_host}:{e.provisioning_port}: "
                                  f"{exc or type(exc).__name__}") from None
    hub, device = state.get("assignedHub"), state.get("deviceId")
    if not isinstance(hub, str) or not hub or not isinstance(device, str) or not device:
        raise InvalidRequestError(f"the provisioning service assigned no hub: {state}")
    key = e.device_key
    if key is not None:
        settings = LinkSettings(hub=hub, device_id=device, shared_access_key=key,
                                ca_file=ca_file or None, host=host or hub, port=port or 8883)
    else:
        assert e.cert_file is not None and e.key_file is not None
        settings = from_x509(e.cert_file, e.key_file, hub=hub, device=device, ca_file=ca_file,
                             host=host, port=port)
    await asyncio.to_thread(provision.save_state, data_dir, {
        "idScope": e.id_scope, "registrationId": e.registration_id,
        "attestation": "symmetricKey (derived from the enrollment group key)" if key
        else "x509", "provisioningHost": e.provisioning_host,
        "registered": {"assignedHub": hub, "deviceId": device,
                       "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}})
    return settings


async def from_request(body: dict[str, Any], data_dir: Path) -> LinkSettings:
    """``PUT /upstream`` with ``enrollment``: validate, register, return the settings."""
    port = body.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 0 < port < 65536):
        raise InvalidRequestError("port must be a port number")
    ca_file, host = body.get("caFile"), body.get("host")
    for name, value in (("caFile", ca_file), ("host", host)):
        if value is not None and not isinstance(value, str):
            raise InvalidRequestError(f"{name} must be a string")
    if ca_file and not Path(ca_file).is_file():
        raise InvalidRequestError(f"caFile: no such file on the gateway: {ca_file}")
    enrollment = await asyncio.to_thread(parse, body["enrollment"])
    try:
        return await enroll(enrollment, data_dir=data_dir, ca_file=ca_file or None,
                            host=host or None, port=port)
    except ConfigError as exc:
        raise InvalidRequestError(str(exc)) from None
