"""File upload over the hub's HTTPS port (IoT Hub ref §11): the device's routes, the
blob-compatible endpoint the device uploads to, and the service's routes.

Device (authenticated as the device HTTP API authenticates, SAS token or client certificate):

* ``POST /devices/{id}/files`` ``{"blobName": NAME}`` -> ``{correlationId, hostName,
  containerName, blobName, sasToken}`` (the SDK's ``get_storage_info_for_blob``);
* ``POST /devices/{id}/files/notifications`` ``{correlationId, isSuccess, statusCode,
  statusDescription}`` -> 204 (``notify_blob_upload_status``).

Blob endpoint, ``PUT /{container}/{device}/{name}{sasToken}`` as ``azure-storage-blob``
sends it: Put Blob, Put Block (``comp=block&blockid=``), Put Block List (``comp=blocklist``).

On behalf of a device (a child gateway forwarding its devices' files, README "File upload
from devices"): the same two device routes with ``x-gateway-device-id: GW`` and GW's own
credentials; GW must be an ``--edge`` device and the device one of its children (created
here as its child, authentication ``none``, if unknown). The file is stored under the device,
its notification names the device, and the upload records ``via``.

``GET /{container}/{device}/{name}{sasToken}&comp=blocklist``: Get Block List (committed and
uncommitted blocks), so an interrupted upload resumes without resending what is staged.

Service (policy tokens): ``GET /files[?deviceId=D]``, ``GET /files/{device}/{name}`` (metadata,
or the bytes with ``?download=true``), ``DELETE /files/{device}/{name}``, and the notification
queue ``GET /messages/serviceBound/filenotifications`` (204 when empty; else the notification,
its lock token in ``ETag``), ``DELETE .../{lock}`` to complete, ``POST .../{lock}/abandon``.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.api.device_http import DeviceApi
from gateway.errors import ForbiddenError, InvalidRequestError, NotFoundError
from gateway.files import blob
from gateway.files.store import FileStore, Upload
from gateway.hub.hub import Hub
from gateway.hub.onbehalf import RegisterOrigin

if TYPE_CHECKING:
    from gateway.api.server import ServiceApi

log = logging.getLogger(__name__)

CHUNK = 256 << 10
X_MS_VERSION = "2021-08-06"


def _blob_error(exc: blob.BlobError) -> web.Response:
    return web.Response(status=exc.status, body=exc.xml(), content_type="application/xml",
                        headers={"x-ms-error-code": exc.code, "x-ms-version": X_MS_VERSION})


async def _chunks(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(CHUNK):
        yield chunk


class FileApi:
    def __init__(self, hub: Hub, store: FileStore, *, key: bytes, blob_host: str) -> None:
        self.hub = hub
        self.store = store
        self.key = key
        self.blob_host = blob_host
        self.devices = DeviceApi(hub)

    # -- device --------------------------------------------------------------------------------

    async def _authorize(self, request: web.Request, device_id: str) -> str:
        """The device itself, or a gateway acting for it: returns the gateway ("" if none)."""
        gateway_id = request.headers.get(blob.GATEWAY_HEADER, "")
        if not gateway_id or gateway_id == device_id:
            self.devices.authenticate(request, device_id)
            return ""
        self.devices.authenticate(request, gateway_id)
        on_behalf = self.hub.on_behalf
        if on_behalf is None:
            raise ForbiddenError("this hub does not accept uploads on behalf of other devices "
                                 "([hub] on_behalf = false)")
        gateway = on_behalf.gateway(gateway_id, None)
        if on_behalf.in_scope(gateway, device_id) is False:
            raise ForbiddenError(f"{gateway_id} may not act for {device_id!r} (not in its scope)")
        known = self.hub.registry.get_device(device_id)
        if known is not None and not known.enabled:
            raise ForbiddenError(f"device {device_id!r} is disabled")
        await on_behalf.register(RegisterOrigin(gateway, device_id, None))
        return gateway_id

    async def create_upload(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        via = await self._authorize(request, device_id)
        try:
            body = await request.json()
            name = blob.check_blob_name(body["blobName"])
        except (ValueError, KeyError, TypeError) as exc:
            message = str(exc) if isinstance(exc, ValueError) and "blob name" in str(exc) \
                else 'the body must be {"blobName": "<name>"}'
            raise InvalidRequestError(message) from None
        upload = await self.store.start(device_id, name, via=via)
        container = self.store.config.container
        return web.json_response({
            "correlationId": upload.correlation_id, "hostName": self.blob_host,
            "containerName": container, "blobName": upload.blob_name,
            "sasToken": blob.make_sas(self.key, container=container, blob=upload.blob_name,
                                      correlation_id=upload.correlation_id,
                                      expiry=upload.expires)})

    async def notify(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        via = await self._authorize(request, device_id)
        try:
            body = await request.json()
            correlation_id = str(body["correlationId"])
            success = bool(body["isSuccess"])
        except (ValueError, KeyError, TypeError):
            raise InvalidRequestError('the body must be {"correlationId": ..., "isSuccess": '
                                      'true|false, "statusCode": N, "statusDescription": ...}'
                                      ) from None
        pending = self.store.uploads.get(correlation_id)
        if pending is not None and pending.via != via:
            raise NotFoundError(f"no file upload with correlation id {correlation_id!r}")
        upload = await self.store.complete(
            device_id, correlation_id, success=success, status_code=body.get("statusCode"),
            description=str(body.get("statusDescription") or ""))
        if upload.state == "stored":
            notification = self.notification(upload)
            await self.store.notify(notification)
            self.hub.file_uploaded(device_id, notification)
        return web.Response(status=204)

    def notification(self, upload: Upload) -> dict[str, Any]:
        """IoT Hub's service-bound file upload notification (ref §11)."""
        when = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(upload.updated))
        return {"deviceId": upload.device_id,
                "blobUri": f"https://{self.blob_host}/{self.store.config.container}/"
                           f"{upload.blob_name}",
                "blobName": upload.blob_name, "lastUpdatedTime": when,
                "blobSizeInBytes": upload.size,
                "enqueuedTimeUtc": time.strftime("%Y-%m-%dT%H:%M:%S.0000000Z")}

    # -- the blob endpoint ---------------------------------------------------------------------

    async def put(self, request: web.Request) -> web.Response:
        name = request.match_info["blob"]
        try:
            sas = blob.verify_sas(self.key, request.query_string,
                                  container=self.store.config.container, blob=name,
                                  now=time.time())
            if "w" not in sas.permissions:
                raise blob.BlobError(403, "AuthorizationPermissionMismatch",
                                     "the SAS token does not permit writes")
            upload = self.store.receiving(sas.correlation_id, name)
            comp = request.query.get("comp")
            if comp == "block":
                block_id = blob.check_block_id(request.query.get("blockid", ""))
                written = await self.store.put_block(upload, block_id, _chunks(request))
                log.info("file block stored correlation_id=%s block=%s bytes=%d",
                         upload.correlation_id, request.query.get("blockid"), written.size)
                return self._created(written.md5, etag=False)
            if comp == "blocklist":
                body = await request.read()
                ids = blob.parse_block_list(body)
                await self.store.put_block_list(upload, ids)
                # Storage's Content-MD5 here is the request's (the block list), not the blob's
                return self._created(base64.b64encode(hashlib.md5(
                    body, usedforsecurity=False).digest()).decode(), etag=True)
            if comp is not None:
                raise blob.BlobError(400, "UnsupportedQueryParameter",
                                     f"comp={comp} is not supported here")
            if request.headers.get("x-ms-blob-type") != "BlockBlob":
                raise blob.BlobError(400, "InvalidHeaderValue",
                                     "x-ms-blob-type must be BlockBlob")
            written = await self.store.put_blob(upload, _chunks(request))
            return self._created(written.md5, etag=True)
        except blob.BlobError as exc:
            return _blob_error(exc)

    async def get(self, request: web.Request) -> web.Response:
        """Get Block List (``comp=blocklist``): what a resumed upload need not send again."""
        name = request.match_info["blob"]
        try:
            sas = blob.verify_sas(self.key, request.query_string,
                                  container=self.store.config.container, blob=name,
                                  now=time.time())
            if request.query.get("comp") != "blocklist":
                raise blob.BlobError(400, "UnsupportedQueryParameter",
                                     "only Get Block List (comp=blocklist) is served here")
            if not set(sas.permissions) & set("rw"):
                raise blob.BlobError(403, "AuthorizationPermissionMismatch",
                                     "the SAS token permits neither reads nor writes")
            upload = self.store.receiving(sas.correlation_id, name)
        except blob.BlobError as exc:
            return _blob_error(exc)
        committed, staged = self.store.block_list(upload)
        kind = request.query.get("blocklisttype", "committed").lower()
        body = blob.get_block_list_xml(committed if kind in ("committed", "all") else None,
                                       staged if kind in ("uncommitted", "all") else None)
        return web.Response(status=200, body=body, content_type="application/xml",
                            headers={"x-ms-version": X_MS_VERSION,
                                     "x-ms-blob-content-length": str(
                                         sum(n for _, n in committed))})

    @staticmethod
    def _created(md5: str, *, etag: bool) -> web.Response:
        headers = {"Content-MD5": md5, "x-ms-version": X_MS_VERSION,
                   "x-ms-request-server-encrypted": "false",
                   "Date": email.utils.formatdate(usegmt=True)}
        if etag:
            headers["ETag"] = f'"0x{time.time_ns():X}"'
            headers["Last-Modified"] = email.utils.formatdate(usegmt=True)
        return web.Response(status=201, headers=headers)

    # -- service -------------------------------------------------------------------------------

    async def list_files(self, request: web.Request) -> web.Response:
        """List uploaded files with their state (receiving, stored, forwarding, forwarded,
        failed, expired)."""
        device_id = request.query.get("deviceId")
        uploads = sorted((u for u in self.store.uploads.values()
                          if device_id is None or u.device_id == device_id),
                         key=lambda u: (u.device_id, u.name, u.created))
        return web.json_response([u.json() for u in uploads])

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        """Get a file's state, or its bytes with download=true."""
        upload = self.store.find(request.match_info["device_id"], request.match_info["name"])
        if request.query.get("download", "").lower() not in ("true", "1"):
            return web.json_response(upload.json())
        if upload.state != "stored":
            raise InvalidRequestError(f"the file is {upload.state}, not stored here"
                                      + (" (forwarded upstream, its bytes deleted)"
                                         if upload.state == "forwarded" else ""))
        return web.FileResponse(self.store.data_path(upload), headers={
            "Content-Type": "application/octet-stream", "x-gateway-sha256": upload.sha256})

    async def delete_file(self, request: web.Request) -> web.Response:
        """Delete a file (every upload of that name)."""
        device_id, name = request.match_info["device_id"], request.match_info["name"]
        self.store.find(device_id, name)
        for upload in [u for u in self.store.uploads.values()
                       if u.device_id == device_id and u.name == name]:
            await self.store.delete(upload)
        return web.Response(status=204)

    async def receive_notification(self, request: web.Request) -> web.Response:
        """Receive the next file upload notification, locked (204 when there is none)."""
        got = await self.store.receive_notification()
        if got is None:
            return web.Response(status=204)
        body, lock = got
        return web.Response(text=json.dumps(body), content_type="application/json",
                            headers={"ETag": f'"{lock}"'})

    async def complete_notification(self, request: web.Request) -> web.Response:
        """Complete a received file upload notification."""
        await self.store.settle_notification(request.match_info["lock"].strip('"'),
                                             complete=True)
        return web.Response(status=204)

    async def abandon_notification(self, request: web.Request) -> web.Response:
        """Abandon a received file upload notification (it is delivered again)."""
        await self.store.settle_notification(request.match_info["lock"].strip('"'),
                                             complete=False)
        return web.Response(status=204)


def add_file_routes(api: ServiceApi, hub: Hub, store: FileStore, *, key: bytes,
                    blob_host: str) -> FileApi:
    from gateway.api.server import READ, SERVICE, WRITE

    files = FileApi(hub, store, key=key, blob_host=blob_host)
    router = api.app.router
    router.add_post("/devices/{device_id}/files", files.create_upload)
    router.add_post("/devices/{device_id}/files/notifications", files.notify)
    router.add_put(f"/{store.config.container}/{{blob:.+}}", files.put)
    router.add_get(f"/{store.config.container}/{{blob:.+}}", files.get)
    api.add_route("GET", "/files", READ, files.list_files)
    api.add_route("GET", "/files/{device_id}/{name:.+}", SERVICE, files.get_file)
    api.add_route("DELETE", "/files/{device_id}/{name:.+}", WRITE, files.delete_file)
    base = "/messages/serviceBound/filenotifications"
    api.add_route("GET", base, SERVICE, files.receive_notification)
    api.add_route("DELETE", base + "/{lock}", SERVICE, files.complete_notification)
    api.add_route("POST", base + "/{lock}/abandon", SERVICE, files.abandon_notification)
    return files
