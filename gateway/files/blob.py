"""The slice of Azure Blob Storage's REST protocol a device's upload uses, and the hub's blob
SAS tokens. Pure.

IoT Hub ref §11: the device asks the hub for a SAS URI, builds
``https://{hostName}/{containerName}/{blobName}{sasToken}`` and uploads with Azure Blob REST
(``azure-storage-blob``): one Put Blob (``PUT``, ``x-ms-blob-type: BlockBlob``), or Put Block
(``?comp=block&blockid=B``) for each block and Put Block List (``?comp=blocklist``, an XML body
naming the blocks in order). Errors are Azure Storage's: an XML ``<Error><Code>..</Code>
<Message>..</Message></Error>`` body and an ``x-ms-error-code`` header.

SAS tokens are the hub's own (shaped like Storage's: ``sv``, ``sr=b``, ``sp``, ``se``,
``scid``, ``sig``): ``sig`` is an HMAC-SHA256, under a key only the hub holds, of the
permissions, the expiry, the blob's path and the upload's correlation id, so a token opens
exactly one upload of one blob until it expires.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote

SAS_VERSION = "2020-10-02"
GATEWAY_HEADER = "x-gateway-device-id"
"""Ours: names the gateway uploading on a device's behalf (its own credentials authenticate)."""
MAX_BLOCK_ID_BYTES = 64
MAX_BLOCKS = 50_000
_NAME = re.compile(r"^[^\x00-\x1f\\]{1,1024}$")


class BlobError(Exception):
    """An Azure Storage error: HTTP ``status``, ``code`` (``x-ms-error-code``), message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def xml(self) -> bytes:
        import xml.etree.ElementTree as ET  # with the first upload (footprint)

        root = ET.Element("Error")
        ET.SubElement(root, "Code").text = self.code
        ET.SubElement(root, "Message").text = self.message
        return b'<?xml version="1.0" encoding="utf-8"?>' + ET.tostring(root)


def check_blob_name(name: str) -> str:
    """A device's requested name: 1-1024 characters, no control characters or ``\\``, no
    empty, ``.`` or ``..`` path segment (so it never leaves its directory)."""
    if not _NAME.match(name) or name.startswith("/"):
        raise ValueError(f"invalid blob name {name!r}: 1-1024 characters, no control "
                         "characters or backslash, not starting with /")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"invalid blob name {name!r}: empty, '.' or '..' path segment")
    return name


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _signed(key: bytes, permissions: str, expiry: str, path: str, correlation_id: str) -> str:
    text = f"{permissions}\n{expiry}\n{path}\n{correlation_id}"
    return base64.b64encode(hmac.new(key, text.encode(), hashlib.sha256).digest()).decode()


def make_sas(key: bytes, *, container: str, blob: str, correlation_id: str, expiry: float,
             permissions: str = "cw") -> str:
    """The ``sasToken`` handed to the device (it starts with ``?``, as IoT Hub's does)."""
    se = _iso(expiry)
    sig = _signed(key, permissions, se, f"/{container}/{blob}", correlation_id)
    return (f"?sv={SAS_VERSION}&sr=b&sp={permissions}&se={quote(se, safe='')}"
            f"&scid={quote(correlation_id, safe='')}&sig={quote(sig, safe='')}")


@dataclass(frozen=True, slots=True)
class BlobSas:
    correlation_id: str
    permissions: str
    expiry: float


def verify_sas(key: bytes, query: str, *, container: str, blob: str, now: float) -> BlobSas:
    """Check a request's SAS for ``/{container}/{blob}``; BlobError 403 otherwise."""
    params = dict(parse_qsl(query, keep_blank_values=True))
    try:
        sp, se, sig, cid = params["sp"], params["se"], params["sig"], params["scid"]
    except KeyError as exc:
        raise BlobError(403, "AuthenticationFailed",
                        f"the SAS token lacks {exc.args[0]!r}") from None
    expected = _signed(key, sp, se, f"/{container}/{blob}", cid)
    if not hmac.compare_digest(expected.encode(), sig.encode()):
        raise BlobError(403, "AuthenticationFailed",
                        "Signature did not match: the SAS token is not this blob's")
    try:
        expiry = datetime.strptime(se, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise BlobError(403, "AuthenticationFailed", "malformed signed expiry (se)") from None
    if expiry < now:
        raise BlobError(403, "AuthenticationFailed", f"Signed expiry time [{se}] has passed")
    return BlobSas(cid, sp, expiry)


def check_block_id(block_id: str) -> bytes:
    """A block id: base64 of at most 64 bytes (Storage's rule); returned decoded."""
    try:
        raw = base64.b64decode(block_id, validate=True)
    except (binascii.Error, ValueError):
        raise BlobError(400, "InvalidQueryParameterValue",
                        f"blockid {block_id!r} is not valid base64") from None
    if not raw or len(raw) > MAX_BLOCK_ID_BYTES:
        raise BlobError(400, "InvalidQueryParameterValue",
                        f"blockid must decode to 1-{MAX_BLOCK_ID_BYTES} bytes")
    return raw


def parse_block_list(body: bytes) -> list[bytes]:
    """The ``<BlockList>`` of a Put Block List, in order (``Latest``, ``Uncommitted`` and
    ``Committed`` entries alike: an upload has only uncommitted blocks)."""
    import xml.etree.ElementTree as ET  # with the first upload (footprint)

    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise BlobError(400, "InvalidXmlDocument", f"the block list is not XML: {exc}") from None
    if root.tag != "BlockList":
        raise BlobError(400, "InvalidXmlDocument", "the body must be a <BlockList>")
    ids = []
    for child in root:
        if child.tag not in ("Latest", "Uncommitted", "Committed") or not child.text:
            raise BlobError(400, "InvalidXmlNodeValue", f"unexpected <{child.tag}> in BlockList")
        ids.append(check_block_id(child.text.strip()))
    if len(ids) > MAX_BLOCKS:
        raise BlobError(400, "BlockListTooLong", f"more than {MAX_BLOCKS} blocks")
    return ids


# -- the client side: what the upstream forwarder sends and reads -----------------------------


def block_id(index: int) -> str:
    """The id of block ``index`` of a file going up: all the same length, as Storage needs."""
    return base64.b64encode(f"{index:08d}".encode()).decode()


def block_list_xml(ids: list[str]) -> bytes:
    """Put Block List's body: the blocks, in order, as ``Latest``."""
    import xml.etree.ElementTree as ET  # with the first upload (footprint)

    root = ET.Element("BlockList")
    for i in ids:
        ET.SubElement(root, "Latest").text = i
    return b'<?xml version="1.0" encoding="utf-8"?>' + ET.tostring(root)


def parse_get_block_list(body: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """(committed, uncommitted) of a Get Block List answer: block id (base64) -> size."""
    import xml.etree.ElementTree as ET  # with the first upload (footprint)

    root = ET.fromstring(body)
    out: list[dict[str, int]] = []
    for tag in ("CommittedBlocks", "UncommittedBlocks"):
        blocks: dict[str, int] = {}
        for b in root.iterfind(f"{tag}/Block"):
            name, size = b.findtext("Name"), b.findtext("Size")
            if name and size:
                blocks[name.strip()] = int(size)
        out.append(blocks)
    return out[0], out[1]


def get_block_list_xml(committed: list[tuple[bytes, int]] | None,
                       uncommitted: list[tuple[bytes, int]] | None) -> bytes:
    """Get Block List's answer; a list left None is left out (``blocklisttype``)."""
    import xml.etree.ElementTree as ET  # with the first upload (footprint)

    root = ET.Element("BlockList")
    for tag, blocks in (("CommittedBlocks", committed), ("UncommittedBlocks", uncommitted)):
        if blocks is None:
            continue
        element = ET.SubElement(root, tag)
        for raw, size in blocks:
            b = ET.SubElement(element, "Block")
            ET.SubElement(b, "Name").text = base64.b64encode(raw).decode()
            ET.SubElement(b, "Size").text = str(size)
    return b'<?xml version="1.0" encoding="utf-8"?>' + ET.tostring(root)
