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

X goes only if nothing but Y stands on its layers: every qcow2 under the store counts, catalogued or
not (a linked clone's overlay, a partial transfer, a fork), and the check is made again just before X's
row changes, since other VMs' receives do not take this VM's lock.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..catalog import Snapshot
from ..errors import SinkError, VmreplError
from ..qemu.storage_daemon import StorageDaemon
from ..state import fsync_dir
from . import chain
from .store import Store


def plan(store: Store, vm_uuid: str, keep: set[str], *, without_partial: bool = False
         ) -> tuple[list[Snapshot], dict[str, str]]:
    """Of the received snapshots, what goes (oldest first) and, for what the rules would drop but must
    stay, why. Snapshots taken here (a VM that failed over or back) are left to source/prune.py.
    `without_partial`: plan as if its interrupted transfers were dropped (`prune --drop-partial --dry-run`):
    neither their base nor their layers keep anything."""
    snaps = store.held(vm_uuid)
    protected = {snaps[-1].id: "the newest snapshot: the next delta from the source is based on it"} if snaps else {}
    partials = store.partial_transfers(vm_uuid)  # read-only: --dry-run changes nothing
    for partial in [] if without_partial else partials:
        if partial.base_id:
            protected.setdefault(partial.base_id, "the base of an interrupted transfer, which the next replicate "
                                                  "resumes")
    recovered = store.vm_dir(vm_uuid) / "recovered"
    dropped = {layer for t in partials
               for layer in store.uncommitted_layers(vm_uuid, t.snapshot_id)} if without_partial else set()
    standing = {base: above - dropped for base, above in files_standing_on(store).items()}
    for snap, younger in zip(snaps, snaps[1:]):
        if snap.origin != "received":
            continue
        if (recovered / snap.id).exists():
            protected.setdefault(snap.id, "a VM recovered from it (vmrepl recover) stands on its layers")
        elif younger.origin != "received" and {Path(d.image) for d in younger.disks} & _standing_on(snap, standing):
            # only a received layer is rebuilt off it; what was taken here changes by source/prune.py alone
            protected.setdefault(snap.id, f"{younger.name}, the next younger snapshot, was taken on this host "
                                          "and stands on its layer")
        elif others := _others_on(snap, younger, standing):
            protected.setdefault(snap.id, f"other layers stand on its layer ({', '.join(sorted(others)[:3])}): "
                                          "a linked clone's, a partial transfer's, or a fork")
    if received_here := [s for s in snaps if s.origin == "received"]:  # a VM that failed over also took some here
        protected.setdefault(received_here[-1].id, "the newest snapshot received here: its sender's next delta "
                                                   "is based on it")
    received = [s for s in snaps if s.origin == "received" and s.id not in keep]
    return [s for s in received if s.id not in protected], {s.id: protected[s.id] for s in received if s.id in protected}


def files_standing_on(store: Store) -> dict[Path, set[Path]]:
    """For every file in the store that a layer names as its backing: the files that name it. Every
    qcow2 under any VM's disks/ and recovered/ counts, catalogued or not (a partial transfer, a clone's
    or a recovered domain's overlay), so that no prune deletes what something still stands on."""
    standing: dict[Path, set[Path]] = {}
    for path in [*store.root.glob("*/disks/*/*"), *store.root.glob("*/recovered/*/*")]:
        if _is_rebuild_leftover(path):
            continue  # written by a rebuild that never finished: a redo starts it afresh, `sweep` drops it
        try:
            backing = chain.backing_of(path)
        except (OSError, VmreplError):
            continue  # not a qcow2 (yet): being created, so nothing stands on it through its header
        if backing is not None:
            standing.setdefault(backing, set()).add(path)
    return standing


def _standing_on(snap: Snapshot, standing: dict[Path, set[Path]]) -> set[Path]:
    return {p for layer in snap.disks for p in standing.get(Path(layer.image), set())}


def _others_on(snap: Snapshot, younger: Snapshot | None, standing: dict[Path, set[Path]]) -> set[str]:
    """The names of files other than `younger`'s layers that stand on `snap`'s layers."""
    mine = {Path(d.image) for d in younger.disks} if younger else set()
    return {p.name for p in _standing_on(snap, standing) - mine}


def prune_one(store: Store, daemon: StorageDaemon, gone: Snapshot) -> None:
    """Take `gone` (a held snapshot other than the newest) out of its VM's chains and forget it."""
    younger = chain.successor(store.held(gone.vm_uuid), gone)
    assert younger is not None, "the newest snapshot is never pruned"
    above = {d.target: d for d in younger.disks}
    for layer in gone.disks:
        upper = above.get(layer.target)
        if upper is not None and chain.backing_of(Path(upper.image)) == Path(layer.image):
            chain.rebuild_without(daemon, Path(upper.image), Path(layer.image), upper.virtual_size,
                                  snapshot=younger.id, target=layer.target)
    chain.crash_point("prune-rebuilt")
    if others := _others_on(gone, None, files_standing_on(store)):  # appeared since the plan (another VM's receive)
        raise SinkError(f"cannot prune {gone.name}: {', '.join(sorted(others)[:3])} now stand(s) on its layer",
                        hint="prune again later; it stays held and reads as before")
    store.catalog.forget(gone)
    chain.crash_point("prune-forgotten")
    _delete_files(store, gone.vm_uuid, gone.id)


def _is_rebuild_leftover(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith((chain.REBUILT_SUFFIX, f"{chain.REBUILT_SUFFIX}.partial"))


def sweep(store: Store, vm_uuid: str) -> None:
    """Delete the files of snapshots pruned here, and half-done rebuilds, that a crash left behind (the
    VM's lock is held: no rebuild of its layers is under way)."""
    for snapshot_id in store.pruned(vm_uuid):
        _delete_files(store, vm_uuid, snapshot_id)
    for path in store.vm_dir(vm_uuid).glob("disks/*/.*"):
        if _is_rebuild_leftover(path):
            path.unlink()
            fsync_dir(path.parent)


def _delete_files(store: Store, vm_uuid: str, snapshot_id: str) -> None:
    disks = store.vm_dir(vm_uuid) / "disks"
    doomed = [*disks.glob(f"*/{snapshot_id}.qcow2")] if disks.is_dir() else []
    doomed.append(store.vm_dir(vm_uuid) / "definitions" / f"{snapshot_id}.xml")
    for path in doomed:
        if path.exists():
            os.unlink(path)
            fsync_dir(path.parent)
