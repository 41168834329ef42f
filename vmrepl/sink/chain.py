"""Chain surgery on the destination: keep each disk's layers a single line, each cluster stored once.

Three operations, each bounded by the clusters layers hold of their own, never by the chain's length:

- `DeltaFilter` drops the clusters of a received DATA frame that the base chain already reads
  identically (the source wrote them, but with the same bytes), so the new layer stores only changes.
- `finish_insertions` grafts a late snapshot S into the middle of the sequence. S's new layer N is
  backed by S's base layer B; the held snapshot Y just younger than S is backed by B too. Y is
  rebuilt as Y' backed by N: Y' holds, for each cluster that Y or N holds of its own, what Y reads
  there wherever N's chain reads something else; elsewhere both read B. So Y' reads exactly as Y and
  stores only what differs from N. Y' is written to a hidden file, fsynced and renamed over Y's layer
  (layers above keep their backing name), then the directory is fsynced.

- `rebuild_without` takes a pruned snapshot X out of the line (sink/prune.py): the layer Y standing on
  X's is rebuilt onto X's backing the same way, over the clusters Y or X holds of its own.

The receiver leaves a marker (sink/store.py) before S's catalog row; a crash at any step leaves every
chain readable, and the next session finds the marker and finishes (docs/FORMAT.md, "Inserting").
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nbd

from ..catalog import Layer, Snapshot
from ..errors import SinkError, VmreplError
from ..extents import MAX_PIECE, Extent, split, union
from ..qemu import img
from ..qemu.storage_daemon import Export, StorageDaemon, pread
from ..state import crash_point, fsync_dir
from .layer import LayerWriter

if TYPE_CHECKING:  # store.py imports crash_point from here
    from .store import Store

CLUSTER = 65536
_ZEROS = memoryview(bytes(CLUSTER))
def differing_runs(offset: int, mine: bytes | bytearray, theirs: bytes | bytearray) -> Iterator[tuple[int, int, bool]]:
    """(start, end, zero) in `mine` of the runs of clusters (aligned to the disk; the first and last
    may be partial) whose bytes differ from `theirs`; `zero`: the run is all zeros in `mine`, so it
    can be stored as zero clusters, which hold no data."""
    if mine == theirs:
        return
    # `startswith` at a position compares in place: slicing would copy every cluster first.
    below = memoryview(theirs)
    run: tuple[int, bool] | None = None
    pos = 0
    while pos < len(mine):
        end = min(len(mine), pos + CLUSTER - (offset + pos) % CLUSTER)
        kind = None if mine.startswith(below[pos:end], pos) else mine.startswith(_ZEROS[:end - pos], pos)
        if run is not None and kind != run[1]:
            yield run[0], pos, run[1]
            run = None
        if run is None and kind is not None:
            run = (pos, kind)
        pos = end
    if run is not None:
        yield run[0], len(mine), run[1]


class DeltaFilter:
    """Drops what the base chain already reads from the DATA frames of a new layer backed by it.

    The base is read ahead: `below(offset, length)` starts reading what the base holds under a frame
    (qemu-storage-daemon works on it meanwhile, in its own process), `changed` later waits for it and
    compares. Waiting for each read in turn left the receiver idle a quarter of its time."""

    def __init__(self, base_reader: nbd.NBD | None) -> None:
        self.h = base_reader  # None: no base at all, which reads zeros everywhere
        self.size = base_reader.get_size() if base_reader else 0

    def below(self, offset: int, length: int) -> Below:
        """Start reading the base under [offset, offset + length). A disk that grew since the base
        reads zeros past the base's end (qcow2 reads a short backing file so)."""
        buf = bytearray(length)
        inside = max(0, min(length, self.size - offset))
        view = memoryview(buf)
        cookies = [self.h.aio_pread(view[pos:min(pos + MAX_PIECE, inside)], offset + pos)
                   for pos in range(0, inside, MAX_PIECE)] if self.h else []
        return Below(buf, cookies)

    def changed(self, offset: int, data: bytes | bytearray, below: Below) -> Iterator[tuple[int, memoryview | int]]:
        """The pieces of a DATA frame that differ from the base read `below`: (offset, bytes) to write,
        or (offset, length) for a run of all-zero clusters, to store as zero clusters."""
        try:
            for cookie in below.cookies:
                assert self.h is not None  # reads are only queued on a base
                while not self.h.aio_command_completed(cookie):
                    self.h.poll(-1)
        except nbd.Error as err:
            raise SinkError(f"reading the base at offset {offset} failed: {err.string}",
                            hint="see qemu-storage-daemon's message") from None
        for start, end, zero in differing_runs(offset, data, below.data):
            yield offset + start, end - start if zero else memoryview(data)[start:end]


@dataclass
class Below:
    """A read of the base that `DeltaFilter.below` started: the buffer it fills, and its NBD commands."""

    data: bytearray
    cookies: list[int]


def store_piece(writer: LayerWriter, offset: int, piece: bytes | bytearray | memoryview | int) -> None:
    """Write one piece `DeltaFilter.changed` or `differing_runs` chose: bytes, or a zero run's length."""
    if isinstance(piece, int):
        writer.write_zeroes(offset, piece)
    else:
        writer.write(offset, piece)


@dataclass(frozen=True)
class Rebuilt:
    """What rebuilding one layer cost: `examined` bytes read from each of the two chains (the union of
    both layers' own clusters), `kept` bytes the new layer holds (data or zero clusters)."""

    snapshot: str
    target: str
    examined: int
    kept: int
    seconds: float


def backing_of(layer: Path) -> Path | None:
    """The backing file named in a layer's header, resolved against the layer's directory (the layer
    alone is opened, not its chain)."""
    name = img.backing_name(layer)
    if not name:
        return None
    return Path(os.path.normpath(os.path.join(layer.parent, name)))


def own_clusters(layer: Path) -> list[Extent]:
    """The ranges the layer holds itself (data or zero clusters), read from its own metadata only."""
    spec = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(layer.resolve())}}
    return img.allocation_map(f"json:{json.dumps(spec)}", own_layer_only=True)


def successor(held: list[Snapshot], snap: Snapshot) -> Snapshot | None:
    """The held snapshot just younger than `snap` by age (generation, then creation time)."""
    age = (snap.generation, snap.created_ns, snap.id)
    younger = [s for s in held if s.id != snap.id and (s.generation, s.created_ns, s.id) > age]
    return min(younger, key=lambda s: (s.generation, s.created_ns, s.id), default=None)


def rebase_pairs(upper: Snapshot, lower: Snapshot) -> list[tuple[Layer, Layer]]:
    """(upper layer, lower layer) per disk where the upper one still hangs on the lower one's backing,
    so that rebuilding it onto the lower layer removes a fork from the chain."""
    pairs = []
    lower_disks = {d.target: d for d in lower.disks}
    for layer in upper.disks:
        below = lower_disks.get(layer.target)
        if below is None or below.virtual_size != layer.virtual_size:
            continue  # a disk added or resized in between: its chain stays as it is, still correct
        if backing_of(Path(layer.image)) == backing_of(Path(below.image)):
            pairs.append((layer, below))
    return pairs


def rebuild_onto(daemon: StorageDaemon, upper: Path, lower: Path, virtual_size: int, *,
                 snapshot: str = "", target: str = "") -> Rebuilt:
    """Replace `upper` (backed by X) with a layer backed by `lower` (also backed by X) that reads the
    same: `lower` is inserted below it. The two can differ only where either holds clusters itself."""
    shared = backing_of(upper)  # both layers stand on it: open its chain once, for all three nodes
    with contextlib.ExitStack() as stack:
        node = stack.enter_context(daemon.reader(shared)).node if shared else None
        mine = stack.enter_context(daemon.reader(upper, backing=shared is not None, backing_node=node))
        theirs = stack.enter_context(daemon.reader(lower, backing=shared is not None, backing_node=node))
        ranges = union(own_clusters(upper), own_clusters(lower))
        return _rewrite(daemon, upper, ranges, mine, theirs, lower, virtual_size, snapshot, target)


def rebuild_without(daemon: StorageDaemon, upper: Path, gone: Path, virtual_size: int, *,
                    snapshot: str = "", target: str = "") -> Rebuilt:
    """Replace `upper` (backed by `gone`) with a layer backed by `gone`'s backing file (none at the
    bottom) that reads the same: `gone` leaves the chain. The new backing reads differently from
    `upper` only where `upper` or `gone` holds clusters itself."""
    below = backing_of(gone)
    with contextlib.ExitStack() as stack:
        theirs = stack.enter_context(daemon.reader(below)) if below else None
        mine = stack.enter_context(daemon.reader(upper))
        ranges = union(own_clusters(upper), own_clusters(gone))
        return _rewrite(daemon, upper, ranges, mine, theirs, below, virtual_size, snapshot, target)


REBUILT_SUFFIX = ".rebased"


def rebuild_temp(upper: Path) -> Path:
    """Where the rebuilt `upper` is written before it is renamed over `upper` (under `LayerWriter`'s
    hidden partial name of that while being written)."""
    return upper.with_name(f".{upper.name}{REBUILT_SUFFIX}")


def _rewrite(daemon: StorageDaemon, upper: Path, ranges: list[Extent], mine: Export, theirs: Export | None,
             backing: Path | None, virtual_size: int, snapshot: str, target: str) -> Rebuilt:
    """Write a layer over `backing` (read through `theirs`) that holds, within `ranges`, what `mine`
    reads wherever `theirs` reads something else; fsync it and rename it over `upper`."""
    started = time.perf_counter()
    temp = rebuild_temp(upper)
    temp.unlink(missing_ok=True)  # left by a crash between its commit and the rename below
    delta = DeltaFilter(theirs.nbd if theirs else None)
    examined = kept = 0
    with LayerWriter(temp, backing=backing, virtual_size=virtual_size, daemon=daemon,
                     backing_node=theirs.node if theirs else None) as writer:
        clipped = (Extent(e.offset, min(e.length, virtual_size - e.offset)) for e in ranges if e.offset < virtual_size)
        for piece in split(clipped):
            ours = pread(mine.nbd, piece.offset, piece.length)
            examined += piece.length
            for offset, part in delta.changed(piece.offset, ours, delta.below(piece.offset, piece.length)):
                store_piece(writer, offset, part)
                kept += part if isinstance(part, int) else len(part)
        crash_point("rebuild-written")
        writer.commit()
    crash_point("rebuild-committed")
    os.rename(temp, upper)  # readers that hold the old file keep reading the old, equal, content
    fsync_dir(upper.parent)
    crash_point("rebuild-renamed")
    return Rebuilt(snapshot, target, examined, kept, time.perf_counter() - started)


def finish_insertions(store: Store, daemon: StorageDaemon, vm_uuid: str) -> list[Rebuilt]:
    """Carry out every insertion marker of the VM (left by `Store.commit` or by a crash), then drop it."""
    done: list[Rebuilt] = []
    for upper_id, lower_id in store.insertions(vm_uuid):
        upper, lower = store.catalog.find_snapshot(upper_id), store.catalog.find_snapshot(lower_id)
        if upper is not None and lower is not None:
            for layer, below in rebase_pairs(upper, lower):
                done.append(rebuild_onto(daemon, Path(layer.image), Path(below.image), layer.virtual_size,
                                         snapshot=upper.id, target=layer.target))
        # else the lower snapshot never got its catalog row (a crash before it): nothing to graft
        store.drop_insertion(vm_uuid, upper_id)
    return done


def finish_insertions_or_warn(store: Store, daemon: StorageDaemon, vm_uuid: str) -> list[Rebuilt]:
    """As `finish_insertions`, but a failure only warns: the chains read correctly either way (a fork
    costs storage, not data) and the marker makes the next session try again."""
    try:
        return finish_insertions(store, daemon, vm_uuid)
    except VmreplError as err:
        print(f"vmrepl receive: warning: could not finish an insertion ({err}); the next receive retries",
              file=sys.stderr)
        return []
