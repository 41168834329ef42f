"""libvirt access for the source: connect, find a domain, list the disks vmrepl replicates."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from ..errors import NotFoundError, SourceError, UnsupportedDiskError
from ..qemu import img

# libvirt prints every error on stderr by default; vmrepl reports its own one-liners.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

BITMAP = "vmrepl"  # the persistent dirty bitmap every active layer carries


@dataclass(frozen=True)
class Disk:
    """A disk of a domain as its live XML describes it now."""

    target: str   # vda, sdb, ...
    image: str    # the active (top) qcow2 file
    alias: str    # libvirt's device alias, e.g. virtio-disk0


def connect(uri: str) -> libvirt.virConnect:
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise SourceError(f"cannot connect to libvirt at {uri}: {err.get_error_message()}",
                          hint="is libvirtd running? (scripts/setup.sh starts it) or pass --connect URI") from err


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        try:
            return conn.lookupByUUIDString(name)
        except libvirt.libvirtError:
            raise NotFoundError(f"no domain {name!r} at {conn.getURI()}", hint="see `virsh list --all`") from None


def is_running(dom: libvirt.virDomain) -> bool:
    """Whether a QEMU process holds the disks (also while crashed-preserved, shutting down or pm-suspended)."""
    return bool(dom.isActive())


def definition(dom: libvirt.virDomain) -> str:
    """The persistent definition (what a destination defines a domain from), without secrets."""
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if dom.isPersistent() else 0
    return dom.XMLDesc(flags)


def disks(dom: libvirt.virDomain) -> list[Disk]:
    """The domain's replicated disks: every file-backed qcow2 disk; CD-ROMs and floppies are skipped.

    Anything else that is a disk (raw, block device, network) cannot carry dirty bitmaps or external
    snapshots the way vmrepl needs them, so it is refused rather than silently left out.
    """
    root = ET.fromstring(dom.XMLDesc(0))
    found = []
    for disk in root.iterfind("./devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        target = disk.find("target").get("dev")
        fmt = disk.find("driver").get("type") if disk.find("driver") is not None else None
        source = disk.find("source")
        path = source.get("file") if source is not None else None
        if disk.get("type") != "file" or not path:
            raise UnsupportedDiskError(f"disk {target} of {dom.name()} is not a file (type {disk.get('type')})",
                                       hint="vmrepl replicates file-backed qcow2 disks only")
        if fmt != "qcow2":
            raise UnsupportedDiskError(f"disk {target} of {dom.name()} is {fmt or 'of unknown format'}, not qcow2",
                                       hint=f"convert it (qemu-img convert -O qcow2 {path} NEW.qcow2) and "
                                            "point the domain at the copy")
        alias = disk.find("alias")
        found.append(Disk(target=target, image=path, alias=alias.get("name") if alias is not None else ""))
    if not found:
        raise UnsupportedDiskError(f"{dom.name()} has no qcow2 disk to replicate")
    return found


def monitor(dom: libvirt.virDomain, execute: str, **arguments: object) -> object:
    """Run one QMP command in the domain's QEMU through libvirt (libvirt owns that monitor)."""
    import json

    import libvirt_qemu

    command = {"execute": execute, "arguments": arguments} if arguments else {"execute": execute}
    try:
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(command), 0))
    except libvirt.libvirtError as err:
        raise SourceError(f"QEMU of {dom.name()} refused {execute}: {err.get_error_message()}") from err
    return reply.get("return")


def top_bitmaps(dom: libvirt.virDomain) -> dict[str, tuple[str, dict | None]]:
    """For each active image of a running domain: (its qcow2 node name, its `vmrepl` bitmap or None)."""
    result: dict[str, tuple[str, dict | None]] = {}
    for node in monitor(dom, "query-named-block-nodes", flat=True):
        if node.get("drv") != "qcow2":
            continue
        bitmap = next((b for b in node.get("dirty-bitmaps", []) if b.get("name") == BITMAP), None)
        result[_node_filename(node["file"])] = (node["node-name"], bitmap)
    return result


def file_bitmap_sound(path: str) -> bool:
    """Whether an image no QEMU has open carries a `vmrepl` bitmap that holds all its writes: present,
    recording (`auto`: a disabled one misses what was written since) and closed cleanly (no `in-use`)."""
    bitmap = next((b for b in img.bitmaps(path) if b["name"] == BITMAP), None)
    return bitmap is not None and "auto" in bitmap["flags"] and "in-use" not in bitmap["flags"]


def _node_filename(file: str) -> str:
    """The image file of a qcow2 node: QEMU shows `json:{...}` instead when the node's options (e.g. its
    backing) differ from what the file itself says; the file is then that JSON's protocol child."""
    import json

    if not file.startswith("json:"):
        return file
    return json.loads(file[len("json:"):]).get("file", {}).get("filename", file)
