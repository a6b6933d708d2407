"""What an endpoint sends for one stored message. Pure.

:class:`Delivery` is a log entry with its enrichments applied (IoT Hub ref §10.4: added as
application properties; an enrichment replaces an application property of the same name).
From it come:

- the JSON envelope (mqtt ``envelope = "json"``, http, jsonl files)::

      {"body": <the JSON body parsed, or the text; base64 text plus "bodyEncoding": "base64"
                for a body that is not text>,
       "properties": {<application properties, enrichments included>},
       "systemProperties": {<what monitor-events --json shows: the AMQP properties
                             (message_id, content_type, ...) and the annotations
                             (iothub-connection-device-id, iothub-enqueuedtime in ms, ...,
                             x-opt-sequence-number)>}}

  built with the hub's own monitor view (:func:`gateway.hub.messages.to_monitor_json`), so
  both read the same;
- the MQTT ``body`` envelope: the raw body on ``{template}/{property bag}``, the bag as the
  hub writes it to devices (:func:`gateway.hub.messages.wire_pairs`, IoT Hub ref §2.2, §3.1);
- the Avro record of Azure Storage endpoints (``EnqueuedTimeUtc``, ``Properties``,
  ``SystemProperties``, ``Body``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway.hub.messages import (
    MAX_TELEMETRY_BYTES,
    Message,
    enriched,
    format_time,
    message_from_stored,
    to_monitor_json,
    wire_pairs,
)
from gateway.hub.propbag import encode_bag
from gateway.store.log import Entry

__all__ = [
    "AVRO_SCHEMA",
    "Delivery",
    "avro_record",
    "body_publish",
    "delivery_of",
    "json_envelope",
    "json_line",
    "render_topic",
]

_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

AVRO_SCHEMA: Final[dict[str, Any]] = {
    "type": "record",
    "name": "Message",
    "namespace": "Microsoft.Azure.Devices",
    "fields": [
        {"name": "EnqueuedTimeUtc", "type": "string"},
        {"name": "Properties", "type": {"type": "map", "values": ["null", "string"]}},
        {"name": "SystemProperties", "type": {"type": "map", "values": "string"}},
        {"name": "Body", "type": ["null", "bytes"]},
    ],
}
"""IoT Hub's routing-to-storage Avro record (its field names); ``Properties`` values may be
null for bare bag keys; ``SystemProperties`` uses Azure's camelCase names plus
``sequenceNumber`` (the log's seq, which lets a restart find where the file ends)."""

# Our system property names -> the names Azure Storage's Avro files use.
_AZURE_SYSTEM: Final[Mapping[str, str]] = {
    "message-id": "messageId",
    "correlation-id": "correlationId",
    "user-id": "userId",
    "content-type": "contentType",
    "content-encoding": "contentEncoding",
    "iothub-connection-device-id": "connectionDeviceId",
    "iothub-connection-module-id": "connectionModuleId",
    "iothub-connection-auth-method": "connectionAuthMethod",
    "iothub-connection-auth-generation-id": "connectionDeviceGenerationId",
    "iothub-enqueuedtime": "enqueuedTime",
    "iothub-message-source": "messageSource",
    "dt-dataschema": "dt-dataschema",
    "dt-subject": "dt-subject",
}


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message on its way to an endpoint: a log entry, enrichments applied."""

    seq: int
    kind: str
    device_id: str
    module_id: str | None
    enqueued_ms: int
    body: bytes
    system: Mapping[str, str]
    application: Mapping[str, str | None]


def delivery_of(entry: Entry, enrichments: Mapping[str, str], host_name: str, *,
                limit: int = MAX_TELEMETRY_BYTES) -> Delivery:
    """The delivery of ``entry``. A device message sent without a message id gets a stable one
    derived from the host name and seq, so an endpoint's consumers can drop redeliveries (the
    built-in endpoint shows none, as IoT Hub). :class:`~gateway.errors.MessageTooLargeError`
    when the enrichments push the message over ``limit`` bytes (IoT Hub ref §10.4; the
    derived message id does not count: :func:`gateway.hub.messages.enriched`)."""
    message = enriched(message_from_stored(entry.props, entry.body), enrichments, limit=limit)
    system: Mapping[str, str] = message.system
    if entry.kind == "telemetry" and "message-id" not in system:
        system = dict(system)
        system["message-id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{host_name}/{entry.seq}"))
    return Delivery(entry.seq, entry.kind, entry.device_id, entry.module_id, entry.enqueued_ms,
                    entry.body, system, message.application)


def json_envelope(d: Delivery) -> dict[str, Any]:
    """The JSON envelope (module docstring)."""
    event = to_monitor_json(Message(d.body, d.system, d.application), device_id=d.device_id,
                            module_id=d.module_id, enqueued_time_ms=d.enqueued_ms)["event"]
    system = {**event["properties"]["system"], **event["annotations"]}
    system["x-opt-sequence-number"] = d.seq
    out: dict[str, Any] = {
        "body": event["payload"],
        "properties": event["properties"]["application"],
        "systemProperties": system,
    }
    if "payload_encoding" in event:
        out["bodyEncoding"] = event["payload_encoding"]
    return out


def json_line(d: Delivery) -> bytes:
    """The envelope as one compact UTF-8 JSON line, newline included."""
    return (_COMPACT.encode(json_envelope(d)) + "\n").encode("utf-8")


def render_topic(template: str, d: Delivery) -> str:
    """``{deviceId}`` and ``{moduleId}`` (empty for device messages) filled in."""
    return template.replace("{deviceId}", d.device_id).replace("{moduleId}", d.module_id or "")


def body_publish(template: str, d: Delivery) -> tuple[str, bytes]:
    """The ``body`` envelope: ``({template}/{bag}, raw body)``; the bag carries the system
    properties the hub writes to devices (``$.mid``, ``$.ct``, ``$.cdid``, ...) and every
    application property, enrichments included."""
    bag = encode_bag(wire_pairs(d.system, d.application))
    return f"{render_topic(template, d)}/{bag}", d.body


def avro_record(d: Delivery) -> dict[str, Any]:
    """The Azure Storage Avro record of ``d`` (:data:`AVRO_SCHEMA`)."""
    system = {_AZURE_SYSTEM.get(k, k): v for k, v in d.system.items()}
    system.setdefault("connectionDeviceId", d.device_id)
    if d.module_id is not None:
        system.setdefault("connectionModuleId", d.module_id)
    system["enqueuedTime"] = format_time(d.enqueued_ms / 1000)
    system["sequenceNumber"] = str(d.seq)
    return {
        "EnqueuedTimeUtc": system["enqueuedTime"],
        "Properties": dict(d.application),
        "SystemProperties": system,
        "Body": d.body,
    }
