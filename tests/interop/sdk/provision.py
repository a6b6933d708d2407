"""Runs inside the Azure SDK venv: provision with the unmodified ProvisioningDeviceClient, then
connect to the assigned hub with what it gave and send one message.

Usage: provision.py JSON  where JSON has: provisioning_host, id_scope, registration_id,
symmetric_key | (x509_cert, x509_key), ca_file, payload (optional).
Prints one JSON line {"status", "assigned_hub", "device_id", "substatus", "sent"}.
"""

import json
import sys

from azure.iot.device import X509, IoTHubDeviceClient, Message, ProvisioningDeviceClient

args = json.loads(sys.argv[1])
ca = open(args["ca_file"]).read()
if "symmetric_key" in args:
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=args["provisioning_host"], registration_id=args["registration_id"],
        id_scope=args["id_scope"], symmetric_key=args["symmetric_key"],
        server_verification_cert=ca)
else:
    x509 = X509(args["x509_cert"], args["x509_key"])
    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=args["provisioning_host"], registration_id=args["registration_id"],
        id_scope=args["id_scope"], x509=x509, server_verification_cert=ca)
if args.get("payload") is not None:
    client.provisioning_payload = args["payload"]
result = client.register()
state = result.registration_state
out = {"status": result.status, "assigned_hub": state.assigned_hub if state else None,
       "device_id": state.device_id if state else None,
       "substatus": state.sub_status if state else None, "sent": 0}
if result.status == "assigned":
    if "symmetric_key" in args:
        device = IoTHubDeviceClient.create_from_symmetric_key(
            symmetric_key=args["symmetric_key"], hostname=state.assigned_hub,
            device_id=state.device_id, server_verification_cert=ca, connection_retry=False)
    else:
        device = IoTHubDeviceClient.create_from_x509_certificate(
            x509=X509(args["x509_cert"], args["x509_key"]), hostname=state.assigned_hub,
            device_id=state.device_id, server_verification_cert=ca, connection_retry=False)
    device.connect()
    device.send_message(Message(json.dumps({"provisioned": True}), content_type="application/json",
                                content_encoding="utf-8"))
    device.shutdown()
    out["sent"] = 1
print(json.dumps(out), flush=True)
