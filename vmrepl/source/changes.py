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

import libvirt
import nbd

from ..catalog import Catalog, Snapshot
from ..errors import ChangeTrackingError, NotFoundError
from ..extents import Extent, clip, union
from ..qemu import img
from ..qemu.storage_daemon import (ALLOCATION, StorageDaemon, allocation_extents, dirty_bitmap_context, dirty_extents,
                                   iter_block_status)
from . import domain, live
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
    if since is None or base is None:
        written = [Extent(0, layer.virtual_size, False)]  # a new disk, or no base: all that holds data
        if since is not None:
            fallbacks.append(f"disk {target} is new since {since.name}: sent whole (sparse)")
    else:
        above = _layers_above(layer.image, base.image, f"{until.name}'s {target}", since)
        written = _written(catalog, daemon, [e["filename"] for e in above], target, fallbacks) \
            + _cut_off(above, layer.virtual_size)
    return DiskChanges(target=target, image=layer.image, virtual_size=layer.virtual_size,
                       base_image=base.image if base else None,
                       extents=_split_zero(daemon, layer.image, written, layer.virtual_size,
                                           drop_zero=base is None),
                       fallbacks=fallbacks)


def running_disk_changes(catalog: Catalog, daemon: StorageDaemon, dom: libvirt.virDomain, since: Snapshot,
                         target: str) -> DiskChanges:
    """From `since` to the disk as it is now: the frozen layers' bitmaps, then the active layer's, read
    from the running QEMU (source/live.py) or, for a shut-off domain, from its file."""
    disk = next((d for d in domain.disks(dom) if d.target == target), None)
    if disk is None:
        raise NotFoundError(f"{dom.name()} has no disk {target!r}", hint="see `virsh domblklist`")
    base = since.disk(target)
    above = _layers_above(disk.image, base.image, f"the running {target}", since)
    fallbacks: list[str] = []
    size = img.info(disk.image)["virtual-size"]
    frozen = _written(catalog, daemon, [e["filename"] for e in above[1:]], target, fallbacks) + _cut_off(above, size)
    if domain.is_running(dom):
        node, bitmap = domain.top_bitmaps(dom)[disk.image]
        sound = bool(bitmap and bitmap.get("recording") and not bitmap.get("inconsistent")) \
            and not catalog.is_untracked(disk.image)
        if not sound:
            fallbacks.append(f"the active layer of {target} has no sound bitmap: used what it holds itself")
        with live.live_export(dom, node, disk.image, with_bitmap=sound) as handle:
            own = union(Extent(pos, n) for pos, n, depth in iter_block_status(handle, live.DEPTH) if depth == 1)
            # As for a frozen layer (_own_zero_clusters): a regrown part reads zeros the bitmap never saw.
            active = [*dirty_extents(handle, live.PEEK),
                      *(p for p in _zero_pieces(handle, own, drop_zero=False) if p.zero)] if sound else own
            extents = _zero_pieces(handle, clip(union(frozen, active), size), drop_zero=False)
    else:
        sound = domain.file_bitmap_sound(disk.image) and not catalog.is_untracked(disk.image)
        active = _file_bitmap(daemon, disk.image) if sound else None
        if active is None:
            fallbacks.append(f"the active layer of {target} has no trustworthy bitmap: used its allocation map")
            active = img.allocation_map(disk.image, own_layer_only=True)
        else:
            active += _own_zero_clusters(disk.image)
        extents = _split_zero(daemon, disk.image, union(frozen, active), size, drop_zero=False)
    return DiskChanges(target=target, image=disk.image, virtual_size=size, base_image=base.image,
                       extents=extents, fallbacks=fallbacks)


def _layers_above(top: str, base: str, whose: str, since: Snapshot) -> list[dict]:
    """`qemu-img info` of each file of `top`'s chain above `base` (top first): the layers written since
    `base` froze. An empty `base` (a pruned snapshot that stood below the chain's bottom) puts the whole
    chain above it."""
    chain = img.info(top, chain=True)
    names = [entry["filename"] for entry in chain]
    if not base:
        return chain
    if base not in names:
        raise ChangeTrackingError(f"{since.name}'s layer is no longer below {whose} (the chain was changed "
                                  "outside vmrepl)", hint="replicate with a full send")
    return chain[: names.index(base)]


def _cut_off(above: list[dict], size: int) -> list[Extent]:
    """What a layer in between cut off by shrinking and the top grew back: it reads as zeros now (or as
    what was written since), while the base's layer may still hold data there. No bitmap records a
    resize, so the whole range counts as changed (mostly zero markers)."""
    shortest = min((entry["virtual-size"] for entry in above), default=size)
    return [Extent(shortest, size - shortest)] if shortest < size else []


def _written(catalog: Catalog, daemon: StorageDaemon, layers: list[str], target: str,
             fallbacks: list[str]) -> list[Extent]:
    """The union of what each frozen layer took: its bitmap's extents or, for a layer that holds only
    its changes (received, or merged by a prune) and as the fallback for a lost bitmap, its own clusters."""
    written: list[Extent] = []
    for path in layers:
        tracking = catalog.layer_tracking(path)
        extents = _file_bitmap(daemon, path) if tracking == "bitmap" else None
        if extents is None:
            if tracking != "clusters":
                fallbacks.append(f"layer {path} of {target} has no trustworthy bitmap: used its allocation map")
            extents = img.allocation_map(path, own_layer_only=True)
        else:
            extents += _own_zero_clusters(path)
        written.extend(extents)
    return union(written)


def full_disk_changes(daemon: StorageDaemon, until: Snapshot, target: str, *, reason: str) -> DiskChanges:
    """Every byte of the disk, as data or zero extents: correct over any base, for when tracking cannot say."""
    layer = until.disk(target)
    note = f"{reason}: sending disk {target} whole (zeros as markers)"
    return DiskChanges(target=target, image=layer.image, virtual_size=layer.virtual_size, base_image=None,
                       extents=_split_zero(daemon, layer.image, [Extent(0, layer.virtual_size, False)],
                                           layer.virtual_size, drop_zero=False),
                       fallbacks=[note])


def _own_zero_clusters(path: str) -> list[Extent]:
    """The zero clusters a layer holds itself. A disk shrunk and grown again while the layer was active
    reads zeros in the regrown part: QEMU zeroes it (when the backing file is longer) without marking
    the bitmap, so these clusters join the bitmap's extents (guest zero writes are in both)."""
    return [e for e in img.allocation_map(path, own_layer_only=True) if e.zero]


def _file_bitmap(daemon: StorageDaemon, path: str) -> list[Extent] | None:
    """The dirty extents of a file no QEMU writes to, or None when its bitmap is missing or inconsistent."""
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
        return _zero_pieces(export.nbd, written, drop_zero=drop_zero)


def _zero_pieces(handle: nbd.NBD, written: list[Extent], *, drop_zero: bool) -> list[Extent]:
    """`written` cut by base:allocation of an export into zero and data extents."""
    pieces = [piece for extent in written for piece in allocation_extents(handle, extent.offset, extent.length)]
    return union(p for p in pieces if not (drop_zero and p.zero))
