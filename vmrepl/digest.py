"""A content digest of a disk as read through its qcow2 chain, equal wherever the content is equal.

The disk is cut into 4 MiB blocks. A block that reads as all zeros (a hole, a zero cluster, or data
that happens to be zeros) contributes nothing; any other block contributes its index and its xxh3-128.
The digest is the blake2b-256 of the disk size followed by those records, so two chains that read the
same agree however their content is spread over layers, and holes are skipped without being read
(block status of base:allocation), which keeps a sparse 64 GiB disk cheap.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterator

import nbd
import xxhash

from .extents import MAX_PIECE
from .qemu.storage_daemon import ALLOCATION, StorageDaemon, allocation_extents

BLOCK = MAX_PIECE
_ZEROS = bytes(BLOCK)
_IN_FLIGHT = 4


def image_digest(path: str | os.PathLike[str], *, daemon: StorageDaemon) -> str:
    """The digest of the image read through its backing chain (opened read-only, without locks)."""
    with daemon.reader(path, meta_contexts=[ALLOCATION]) as export:
        return handle_digest(export.nbd)


def handle_digest(h: nbd.NBD) -> str:
    """The digest of what an NBD export (offering base:allocation) reads."""
    size = h.get_size()
    outer = hashlib.blake2b(digest_size=32, person=b"vmrepl-digest-1")
    outer.update(size.to_bytes(8, "little"))
    pending: deque[tuple[int, bytearray, int]] = deque()

    def finish_oldest() -> None:
        index, buf, cookie = pending[0]
        while not h.aio_command_completed(cookie):
            h.poll(-1)
        pending.popleft()
        if buf != (_ZEROS if len(buf) == BLOCK else bytes(len(buf))):
            outer.update(index.to_bytes(8, "little") + xxhash.xxh3_128_digest(buf))

    for index in _blocks_with_data(h, size):
        if len(pending) >= _IN_FLIGHT:
            finish_oldest()
        offset = index * BLOCK
        buf = bytearray(min(BLOCK, size - offset))  # not nbd.Buffer: libnbd 1.14 never frees those
        pending.append((index, buf, h.aio_pread(buf, offset)))
    while pending:
        finish_oldest()
    return outer.hexdigest()


def _blocks_with_data(h: nbd.NBD, size: int) -> Iterator[int]:
    """Indexes of the blocks that block status does not report as entirely zero, in order."""
    next_block = 0
    for extent in allocation_extents(h, 0, size):
        if extent.zero:
            continue
        first = max(extent.offset // BLOCK, next_block)
        next_block = (extent.end - 1) // BLOCK + 1
        yield from range(first, next_block)
