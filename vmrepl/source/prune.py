"""Pruning snapshots on the source: a snapshot goes by merging the next younger snapshot's layer down
into its layer (libvirt block commit while the domain runs, `qemu-img commit` while it is shut off), so
the younger snapshot and everything above read exactly as before and the gone snapshot's data is freed.

The gone snapshot stays in the catalog as a ghost standing where it stood in the chain (on the layer
below it): a destination that still holds it can still take a delta from it, now a superset of the true
one (docs/PLANNING.md), and the receiver drops what its base already reads. A snapshot that is an anchor
of a target, the newest one, one whose layer another domain's disk stands on (a linked clone), and one
whose next younger snapshot is not the layer right above it in the domain's chains (received, on another
branch after a recover, or with other disks) is never pruned, and the command says why.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import libvirt

from ..catalog import Catalog, Layer, Merge, Snapshot
from ..errors import NotFoundError, QemuError, SourceError
from ..qemu import img
from ..state import crash_point, fsync_dir
from . import domain

JOB_SECONDS = 3600.0


def plan_prune(catalog: Catalog, vm_uuid: str, keep: set[str], others: set[str],
               chains: dict[str, list[str]]) -> tuple[list[Snapshot], dict[str, str]]:
    """Of the snapshots taken here, what goes (oldest first) and, for what the rules would drop but must
    stay, why. `chains`: the domain's disk chains as they are now (per target, top first); `others`: the
    files in other chains (other domains', received layers'), which must not change. Received snapshots
    are left to sink/prune.py."""
    snaps = catalog.snapshots(vm_uuid)
    protected = {snaps[-1].id: "the newest snapshot (the running disk stands on it)"} if snaps else {}
    protected |= {a: "an anchor: a destination's next delta is based on it" for a in catalog.anchors(vm_uuid)}
    for snap, younger in zip(snaps, snaps[1:]):
        if snap.origin != "local":
            continue
        if any(os.path.normpath(d.image) in others for d in snap.disks):
            protected.setdefault(snap.id, "another chain stands on its layer (a linked clone's, or received snapshots')")
        elif any(os.path.normpath(d.image) in others for d in younger.disks):
            # merged into this one's layer, the next younger's file would go from under that chain
            protected.setdefault(snap.id, f"another chain stands on the layer of {younger.name}, the next younger "
                                          "snapshot (a linked clone's, or received snapshots')")
        elif any(_position(chains, d) == 1 for d in snap.disks):
            protected.setdefault(snap.id, "the domain's disks stand on it")
        elif not _directly_below(snap, younger, chains):
            # its layer would be merged with the next younger's: only right if that one stands on it
            protected.setdefault(snap.id, f"{younger.name}, the next younger snapshot, does not stand on it in the "
                                          "domain's disk chains (received, another branch, or other disks)")
        elif _shrunk(snap, younger):
            protected.setdefault(snap.id, f"{younger.name}, the next younger snapshot, has a smaller disk (shrunk): "
                                          "merged into this one's layer, it would read this one's data past its end")
    gone, kept_why = [], {}
    for snap in snaps:
        if snap.origin != "local" or snap.id in keep:
            continue
        if snap.id in protected:
            kept_why[snap.id] = protected[snap.id]
        else:
            gone.append(snap)
    return gone, kept_why


def _directly_below(snap: Snapshot, younger: Snapshot, chains: dict[str, list[str]]) -> bool:
    """Whether, disk for disk, `younger`'s layer is the one right above `snap`'s in the domain's chains."""
    if younger.origin != "local" or {d.target for d in snap.disks} != {d.target for d in younger.disks}:
        return False
    return all((at := _position(chains, layer)) and _position(chains, younger.disk(layer.target)) == at - 1
               for layer in snap.disks)


def _shrunk(snap: Snapshot, younger: Snapshot) -> bool:
    """Whether a disk of `younger` is smaller than `snap`'s. A commit never shrinks its base: the merged
    file would keep `snap`'s data past `younger`'s end, and a layer above that grew again would read
    that data where it read zeros (its old backing file ended there)."""
    sizes = {d.target: d.virtual_size for d in younger.disks}
    return any(sizes.get(d.target, d.virtual_size) < d.virtual_size for d in snap.disks)


def _position(chains: dict[str, list[str]], layer: Layer) -> int | None:
    """Where the layer is in its disk's chain (0: the active layer), or None when it is not in it."""
    files = chains.get(layer.target, [])
    image = os.path.normpath(layer.image)
    return files.index(image) if image in files else None


def disk_chains(dom: libvirt.virDomain) -> dict[str, list[str]]:
    """Each disk's chain of files, top (the active layer) first."""
    return {disk.target: [os.path.normpath(entry["filename"]) for entry in img.info(disk.image, chain=True)]
            for disk in domain.disks(dom)}


def files_under_received(catalog: Catalog, chains: dict[str, list[str]]) -> set[str]:
    """The files that received layers stand on without the domain's chains in between: after a failback
    the first snapshot received stands on the anchor's layer taken here (and a clone received from
    elsewhere on its origin's). Walking down from such a layer, every file up to and including the first
    one in the domain's `chains` must keep its content and its name; merges further down keep what they
    all read, since a merge points the domain's layer above the merged one at the merged file."""
    in_domain = {f for files in chains.values() for f in files}
    files: set[str] = set()
    for vm_uuid, _name in catalog.vms():
        snaps = catalog.snapshots(vm_uuid)
        for before, snap in zip([None, *snaps], snaps):
            if snap.origin == "received" and (before is None or before.origin != "received"):
                for layer in snap.disks:
                    for entry in img.info(layer.image, chain=True)[1:]:
                        files.add(name := os.path.normpath(entry["filename"]))
                        if name in in_domain:
                            break
    return files


def files_of_other_domains(conn: libvirt.virConnect, dom: libvirt.virDomain) -> set[str]:
    """Every image file in the chains of the other domains' disks: layers that must not change."""
    files: set[str] = set()
    for other in conn.listAllDomains():
        if other.UUIDString() == dom.UUIDString():
            continue
        try:
            disks = domain.disks(other)
        except SourceError:
            continue  # a domain vmrepl does not handle (raw disks...) cannot stand on a vmrepl layer
        for disk in disks:
            try:
                chain = img.info(disk.image, chain=True)
            except (QemuError, NotFoundError) as err:  # it might stand on one of ours: nothing may merge
                raise SourceError(f"cannot read the chain of disk {disk.target} of another domain, {other.name()}, "
                                  f"to see whether it stands on {dom.name()}'s layers: {err.message}",
                                  hint=f"repair or undefine {other.name()}, then prune again") from err
            files.update(os.path.normpath(entry["filename"]) for entry in chain)
    return files


def prune_one(dom: libvirt.virDomain, catalog: Catalog, gone: Snapshot) -> Snapshot:
    """Merge the layer of `gone`'s next younger snapshot into `gone`'s layer, disk by disk; returns it.

    `gone` turns into a ghost first (with the merge recorded as pending), so that it is never visible
    while its layers take the younger one's data; a crash anywhere leaves a merge that `finish_merges`
    completes."""
    gone = catalog.find_snapshot(gone.id) or gone  # an earlier merge of this run may have moved its layers
    snaps = catalog.snapshots(gone.vm_uuid)
    younger = snaps[[s.id for s in snaps].index(gone.id) + 1]
    below = {}
    for layer in gone.disks:
        backing = img.info(layer.image).get("full-backing-filename")
        below[layer.target] = os.path.normpath(backing) if backing else ""
    catalog.begin_merge(gone, younger, below)
    crash_point("merge-begun")
    finish_merges(dom, catalog, gone.vm_uuid)
    return gone


def finish_merges(dom: libvirt.virDomain, catalog: Catalog, vm_uuid: str) -> None:
    """Carry out the VM's pending merges (the one just begun, or those a crash interrupted): merge each
    top layer still in the domain's chain into its base, record that the younger snapshot owns the
    base, then delete the top files, which nothing names any more. Each step is safe to redo."""
    pending: dict[str, list[Merge]] = {}
    for merge in catalog.pending_merges(vm_uuid):
        pending.setdefault(merge.gone_id, []).append(merge)
    for gone_id, merges in pending.items():
        if not all(m.recorded for m in merges):
            running = domain.is_running(dom)
            for m in merges:
                top = os.path.normpath(m.top)
                if running:
                    _block_commit(dom, m.target, base=m.base, top=top)
                elif top in _chain(dom, m.target):
                    _offline_commit(m.base, top, _above(dom, m.target, top))
            crash_point("merge-committed")
            catalog.record_merge(merges)
            crash_point("merge-recorded")
        for m in merges:
            Path(m.top).unlink(missing_ok=True)
            fsync_dir(Path(m.top).parent)
        catalog.end_merge(gone_id)
        _forget_in_libvirt(dom, catalog.find_snapshot(gone_id))


def _forget_in_libvirt(dom: libvirt.virDomain, gone: Snapshot | None) -> None:
    try:
        if gone is not None:
            dom.snapshotLookupByName(gone.name).delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    except libvirt.libvirtError:
        pass  # no libvirt metadata for it (taken elsewhere, or already removed by hand)


def _block_commit(dom: libvirt.virDomain, target: str, *, base: str, top: str) -> None:
    _wait_for_job(dom, target)  # a commit that a killed run started goes on in libvirt
    if top not in _chain(dom, target):
        return  # merged already
    try:
        dom.blockCommit(target, base, top, 0, 0)
    except libvirt.libvirtError as err:
        raise SourceError(f"libvirt could not merge {top} into {base}: {err.get_error_message()}") from err
    _wait_for_job(dom, target)
    if top in _chain(dom, target):
        raise SourceError(f"merging {top} into {base} did not complete", hint="see libvirt's log")


def _wait_for_job(dom: libvirt.virDomain, target: str) -> None:
    deadline = time.monotonic() + JOB_SECONDS
    while dom.blockJobInfo(target, 0):
        if time.monotonic() > deadline:
            raise SourceError(f"merging layers of {target} did not finish", hint=f"see `virsh blockjob {dom.name()} {target}`")
        time.sleep(0.1)


def _offline_commit(base: str, top: str, above: str) -> None:
    """Shut off: copy `top`'s clusters into `base`, then point the layer above `top` at `base`."""
    img.commit(top)                      # into its backing file, `base`
    img.rebase_unsafe(above, base)       # safe here: `base` now reads as `top` did


def _above(dom: libvirt.virDomain, target: str, top: str) -> str:
    """The file of the disk's chain whose backing file is `top`."""
    chain = _chain(dom, target)
    return chain[chain.index(top) - 1]


def _chain(dom: libvirt.virDomain, target: str) -> list[str]:
    return disk_chains(dom)[target]
