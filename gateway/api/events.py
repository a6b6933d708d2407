"""Reading the built-in endpoint: stored entries -> the JSON a back-end application sees.

The store keeps per message only what the hub decided at ingress (property JSON, body, ids,
enqueued time). Two things are derived here, the same on every read: the enqueued time, and
for messages the device sent without one, a message id derived from the hub's host name and
the sequence number (stable and unique per hub). The sequence number is shown as Event Hubs
shows it, in the ``x-opt-sequence-number`` annotation.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from gateway.hub.messages import Message, message_from_stored, to_monitor_json
from gateway.store.log import Entry


def entry_message(entry: Entry, host_name: str) -> Message:
    message = message_from_stored(entry.props, entry.body)
    if entry.kind == "telemetry" and "message-id" not in message.system:
        system = dict(message.system)
        system["message-id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{host_name}/{entry.seq}"))
        message = Message(body=message.body, system=system, application=message.application)
    return message


def entry_json(entry: Entry, host_name: str,
               enrichments: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One line of the event stream: the monitor-events shape plus ``seq`` and ``kind``;
    ``enrichments`` (those of the ``events`` endpoint, IoT Hub ref §10.4) join the
    application properties."""
    message = entry_message(entry, host_name)
    if enrichments:
        message = Message(body=message.body, system=message.system,
                          application={**message.application, **enrichments})
    out = to_monitor_json(message, device_id=entry.device_id, module_id=entry.module_id,
                          enqueued_time_ms=entry.enqueued_ms)
    out["event"]["annotations"]["x-opt-sequence-number"] = entry.seq
    out["seq"] = entry.seq
    out["kind"] = entry.kind
    return out
