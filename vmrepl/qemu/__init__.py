"""QEMU's block layer as vmrepl uses it: `img` wraps the qemu-img tool, `storage_daemon` drives
qemu-storage-daemon over QMP and reads or writes its NBD exports with libnbd.

Both raise errors of vmrepl.errors; a failure of a QEMU tool that fits no other class is a `QemuError`.
"""

from __future__ import annotations

from ..errors import VmreplError
from ..extents import Extent

__all__ = ["Extent", "QemuError"]


class QemuError(VmreplError):
    """qemu-img or qemu-storage-daemon refused or failed (on either host); the message quotes QEMU."""
