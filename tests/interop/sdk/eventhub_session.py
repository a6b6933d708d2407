"""Runs inside the Azure SDK venv: read the hub's built-in endpoint with the unmodified
azure-eventhub EventHubConsumerClient, as a back end written for IoT Hub does.

Usage: eventhub_session.py JSON  where JSON has: connection_string; endpoint (the custom
endpoint address, ``sb://127.0.8.1:PORT`` -- the real clients dial 5671/443 on the
connection string's host); ca_file; websocket (bool); uamqp (bool: the uamqp transport
instead of the pure-Python one); consumer_group; partition; start: "@latest" | "-1" |
{"sequence": n} | {"time_ms": ms} | {"offset": "n"}; inclusive; count (events to wait for);
timeout; properties (bool: print the event hub's and partition 0's properties first;
properties_partition names another partition).

Prints JSON lines: {"properties": ...}, {"event": ...} per event, {"error": {"type", "message"}}
when the client reports one (then exits), and {"done": n} at the end.
"""

import datetime
import json
import sys
import threading

from azure.eventhub import EventHubConsumerClient, TransportType

args = json.loads(sys.argv[1])


def out(obj):
    print(json.dumps(obj, default=str), flush=True)


def text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


kwargs = dict(
    consumer_group=args.get("consumer_group", "$Default"),
    connection_verify=args["ca_file"],
    transport_type=TransportType.AmqpOverWebsocket if args.get("websocket") else TransportType.Amqp,
    retry_total=0,
)
if args.get("endpoint"):
    kwargs["custom_endpoint_address"] = args["endpoint"]
if args.get("uamqp"):
    kwargs["uamqp_transport"] = True
client = EventHubConsumerClient.from_connection_string(args["connection_string"], **kwargs)

if args.get("properties"):
    try:
        hub = client.get_eventhub_properties()
        part = client.get_partition_properties(args.get("properties_partition", "0"))
        out({"properties": {"eventhub": hub, "partition": part}})
    except Exception as exc:  # the refusal tests look at this
        out({"error": {"type": type(exc).__name__, "message": str(exc)}})
        client.close()
        sys.exit(0)

start = args.get("start", "-1")
if isinstance(start, dict):
    if "sequence" in start:
        start = int(start["sequence"])
    elif "time_ms" in start:
        start = datetime.datetime.fromtimestamp(start["time_ms"] / 1000, datetime.timezone.utc)
    else:
        start = str(start["offset"])
count = args.get("count", 1)
seen = [0]
done = threading.Event()


def on_event(partition_context, event):
    if event is None:
        return
    raw = event.raw_amqp_message
    annotations = {text(k): (v if not isinstance(v, bytes) else text(v))
                   for k, v in (raw.annotations or {}).items()}
    out({"event": {
        "body": event.body_as_str(),
        "properties": {text(k): text(v) for k, v in (event.properties or {}).items()},
        "system": {text(k): text(v) for k, v in event.system_properties.items()},
        "annotations": annotations,
        "sequence_number": event.sequence_number,
        "offset": event.offset,
        "enqueued_time": event.enqueued_time.isoformat() if event.enqueued_time else None,
        "partition": partition_context.partition_id,
        "message_id": text(raw.properties.message_id) if raw.properties else None,
        "content_type": text(raw.properties.content_type) if raw.properties else None,
    }})
    seen[0] += 1
    if seen[0] >= count:
        done.set()


def on_error(partition_context, error):
    out({"error": {"type": type(error).__name__, "message": str(error)}})
    done.set()


def on_partition_initialize(partition_context):
    out({"initialized": partition_context.partition_id})


def stopper():
    done.wait(args.get("timeout", 60))
    client.close()


threading.Thread(target=stopper, daemon=True).start()
try:
    client.receive(on_event=on_event, on_error=on_error, partition_id=args.get("partition", "0"),
                   starting_position=start,
                   starting_position_inclusive=bool(args.get("inclusive")),
                   on_partition_initialize=on_partition_initialize, max_wait_time=None)
except Exception as exc:
    out({"error": {"type": type(exc).__name__, "message": str(exc)}})
out({"done": seen[0]})
