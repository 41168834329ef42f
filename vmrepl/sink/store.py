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
from ..errors import ProtocolError, UsageError, VmreplError
from ..names import safe_name
from ..state import fsync_dir, make_dir_durably, write_file_durably
from .chain import crash_point


@dataclass(frozen=True)
class Progress:
    """How far a partial transfer durably got: per disk, every extent below `offsets[target]` is stored."""

    snapshot_id: str
    base_id: str | None
    offsets: dict[str, int]
    vm_name: str = ""  # the sender's name for the VM: the catalog has none before its first commit


@dataclass(frozen=True)
class PartialTransfer:
    """An interrupted transfer as an admin sees it (`vmrepl status`, `vmrepl prune --drop-partial`)."""

    snapshot_id: str
    base_id: str | None
    since_ns: int  # the progress file's mtime: when the transfer last made durable progress
    bytes: int     # disk space held by the layer files that `drop_partial` deletes
    vm_name: str   # the sender's name for the VM ('' in files of an older vmrepl)

    def as_json(self) -> dict:
        return {"snapshot_id": self.snapshot_id, "base_id": self.base_id, "since_ns": self.since_ns,
                "bytes": self.bytes}


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

    def _progress_files(self, vm_uuid: str) -> list[Path]:
        directory = self.vm_dir(vm_uuid) / "incoming"
        return sorted(directory.glob("*.json")) if directory.is_dir() else []

    @staticmethod
    def _read_progress(path: Path) -> Progress:
        """Raises ValueError, KeyError or TypeError when the file is not a progress file."""
        doc = json.loads(path.read_text())
        return Progress(doc["snapshot_id"], doc["base_id"], {str(k): int(v) for k, v in doc["offsets"].items()},
                        str(doc.get("vm_name", "")))  # absent from files an older vmrepl wrote

    def partial(self, vm_uuid: str) -> Progress | None:
        """The resumable transfer of this VM, if one was interrupted."""
        for path in self._progress_files(vm_uuid):
            try:
                progress = self._read_progress(path)
            except (ValueError, KeyError, TypeError):
                path.unlink()  # a progress file we cannot read only costs a restart of that transfer
                continue
            if not self._committed(vm_uuid, progress):
                return progress
            path.unlink()
        return None

    def _committed(self, vm_uuid: str, progress: Progress) -> bool:
        """Its snapshot is held, as this VM's: the progress file was left by a commit that stopped after
        its catalog row (FORMAT.md, "Committing a snapshot", step 6), and nothing is partial."""
        known = self.catalog.find_snapshot(progress.snapshot_id)
        return known is not None and known.held and known.vm_uuid == vm_uuid

    def partial_vms(self) -> list[str]:
        """Uuids of the VMs with a progress file here, catalogued or not (a first full send that stopped
        leaves a VM that no catalog row names yet)."""
        return sorted({path.parent.parent.name for path in self.root.glob("*/incoming/*.json")
                       if _is_safe(path.parent.parent.name)})  # a directory vmrepl made, not one put there by hand

    def partial_transfers(self, vm_uuid: str) -> list[PartialTransfer]:
        """The VM's interrupted transfers, for an admin to see or drop; changes nothing (`vmrepl status`
        runs beside receivers and need not be able to write). A transfer under way shows too, its
        progress file rewritten every PROGRESS_SECONDS while data arrives (sink/receive.py)."""
        found = []
        for path in self._progress_files(vm_uuid):
            try:
                progress, since_ns = self._read_progress(path), path.stat().st_mtime_ns
                layers = self.uncommitted_layers(vm_uuid, progress.snapshot_id)
            except (OSError, ValueError, KeyError, TypeError, UsageError):
                continue  # unreadable, or just removed by a commit: the next receive deletes the former
            if self._committed(vm_uuid, progress):
                continue
            found.append(PartialTransfer(progress.snapshot_id, progress.base_id, since_ns,
                                         sum(_allocated(layer) for layer in layers), progress.vm_name))
        return found

    def save_progress(self, vm_uuid: str, progress: Progress) -> None:
        """Call only after the layers hold (flushed) every extent below the offsets."""
        write_file_durably(self._progress_path(vm_uuid, progress.snapshot_id), json.dumps(
            {"snapshot_id": progress.snapshot_id, "base_id": progress.base_id, "offsets": progress.offsets,
             "vm_name": progress.vm_name}).encode())

    def uncommitted_layers(self, vm_uuid: str, snapshot_id: str) -> list[Path]:
        """An interrupted transfer's layer files: its partial layers, and the complete ones that no catalog
        row names (disks that arrived whole before the transfer stopped)."""
        disks = self.vm_dir(vm_uuid) / "disks"
        sid = safe_name("snapshot id", snapshot_id)
        uncommitted = self.catalog.find_snapshot(snapshot_id) is None
        names = [f".{sid}.qcow2.partial", *([f"{sid}.qcow2"] if uncommitted else [])]
        return [layer for name in names for layer in (disks.glob(f"*/{name}") if disks.is_dir() else [])]

    def drop_partial(self, vm_uuid: str, snapshot_id: str) -> None:
        """Forget an interrupted transfer: its layer files (`uncommitted_layers`), then its progress file.
        A crash in between leaves a progress file whose layers are gone: the next hello reports those
        disks at offset 0 (`_Session._durable`), so the transfer restarts."""
        layers = self.uncommitted_layers(vm_uuid, snapshot_id)
        for layer in layers:
            layer.unlink(missing_ok=True)
        for directory in {layer.parent for layer in layers}:
            fsync_dir(directory)  # gone for good before the file that names them: nothing left unnamed
        progress = self._progress_path(vm_uuid, snapshot_id)
        progress.unlink(missing_ok=True)
        fsync_dir(progress.parent)

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


def _allocated(path: Path) -> int:
    """Bytes `path` takes on disk (a partial layer is sparse: its size says little); 0 once gone."""
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def _is_safe(name: str) -> bool:
    try:
        safe_name("VM uuid", name)
    except UsageError:
        return False
    return True
