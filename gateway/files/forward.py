"""Files stored at the edge go up to the parent, in blocks, resumable (IoT Hub ref §11).

One task (:class:`FileForwarder`), one file at a time, oldest first, next to the telemetry
forwarder and yielding to it. For each file, towards the parent the upstream link names:

1. ``POST https://{hub}:{files.forward_port}/devices/{origin}/files`` -> the parent's blob SAS
   URI. Towards a parent that is this software (``[upstream] mode = "gateway"``) the gateway
   authenticates as itself and names itself in ``x-gateway-device-id``: the parent checks the
   origin is in its scope and stores the file under the origin. Towards Azure IoT Hub (mode
   ``identity``) the request is the origin's own, with its own key (or a DeviceConnect policy).
2. Put Block for each block of ``forward_block_bytes`` (ids ``base64("%08d" % i)``, all the
   same length as Storage requires), to the storage host the parent named. The parent's upload
   (correlation id, blob URL) is saved before the first block, so after a cut link or a
   restart the forwarder asks the parent what it holds (Get Block List, committed and
   uncommitted) and sends only the missing blocks: a block the parent stored is never sent
   again, even when its 201 was lost in the cut. A SAS that expired, or an upload the parent
   forgot, starts a new one.
3. Put Block List, then the notification (``isSuccess: true``), then the file is
   ``forwarded``: its bytes kept or deleted (``files.after_forward``).

Bandwidth: files have their own byte bucket (``files.forward_bandwidth``, else the upstream's
``bandwidth``). Priority: before every 64 KB piece the sender waits while an upstream route of
class ``files.forward_priority`` or higher has messages queued on a connected link (at most
``YIELD_MAX`` per piece, so a file is slowed, never starved).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from gateway.config import FilesConfig, UpstreamConfig
from gateway.errors import UpstreamError
from gateway.files.blob import (
    GATEWAY_HEADER,
    block_id,
    block_list_xml,
    parse_get_block_list,
)
from gateway.files.store import FileStore, Upload
from gateway.hub.sas import generate_sas_token
from gateway.upstream.link import Backoff, ssl_context
from gateway.upstream.settings import LinkSettings
from gateway.upstream.wire import Origin

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

API_VERSION: Final = "2021-04-12"
PIECE: Final = 64 << 10
YIELD_MAX: Final = 1.0  # seconds a piece waits at most for telemetry
SAVE_EVERY: Final = 1.0  # seconds between progress saves
HOLD_MIN: Final = 5.0  # a file the parent refused waits this long, doubling each time
HOLD_MAX: Final = 600.0


class Refused(UpstreamError):
    """The parent answered with an HTTP error."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:300]}")
        self.status = status
        self.text = text


class NoCredentials(UpstreamError):
    """Identity mode: the device has no key here to upload with (e.g. an X.509 device)."""


class Bucket:
    """Bytes per second with a burst of an eighth of a second (at least one piece): a file
    after a pause does not make up for it; ``rate`` 0 = unlimited."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.tokens = float(PIECE)
        self.stamp = clock()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        while True:
            now = self.clock()
            self.tokens = min(float(max(PIECE, self.rate // 8)),
                              self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)


@dataclass(frozen=True, slots=True)
class Target:
    """Where and as whom files go up (from the upstream link's settings)."""

    settings: LinkSettings
    mode: str  # "gateway" | "identity"
    local_gateway: str
    credentials: Callable[[Origin], tuple[str | None, str | None]]
    port: int
    token_ttl: int

    @property
    def key(self) -> str:
        return f"{self.mode}:{self.settings.hub}:{self.settings.device_id}"

    def origin(self, upload: Upload) -> Origin:
        device = (self.settings.device_id if upload.device_id == self.local_gateway
                  else upload.device_id)
        return Origin(device, None)

    def base(self) -> str:
        return f"https://{self.settings.hub}:{self.port}"

    def headers(self, origin: Origin) -> dict[str, str]:
        hub = self.settings.hub
        expiry = int(time.time()) + self.token_ttl
        if self.mode == "identity":
            key, policy = self.credentials(origin)
            if not key:
                raise NoCredentials(f"no SAS key for {origin.device_id} to upload with "
                                    "(identity mode needs the device's key or policy_key)")
            return {"Authorization": generate_sas_token(
                f"{hub}/devices/{origin.device_id}", key, expiry, policy)}
        headers = {}
        if origin.device_id != self.settings.device_id:
            headers[GATEWAY_HEADER] = self.settings.device_id
        if self.settings.shared_access_key:
            headers["Authorization"] = generate_sas_token(
                f"{hub}/devices/{self.settings.device_id}", self.settings.shared_access_key,
                expiry)
        return headers  # X.509: the client certificate of the TLS handshake


class FileForwarder:
    """Forwards stored files while an upstream is set; ``run`` until cancelled."""

    def __init__(self, store: FileStore, cfg: FilesConfig, *,
                 settings: Callable[[], LinkSettings | None],
                 upstream_cfg: UpstreamConfig, local_gateway: str,
                 credentials: Callable[[Origin], tuple[str | None, str | None]],
                 telemetry_busy: Callable[[int], bool] = lambda priority: False) -> None:
        self.store = store
        self.cfg = cfg
        self.settings = settings
        self.upstream_cfg = upstream_cfg
        self.local_gateway = local_gateway
        self.credentials = credentials
        self.telemetry_busy = telemetry_busy
        self.bucket = Bucket(cfg.forward_bandwidth or upstream_cfg.bandwidth)
        self.wake = asyncio.Event()
        self.sent_bytes = 0  # block bytes the parent acknowledged (this run)
        self.current: str | None = None  # correlation id of the file going up
        self.held: dict[str, tuple[float, float]] = {}  # refused: (retry at, pause)
        store.forwarding = lambda: cfg.forward and self.settings() is not None
        store.stored_hook = lambda upload: self.wake.set()

    def queue(self) -> list[Upload]:
        """Files still to go up, oldest first (those the parent refused, after their pause)."""
        now = time.monotonic()
        pending = [u for u in self.store.uploads.values()
                   if u.state == "stored" and u.forward in ("queued", "forwarding")
                   and self.held.get(u.correlation_id, (0.0, 0.0))[0] <= now]
        return sorted(pending, key=lambda u: u.updated)

    def _hold(self, upload: Upload, reason: str) -> None:
        """The parent refused this file (4xx): others go first; it is retried later, each
        time after twice the pause (up to HOLD_MAX)."""
        _, pause = self.held.get(upload.correlation_id, (0.0, HOLD_MIN / 2))
        pause = min(HOLD_MAX, pause * 2)
        self.held[upload.correlation_id] = (time.monotonic() + pause, pause)
        self._note_error(reason)
        log.warning("file %s refused by the parent: %s (retry in %.0f s)", upload.blob_name,
                    reason, pause)

    async def run(self) -> None:
        backoff = Backoff(self.upstream_cfg.reconnect_min, self.upstream_cfg.reconnect_max)
        while True:
            settings = self.settings()
            pending = self.queue() if settings is not None and self.cfg.forward else []
            if not pending:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self.wake.wait()
                continue
            assert settings is not None
            target = Target(settings, self.upstream_cfg.mode, self.local_gateway,
                            self.credentials, self.cfg.forward_port,
                            self.upstream_cfg.token_ttl)
            try:
                async with self._session(settings) as http:
                    while (self.settings() is settings and (pending := self.queue())):
                        try:
                            await self.forward(http, target, pending[0])
                        except (Refused, NoCredentials) as exc:
                            if isinstance(exc, Refused) and (
                                    exc.status < 400 or exc.status >= 500
                                    or exc.status in (408, 429)):
                                raise
                            self._hold(pending[0], str(exc))
                            continue
                        self.held.pop(pending[0].correlation_id, None)
                        backoff.reset()
            except Exception as exc:  # never take the hub down: back off and retry
                import xml.etree.ElementTree as ET  # loaded by now, or cheap on this path

                import aiohttp

                reason = str(exc) or type(exc).__name__
                if not isinstance(exc, (UpstreamError, aiohttp.ClientError, OSError,
                                        TimeoutError, ET.ParseError, ValueError)):
                    log.exception("file forwarding failed unexpectedly")
                self._note_error(reason)
                delay = backoff.next()
                log.warning("file forwarding: %s (retry in %.1f s)", reason, delay)
                await asyncio.sleep(delay)

    def _note_error(self, reason: str) -> None:
        if self.current is None:
            return
        upload = self.store.uploads.get(self.current)
        if upload is not None and upload.state == "stored":
            self.store.uploads[upload.correlation_id] = replace(upload, forward_error=reason)

    def _session(self, settings: LinkSettings) -> aiohttp.ClientSession:
        from gateway.files.session import client_session  # aiohttp: with the first file

        ctx: ssl.SSLContext = ssl_context(settings)
        pins = {}
        if settings.host and settings.host != settings.hub:
            pins[settings.hub] = settings.host
        return client_session(ctx, pins, self.upstream_cfg.ack_timeout)

    # -- one file ----------------------------------------------------------------------------

    async def forward(self, http: aiohttp.ClientSession, target: Target, upload: Upload,
                      *, renewals: int = 0) -> None:
        """One file up; a SAS that expires on the way is renewed (up to 3 times in a row
        without progress), the parent keeping the blocks it has."""
        self.current = upload.correlation_id
        origin = target.origin(upload)
        size = upload.size
        bsize = max(1, self.cfg.forward_block_bytes)
        ids = [block_id(i) for i in range(max(1, -(-size // bsize)))]
        sizes = [min(bsize, size - i * bsize) for i in range(len(ids))]
        committed: dict[str, int] = {}
        staged: dict[str, int] = {}
        if upload.parent_url and upload.parent != target.key:
            log.info("file %s: the upstream changed; starting again at %s", upload.blob_name,
                     target.key)
            upload = await self._update(upload, parent_url="", parent_cid="",
                                        forwarded_bytes=0)
        if upload.parent_url:
            try:
                committed, staged = await self._block_list(http, upload.parent_url)
                log.info("file %s: resumed; the parent holds %d of %d blocks",
                         upload.blob_name, len(committed) or len(staged), len(ids))
            except Refused as exc:
                if exc.status == 409 and "upload is stored" in exc.text:
                    # the parent completed it (our notification went through before a cut)
                    done = await self.store.forwarded(upload,
                                                      keep=self.cfg.after_forward == "keep")
                    self.current = None
                    log.info("file %s forwarded (the parent had it already)", done.blob_name)
                    return
                if exc.status not in (403, 404, 409):
                    raise
                log.info("file %s: the parent's upload is gone (%s); starting again",
                         upload.blob_name, exc)
                upload = await self._update(upload, parent_url="", parent_cid="",
                                            forwarded_bytes=0)
        if not upload.parent_url:
            info = await self._json(http, "POST", f"{target.base()}/devices/"
                                    f"{quote(origin.device_id, safe='')}/files",
                                    target.headers(origin), {"blobName": upload.name})
            url = (f"https://{info['hostName']}/{info['containerName']}/"
                   f"{quote(info['blobName'])}{info['sasToken']}")
            upload = await self._update(upload, forward="forwarding", parent_url=url,
                                        parent=target.key,
                                        parent_cid=str(info["correlationId"]),
                                        forwarded_bytes=0, forward_error="")
            committed, staged = await self._block_list(http, url)  # carried-over blocks
            log.info("file %s: forwarding %d bytes in %d blocks (the parent holds %d)",
                     upload.blob_name, size, len(ids), len(committed) or len(staged))
        whole = [committed.get(i) for i in ids] == sizes
        if not whole:
            have = sum(n for i, n in zip(ids, sizes, strict=True) if staged.get(i) == n)
            upload = await self._update(upload, forward="forwarding", forwarded_bytes=have)
            saved = time.monotonic()
            for index, (bid, n) in enumerate(zip(ids, sizes, strict=True)):
                if staged.get(bid) == n:
                    continue
                try:
                    await self._put_block(http, upload, bid, index * bsize, n)
                except Refused as exc:
                    if exc.status != 403 or renewals >= 3:
                        raise
                    log.info("file %s: the parent's SAS expired on the way; renewing it",
                             upload.blob_name)
                    upload = await self._update(upload, parent_url="", parent_cid="")
                    await self.forward(http, target, upload, renewals=renewals + 1)
                    return
                renewals = 0
                self.sent_bytes += n
                have += n
                live = self.store.uploads.get(upload.correlation_id)
                if live is None or live.state != "stored":
                    log.info("file %s was deleted while forwarding", upload.blob_name)
                    return
                upload = replace(live, forwarded_bytes=have, forward_error="")
                self.store.uploads[upload.correlation_id] = upload
                if time.monotonic() - saved >= SAVE_EVERY:
                    await self.store.save(upload)
                    saved = time.monotonic()
            await self._request(http, "PUT", upload.parent_url + "&comp=blocklist", {
                "Content-Type": "application/xml", "x-ms-version": "2021-08-06"},
                block_list_xml(ids))
        notified = await self._request(
            http, "POST", f"{target.base()}/devices/{quote(origin.device_id, safe='')}/files/"
            f"notifications?api-version={API_VERSION}", target.headers(origin) | {
                "Content-Type": "application/json"},
            json.dumps({"correlationId": upload.parent_cid, "isSuccess": True,
                        "statusCode": 200, "statusDescription":
                        f"forwarded by {target.settings.device_id}"}).encode(),
            accept=_already_notified)
        live = self.store.uploads.get(upload.correlation_id)
        if live is None or live.state != "stored":
            return
        done = await self.store.forwarded(live, keep=self.cfg.after_forward == "keep")
        self.current = None
        log.info("file %s forwarded (%d bytes%s)%s", done.blob_name, done.size,
                 ", kept" if done.state == "stored" else ", deleted here",
                 "" if notified else " (the parent had the notification already)")

    async def _update(self, upload: Upload, **changes: Any) -> Upload:
        live = self.store.uploads.get(upload.correlation_id, upload)
        changed = replace(live, **changes)
        await self.store.save(changed)
        return changed

    async def _block_list(self, http: aiohttp.ClientSession,
                          url: str) -> tuple[dict[str, int], dict[str, int]]:
        async with http.get(url + "&comp=blocklist&blocklisttype=all",
                            headers={"x-ms-version": "2021-08-06"}) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise Refused(resp.status, body.decode(errors="replace"))
        return parse_get_block_list(body)

    async def _put_block(self, http: aiohttp.ClientSession, upload: Upload, bid: str,
                         offset: int, length: int) -> None:
        md5 = hashlib.md5(usedforsecurity=False)
        progress = [time.monotonic()]
        path = self.store.data_path(upload)
        stall = self.upstream_cfg.ack_timeout

        async def body() -> AsyncIterator[bytes]:
            with open(path, "rb") as fh:  # noqa: ASYNC230 - opening is instant; reads below
                fh.seek(offset)
                left = length
                while left:
                    n = min(PIECE, left)
                    waited = 0.0
                    while waited < YIELD_MAX and self.telemetry_busy(self.cfg.forward_priority):
                        await asyncio.sleep(0.05)
                        waited += 0.05
                    await self.bucket.take(n)
                    data = await asyncio.to_thread(_read_hashed, fh, n, md5)
                    if len(data) != n:
                        raise UpstreamError(f"{upload.blob_name} is shorter than its size")
                    left -= n
                    progress[0] = time.monotonic()
                    yield data

        async def send() -> aiohttp.ClientResponse:
            async with http.put(
                    f"{upload.parent_url}&comp=block&blockid={quote(bid, safe='')}",
                    data=body(), headers={"Content-Length": str(length),
                                          "x-ms-version": "2021-08-06"}) as resp:
                await resp.read()
                return resp

        task = asyncio.ensure_future(send())
        try:
            while not task.done():  # a stalled link: no piece taken for ack_timeout
                await asyncio.wait({task}, timeout=1.0)
                if not task.done() and time.monotonic() - progress[0] > stall + self._pacing(
                        length):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    raise UpstreamError(f"the link stalled sending {upload.blob_name}")
            resp = task.result()
        finally:
            if not task.done():
                task.cancel()
        if resp.status != 201:
            raise Refused(resp.status, f"Put Block refused: {resp.headers.get('x-ms-error-code')}")
        sent = resp.headers.get("Content-MD5")
        if sent and sent != base64.b64encode(md5.digest()).decode():
            raise UpstreamError(f"block {bid} of {upload.blob_name} arrived corrupted")

    def _pacing(self, length: int) -> float:
        return 0.0 if self.bucket.rate <= 0 else PIECE / self.bucket.rate + YIELD_MAX

    async def _request(self, http: aiohttp.ClientSession, method: str, url: str,
                       headers: dict[str, str], body: bytes,
                       accept: Callable[[int, str], bool] | None = None) -> bool:
        async with http.request(method, url, headers=headers, data=body) as resp:
            text = await resp.text(errors="replace")
            if resp.status < 300:
                return True
            if accept is not None and accept(resp.status, text):
                return False
            raise Refused(resp.status, text)

    async def _json(self, http: aiohttp.ClientSession, method: str, url: str,
                    headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        async with http.request(method, f"{url}?api-version={API_VERSION}", json=body,
                                headers=headers) as resp:
            text = await resp.text(errors="replace")
            if resp.status >= 300:
                raise Refused(resp.status, text)
            data = json.loads(text)
        for key in ("correlationId", "hostName", "containerName", "blobName", "sasToken"):
            if not isinstance(data.get(key), str):
                raise UpstreamError(f"the parent's SAS URI answer lacks {key!r}")
        return data  # type: ignore[no-any-return]

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        queued = self.queue()
        return {"queued": len(queued), "queuedBytes": sum(u.size - u.forwarded_bytes
                                                           for u in queued),
                "current": self.current, "sentBytes": self.sent_bytes}


def _read_hashed(fh: Any, n: int, md5: Any) -> bytes:
    data: bytes = fh.read(n)
    md5.update(data)
    return data


def _already_notified(status: int, text: str) -> bool:
    """A notification the parent took before a cut lost its answer (ours says "already")."""
    return status == 400 and "already stored" in text


def telemetry_busy(upstream: Any) -> Callable[[int], bool]:
    """``priority -> bool``: does a route of that class or higher have messages waiting on a
    connected link? (Read from the running telemetry forwarder, never changing it.)"""
    cache = [0.0, 0, False]

    def busy(priority: int) -> bool:
        now = time.monotonic()
        if now - cache[0] < 0.05 and cache[1] == priority:
            return bool(cache[2])
        fwd = getattr(upstream, "forwarder", None)
        result = False
        if fwd is not None and fwd.link.state == "connected" and fwd.backlog.buffered:
            result = any(q.pending and fwd.policy(q.route).priority <= priority
                         for q in fwd.backlog.queues.values())
        cache[:] = [now, priority, result]
        return result

    return busy


def for_upstream(store: FileStore, cfg: FilesConfig, upstream: Any,
                 local_gateway: str) -> FileForwarder:
    """The forwarder for the app's :class:`~gateway.upstream.service.Upstream`."""
    return FileForwarder(store, cfg, settings=lambda: upstream.settings,
                         upstream_cfg=upstream.cfg, local_gateway=local_gateway,
                         credentials=upstream._credentials,
                         telemetry_busy=telemetry_busy(upstream))
