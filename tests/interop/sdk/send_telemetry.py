"""Runs inside the Azure SDK venv: send telemetry with the unmodified azure-iot-device SDK.

Usage: send_telemetry.py JSON  where JSON has: connection_string | (x509_cert, x509_key,
hostname, device_id, gateway_hostname); ca_file; count; module (bool); prefix; websockets
(bool: MQTT over WebSocket on 443).
Prints one JSON line {"sent": n} on success; exits non-zero with the SDK error otherwise.
"""

import json
import sys

from azure.iot.device import X509, IoTHubDeviceClient, IoTHubModuleClient, Message

args = json.loads(sys.argv[1])
ca = open(args["ca_file"]).read()
Client = IoTHubModuleClient if args.get("module") else IoTHubDeviceClient
if "connection_string" in args:
    client = Client.create_from_connection_string(
        args["connection_string"], server_verification_cert=ca, connection_retry=False,
        keep_alive=args.get("keep_alive", 60),
    )
else:
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(args["x509_cert"], args["x509_key"]), hostname=args["hostname"],
        device_id=args["device_id"], gateway_hostname=args["gateway_hostname"],
        server_verification_cert=ca, connection_retry=False,
        websockets=args.get("websockets", False),
    )
client.connect()
prefix = args.get("prefix", "m")
for i in range(args["count"]):
    msg = Message(json.dumps({"seq": i, "temperature": 20 + i % 10, "note": "ü & = / %"}))
    msg.message_id = f"{prefix}-{i}"
    msg.correlation_id = f"corr-{i}"
    msg.content_type = "application/json"
    msg.content_encoding = "utf-8"
    msg.custom_properties["seq"] = str(i)
    msg.custom_properties["alert level"] = "high & low=1/2"
    if args.get("output"):
        client.send_message_to_output(msg, args["output"])
    else:
        client.send_message(msg)
client.shutdown()
print(json.dumps({"sent": args["count"]}), flush=True)
