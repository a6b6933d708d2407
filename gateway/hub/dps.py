"""The Device Provisioning Service's device protocol over MQTT: username, topics, keys. Pure.

IoT Hub ref §12. A device that provisions itself connects with client id ``{registrationId}``
and username ``{idScope}/registrations/{registrationId}/api-version=...`` (no ``?``), subscribes
to ``$dps/registrations/res/#``, publishes a register request and polls the operation until it
is ``assigned``; the answer names the hub to use and the device id. With a symmetric-key group
enrollment the device signs its token with a key derived from the group key (§12.3).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote

from gateway.errors import AuthError, ForbiddenError

RESPONSES_FILTER = "$dps/registrations/res/#"
REGISTER_PREFIX = "$dps/registrations/PUT/iotdps-register/"
POLL_PREFIX = "$dps/registrations/GET/iotdps-get-operationstatus/"
_REGISTRATION_ID = re.compile(r"^[a-z0-9]([a-z0-9:._-]{0,126}[a-z0-9])?$")
_ID_SCOPE = re.compile(r"^[A-Za-z0-9]{1,64}$")


@dataclass(frozen=True, slots=True)
class DpsUsername:
    id_scope: str
    registration_id: str
    api_version: str


def is_dps_username(username: str) -> bool:
    """A DPS username has ``registrations`` as its second segment and its query after the
    third ``/`` without a ``?`` (IoT Hub usernames carry ``/?api-version``)."""
    parts = username.split("/", 3)
    return len(parts) == 4 and parts[1] == "registrations" and not parts[3].startswith("?")


def parse_dps_username(username: str) -> DpsUsername:
    parts = username.split("/", 3)
    if len(parts) != 4 or parts[1] != "registrations":
        raise AuthError("malformed provisioning username", connack=4)
    scope, _, registration_id, query = parts
    params = dict(parse_qsl(query, keep_blank_values=True))
    if not params.get("api-version"):
        raise AuthError("provisioning username without api-version", connack=4)
    if not _ID_SCOPE.match(scope):
        raise AuthError("malformed ID scope in the provisioning username", connack=4)
    return DpsUsername(scope, registration_id, params["api-version"])


def check_registration_id(registration_id: str) -> str:
    """Registration ids are case-insensitive, at most 128 characters of alphanumerics and
    ``: . _ -``, neither starting nor ending with a special character (ref §12.1); the hub
    keeps them in lower case, as the SDK documentation asks devices to send them."""
    lowered = registration_id.lower()
    if not _REGISTRATION_ID.match(lowered):
        raise AuthError(f"invalid registration id {registration_id!r}")
    return lowered


def token_resource(id_scope: str, registration_id: str) -> str:
    """The ``sr`` a device's provisioning token must name (before URL-encoding)."""
    return f"{id_scope}/registrations/{registration_id}"


def derive_device_key(group_key_b64: str, registration_id: str) -> str:
    """Base64(HMAC-SHA256(key = Base64Decode(groupKey), message = registrationId)) (§12.3)."""
    key = base64.b64decode(group_key_b64)
    digest = hmac.new(key, registration_id.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


# -- topics -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DpsResponsesFilter:
    """``$dps/registrations/res/#``: where the answers arrive."""


@dataclass(frozen=True, slots=True)
class DpsRegister:
    rid: str


@dataclass(frozen=True, slots=True)
class DpsPoll:
    rid: str
    operation_id: str


DpsRequest = DpsRegister | DpsPoll


def parse_filter(topic_filter: str) -> DpsResponsesFilter:
    if topic_filter != RESPONSES_FILTER:
        raise ForbiddenError(f"a provisioning client may subscribe only to {RESPONSES_FILTER}, "
                             f"not {topic_filter!r}")
    return DpsResponsesFilter()


def parse_publish(topic: str) -> DpsRequest:
    for prefix in (REGISTER_PREFIX, POLL_PREFIX):
        if topic.startswith(prefix):
            query = topic[len(prefix):]
            if not query.startswith("?"):
                break
            params = dict(parse_qsl(query[1:], keep_blank_values=True))
            rid = params.get("$rid")
            if not rid:
                raise ForbiddenError(f"provisioning request without $rid: {topic!r}")
            if prefix == REGISTER_PREFIX:
                return DpsRegister(rid)
            operation_id = params.get("operationId")
            if not operation_id:
                raise ForbiddenError(f"operation status request without operationId: {topic!r}")
            return DpsPoll(rid, operation_id)
    raise ForbiddenError(f"topic not allowed for a provisioning client: {topic!r}")


def response_topic(status: int, rid: str, retry_after: int | None = None) -> str:
    topic = f"$dps/registrations/res/{status}/?$rid={quote(rid, safe='')}"
    if retry_after is not None:
        topic += f"&retry-after={retry_after}"
    return topic


def register_payload(body: bytes) -> dict[str, Any]:
    """The register request body: ``{"registrationId": ..., "payload": ...}`` (SDKs may add
    ``tpm``/``csr``, which the hub ignores)."""
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        raise ForbiddenError("the register request is not JSON") from None
    if not isinstance(doc, dict):
        raise ForbiddenError("the register request must be a JSON object")
    return doc
