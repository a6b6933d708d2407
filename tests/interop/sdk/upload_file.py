"""Runs inside the Azure SDK venv: upload a file as IoT Hub's samples do, with the unmodified
azure-iot-device (SAS URI, notification) and azure-storage-blob (the upload itself).

Usage: upload_file.py JSON  where JSON has: connection_string, ca_file, path, blob_name,
max_single_put_size (optional: smaller forces Put Block + Put Block List), block_size.
Prints one JSON line {"correlation_id", "blob_url", "notified"}.
"""

import json
import sys

from azure.iot.device import IoTHubDeviceClient
from azure.storage.blob import BlobClient

args = json.loads(sys.argv[1])
ca = open(args["ca_file"]).read()
device = IoTHubDeviceClient.create_from_connection_string(
    args["connection_string"], server_verification_cert=ca, connection_retry=False)
device.connect()
info = device.get_storage_info_for_blob(args["blob_name"])
url = "https://{}/{}/{}{}".format(info["hostName"], info["containerName"], info["blobName"],
                                  info["sasToken"])
options = {}
if args.get("max_single_put_size"):
    options["max_single_put_size"] = args["max_single_put_size"]
    options["max_block_size"] = args.get("block_size", 4 * 1024 * 1024)
blob = BlobClient.from_blob_url(url, connection_verify=args["ca_file"], **options)
ok, status, description = True, 200, "uploaded"
try:
    with open(args["path"], "rb") as fh:
        blob.upload_blob(fh, overwrite=True, max_concurrency=1)
except Exception as exc:  # report the failure to the hub, as the SDK samples do
    ok, status, description = False, 500, f"{type(exc).__name__}: {exc}"[:500]
device.notify_blob_upload_status(info["correlationId"], ok, status, description)
device.shutdown()
print(json.dumps({"correlation_id": info["correlationId"], "blob_url": url.split("?")[0],
                  "ok": ok, "description": description}), flush=True)
