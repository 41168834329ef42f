"""QEMU's block layer as vmrepl uses it: `img` wraps the qemu-img tool, `storage_daemon` drives
qemu-storage-daemon over QMP and reads or writes its NBD exports with libnbd.

Both raise errors of vmrepl.errors; a failure of a QEMU tool that fits no other class is a `QemuError`.
"""

from __future__ import annotations

from ..errors import QemuError
from ..extents import Extent

__all__ = ["Extent", "QemuError"]
