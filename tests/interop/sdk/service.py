"""Runs inside the Azure SDK venv: service operations with the unmodified azure-iot-hub SDK.

Argument: JSON {connection_string, ops: [...]}; REQUESTS_CA_BUNDLE must name the hub CA.
Ops: {"op": "update_twin", "device": d, "module": m?, "patch": {...}},
{"op": "get_twin", "device": d, "module": m?}, {"op": "invoke", "device": d, "module": m?,
"method": name, "payload": ..., "timeout": s, "connect_timeout": s},
{"op": "create_device", "device": d, "scope": parent edge's deviceScope?},
{"op": "update_device", "device": d, "primary": key, "secondary": key, "status": s,
"scope": ...?}, {"op": "get_device", "device": d},
{"op": "delete_device", "device": d}, {"op": "create_module", "device": d, "module": m},
{"op": "create_device_x509", "device": d, "primary": thumbprint, "secondary": thumbprint?},
{"op": "create_device_ca", "device": d}.
Prints one JSON line: {"results": [...]} where failed ops give {"error": ..., "status": ...}.
"""

import json
import sys

from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties

args = json.loads(sys.argv[1])
rm = IoTHubRegistryManager.from_connection_string(args["connection_string"])
results = []
for op in args["ops"]:
    try:
        kind = op["op"]
        if kind == "update_twin":
            patch = op["patch"]
            twin = Twin(tags=patch.get("tags"),
                        properties=TwinProperties(desired=patch.get("desired")))
            if op.get("module"):
                out = rm.update_module_twin(op["device"], op["module"], twin, "*")
            else:
                out = rm.update_twin(op["device"], twin, "*")
            results.append({"desired": out.properties.desired, "tags": out.tags, "etag": out.etag})
        elif kind == "get_twin":
            out = (rm.get_module_twin(op["device"], op["module"]) if op.get("module")
                   else rm.get_twin(op["device"]))
            results.append({"reported": out.properties.reported, "desired": out.properties.desired,
                            "tags": out.tags, "status": out.status})
        elif kind == "invoke":
            method = CloudToDeviceMethod(method_name=op["method"], payload=op.get("payload"),
                                         response_timeout_in_seconds=op.get("timeout", 30),
                                         connect_timeout_in_seconds=op.get("connect_timeout", 0))
            out = (rm.invoke_device_module_method(op["device"], op["module"], method)
                   if op.get("module") else rm.invoke_device_method(op["device"], method))
            results.append({"status": out.status, "payload": out.payload})
        elif kind == "create_device":
            scope = op.get("scope")
            out = rm.create_device_with_sas(op["device"], None, None, "enabled",
                                            device_scope=scope,
                                            parent_scopes=[scope] if scope else None)
            results.append({"deviceId": out.device_id,
                            "primaryKey": out.authentication.symmetric_key.primary_key})
        elif kind == "update_device":
            scope = op.get("scope")
            out = rm.update_device_with_sas(op["device"], "*", op["primary"], op["secondary"],
                                            op["status"], device_scope=scope,
                                            parent_scopes=[scope] if scope else None)
            results.append({"deviceId": out.device_id, "status": out.status,
                            "primaryKey": out.authentication.symmetric_key.primary_key})
        elif kind == "create_device_x509":
            out = rm.create_device_with_x509(op["device"], op["primary"], op.get("secondary"),
                                             "enabled")
            results.append({"deviceId": out.device_id, "type": out.authentication.type,
                            "primary": out.authentication.x509_thumbprint.primary_thumbprint})
        elif kind == "create_device_ca":
            out = rm.create_device_with_certificate_authority(op["device"], "enabled")
            results.append({"deviceId": out.device_id, "type": out.authentication.type})
        elif kind == "create_module":
            out = rm.create_module_with_sas(op["device"], op["module"], None, None, None)
            results.append({"moduleId": out.module_id})
        elif kind == "get_device":
            out = rm.get_device(op["device"])
            results.append({"deviceId": out.device_id, "status": out.status,
                            "connectionState": out.connection_state})
        elif kind == "delete_device":
            rm.delete_device(op["device"])
            results.append({"deleted": op["device"]})
        else:
            results.append({"error": f"unknown op {kind}"})
    except Exception as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        results.append({"error": f"{type(exc).__name__}: {exc}", "status": status})
print(json.dumps({"results": results}), flush=True)
