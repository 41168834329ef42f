"""Typed wrappers over the `qemu-img` tool (JSON output where it has one).

Every image vmrepl writes is qcow2, so the wrappers name the format (`-f qcow2`, and `-F qcow2` for a
backing file) instead of letting qemu-img probe it; only `info` probes, because telling a raw disk
apart is its job. Readers pass `-U` (force share) so they work while a VM holds the chain.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from typing import Any

from ..errors import NoSpaceError, NotFoundError, VmreplError
from ..extents import Extent, union
from . import QemuError

StrPath = str | os.PathLike[str]


def info(path: StrPath, *, chain: bool = False, force_share: bool = True) -> dict[str, Any] | list[dict[str, Any]]:
    """`qemu-img info` as a dict; with `chain`, a list from the image down to its base."""
    args = ["info", "--output=json"]
    if force_share:
        args.append("-U")
    if chain:
        args.append("--backing-chain")
    return json.loads(_run([*args, str(path)], str(path)))


def backing_name(path: StrPath) -> str | None:
    """The backing file name stored in a qcow2 image's header, as written (maybe relative), or None.
    Read from the header itself: scans over every layer of a host would cost a process per file."""
    with open(path, "rb") as image:
        head = image.read(20)
        if len(head) < 20 or head[:4] != b"QFI\xfb":
            raise QemuError(f"{path} is not a qcow2 image", hint="see `qemu-img info` on it")
        offset, size = struct.unpack(">QI", head[8:20])
        if not offset:
            return None
        image.seek(offset)
        return image.read(size).decode("utf-8", "surrogateescape")


def create(path: StrPath, *, size: int, backing: StrPath | None = None, cluster_size: int = 65536) -> None:
    """A new qcow2 of `size` bytes; `backing` is stored as given (a relative name is taken relative
    to the new image's directory)."""
    args = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}"]
    if backing is not None:
        # -u: the size is given, so the backing chain need not be opened (that costs time per layer).
        args += ["-b", str(backing), "-F", "qcow2", "-u"]
    _run([*args, str(path), str(size)], str(path))


def rebase_unsafe(path: StrPath, backing: StrPath | None) -> None:
    """Point `path` at another backing file without touching data (`None`: no backing file)."""
    args = ["rebase", "-u", "-f", "qcow2", "-b", "" if backing is None else str(backing)]
    if backing is not None:
        args += ["-F", "qcow2"]
    _run([*args, str(path)], str(path))


def commit(path: StrPath) -> None:
    """Write the clusters of `path` into its backing file (which then reads as `path` did)."""
    _run(["commit", "-q", "-f", "qcow2", str(path)], str(path))


def check(path: StrPath) -> dict[str, Any]:
    """`qemu-img check` of one layer; the dict has `check-errors`, `corruptions`, `leaks` (when non-zero)."""
    # Exit 2 (corruptions) and 3 (leaks) still print the JSON report; only 1 means no report.
    out = _run(["check", "--output=json", "-f", "qcow2", str(path)], str(path), ok_codes=(0, 2, 3))
    return json.loads(out)


def compare(a: StrPath, b: StrPath) -> bool:
    """True when both images read the same through their chains (a missing tail counts as zeros)."""
    proc = _call(["compare", "-q", "-U", "-f", "qcow2", "-F", "qcow2", str(a), str(b)])
    if proc.returncode in (0, 1):
        return proc.returncode == 0
    raise _error(proc, f"compare {a} {b}")


def allocation_map(path: StrPath, *, own_layer_only: bool) -> list[Extent]:
    """The ranges that have content: in this file alone (`own_layer_only`), or anywhere in its chain.

    Ranges written as zeros come back with `zero=True`; ranges nobody wrote are left out.
    """
    entries = json.loads(_run(["map", "--output=json", "-U", "-f", "qcow2", str(path)], str(path)))
    return union(
        Extent(e["start"], e["length"], bool(e["zero"]))
        for e in entries
        if e["present"] and (e["depth"] == 0 or not own_layer_only)
    )


def bitmaps(path: StrPath) -> list[dict[str, Any]]:
    """The persistent bitmaps stored in this file: `name`, `flags` (`in-use` marks one that QEMU did not
    close cleanly, so it is inconsistent; `auto` one that records writes) and `granularity`."""
    data = info(path)
    assert isinstance(data, dict)
    return list(data.get("format-specific", {}).get("data", {}).get("bitmaps", []))


def add_bitmap(path: StrPath, name: str, *, granularity: int = 65536) -> None:
    """Start a persistent dirty bitmap in an image no QEMU has open (a shut-off domain's new overlay)."""
    _run(["bitmap", "--add", "-f", "qcow2", "-g", str(granularity), str(path), name], str(path))


def _run(args: list[str], path: str, *, ok_codes: tuple[int, ...] = (0,)) -> str:
    proc = _call(args)
    if proc.returncode not in ok_codes:
        raise _error(proc, f"{args[0]} {path}")
    return proc.stdout


def _call(args: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise QemuError("qemu-img is not installed", hint="run scripts/setup.sh") from None


def _error(proc: subprocess.CompletedProcess[str], what: str) -> VmreplError:
    # qemu-img's own error is its last line starting "qemu-img:"; lines after it only add context.
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    own = [line for line in lines if line.startswith("qemu-img:")] or lines
    last = own[-1] if own else f"exit status {proc.returncode}"
    message = f"qemu-img {what} failed: {last}"
    if "No space left on device" in last:
        return NoSpaceError(message, hint="free space on the destination, then retry")
    if "No such file or directory" in last:
        return NotFoundError(message, hint="check that the image and its backing files exist")
    return QemuError(message, hint="see qemu-img's message")
