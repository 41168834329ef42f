"""Define a domain whose disks are fresh overlays on a snapshot's images: `clone` on the source,
`recover` on the destination. Each overlay starts its `vmrepl` bitmap at once, so the first snapshot of
the new domain is a delta on that snapshot (its parent, found through the backing chain)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from ..catalog import Snapshot
from ..errors import SourceError, UsageError
from ..qemu import img
from ..state import fsync_dir, make_dir_durably, write_file_durably
from .domain import BITMAP


def define_on_snapshot(conn: libvirt.virConnect, snap: Snapshot, name: str, overlay_dir: Path, *,
                       keep_uuid: bool) -> libvirt.virDomain:
    """Define `name` from the snapshot's definition with one new overlay per disk in `overlay_dir`."""
    try:
        conn.lookupByName(name)
        raise UsageError(f"a domain named {name} already exists at {conn.getURI()}",
                         hint="pick another name (--as NEWVM), or undefine the old domain first")
    except libvirt.libvirtError:
        pass
    if not snap.definition:
        raise SourceError(f"snapshot {snap.name} carries no VM definition")
    root = ET.fromstring(snap.definition)
    root.find("name").text = name
    if not keep_uuid:
        if (uuid := root.find("uuid")) is not None:
            root.remove(uuid)
        for interface in root.iterfind("./devices/interface"):  # a copy must not share MAC addresses
            if (mac := interface.find("mac")) is not None:
                interface.remove(mac)
    fresh_dir = not overlay_dir.exists()  # recover's `recovered/ID/` marks the snapshot as stood on
    make_dir_durably(overlay_dir)
    made: list[Path] = []
    try:
        if not keep_uuid:
            # a received snapshot's definition names a store on the host it came from: none to copy here
            made += _own_nvram(root, overlay_dir / f"{name}_VARS.fd", copy=snap.origin == "local")
        for disk in root.iterfind("./devices/disk"):
            target = disk.find("target").get("dev")
            source = disk.find("source")
            if disk.get("device", "disk") != "disk" or source is None:
                continue
            layer = snap.disk(target)
            overlay = overlay_dir / f"{name}-{target}.qcow2"
            if overlay.exists():
                raise SourceError(f"{overlay} already exists", hint="remove it or pick another name")
            img.create(overlay, size=layer.virtual_size, backing=layer.image)
            made.append(overlay)
            img.add_bitmap(overlay, BITMAP)
            overlay.chmod(0o644)
            source.set("file", str(overlay))
            for stale in disk.findall("backingStore"):
                disk.remove(stale)
        fsync_dir(overlay_dir)
        try:
            return conn.defineXML(ET.tostring(root, encoding="unicode"))
        except libvirt.libvirtError as err:
            raise SourceError(f"libvirt refused the definition of {name}: {err.get_error_message()}") from err
    except BaseException:
        for overlay in made:
            overlay.unlink(missing_ok=True)
        if fresh_dir:
            overlay_dir.rmdir()
        raise


def _own_nvram(root: ET.Element, path: Path, *, copy: bool) -> list[Path]:
    """Give a domain under a new name a UEFI variable store of its own, never its origin's (both would
    write it): with `copy`, a copy of the store the definition names, as it is now, at `path` (as
    virt-clone does); otherwise, or when there is no such file, the name is dropped and libvirt makes a
    fresh store from the firmware's template. Returns the file made."""
    nvram = root.find("./os/nvram")
    if nvram is None:
        return []  # the firmware is left to libvirt (`<os firmware='efi'>`): it names a store per domain
    source = Path(nvram.text.strip()) if nvram.text and nvram.text.strip() else None
    if not copy or source is None or not source.is_file():
        if nvram.attrib:
            nvram.text = None  # keeps template=: libvirt names the new store and fills it from that
        else:
            root.find("os").remove(nvram)
        return []
    if path.exists():
        raise SourceError(f"{path} already exists", hint="remove it or pick another name")
    try:
        write_file_durably(path, source.read_bytes())
        path.chmod(0o600)  # as libvirt keeps its stores
    except OSError as err:
        path.unlink(missing_ok=True)
        raise SourceError(f"cannot copy the UEFI variable store {source}: {err.strerror or err}",
                          hint="check the space and permissions there") from None
    nvram.text = str(path)
    return [path]
