"""Runs inside the Azure SDK venv: the service side of C2D over AMQP, unmodified clients.

Usage: service_amqp.py JSON  where JSON has: connection_string (a policy connection string);
ca_file; op: "send" | "feedback".

* send: ``IoTHubRegistryManager.send_c2d_message(device, body, properties)`` (azure-iot-hub:
  uamqp to ``{HostName}:5671``, ``$cbs``, link to ``/messages/devicebound``). Its uamqp
  client has no CA option: it trusts ``certifi.where()``, which is pointed at the hub CA here,
  as installing the CA into the trust store would. Prints {"sent": true} or {"error": ...}.
* feedback: a uamqp ``ReceiveClient`` on ``amqps://{HostName}/messages/servicebound/feedback``
  with the same claims-based auth the registry manager uses (how the IoT Hub service SDKs of
  other languages read feedback); waits for ``count`` messages (``timeout`` s) and prints
  {"feedback": [{"body": ..., "content_type": ..., "user_id": ...}]}.
"""

import base64
import hashlib
import hmac
import json
import sys
import time
import urllib.parse

import certifi

args = json.loads(sys.argv[1])
certifi.where = lambda: args["ca_file"]  # noqa: E731  (the trust store uamqp reads)

import uamqp  # noqa: E402
from azure.core.credentials import AccessToken  # noqa: E402
from azure.iot.hub import IoTHubRegistryManager  # noqa: E402

parts = dict(p.split("=", 1) for p in args["connection_string"].split(";"))
host, policy, key = parts["HostName"], parts["SharedAccessKeyName"], parts["SharedAccessKey"]


def out(obj):
    print(json.dumps(obj, default=str), flush=True)


if args["op"] == "send":
    try:
        rm = IoTHubRegistryManager.from_connection_string(args["connection_string"])
        rm.send_c2d_message(args["device"], args["body"], properties=args.get("properties", {}))
        rm.amqp_svc_client.disconnect_sync()
        out({"sent": True})
    except Exception as exc:
        out({"error": f"{type(exc).__name__}: {exc}"})
else:
    def get_token():  # as azure-iot-hub's IoTHubAmqpClientSharedAccessKeyAuth signs
        expiry = int(time.time() + 3600)
        to_sign = (host + "\n" + str(expiry)).encode()
        sig = urllib.parse.quote(base64.b64encode(
            hmac.HMAC(base64.b64decode(key), to_sign, hashlib.sha256).digest()))
        return AccessToken(f"SharedAccessSignature sr={host}&sig={sig}&se={expiry}&skn={policy}",
                           expiry)

    auth = uamqp.authentication.JWTTokenAuth(
        audience="https://" + host, uri="https://" + host, get_token=get_token,
        token_type=b"servicebus.windows.net:sastoken", verify=args["ca_file"])
    auth.update_token()
    client = uamqp.ReceiveClient(f"amqps://{host}/messages/servicebound/feedback", auth=auth,
                                 timeout=int(args.get("timeout", 30) * 1000))
    got = []
    try:
        deadline = time.monotonic() + args.get("timeout", 30)
        while len(got) < args.get("count", 1) and time.monotonic() < deadline:
            for message in client.receive_message_batch(max_batch_size=1, timeout=5000):
                props = message.properties
                got.append({"body": json.loads(b"".join(message.get_data()).decode()),
                            "content_type": props.content_type.decode() if props else None,
                            "user_id": props.user_id.decode() if props and props.user_id else None})
                message.accept()
        out({"feedback": got})
    except Exception as exc:
        out({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        client.close()
