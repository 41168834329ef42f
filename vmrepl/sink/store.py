"""The destination's store: per VM and disk a chain of immutable qcow2 layers, plus catalog rows.

    STATE/vms/VM_UUID/disks/TARGET/SNAPSHOT_ID.qcow2          a committed layer, backed by the next older
    STATE/vms/VM_UUID/disks/TARGET/.SNAPSHOT_ID.qcow2.partial being received (invisible)
    STATE/vms/VM_UUID/incoming/SNAPSHOT_ID.json               progress of a partial transfer (resume)
    STATE/vms/VM_UUID/definitions/SNAPSHOT_ID.xml             the VM definition at that snapshot
    STATE/vms/VM_UUID/inserting/UPPER_ID.json                 an insertion to finish (sink/chain.py)

Commit order of a snapshot (docs/FORMAT.md, "Committing a snapshot"): every disk's partial layer is
complete and its digest checked -> each is flushed, fsynced and renamed to its final name -> the
definition is written durably -> the insertion marker, when the snapshot lands below a held one ->
one catalog transaction adds the snapshot and its layers -> the progress file goes. Only a catalog row
makes a snapshot visible; a crash before it leaves files that no row names, which the next receive of
that snapshot replaces, and a marker naming an uncatalogued snapshot, which the next session drops.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..catalog import Catalog, Snapshot
from ..errors import ProtocolError, VmreplError
from ..names import safe_name
from ..state import fsync_dir, make_dir_durably, write_file_durably
from .chain import crash_point


@dataclass(frozen=True)
class Progress:
    """How far a partial transfer durably got: per disk, every extent below `offsets[target]` is stored."""

    snapshot_id: str
    base_id: str | None
    offsets: dict[str, int]


class Store:
    def __init__(self, state_dir: Path, catalog: Catalog) -> None:
        self.state_dir = state_dir
        self.root = state_dir / "vms"
        self.catalog = catalog

    def vm_dir(self, vm_uuid: str) -> Path:
        return self.root / safe_name("VM uuid", vm_uuid)

    def layer_path(self, vm_uuid: str, target: str, snapshot_id: str) -> Path:
        directory = make_dir_durably(self.vm_dir(vm_uuid) / "disks" / safe_name("disk target", target))
        return directory / f"{safe_name('snapshot id', snapshot_id)}.qcow2"

    def held(self, vm_uuid: str) -> list[Snapshot]:
        return self.catalog.snapshots(vm_uuid) if self.catalog.vm_uuid(vm_uuid) else []

    def pruned(self, vm_uuid: str, *, since_generation: int = 0) -> tuple[str, ...]:
        """Ids of the VM's snapshots pruned here (ghost rows), of generation `since_generation` or
        younger: senders do not send them again."""
        return tuple(self.catalog.ghost_ids(vm_uuid, since_generation=since_generation))

    # --- progress of partial transfers ------------------------------------------------------------

    def _progress_path(self, vm_uuid: str, snapshot_id: str) -> Path:
        directory = make_dir_durably(self.vm_dir(vm_uuid) / "incoming")
        return directory / f"{safe_name('snapshot id', snapshot_id)}.json"

    def partial(self, vm_uuid: str) -> Progress | None:
        """The resumable transfer of this VM, if one was interrupted."""
        directory = self.vm_dir(vm_uuid) / "incoming"
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
            try:
                doc = json.loads(path.read_text())
                return Progress(doc["snapshot_id"], doc["base_id"], {str(k): int(v) for k, v in doc["offsets"].items()})
            except (ValueError, KeyError, TypeError):
                path.unlink()  # a progress file we cannot read only costs a restart of that transfer
        return None

    def save_progress(self, vm_uuid: str, progress: Progress) -> None:
        """Call only after the layers hold (flushed) every extent below the offsets."""
        write_file_durably(self._progress_path(vm_uuid, progress.snapshot_id), json.dumps(
            {"snapshot_id": progress.snapshot_id, "base_id": progress.base_id, "offsets": progress.offsets}).encode())

    def drop_partial(self, vm_uuid: str, snapshot_id: str) -> None:
        """Forget an interrupted transfer: its partial layers, the complete ones that no catalog row names
        (disks that arrived whole before the transfer stopped), and then its progress file."""
        disks = self.vm_dir(vm_uuid) / "disks"
        sid = safe_name("snapshot id", snapshot_id)
        uncommitted = self.catalog.find_snapshot(snapshot_id) is None
        for name in [f".{sid}.qcow2.partial", *([f"{sid}.qcow2"] if uncommitted else [])]:
            for layer in disks.glob(f"*/{name}") if disks.is_dir() else []:
                layer.unlink()
        self._progress_path(vm_uuid, snapshot_id).unlink(missing_ok=True)

    # --- commit ----------------------------------------------------------------------------------

    def commit(self, snap: Snapshot, *, insert_below: str | None = None) -> None:
        """Make a received snapshot visible: its layers are already at their final names, durable.
        `insert_below`: the held snapshot whose layers are to be rebuilt onto this one's; its marker
        is durable before the catalog row, so a crash after the row still finishes the insertion."""
        for layer in snap.disks:
            if not Path(layer.image).is_file():
                raise ProtocolError(f"layer {layer.image} of snapshot {snap.name} is missing at commit")
        definitions = make_dir_durably(self.vm_dir(snap.vm_uuid) / "definitions")
        write_file_durably(definitions / f"{snap.id}.xml", snap.definition.encode())
        if insert_below is not None:
            write_file_durably(self._insertion_path(snap.vm_uuid, insert_below),
                               json.dumps({"upper": insert_below, "lower": snap.id}).encode())
        crash_point("before-catalog")
        self.catalog.add_snapshot(snap)
        crash_point("after-catalog")
        progress = self._progress_path(snap.vm_uuid, snap.id)
        if progress.exists():
            os.unlink(progress)
            fsync_dir(progress.parent)

    # --- insertions ------------------------------------------------------------------------------

    def _insertion_path(self, vm_uuid: str, upper_id: str) -> Path:
        directory = make_dir_durably(self.vm_dir(vm_uuid) / "inserting")
        return directory / f"{safe_name('snapshot id', upper_id)}.json"

    def insertions(self, vm_uuid: str) -> list[tuple[str, str]]:
        """(upper, lower) snapshot ids of each insertion not finished yet: upper's layers are to be
        rebuilt onto lower's."""
        directory = self.vm_dir(vm_uuid) / "inserting"
        found = []
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
            try:
                doc = json.loads(path.read_text())
                found.append((safe_name("snapshot id", doc["upper"]), safe_name("snapshot id", doc["lower"])))
            except (ValueError, KeyError, TypeError, VmreplError):
                path.unlink()  # unreadable (never written whole): the chain only stays forked
        return found

    def drop_insertion(self, vm_uuid: str, upper_id: str) -> None:
        path = self._insertion_path(vm_uuid, upper_id)
        if path.exists():
            path.unlink()
            fsync_dir(path.parent)
