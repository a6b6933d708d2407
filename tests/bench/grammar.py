"""Nanoseconds per call of the topic/bag/message grammar (gateway.hub.addresses, propbag,
messages). Run: ``python3 tests/bench/grammar.py [--quick]``.

Each line is the best of several timeit repeats (min is the least noisy estimate of the
cost itself). The hot path per telemetry PUBLISH is parse_publish_topic (cacheable per
connection and topic), then decode_bag + split_properties + stamp + props_json (cacheable per
topic too), and message_size; the store reads back with message_from_stored.
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable

from gateway.hub.addresses import (
    c2d_topic,
    parse_publish_topic,
    parse_subscribe_filter,
    twin_response_topic,
)
from gateway.hub.messages import (
    auth_method_json,
    message_from_stored,
    message_size,
    props_json,
    split_properties,
    stamp_telemetry,
    to_monitor_json,
    wire_pairs,
)
from gateway.hub.propbag import decode_bag, encode_bag

SDK_BAG = "%24.mid=42&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high"
PLAIN_BAG = "alert=high&unit=celsius&site=plant-7"
DEVICE_TOPIC = "devices/dev1/messages/events/" + SDK_BAG
MODULE_TOPIC = "devices/gw-01/modules/modbus/messages/events/%24.on=out1&%24.ct=application%2Fjson"
ENCODED_TOPIC = "devices/dev%2B1/messages/events/" + SDK_BAG
AUTH = auth_method_json(scope="device", method="sas")
BODY = b'{"temperature":21.5,"humidity":40.2,"ts":"2024-05-01T12:00:00Z"}'


def cases() -> list[tuple[str, Callable[[], object]]]:
    pairs = decode_bag(SDK_BAG)
    system, application = split_properties(pairs)
    stamped = stamp_telemetry(system, device_id="dev1", module_id=None, auth_method=AUTH,
                              generation_id="637553997165220462")
    stored = props_json(stamped, application)
    message = message_from_stored(stored, BODY)
    out_pairs = wire_pairs({"message-id": "m1", "to": "/devices/dev1/messages/devicebound"},
                           {"alert": "high", "unit": "celsius"})
    return [
        ("parse_publish_topic telemetry (device)",
         lambda: parse_publish_topic(DEVICE_TOPIC, device_id="dev1", module_id=None)),
        ("parse_publish_topic telemetry (module)",
         lambda: parse_publish_topic(MODULE_TOPIC, device_id="gw-01", module_id="modbus")),
        ("parse_publish_topic telemetry (encoded id)",
         lambda: parse_publish_topic(ENCODED_TOPIC, device_id="dev+1", module_id=None)),
        ("parse_publish_topic twin GET",
         lambda: parse_publish_topic("$iothub/twin/GET/?$rid=6a2d3e5c-2c7e-4a53-8c3c-2b7d7f1a9e01",
                                     device_id="dev1", module_id=None)),
        ("parse_subscribe_filter C2D",
         lambda: parse_subscribe_filter("devices/dev1/messages/devicebound/#",
                                        device_id="dev1", module_id=None)),
        ("decode_bag SDK example (with %)", lambda: decode_bag(SDK_BAG)),
        ("decode_bag plain (no %)", lambda: decode_bag(PLAIN_BAG)),
        ("split_properties (4 pairs)", lambda: split_properties(pairs)),
        ("stamp_telemetry", lambda: stamp_telemetry(
            system, device_id="dev1", module_id=None, auth_method=AUTH,
            generation_id="637553997165220462")),
        ("props_json (8 props)", lambda: props_json(stamped, application)),
        ("message_size", lambda: message_size(BODY, stamped, application)),
        ("message_from_stored", lambda: message_from_stored(stored, BODY)),
        ("encode_bag (4 pairs)", lambda: encode_bag(out_pairs)),
        ("c2d_topic", lambda: c2d_topic("dev1", "%24.mid=m1&alert=high")),
        ("twin_response_topic", lambda: twin_response_topic(204, "6a2d3e5c-2c7e-4a53", 6)),
        ("to_monitor_json", lambda: to_monitor_json(message, device_id="dev1", module_id=None)),
    ]


def measure(fn: Callable[[], object], repeats: int) -> float:
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=repeats, number=number)) / number * 1e9


def main() -> None:
    repeats = 3 if "--quick" in sys.argv else 7
    print(f"python {sys.version.split()[0]}, best of {repeats} repeats")
    for name, fn in cases():
        print(f"{name:<45} {measure(fn, repeats):>8.0f} ns/call")


if __name__ == "__main__":
    main()
