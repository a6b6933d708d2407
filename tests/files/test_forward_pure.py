"""The pure parts of file forwarding: block ids, the block list both ways, the byte bucket."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest

from gateway.files import blob
from gateway.files.blob import block_id, block_list_xml, get_block_list_xml, parse_get_block_list
from gateway.files.forward import Bucket

# Get Block List's answer as Azure Storage documents it (blocklisttype=all)
AZURE_SAMPLE = b"""<?xml version="1.0" encoding="utf-8"?>
<BlockList>
  <CommittedBlocks>
    <Block><Name>MDAwMDAwMDA=</Name><Size>4194304</Size></Block>
  </CommittedBlocks>
  <UncommittedBlocks>
    <Block><Name>MDAwMDAwMDE=</Name><Size>4194304</Size></Block>
    <Block><Name>MDAwMDAwMDI=</Name><Size>1024</Size></Block>
  </UncommittedBlocks>
</BlockList>"""


def test_block_ids_are_equal_length_and_ordered() -> None:
    ids = [block_id(i) for i in (0, 1, 9, 10, 49_999)]
    assert len({len(i) for i in ids}) == 1  # Storage: all ids of a blob the same length
    assert [base64.b64decode(i) for i in ids] == sorted(base64.b64decode(i) for i in ids)
    assert block_id(0) == "MDAwMDAwMDA="


def test_block_list_is_what_the_blob_endpoint_parses() -> None:
    ids = [block_id(i) for i in range(3)]
    assert blob.parse_block_list(block_list_xml(ids)) == [base64.b64decode(i) for i in ids]


def test_get_block_list_answer() -> None:
    committed, staged = parse_get_block_list(AZURE_SAMPLE)
    assert committed == {block_id(0): 4194304}
    assert staged == {block_id(1): 4194304, block_id(2): 1024}
    assert parse_get_block_list(b"<BlockList/>") == ({}, {})
    ours = get_block_list_xml([(b"00000000", 4194304)],
                              [(b"00000001", 4194304), (b"00000002", 1024)])
    assert parse_get_block_list(ours) == (committed, staged)  # the hub answers the same


@pytest.mark.parametrize("rate", [0, 4 << 20])
def test_bucket_paces_to_its_rate(rate: int) -> None:
    async def run() -> float:
        bucket = Bucket(rate)
        t0 = time.monotonic()
        for _ in range(32):  # 2 MB in 64 KB pieces
            await bucket.take(64 << 10)
        return time.monotonic() - t0

    took = asyncio.run(run())
    if rate:
        assert 0.4 <= took <= 1.5, took  # 2 MB at 4 MB/s, less the first piece's burst
    else:
        assert took < 0.1
