"""Pruning received snapshots on a destination.

Snapshot X goes by rebuilding the layer that stands on X's layer (its next younger held snapshot Y's,
disk by disk) onto the layer below X (`chain.rebuild_without`), so that Y reads exactly as before and
nothing reads X's layer any more; then X's catalog row becomes a ghost, "pruned here", which the
destination reports to every sender so that X is not sent again; then X's layers are deleted.

That order keeps every held snapshot readable through a crash at any step: a rebuilt layer is written
to a hidden file, fsynced and renamed over Y's; until X's row changes X still reads as before (its
layer is still there, only Y no longer stands on it), and the next prune of the VM redoes the step,
finding Y already off X's layer. After the row, X's files are named by no row and the next prune of the
VM deletes them (`sweep`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..catalog import Snapshot
from ..errors import SinkError
from ..qemu.storage_daemon import StorageDaemon
from ..state import fsync_dir
from . import chain
from .store import Store


def plan(store: Store, vm_uuid: str, keep: set[str]) -> tuple[list[Snapshot], dict[str, str]]:
    """Of the received snapshots, what goes (oldest first) and, for what the rules would drop but must
    stay, why. Snapshots taken here (a VM that failed over or back) are left to source/prune.py."""
    snaps = store.held(vm_uuid)
    protected = {snaps[-1].id: "the newest snapshot: the next delta from the source is based on it"} if snaps else {}
    partial = store.partial(vm_uuid)
    if partial is not None and partial.base_id:
        protected.setdefault(partial.base_id, "the base of an interrupted transfer, which the next replicate resumes")
    recovered = store.vm_dir(vm_uuid) / "recovered"
    clone_bases = _layers_under_other_vms(store, vm_uuid)
    for snap, younger in zip(snaps, snaps[1:]):
        if snap.origin != "received":
            continue
        if (recovered / snap.id).exists():
            protected.setdefault(snap.id, "a VM recovered from it (vmrepl recover) stands on its layers")
        elif any(d.image in clone_bases for d in snap.disks):
            protected.setdefault(snap.id, "a linked clone's chain stands on its layer")
        elif younger.origin != "received":
            # only a received layer is rebuilt off it; what was taken here stands on its own branch
            protected.setdefault(snap.id, f"{younger.name}, the next younger snapshot, was taken on this host")
    received = [s for s in snaps if s.origin == "received" and s.id not in keep]
    return [s for s in received if s.id not in protected], {s.id: protected[s.id] for s in received if s.id in protected}


def _layers_under_other_vms(store: Store, vm_uuid: str) -> set[str]:
    """The layers that the bottom of another VM's chains stands on: a linked clone's first snapshot
    arrives as a delta on the snapshot it was cloned from. Only a chain's bottom layer can stand on
    another VM's layer, so one look per disk of each other VM's oldest held snapshot suffices."""
    found = set()
    for other, _name in store.catalog.vms():
        held = store.held(other) if other != vm_uuid else []
        for layer in held[0].disks if held else ():
            backing = chain.backing_of(Path(layer.image))
            if backing is not None:
                found.add(str(backing))
    return found


def prune_one(store: Store, daemon: StorageDaemon, gone: Snapshot) -> None:
    """Take `gone` (a held snapshot other than the newest) out of its VM's chains and forget it."""
    younger = chain.successor(store.held(gone.vm_uuid), gone)
    assert younger is not None, "the newest snapshot is never pruned"
    above = {d.target: d for d in younger.disks}
    for layer in gone.disks:
        if layer.target not in above:  # detached in Y: only a later re-attachment could stand on it
            _refuse_if_stood_on(store, gone, layer.target)
    for layer in gone.disks:
        upper = above.get(layer.target)
        if upper is not None and chain.backing_of(Path(upper.image)) == Path(layer.image):
            chain.rebuild_without(daemon, Path(upper.image), Path(layer.image), upper.virtual_size,
                                  snapshot=younger.id, target=layer.target)
    chain.crash_point("prune-rebuilt")
    store.catalog.forget(gone)
    chain.crash_point("prune-forgotten")
    _delete_files(store, gone.vm_uuid, gone.id)


def _refuse_if_stood_on(store: Store, gone: Snapshot, target: str) -> None:
    image = Path(gone.disk(target).image)
    for snap in store.held(gone.vm_uuid):
        layer = next((d for d in snap.disks if d.target == target), None)
        if snap.id != gone.id and layer is not None and chain.backing_of(Path(layer.image)) == image:
            raise SinkError(f"cannot prune {gone.name}: the layer of {snap.name}'s disk {target} stands on its "
                            f"layer, but {target} is missing from the snapshot in between",
                            hint="keep it (prune with a grid that keeps it)")


def sweep(store: Store, vm_uuid: str) -> None:
    """Delete the files of snapshots pruned here that a crash left behind."""
    for snapshot_id in store.pruned(vm_uuid):
        _delete_files(store, vm_uuid, snapshot_id)


def _delete_files(store: Store, vm_uuid: str, snapshot_id: str) -> None:
    disks = store.vm_dir(vm_uuid) / "disks"
    doomed = [*disks.glob(f"*/{snapshot_id}.qcow2")] if disks.is_dir() else []
    doomed.append(store.vm_dir(vm_uuid) / "definitions" / f"{snapshot_id}.xml")
    for path in doomed:
        if path.exists():
            os.unlink(path)
            fsync_dir(path.parent)
