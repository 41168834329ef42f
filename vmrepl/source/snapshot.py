"""Taking a snapshot on the source: every disk of the VM at one instant, kept as a frozen qcow2 layer.

For a running domain, libvirt takes a disk-only external snapshot of all disks atomically: each
active image is frozen and a new overlay becomes active. Every active layer carries the persistent
dirty bitmap `vmrepl`; libvirt carries a consistent, recording bitmap onto the new overlay in the same
transaction, so the frozen layer's bitmap holds exactly the writes made while it was active. When
that bitmap is missing or inconsistent (QEMU was killed), the layer is recorded as `allocation`
tracked (its own allocation map tells its writes) and a fresh bitmap is started before the snapshot,
so the next layer is tracked again. A shut-off domain gets the same layout through libvirt's offline
disk-only snapshot and `qemu-img bitmap --add`.
"""

from __future__ import annotations

import logging
import os
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from ..catalog import Catalog, Layer, Snapshot
from ..errors import HookError, SourceError, UsageError
from ..hooks import run_hooks
from ..names import safe_name
from ..qemu import img
from ..state import fsync_file
from . import domain
from .domain import BITMAP, Disk

log = logging.getLogger(__name__)


def take_snapshot(conn: libvirt.virConnect, dom: libvirt.virDomain, catalog: Catalog, *,
                  name: str | None, quiesce: bool, hooks_dir: Path) -> Snapshot:
    """Snapshot every disk of `dom` at one instant and record it; the caller holds the VM lock."""
    vm_uuid, vm_name = dom.UUIDString(), dom.name()
    generation = catalog.next_generation(vm_uuid)
    created_ns = time.time_ns()
    name = safe_name("snapshot name", name or f"g{generation}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    if any(s.name == name for s in catalog.snapshots(vm_uuid)):
        raise UsageError(f"{vm_name} already has a snapshot named {name!r}", hint="pick another --name")
    running = domain.is_running(dom)
    if quiesce and not running:
        raise UsageError(f"--quiesce needs a running domain; {vm_name} is shut off")
    if not running and dom.hasManagedSaveImage(0):
        raise SourceError(f"{vm_name} has a managed save image: restoring it would run on the disks as saved, "
                          "bypassing a snapshot's new overlays and writing its frozen layers",
                          hint="start the domain and snapshot it running, or drop the image "
                               "(virsh managedsave-remove)")
    disks = domain.disks(dom)
    snapshot_id = str(uuidlib.uuid4())
    overlays = {d.target: _overlay_path(d, vm_name, name) for d in disks}
    parent = _parent(catalog, disks, vm_uuid)
    hook_env = {"VMREPL_VM": vm_name, "VMREPL_VM_UUID": vm_uuid, "VMREPL_SNAPSHOT": snapshot_id,
                "VMREPL_SNAPSHOT_NAME": name}

    result = "failed"
    try:
        run_hooks(hooks_dir, "pre-snapshot", hook_env)
        tracking = _prepare_tracking(dom, disks, catalog) if running else _offline_tracking(disks, catalog)
        _create(dom, disks, overlays, name, snapshot_id, generation, running=running, quiesce=quiesce)
        if not running:
            for path in overlays.values():
                img.add_bitmap(path, BITMAP)
        layers = []
        for d in disks:
            fsync_file(d.image)
            fsync_file(overlays[d.target])
            layers.append(Layer(target=d.target, image=d.image, virtual_size=img.info(d.image)["virtual-size"],
                                tracking=tracking[d.target]))
        snap = Snapshot(id=snapshot_id, vm_uuid=vm_uuid, vm_name=vm_name, name=name,
                        parent=parent.id if parent else None, created_ns=created_ns,
                        generation=generation, origin="local", disks=tuple(layers),
                        definition=domain.definition(dom))
        catalog.add_snapshot(snap)
        result = "ok"
    finally:
        try:
            run_hooks(hooks_dir, "post-snapshot", {**hook_env, "VMREPL_RESULT": result})
        except HookError as err:
            if result != "ok":  # the snapshot's own failure, on its way out, is the one to report
                log.warning("%s", err)
            else:  # taken and catalogued: say so, or the user retries and gets a second one
                raise HookError(f"snapshot {name} ({snapshot_id}) was taken, but {err.message}",
                                hint=err.hint) from None
    return snap


def _parent(catalog: Catalog, disks: list[Disk], vm_uuid: str) -> Snapshot | None:
    """The snapshot the active layers grow from: the catalogued one whose image backs them.

    Normally that is the VM's newest snapshot; for a clone or a recovered domain it is the snapshot
    its overlays were created on, maybe of another VM. When the chain names no catalogued snapshot
    (it was rewritten outside vmrepl), the VM's newest snapshot still is the parent: the deltas from it
    then come from comparing block digests (invariant 7)."""
    backing = img.info(disks[0].image).get("full-backing-filename")
    found = catalog.snapshot_by_image(os.path.normpath(backing)) if backing else None
    if found is None:
        own = catalog.snapshots(vm_uuid)
        found = own[-1] if own else None
    return found


def _overlay_path(disk: Disk, vm_name: str, snapshot_name: str) -> str:
    """The new active file: beside the current one, named after the VM, disk and snapshot."""
    path = Path(disk.image).with_name(f"{vm_name}-{disk.target}.{snapshot_name}.qcow2")
    if path.exists():
        raise SourceError(f"{path} already exists", hint="remove it or pick another --name")
    return str(path)


def _prepare_tracking(dom: libvirt.virDomain, disks: list[Disk], catalog: Catalog) -> dict[str, str]:
    """Say whether each active layer's bitmap is complete, and make sure each carries a sound one.

    A missing or inconsistent bitmap is replaced by a fresh one before the snapshot (libvirt only
    carries consistent bitmaps onto the new overlay); the layer being frozen is then 'allocation'.
    The catalog records that first: if the snapshot then fails, the fresh bitmap looks sound but
    lacks the writes before it, and the next snapshot must not trust it either.
    """
    nodes = domain.top_bitmaps(dom)
    tracking: dict[str, str] = {}
    actions = []
    for d in disks:
        if d.image not in nodes:
            raise SourceError(f"QEMU of {dom.name()} does not show disk {d.target} ({d.image})",
                              hint="is the domain's definition in sync with the running QEMU?")
        node, bitmap = nodes[d.image]
        sound = bitmap is not None and bitmap.get("persistent") and bitmap.get("recording") \
            and not bitmap.get("inconsistent")
        tracking[d.target] = "bitmap" if sound and not catalog.is_untracked(d.image) else "allocation"
        if not sound:
            catalog.mark_untracked(d.image)
            if bitmap is not None:
                actions.append({"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": BITMAP}})
            actions.append({"type": "block-dirty-bitmap-add",
                            "data": {"node": node, "name": BITMAP, "persistent": True, "granularity": 65536}})
    if actions:
        domain.monitor(dom, "transaction", actions=actions)
    return tracking


def _offline_tracking(disks: list[Disk], catalog: Catalog) -> dict[str, str]:
    tracking = {}
    for d in disks:
        sound = domain.file_bitmap_sound(d.image) and not catalog.is_untracked(d.image)
        tracking[d.target] = "bitmap" if sound else "allocation"
    return tracking


def _create(dom: libvirt.virDomain, disks: list[Disk], overlays: dict[str, str], name: str, snapshot_id: str,
            generation: int, *, running: bool, quiesce: bool) -> None:
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "description").text = f"vmrepl snapshot {snapshot_id} generation {generation}"
    xml_disks = ET.SubElement(root, "disks")
    for d in disks:
        el = ET.SubElement(xml_disks, "disk", name=d.target, snapshot="external")
        ET.SubElement(el, "driver", type="qcow2")
        ET.SubElement(el, "source", file=overlays[d.target])
    flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
    if running:
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    if quiesce:
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
    try:
        dom.snapshotCreateXML(ET.tostring(root, encoding="unicode"), flags)
    except libvirt.libvirtError as err:
        message = err.get_error_message()
        if quiesce and "agent" in message.lower():
            raise SourceError(f"cannot quiesce {dom.name()}: {message}",
                              hint="install and start qemu-guest-agent in the guest (with its virtio channel), "
                                   "or snapshot without --quiesce") from err
        raise SourceError(f"libvirt could not snapshot {dom.name()}: {message}") from err

