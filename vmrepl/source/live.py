"""Reading the running disk's change tracking out of the domain's own QEMU.

The active layer of a running domain is written by QEMU, so its file cannot be read consistently from
outside, and its `vmrepl` bitmap lives in QEMU's memory. vmrepl asks that QEMU itself (QMP through
libvirt's monitor passthrough): a disabled copy of the bitmap, taken at one instant (QEMU refuses to
export a bitmap that is still recording), is exported read-only from QEMU's NBD server on a private unix
socket, with `qemu:allocation-depth` (what the active layer holds itself) and `base:allocation`; then the
export, the server and the copy are removed again, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import libvirt
import nbd

from ..errors import SourceError
from ..qemu.storage_daemon import ALLOCATION, dirty_bitmap_context
from . import domain
from .domain import BITMAP

PEEK = "vmrepl-peek"             # the frozen copy of the active layer's bitmap, gone after the read
DEPTH = "qemu:allocation-depth"  # per extent: 1 when the top layer holds it itself
EXPORT = "vmrepl-live"


@contextlib.contextmanager
def live_export(dom: libvirt.virDomain, node: str, image: str, *, with_bitmap: bool) -> Iterator[nbd.NBD]:
    """A libnbd handle on the running domain's `node` (its active layer over its chain)."""
    _clear_leftovers(dom, node)  # of a run killed before its cleanup (SIGTERM, SIGKILL); the caller holds the lock
    directory = tempfile.mkdtemp(prefix="vmrepl-live-", dir="/run")
    # QEMU runs as its own user (the owner of the image it holds): let it create the socket here.
    os.chown(directory, os.stat(image).st_uid, -1)
    socket = os.path.join(directory, "nbd.sock")
    steps: list[tuple[str, dict]] = []  # what to undo, newest first
    try:
        if with_bitmap:
            domain.monitor(dom, "transaction", actions=[
                {"type": "block-dirty-bitmap-add", "data": {"node": node, "name": PEEK, "persistent": False,
                                                            "disabled": True}},
                {"type": "block-dirty-bitmap-merge", "data": {"node": node, "target": PEEK, "bitmaps": [BITMAP]}}])
            steps.append(("block-dirty-bitmap-remove", {"node": node, "name": PEEK}))
        try:
            domain.monitor(dom, "nbd-server-start", addr={"type": "unix", "data": {"path": socket}})
        except SourceError as err:
            if "already" not in str(err):
                raise
            raise SourceError(f"QEMU of {dom.name()} already serves NBD (a backup or migration?): {err}",
                              hint="retry when it is done") from None
        steps.append(("nbd-server-stop", {}))
        domain.monitor(dom, "block-export-add", type="nbd", id=EXPORT, name=EXPORT, writable=False,
                       **{"node-name": node, "allocation-depth": True, "bitmaps": [PEEK] if with_bitmap else []})
        steps.append(("block-export-del", {"id": EXPORT}))
        handle = nbd.NBD()
        handle.set_export_name(EXPORT)
        for context in (ALLOCATION, DEPTH, *([dirty_bitmap_context(PEEK)] if with_bitmap else [])):
            handle.add_meta_context(context)
        handle.connect_unix(socket)
        try:
            yield handle
        finally:
            with contextlib.suppress(nbd.Error):
                handle.shutdown()
    finally:
        for command, arguments in reversed(steps):
            with contextlib.suppress(SourceError):
                domain.monitor(dom, command, **arguments)
        shutil.rmtree(directory, ignore_errors=True)


def _clear_leftovers(dom: libvirt.virDomain, node: str) -> None:
    """Remove what only vmrepl names so: its export (and the NBD server it started), its bitmap copy."""
    if any(e.get("id") == EXPORT for e in domain.monitor(dom, "query-block-exports") or []):
        for command, arguments in (("block-export-del", {"id": EXPORT, "mode": "hard"}), ("nbd-server-stop", {})):
            with contextlib.suppress(SourceError):
                domain.monitor(dom, command, **arguments)
    with contextlib.suppress(SourceError):
        domain.monitor(dom, "block-dirty-bitmap-remove", node=node, name=PEEK)
