"""Runs inside the Azure SDK venv: a long-lived device or module client that reports what it
receives as JSON lines on stdout, and obeys commands given as JSON lines on stdin.

Argument: JSON {connection_string, ca_file, module (bool), websockets (bool)}.
Events printed: {"ready": ...}, {"twin": ...}, {"reported_ok": ...}, {"desired": patch},
{"method": name, "payload": ...}, {"c2d": {...}}, {"input": {...}}, {"error": "..."}.
Commands read: {"cmd": "get_twin"}, {"cmd": "report", "patch": {...}},
{"cmd": "send", "body": "...", "output": "o1"}, {"cmd": "disconnect"}, {"cmd": "connect"},
{"cmd": "exit"}.
"""

import json
import sys
import threading

from azure.iot.device import IoTHubDeviceClient, IoTHubModuleClient, Message, MethodResponse

args = json.loads(sys.argv[1])
lock = threading.Lock()


def emit(obj):
    with lock:
        print(json.dumps(obj), flush=True)


Client = IoTHubModuleClient if args.get("module") else IoTHubDeviceClient
client = Client.create_from_connection_string(
    args["connection_string"], server_verification_cert=open(args["ca_file"]).read(),
    websockets=args.get("websockets", False), connection_retry=False,
)


def on_desired(patch):
    emit({"desired": patch})


def on_method(request):
    emit({"method": request.name, "payload": request.payload})
    status = 200 if request.name != "fail" else 500
    client.send_method_response(MethodResponse.create_from_method_request(
        request, status, {"echo": request.payload, "method": request.name}))


def on_message(message):
    emit({"c2d": {"body": message.data.decode(), "message_id": message.message_id,
                  "correlation_id": message.correlation_id, "content_type": message.content_type,
                  "props": message.custom_properties, "input": getattr(message, "input_name", None)}})


client.on_twin_desired_properties_patch_received = on_desired
client.on_method_request_received = on_method
client.on_message_received = on_message
client.connect()
emit({"ready": True})
for line in sys.stdin:
    try:
        cmd = json.loads(line)
        what = cmd["cmd"]
        if what == "get_twin":
            emit({"twin": client.get_twin()})
        elif what == "report":
            client.patch_twin_reported_properties(cmd["patch"])
            emit({"reported_ok": True})
        elif what == "send":
            msg = Message(cmd["body"])
            if cmd.get("output"):
                client.send_message_to_output(msg, cmd["output"])
            else:
                client.send_message(msg)
            emit({"sent": True})
        elif what == "disconnect":
            client.disconnect()
            emit({"disconnected": True})
        elif what == "connect":
            client.connect()
            emit({"connected": True})
        elif what == "exit":
            break
    except Exception as exc:  # report and keep going: the test decides
        emit({"error": f"{type(exc).__name__}: {exc}"})
client.shutdown()
emit({"bye": True})
