"""Reading the built-in endpoint: stored entries -> the JSON a back-end application sees.

The store keeps per message only what the hub decided at ingress (property JSON, body, ids,
enqueued time). A message the device sent without a message id is shown without one: IoT Hub
assigns none (``message-id`` is the sender's, ref §2.3), and a reader given an invented id on a
message without a content type can mistake it for something else (the Azure SDK's own
service-side helper loses such messages). The sequence number is shown as Event Hubs shows
it, in the ``x-opt-sequence-number`` annotation.
"""

from __future__ import annotations

from typing import Any

from gateway.hub.messages import Message, message_from_stored, to_monitor_json
from gateway.store.log import Entry


def entry_message(entry: Entry, host_name: str) -> Message:
    """The stored message as it was accepted (``host_name`` is kept for callers)."""
    return message_from_stored(entry.props, entry.body)


def entry_json(entry: Entry, host_name: str) -> dict[str, Any]:
    """One line of the event stream: the monitor-events shape plus ``seq`` and ``kind`` (the
    ``events`` endpoint's enrichments: :meth:`gateway.routingsvc.RoutingService.events_message`
    and :func:`message_json`)."""
    return message_json(entry, entry_message(entry, host_name))


def message_json(entry: Entry, message: Message) -> dict[str, Any]:
    """:func:`entry_json` of ``entry`` shown as ``message`` (its enrichments applied)."""
    out = to_monitor_json(message, device_id=entry.device_id, module_id=entry.module_id,
                          enqueued_time_ms=entry.enqueued_ms)
    out["event"]["annotations"]["x-opt-sequence-number"] = entry.seq
    out["seq"] = entry.seq
    out["kind"] = entry.kind
    return out
