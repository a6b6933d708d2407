"""Runs inside the Azure SDK venv (tests/bench/amqp_events.py starts it): read ``count`` events
from the start of partition 0 with the unmodified azure-eventhub EventHubConsumerClient
(pure-Python transport, or uamqp with "uamqp": true; receive_batch) and print one JSON line
with the timings."""

import json
import sys
import threading
import time

from azure.eventhub import EventHubConsumerClient, TransportType

args = json.loads(sys.argv[1])
client = EventHubConsumerClient.from_connection_string(
    args["connection_string"], consumer_group="$Default", connection_verify=args["ca_file"],
    custom_endpoint_address=args["endpoint"], transport_type=TransportType.Amqp,
    prefetch=args.get("prefetch", 300), uamqp_transport=bool(args.get("uamqp")))
count = args["count"]
seen = [0]
first = [0.0]
done = threading.Event()
start = time.monotonic()


def on_batch(context, events):
    if events and not first[0]:
        first[0] = time.monotonic()
    seen[0] += len(events)
    if seen[0] >= count:
        done.set()


def stopper():
    done.wait(args.get("timeout", 300))
    client.close()


threading.Thread(target=stopper, daemon=True).start()
client.receive_batch(on_event_batch=on_batch, partition_id="0", starting_position="-1",
                     max_batch_size=args.get("prefetch", 300), max_wait_time=5)
end = time.monotonic()
print(json.dumps({"events": seen[0], "seconds": end - start,
                  "first_to_last": end - (first[0] or end)}))
