"""`vmrepl receive`: the destination's end of a session, speaking the stream on stdin/stdout.

It answers the sender's hello with what it holds of the VM (and a resumable partial transfer), then
stores each snapshot as one new layer per disk, backed by the base snapshot's layer of that disk,
keeping only the clusters that differ from what the base reads (sink/chain.py, DeltaFilter), and
commits it (sink/store.py gives the order). A snapshot older than one held here is then grafted in
below it (sink/chain.py); an insertion a crash interrupted is finished when the next session opens.
Progress is made durable every PROGRESS_BYTES, so a dropped transfer resumes from there. Anything
that is not the protocol ends the session with one ERROR frame; nothing half-received is ever visible.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import select
import stat
import time
from collections import deque
from pathlib import Path
from typing import BinaryIO

from ..catalog import Catalog, Layer, Snapshot
from ..digest import image_digest
from ..errors import NoSpaceError, ProtocolError, SinkError, TransportError, VmreplError
from ..qemu import img
from ..qemu.storage_daemon import StorageDaemon, pread
from ..state import fsync_dir, vm_lock
from ..wire import (BlockDigestReply, BlockDigestRequest, Data, DiskEnd, End, Error, FrameReader, FrameWriter,
                    HeldSnapshot, Hello, Ok, Partial, ReceiverHello, SnapshotHeader, Trailer, VerifyReply,
                    VerifyRequest, Zero, block_digest)
from . import chain
from .layer import LayerWriter, is_sound, partial_path
from .store import Progress, Store

PROGRESS_BYTES = 256 << 20   # a resume point (flush + progress file) every this many bytes received
PROGRESS_SECONDS = 10.0      # ... or this often, whichever comes first
READ_AHEAD_FRAMES = 16      # DATA frames whose base is read ahead ...
READ_AHEAD_BYTES = 16 << 20  # ... while they hold at most this much
PIPE_BYTES = 1 << 20         # stdin's pipe buffer (Linux allows up to /proc/sys/fs/pipe-max-size)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
IDLE_SECONDS = float(os.environ.get("VMREPL_RECEIVE_IDLE_SECONDS", 900))  # silence that ends a session
# How long a linked clone's snapshot waits for its origin VM's lock (held by a prune or a session of the
# origin) before the session fails; the sender waits meanwhile.
ORIGIN_LOCK_SECONDS = float(os.environ.get("VMREPL_ORIGIN_LOCK_SECONDS", 600))


class _IdleLimitedInput(io.RawIOBase):
    """stdin that gives up when the sender sends nothing for IDLE_SECONDS: a peer that vanished without
    closing the connection must not hold the VM's lock (and the partial transfer) forever."""

    def __init__(self, stream: BinaryIO) -> None:
        self.fd = stream.fileno()
        # sshd feeds the stream through a pipe of 64 KiB: widened, each read takes up to 1 MiB and
        # the two processes wake each other 16 times less often.
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.fstat(self.fd).st_mode):
                fcntl.fcntl(self.fd, F_SETPIPE_SZ, PIPE_BYTES)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        ready, _, _ = select.select([self.fd], [], [], IDLE_SECONDS)
        if not ready:
            raise TransportError(f"the sender sent nothing for {IDLE_SECONDS:.0f} s; giving up",
                                 hint="run replicate again: it resumes what arrived")
        return os.readv(self.fd, [buffer])


def serve(stdin: BinaryIO, stdout: BinaryIO, state_dir: Path) -> None:
    """Run one session; a failure is sent to the sender as an ERROR frame, then raised."""
    reader = FrameReader(io.BufferedReader(_IdleLimitedInput(stdin), 1 << 20), peer="sender")
    writer = FrameWriter(stdout)
    try:
        hello = reader.expect(Hello)
        with Catalog(state_dir) as catalog, vm_lock(state_dir, hello.vm_uuid), StorageDaemon() as daemon:
            _Session(reader, writer, Store(state_dir, catalog), daemon, hello).run()
    except Exception as err:  # noqa: BLE001 - whatever it is, the sender is told in one line
        failure = err if isinstance(err, VmreplError) else _as_vmrepl_error(err)
        try:
            writer.write(Error.from_exception(failure))
        except (OSError, VmreplError):
            pass  # the sender is gone; our own exit status and stderr still tell
        if failure is err:
            raise
        raise failure from err


def _as_vmrepl_error(err: Exception) -> VmreplError:
    """A failure outside vmrepl's own errors, as the sender (and the receiver's own exit) reports it."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return NoSpaceError(f"cannot write {err.filename or 'the state dir'}: {err.strerror}",
                            hint="free space on the destination, then retry")
    return VmreplError(f"internal error: {type(err).__name__}: {err}",
                       hint="rerun the receiver with --debug (or VMREPL_DEBUG=1) for a traceback")


class _Session:
    def __init__(self, reader: FrameReader, writer: FrameWriter, store: Store, daemon: StorageDaemon,
                 hello: Hello) -> None:
        self.reader, self.writer, self.store, self.daemon = reader, writer, store, daemon
        self.vm_uuid, self.vm_name, self.since_generation = hello.vm_uuid, hello.vm_name, hello.since_generation
        self.reported: Partial | None = None  # the resumable transfer this session's hello told the sender of

    def run(self) -> None:
        chain.finish_insertions_or_warn(self.store, self.daemon, self.vm_uuid)
        held = self.store.held(self.vm_uuid)
        self.reported = self._partial()
        self.writer.write(ReceiverHello(
            snapshots=tuple(HeldSnapshot(s.id, s.parent, s.created_ns, s.generation) for s in held),
            partial=self.reported, pruned=self.store.pruned(self.vm_uuid, since_generation=self.since_generation)))
        while True:
            message = self.reader.read()
            if isinstance(message, SnapshotHeader):
                self._receive(message)
                self.writer.write(Ok(message.id))
            elif isinstance(message, VerifyRequest):
                self.writer.write(VerifyReply({sid: self._digests(sid) for sid in message.snapshots}))
            elif isinstance(message, BlockDigestRequest):
                self.writer.write(BlockDigestReply(self._block_digests(message)))
            elif isinstance(message, End):
                return
            elif isinstance(message, Error):
                raise message.exception("sender")
            else:
                raise ProtocolError(f"stream corrupt: unexpected {type(message).__name__} frame between snapshots")

    def _partial(self) -> Partial | None:
        """The interrupted transfer, with each disk whose layer is already complete reported as done."""
        progress = self.store.partial(self.vm_uuid)
        return None if progress is None else Partial(progress.snapshot_id, progress.base_id, self._durable(progress))

    def _durable(self, progress: Progress) -> dict[str, int]:
        """Per disk, the offset below which this transfer is stored: what the hello reports, and so the
        most a resuming sender may skip."""
        offsets = dict(progress.offsets)
        for target in list(offsets):
            final = self.store.layer_path(self.vm_uuid, target, progress.snapshot_id)
            if final.exists():
                offsets[target] = img.info(final)["virtual-size"]
            elif not partial_path(final).exists():
                offsets[target] = 0
            elif not is_sound(partial_path(final)):
                # unusable (a disk error, a crash of the storage itself): resending that disk beats
                # refusing every resume until someone deletes it by hand
                partial_path(final).unlink()
                fsync_dir(final.parent)
                offsets[target] = 0
        return offsets

    def _receive(self, header: SnapshotHeader) -> None:
        known = self.store.catalog.find_snapshot(header.id)
        if known is not None and known.held:
            self._discard(header)  # a second copy (e.g. two senders raced): a no-op, still checked
            return
        with contextlib.ExitStack() as origin_lock:
            self._receive_on(header, self._base(header, origin_lock))

    def _base(self, header: SnapshotHeader, origin_lock: contextlib.ExitStack) -> Snapshot | None:
        """The held snapshot the new layers stand on. A linked clone's is its origin VM's: that VM's lock is
        taken too (into `origin_lock`, held to the commit), so that a prune of the origin cannot remove
        the base while layers are being written on it."""
        if not header.base:
            return None
        base = self.store.catalog.find_snapshot(header.base)
        if base is not None and base.vm_uuid != self.vm_uuid:
            origin_lock.enter_context(vm_lock(self.store.state_dir, base.vm_uuid, wait_seconds=ORIGIN_LOCK_SECONDS,
                                              which=f"VM {base.vm_name}, the origin of this clone"))
            base = self.store.catalog.find_snapshot(header.base)  # pruned before the lock was ours?
        if base is None or not base.held:  # a ghost has no layer of its own to stand on
            raise SinkError(f"base snapshot {header.base} of {header.name} is not held here",
                            hint="replicate again: the sender will choose another base")
        return base

    def _receive_on(self, header: SnapshotHeader, base: Snapshot | None) -> None:
        progress = self.store.partial(self.vm_uuid)
        resuming = bool(header.resume)
        if progress and (not resuming or progress.snapshot_id != header.id or progress.base_id != header.base):
            self.store.drop_partial(self.vm_uuid, progress.snapshot_id)
            progress = None
        if resuming and progress is None:
            raise ProtocolError(f"the sender resumes {header.name}, but no partial transfer of it is here")
        reported = self.reported
        durable = reported.disks if progress and reported and reported.snapshot == header.id else {}
        for disk in header.disks:
            # The digests cover only this stream: a start past what is stored here would leave a gap
            # that reads the base, committed as if it were the snapshot. A complete layer is kept whole
            # or written again from 0.
            start, stored = header.resume.get(disk.target, 0), durable.get(disk.target, 0)
            complete = self.store.layer_path(self.vm_uuid, disk.target, header.id).exists()
            if start > stored or (complete and start and not start == stored == disk.virtual_size):
                raise ProtocolError(f"the sender resumes disk {disk.target} of {header.name} at offset {start}, "
                                    f"but this transfer is stored here up to {stored}",
                                    hint="replicate again: the sender resumes from what the destination reports")
        offsets = {disk.target: header.resume.get(disk.target, 0) for disk in header.disks}
        if progress is None or offsets != progress.offsets:
            # Before the first partial layer exists, so that a transfer that stops at any point is found
            # (and resumed or dropped) by the next session; and a disk that restarts below its old resume
            # point must not be claimed as stored further.
            self._save_progress(header, offsets)
        layers = []
        for disk in header.disks:
            final = self.store.layer_path(self.vm_uuid, disk.target, header.id)
            backing = Path(base.disk(disk.target).image) if base and disk.target in {d.target for d in base.disks} \
                else None
            start = header.resume.get(disk.target, 0)
            if final.exists() and start < disk.virtual_size:
                final.unlink()  # a complete layer of an uncommitted earlier attempt: no row names it
            if final.exists():
                self._skip_disk(disk.target)
            else:
                resume = start > 0 and partial_path(final).exists()
                with contextlib.ExitStack() as stack:
                    # The base chain is opened once: to compare against, and as the new layer's backing.
                    base_reader = stack.enter_context(self.daemon.reader(backing)) if backing else None
                    node = base_reader.node if base_reader else None
                    writer = stack.enter_context(
                        LayerWriter.resume(final, daemon=self.daemon, backing_node=node) if resume else
                        LayerWriter(final, backing=backing, virtual_size=disk.virtual_size, daemon=self.daemon,
                                    keep_partial=True, backing_node=node))
                    delta = chain.DeltaFilter(base_reader.nbd) if base_reader else None
                    self._receive_disk(header, disk.target, writer, delta, offsets)
                    writer.commit()
                offsets[disk.target] = disk.virtual_size
                self._save_progress(header, offsets)
            layers.append(Layer(disk.target, str(final), disk.virtual_size, tracking="clusters"))
        self.reader.expect(Trailer)  # the reader checks the whole-stream digest
        snap = Snapshot(id=header.id, vm_uuid=self.vm_uuid, vm_name=self.vm_name, name=header.name,
                        parent=header.parent, created_ns=header.created_ns, generation=header.generation,
                        origin="received", disks=tuple(layers), definition=header.definition)
        upper = chain.successor(self.store.held(self.vm_uuid), snap)
        self.store.commit(snap, insert_below=upper.id if upper and chain.rebase_pairs(upper, snap) else None)
        chain.finish_insertions_or_warn(self.store, self.daemon, self.vm_uuid)

    def _save_progress(self, header: SnapshotHeader, offsets: dict[str, int]) -> None:
        self.store.save_progress(self.vm_uuid, Progress(header.id, header.base, offsets, vm_name=self.vm_name))

    def _receive_disk(self, header: SnapshotHeader, target: str, writer: LayerWriter,
                      delta: chain.DeltaFilter | None, offsets: dict[str, int]) -> None:
        # DATA frames wait in `window` while the base under them is read ahead (DeltaFilter.below).
        window: deque[tuple[Data, chain.Below | None]] = deque()
        window_bytes = 0

        def store(frames: int = 0, limit: int = 0) -> None:
            """Store the oldest frames until at most `frames` holding at most `limit` bytes wait."""
            nonlocal window_bytes
            while window and (len(window) > frames or window_bytes > limit):
                frame, below = window.popleft()
                window_bytes -= len(frame.data)
                pieces = delta.changed(frame.offset, frame.data, below) if delta and below else \
                    [(frame.offset, frame.data)]
                for offset, piece in pieces:
                    chain.store_piece(writer, offset, piece)

        unsaved, last_save = 0, time.monotonic()
        while True:
            frame = self.reader.read()
            if isinstance(frame, Data):
                window.append((frame, delta.below(frame.offset, len(frame.data)) if delta else None))
                window_bytes += len(frame.data)
                if delta:
                    store(READ_AHEAD_FRAMES, READ_AHEAD_BYTES)
                else:
                    store()  # nothing to read ahead: a whole disk goes straight to the layer
                unsaved += len(frame.data)
                end = frame.offset + len(frame.data)
            elif isinstance(frame, Zero):
                store()
                writer.write_zeroes(frame.offset, frame.length)
                end = frame.offset + frame.length
            elif isinstance(frame, DiskEnd):
                store()
                return
            elif isinstance(frame, Error):
                raise frame.exception("sender")
            else:
                raise ProtocolError(f"stream corrupt: unexpected {type(frame).__name__} frame in disk {target}")
            if unsaved >= PROGRESS_BYTES or time.monotonic() - last_save >= PROGRESS_SECONDS:
                store()
                writer.flush()
                offsets[target] = end
                self._save_progress(header, offsets)
                unsaved, last_save = 0, time.monotonic()

    def _discard(self, header: SnapshotHeader) -> None:
        """Read a snapshot's stream to its trailer (the reader still checks every checksum) and drop it."""
        for disk in header.disks:
            while not isinstance(frame := self.reader.read(), DiskEnd):
                if isinstance(frame, Error):
                    raise frame.exception("sender")
                if not isinstance(frame, (Data, Zero)):
                    raise ProtocolError(f"stream corrupt: unexpected {type(frame).__name__} frame in disk {disk.target}")
        self.reader.expect(Trailer)

    def _skip_disk(self, target: str) -> None:
        frame = self.reader.read()
        if not isinstance(frame, DiskEnd):
            raise ProtocolError(f"stream corrupt: data sent for disk {target}, which arrived complete before")

    def _block_digests(self, request: BlockDigestRequest) -> tuple[str | None, ...]:
        """Digests of blocks of a held snapshot's disk, read through its chain; None past its end or when
        it is not held here (the sender then sends those blocks)."""
        snap = self.store.catalog.find_snapshot(request.snapshot)
        layer = next((d for d in snap.disks if d.target == request.disk), None) if snap and snap.held else None
        if layer is None:
            return (None,) * len(request.blocks)
        size, bs = layer.virtual_size, request.block_size
        with self.daemon.reader(layer.image) as export:
            return tuple(block_digest(pread(export.nbd, i * bs, min(bs, size - i * bs))) if i * bs < size else None
                         for i in request.blocks)

    def _digests(self, snapshot_id: str) -> dict[str, str] | None:
        snap = self.store.catalog.find_snapshot(snapshot_id)
        if snap is None or not snap.held:  # a ghost's layer rows name the layer it stands on, not its own
            return None
        return {layer.target: image_digest(layer.image, daemon=self.daemon) for layer in snap.disks}
