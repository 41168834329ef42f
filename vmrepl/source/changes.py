"""Changed extents of a disk between two snapshots, from the dirty bitmaps of the layers in between.

Snapshot B's image is a frozen layer whose backing chain passes through A's image; the layers above
A's image (B's included) were each the active layer for a while, and each one's `vmrepl` bitmap holds
the writes made then. Their union is what changed from A to B. A layer whose bitmap cannot be trusted
(the catalog says tracking was lost, or QEMU marks it inconsistent, or it is missing) falls back to that
layer's own allocation map: slower to be precise about, never wrong. Nothing reads the disk's data.
Each changed extent is then split into what reads as zeros in B (sent as a zero marker) and data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..catalog import Catalog, Snapshot
from ..errors import ChangeTrackingError
from ..extents import Extent, clip, union
from ..qemu import img
from ..qemu.storage_daemon import ALLOCATION, StorageDaemon, allocation_extents, dirty_bitmap_context, dirty_extents
from .domain import BITMAP


@dataclass
class DiskChanges:
    target: str
    image: str                 # B's image, to read the data from
    virtual_size: int
    base_image: str | None     # A's image, None for a full (sparse) send
    extents: list[Extent]      # sorted, disjoint; zero=True reads as zeros in B
    fallbacks: list[str] = field(default_factory=list)  # why a slower path was taken, for the user

    @property
    def bytes_changed(self) -> int:
        return sum(e.length for e in self.extents)


def disk_changes(catalog: Catalog, daemon: StorageDaemon, since: Snapshot | None, until: Snapshot,
                 target: str) -> DiskChanges:
    layer = until.disk(target)
    base = next((d for d in since.disks if d.target == target), None) if since else None
    fallbacks: list[str] = []
    if base is None:
        written = [Extent(0, layer.virtual_size, False)]  # a new disk, or no base: all that holds data
        if since is not None:
            fallbacks.append(f"disk {target} is new since {since.name}: sent whole (sparse)")
    else:
        chain = [entry["filename"] for entry in img.info(layer.image, chain=True)]
        if base.image not in chain:
            raise ChangeTrackingError(
                f"{since.name}'s layer of {target} is no longer below {until.name}'s "
                "(the chain was changed outside vmrepl)", hint="replicate with a full send")
        written = []
        for path in chain[: chain.index(base.image)]:
            extents = _bitmap_extents(catalog, daemon, path)
            if extents is None:
                fallbacks.append(f"layer {path} of {target} has no trustworthy bitmap: used its allocation map")
                extents = img.allocation_map(path, own_layer_only=True)
            written.extend(extents)
        written = union(written)
    return DiskChanges(target=target, image=layer.image, virtual_size=layer.virtual_size,
                       base_image=base.image if base else None,
                       extents=_split_zero(daemon, layer.image, written, layer.virtual_size,
                                           drop_zero=base is None),
                       fallbacks=fallbacks)


def full_disk_changes(daemon: StorageDaemon, until: Snapshot, target: str, *, reason: str) -> DiskChanges:
    """Every byte of the disk, as data or zero extents: correct over any base, for when tracking cannot say."""
    layer = until.disk(target)
    note = f"{reason}: sending disk {target} whole (zeros as markers)"
    return DiskChanges(target=target, image=layer.image, virtual_size=layer.virtual_size, base_image=None,
                       extents=_split_zero(daemon, layer.image, [Extent(0, layer.virtual_size, False)],
                                           layer.virtual_size, drop_zero=False),
                       fallbacks=[note])


def _bitmap_extents(catalog: Catalog, daemon: StorageDaemon, path: str) -> list[Extent] | None:
    """The layer's dirty extents, or None when its bitmap cannot be trusted."""
    if catalog.layer_tracking(path) != "bitmap":
        return None
    try:
        export = daemon.reader(path, backing=False, bitmaps=[BITMAP], meta_contexts=[dirty_bitmap_context(BITMAP)])
    except ChangeTrackingError:  # missing, or QEMU marks it inconsistent
        return None
    with export:
        return dirty_extents(export.nbd, BITMAP)


def _split_zero(daemon: StorageDaemon, image: str, written: list[Extent], size: int, *,
                drop_zero: bool) -> list[Extent]:
    """Cut `written` into data and zero extents as they read in `image` (through its chain)."""
    written = clip(written, size)
    if not written:
        return []
    with daemon.reader(image, meta_contexts=[ALLOCATION]) as export:
        pieces = [piece for extent in written for piece in allocation_extents(export.nbd, extent.offset, extent.length)]
    return union(p for p in pieces if not (drop_zero and p.zero))
