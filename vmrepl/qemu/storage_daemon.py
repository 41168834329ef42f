"""qemu-storage-daemon under QMP control, serving qcow2 images as NBD exports read or written with libnbd.

One daemon per vmrepl run: images are added as block nodes, exported on one NBD unix socket, and read
(block status, data) or written through libnbd handles. QMP goes over the daemon's stdin and stdout;
its NBD socket lives in a private 0700 directory. The daemon is stopped on leaving the `with` block,
whatever happened inside it, and is killed by the kernel if the thread that started it dies first
(PR_SET_PDEATHSIG), so no run leaves one behind. Start it from the thread that lives as long as the
work (the main thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import nbd
from qemu.qmp import ExecuteError, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from ..errors import ChangeTrackingError
from ..extents import MAX_PIECE, Extent, union
from . import QemuError

# NBD block status counts are 32-bit; ask for at most 2 GiB at a time (the server may return less).
MAX_STATUS_LENGTH = 1 << 31
STATE_HOLE = nbd.STATE_HOLE  # base:allocation: not allocated anywhere in the chain
STATE_ZERO = nbd.STATE_ZERO  # base:allocation: reads as zeros
STATE_DIRTY = 1  # qemu:dirty-bitmap:NAME: the range is set in the bitmap
ALLOCATION = "base:allocation"

_START_TIMEOUT = 15.0
_QMP_TIMEOUT = 120.0
_PR_SET_PDEATHSIG = 1

# qemu.qmp logs the failures it also raises; vmrepl reports them once, as one line.
logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())
logging.getLogger("qemu.qmp").propagate = False


def dirty_bitmap_context(name: str) -> str:
    return f"qemu:dirty-bitmap:{name}"


class StorageDaemon:
    """A private qemu-storage-daemon; use it as a context manager."""

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._qmp_end: socket.socket | None = None  # our end of the QMP socket pair, until qemu.qmp takes it
        self._nbd_socket: Path | None = None
        self._ids = itertools.count(1)

    def __enter__(self) -> StorageDaemon:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="vmrepl-qsd-"))  # mkdtemp makes it 0700
        # QMP runs over the daemon's stdin and stdout, one end of a socket pair: connected from the
        # start, no socket file, no retry. Not a socket chardev: QEMU 7.2 moves a socket chardev's
        # monitor into an I/O thread by a bottom half, and a client the main loop accepts before that
        # runs is read by both threads (a double free in the JSON parser, or a SIGSEGV; measured: one
        # daemon in ~3,000 started with a polled socket file, ~1 in 300 when connecting at once).
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with theirs, open(self._dir / "stderr.log", "wb") as log:
                self._proc = subprocess.Popen(
                    ["qemu-storage-daemon", "--chardev", "stdio,id=qmp", "--monitor", "chardev=qmp"],
                    stdin=theirs, stdout=theirs, stderr=log, preexec_fn=_die_with_parent,
                )
        except FileNotFoundError:
            ours.close()
            self.stop()
            raise QemuError("qemu-storage-daemon is not installed", hint="run scripts/setup.sh") from None
        self._qmp_end = ours  # negotiated on first use: the daemon boots while the caller works

    def _monitor(self) -> QEMUMonitorProtocol:
        if self._qmp is None:
            if self._proc is None or self._qmp_end is None:
                raise QemuError("qemu-storage-daemon is not running", hint="use StorageDaemon as a context manager")
            if not select.select([self._qmp_end], [], [], _START_TIMEOUT)[0]:  # the greeting (or EOF) is there
                raise QemuError("qemu-storage-daemon did not start in time", hint="check the machine's load")
            qmp = QEMUMonitorProtocol(self._qmp_end)
            self._qmp_end = None  # qemu.qmp owns it now, and closes it
            # qemu.qmp's legacy connect() has no timeout: a daemon that hangs after its greeting is
            # killed, which ends the negotiation with EOF and reports the signal.
            watchdog = threading.Timer(_START_TIMEOUT, self._proc.kill)
            watchdog.start()
            try:
                qmp.connect()
            except (QMPError, OSError, AssertionError, EOFError) as err:
                with contextlib.suppress(QMPError, OSError, EOFError, AssertionError):
                    qmp.close()
                raise self._gone("its start (the QMP greeting)", err) from None
            finally:
                watchdog.cancel()
            qmp.settimeout(_QMP_TIMEOUT)
            self._qmp = qmp
        return self._qmp

    def stop(self) -> None:
        """Quit the daemon (kill it if it does not go within 5 s) and remove its directory."""
        if self._qmp is not None:
            with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
                self._qmp.cmd("quit")
            with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
                self._qmp.close()
            self._qmp = None
        elif self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # never talked to: SIGTERM makes it quit cleanly too
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._qmp_end is not None:
            self._qmp_end.close()
            self._qmp_end = None
        self._nbd_socket = None

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run one QMP command; a refusal becomes a QemuError quoting QEMU's message."""
        monitor = self._monitor()
        try:
            return monitor.cmd(command, **arguments)
        except ExecuteError as err:
            raise QemuError(f"qemu-storage-daemon refused {command}: {err}", hint="see QEMU's message") from None
        except (QMPError, OSError, EOFError, TimeoutError) as err:  # QMPError here: "Disconnected" and the like
            raise self._gone(command, err) from None

    def _gone(self, command: str, err: BaseException) -> QemuError:
        """The error for a daemon that stopped answering: how it ended, if it did, and its last words."""
        status = None
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):  # its socket closes a moment before it exits
                status = self._proc.wait(timeout=1.0)
        if status is not None and status < 0:
            how = f"was killed by signal {-status} ({signal.Signals(-status).name})"
        elif status is not None:
            how = f"exited with status {status}"
        else:
            how = f"stopped answering ({str(err) or type(err).__name__})"
        return QemuError(f"qemu-storage-daemon {how} during {command}", hint=f"its log: {self._log_tail()}")

    def add_image(self, path: str | os.PathLike[str], *, writable: bool = False,
                  backing: bool = True, backing_node: str | None = None) -> str:
        """Open a qcow2 file as a block node; returns its node name.

        Read-only nodes take no file locks (`locking: off` and `force-share`, inherited by the backing
        chain), so they open while a VM holds the chain; their file is read through io_uring (with
        reads queued, half the daemon's CPU per read of its thread pool's), where the kernel allows.
        Writable nodes (new layers) write through io_uring with O_DIRECT, bypassing the page cache: a
        whole disk goes about twice as fast as buffered and the final fsync finds little to do, and a
        delta does not depend on the page cache finding free pages (sink/layer.py). Where the file
        system or kernel refuses either (tmpfs has no O_DIRECT), plain buffered I/O.
        `backing=False` opens the file alone, as if it had no backing file; `backing_node` uses a node
        already open here as the backing file (it must read as the file's backing), so a deep chain is
        opened once however many layers are stacked on it.
        """
        node = f"n{next(self._ids)}"
        file: dict[str, Any] = {"driver": "file", "filename": os.path.abspath(path)}
        options: dict[str, Any] = {"driver": "qcow2", "node-name": node, "read-only": not writable, "file": file}
        if not backing:
            options["backing"] = None
        elif backing_node is not None:
            options["backing"] = backing_node
        if not writable:
            file["locking"] = "off"
            options["force-share"] = True
        fast = {**options, "file": {**file, "aio": "io_uring"}}
        if writable:
            fast["cache"] = fast["file"]["cache"] = {"direct": True}
        try:
            self.qmp("blockdev-add", **fast)
        except QemuError:
            if self._proc is None or self._proc.poll() is not None:
                raise  # the daemon died: a plain retry could only report a closed connection
            self.qmp("blockdev-add", **options)
        return node

    def remove_image(self, node: str) -> None:
        """Close a node (its exports must be removed first); a writable one is flushed on close."""
        self.qmp("blockdev-del", **{"node-name": node})

    def export(self, node: str, *, writable: bool = False, bitmaps: Iterable[str] = ()) -> str:
        """Export a node over NBD; returns the export name. Each bitmap is taken from the node itself,
        never from a backing file that happens to hold a bitmap of the same name."""
        for name in bitmaps:
            found = {b["name"]: b for b in self.block_bitmaps(node)}
            if name not in found:
                raise ChangeTrackingError(f"image node {node} has no dirty bitmap {name!r}",
                                          hint="fall back to the allocation map")
            if found[name]["inconsistent"]:
                raise ChangeTrackingError(f"dirty bitmap {name!r} of node {node} is inconsistent",
                                          hint="fall back to the allocation map")
        if self._nbd_socket is None:
            assert self._dir is not None
            socket = self._dir / "nbd.sock"
            self.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(socket)}})
            self._nbd_socket = socket
        name = f"e{next(self._ids)}"
        self.qmp("block-export-add", type="nbd", id=name, name=name, writable=writable,
                 bitmaps=[{"node": node, "name": b} for b in bitmaps], **{"node-name": node})
        return name

    def remove_export(self, export: str) -> None:
        """Drop an export and wait until QEMU has released it (clients are cut off: close them first)."""
        self.qmp("block-export-del", id=export, mode="hard")
        deadline = time.monotonic() + _QMP_TIMEOUT
        while time.monotonic() < deadline:
            try:
                event = self._monitor().pull_event(wait=1.0)
            except TimeoutError:
                continue
            if event and event["event"] == "BLOCK_EXPORT_DELETED" and event["data"]["id"] == export:
                return
        raise QemuError(f"export {export} was not released in time", hint="retry; QEMU may be stuck on I/O")

    def connect(self, export: str, *, meta_contexts: Iterable[str] = ()) -> nbd.NBD:
        """A libnbd handle on an export, with the given metadata contexts asked for before connecting."""
        if self._nbd_socket is None:
            raise QemuError(f"no NBD export {export}", hint="export a node first")
        h = nbd.NBD()
        h.set_export_name(export)
        for context in meta_contexts:
            h.add_meta_context(context)
        try:
            h.connect_unix(str(self._nbd_socket))
        except nbd.Error as err:
            raise QemuError(f"cannot connect to NBD export {export}: {err.string}", hint="see QEMU's message") from None
        return h

    def reader(self, path: str | os.PathLike[str], *, backing: bool = True, backing_node: str | None = None,
               bitmaps: Iterable[str] = (), meta_contexts: Iterable[str] = ()) -> Export:
        """Open `path` read-only, export it and connect: the usual way to read an image or its bitmaps.
        `Export.close()` (or leaving its `with`) takes it all down again."""
        node = self.add_image(path, backing=backing, backing_node=backing_node)
        try:
            export = self.export(node, bitmaps=bitmaps)
            try:
                return Export(self, node, export, self.connect(export, meta_contexts=meta_contexts))
            except BaseException:
                self.remove_export(export)
                raise
        except BaseException:
            self.remove_image(node)
            raise

    def block_bitmaps(self, node: str) -> list[dict[str, Any]]:
        """The dirty bitmaps of one node (not of its backing files): `name`, `recording`, `persistent`,
        `inconsistent` (QEMU found the in-use flag: it was not closed cleanly), `granularity`, `count`."""
        for info in self.qmp("query-named-block-nodes", flat=True):
            if info.get("node-name") == node:
                return [{**b, "inconsistent": bool(b.get("inconsistent", False))} for b in info.get("dirty-bitmaps", [])]
        raise QemuError(f"no block node {node}", hint="add the image first")

    def _log_tail(self) -> str:
        if self._dir is None:
            return "no log"
        with contextlib.suppress(OSError):
            lines = (self._dir / "stderr.log").read_text(errors="replace").strip().splitlines()
            if lines:
                return lines[-1]
        return "no message"


class Export:
    """A connected NBD export of one node of a StorageDaemon; `nbd` is the libnbd handle."""

    def __init__(self, daemon: StorageDaemon, node: str, export: str, handle: nbd.NBD) -> None:
        self.daemon, self.node, self.export, self.nbd = daemon, node, export, handle

    def __enter__(self) -> Export:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(nbd.Error):
            self.nbd.shutdown()
        self.daemon.remove_export(self.export)
        self.daemon.remove_image(self.node)


def iter_block_status(h: nbd.NBD, context: str, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int, int]]:
    """(offset, length, flags) covering `[offset, offset + length)` exactly, in order, for one context.

    The server may answer a request with less than was asked (and its last extent may reach past the
    request): ask again from where the answer ended until the range is covered.
    """
    if not h.can_meta_context(context):
        error = ChangeTrackingError if context.startswith("qemu:dirty-bitmap:") else QemuError
        raise error(f"the NBD export does not offer {context}", hint="export it and ask for it before connecting")
    end = h.get_size() if length is None else offset + length
    pos = offset
    while pos < end:
        answer: list[int] = []

        def extent(ctx: str, _offset: int, entries: list[int], _err: Any) -> int:
            if ctx == context:
                answer.extend(entries)
            return 0

        h.block_status(min(end - pos, MAX_STATUS_LENGTH), pos, extent)
        if not answer:
            raise QemuError(f"the NBD server gave no {context} status at offset {pos}", hint="see QEMU's log")
        for i in range(0, len(answer), 2):
            n, flags = min(answer[i], end - pos), answer[i + 1]
            if n <= 0:
                break
            yield pos, n, flags
            pos += n


def dirty_extents(h: nbd.NBD, bitmap: str, offset: int = 0, length: int | None = None) -> list[Extent]:
    """The ranges set in an exported dirty bitmap, coalesced (all with `zero=False`)."""
    status = iter_block_status(h, dirty_bitmap_context(bitmap), offset, length)
    return union(Extent(pos, n) for pos, n, flags in status if flags & STATE_DIRTY)


def allocation_extents(h: nbd.NBD, offset: int = 0, length: int | None = None) -> list[Extent]:
    """The whole range cut by base:allocation, each piece `zero` when it reads as zeros."""
    return union(Extent(pos, n, bool(flags & STATE_ZERO)) for pos, n, flags in iter_block_status(h, ALLOCATION, offset, length))


def pread(h: nbd.NBD, offset: int, length: int) -> bytes:
    """`length` bytes at `offset`, in requests of at most 4 MiB (NBD servers cap request sizes)."""
    if length <= MAX_PIECE:
        return h.pread(length, offset)
    buf = bytearray(length)
    view = memoryview(buf)
    for pos in range(0, length, MAX_PIECE):
        n = min(MAX_PIECE, length - pos)
        view[pos:pos + n] = h.pread(n, offset + pos)
    return bytes(buf)


def _die_with_parent() -> None:
    # Runs in the child before exec: the kernel sends SIGKILL when the starting thread exits.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
