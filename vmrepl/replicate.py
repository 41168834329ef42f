"""The sender's side of a session: plan against what the destination holds, then stream each snapshot.

For each planned step the changed extents of every disk come from the dirty bitmaps (source/changes.py);
the main thread queues NBD reads of them, encodes what arrived in batches (in a small thread pool while
the data compresses: zstd releases the GIL) and writes the finished frames in order, so reading,
compressing and sending overlap and memory stays bounded by the reads and batches in flight.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import nbd

from . import plan as planner
from .catalog import Catalog, Snapshot
from .errors import ChangeTrackingError, ProtocolError, SourceError, TransportError, VmreplError
from .extents import Extent, split, total_length, union
from .qemu.storage_daemon import StorageDaemon, pread
from .source.changes import DiskChanges, disk_changes, full_disk_changes
from .destination import parse_destination
from .transport import Connection, ConnectOptions, Opening
from .wire import (MAX_BLOCKS, BlockDigestReply, BlockDigestRequest, DiskInfo, EncodedData, End, Error, FrameReader,
                   FrameWriter, Hello, Ok, ReceiverHello, SnapshotHeader, VerifyReply, VerifyRequest, block_digest,
                   encode_data)

COMPARE_BLOCK = 1 << 20  # block size of the digest comparison when change tracking cannot help
READS_IN_FLIGHT = 8       # NBD reads queued (4 MiB at most each) ...
BATCH_BYTES = 1 << 20     # ... frames encoded together ...
BATCHES_IN_FLIGHT = 4     # ... and batches encoding: about 64 MiB at most, however large the disk
WORKERS = 2


@dataclass(frozen=True)
class Sent:
    id: str
    name: str
    base: str | None
    bytes_changed: int
    bytes_sent: int
    seconds: float
    position: str
    notes: tuple[str, ...]

    def as_json(self) -> dict:
        return {"id": self.id, "name": self.name, "base": self.base, "bytes_changed": self.bytes_changed,
                "bytes_sent": self.bytes_sent, "seconds": round(self.seconds, 3), "position": self.position}


class Session:
    """One ssh session to `vmrepl receive` for one VM: hello, then transfers or verify requests.

    Connecting and the destination's start-up take most of a small delta's time, so the connection is
    opened in a thread (`Opening`; the caller may start it before anything else) while the caller
    prepares (`prefetch`); the first use of `held` says hello and waits for the destination's answer."""

    def __init__(self, catalog: Catalog, vm_uuid: str, options: ConnectOptions, *,
                 opening: Opening | None = None) -> None:
        self.catalog = catalog
        self.vm_uuid = vm_uuid
        self.vm_name = next(name for uuid, name in catalog.vms() if uuid == vm_uuid)
        self.options = options
        self.conn: Connection | None = None
        self.sent_ids: set[str] = set()
        self._opening = opening
        self._held: ReceiverHello | None = None
        self._prefetched: dict[tuple[str, str, str], DiskChanges] = {}

    def __enter__(self) -> Session:
        if self._opening is None:
            self._opening = Opening(self.options)
        return self

    @property
    def held(self) -> ReceiverHello:
        """What the destination holds of the VM (its answer to the hello)."""
        if self._held is None:
            assert self._opening is not None, "use Session as a context manager"
            self.conn = self._opening.result()
            self.writer = FrameWriter(self.conn.writer)
            self.reader = FrameReader(self.conn.reader, peer="destination")
            # Only snapshots held here can be sent: ghosts older than these need not be listed.
            oldest = min((s.generation for s in self.catalog.snapshots(self.vm_uuid)), default=0)
            self._guard(lambda: self.writer.write(Hello(self.vm_uuid, self.vm_name, since_generation=oldest)))
            self._held = self._guard(lambda: self.reader.expect(ReceiverHello))
        return self._held

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.conn is None:
            return  # never got as far as the hello: the caller is unwinding from an earlier error
        try:
            if exc_type is None:
                self._guard(lambda: self.writer.write(End()))
        finally:
            self.conn.close()

    def _guard(self, action: Callable):  # type: ignore[no-untyped-def]
        """Run a wire action; when the channel breaks, prefer the destination's own ERROR frame."""
        assert self.conn is not None
        try:
            return action()
        except TransportError as err:
            raise self._remote_error() or err from None
        except OSError as err:
            raise self.conn.failure("sending") from err

    def _remote_error(self) -> VmreplError | None:
        """The failure the destination reported in an ERROR frame before the channel broke, if any.
        Only after a transport failure: the channel is closing, so this read cannot wait forever."""
        try:
            message = self.reader.read()
        except Exception:  # noqa: BLE001 - no frame (a plain drop): the transport failure says more
            return None
        return message.exception(self.reader.peer) if isinstance(message, Error) else None

    # --- planning ------------------------------------------------------------------------------

    def plan(self, *, want: list[str] | None, latest_first: bool) -> list[planner.Step]:
        own = self.catalog.snapshots(self.vm_uuid, ghosts=True)
        ancestors = self._ancestors(own)
        # A ghost (pruned here) can no longer be sent, but is still a base while it stands on a layer.
        lineage = [planner.SourceSnapshot(id=s.id, parent=s.parent, created_ns=s.created_ns, generation=s.generation,
                                          vm=s.vm_uuid, name=s.name, on_source=s.held, tracked=bool(s.disks))
                   for s in ancestors + own]
        held = list(self.held.snapshots)
        ancestor_ids = {s.id for s in ancestors}
        for vm_uuid in {s.vm_uuid for s in ancestors}:  # a clone: what the destination holds of its origin
            with Session(self.catalog, vm_uuid, self.options) as other:
                # Only the snapshots this VM descends from: the origin's later ones are another sequence,
                # which a send of this VM neither inserts into nor rebases.
                held += [h for h in other.held.snapshots if h.id in ancestor_ids]
        return planner.plan(lineage, [planner.HeldSnapshot(id=h.id, created_ns=h.created_ns, generation=h.generation,
                                                           name=self._name(h.id), parent=h.parent) for h in held],
                            want=want, latest_first=latest_first, pruned=set(self.held.pruned))

    def _ancestors(self, own: list[Snapshot]) -> list[Snapshot]:
        """The snapshots of other VMs this VM descends from (it is a clone, or recovered under a new name)."""
        ids = {s.id for s in own}
        chain: list[Snapshot] = []
        parent = next((s.parent for s in own if s.parent and s.parent not in ids), None)
        while parent and (snap := self.catalog.find_snapshot(parent)) is not None:
            chain.insert(0, snap)
            parent = snap.parent
        return chain

    def _name(self, snapshot_id: str) -> str:
        snap = self.catalog.find_snapshot(snapshot_id)
        return snap.name if snap else ""

    # --- sending -------------------------------------------------------------------------------

    def send(self, step: planner.Step, daemon: StorageDaemon, pool: ThreadPoolExecutor) -> Sent:
        started = time.monotonic()
        snap = self.catalog.find_snapshot(step.snapshot)
        base = self.catalog.find_snapshot(step.base) if step.base else None
        assert snap is not None
        partial = self.held.partial
        resume = dict(partial.disks) if partial and partial.snapshot == snap.id and partial.base == step.base else {}
        sent_before = self.writer.bytes_written  # a block-digest exchange below counts too
        changes = [self._changes(daemon, base, snap, d.target) for d in snap.disks]
        header = SnapshotHeader(id=snap.id, name=snap.name, parent=snap.parent, base=step.base,
                                created_ns=snap.created_ns, generation=snap.generation, definition=snap.definition,
                                disks=tuple(DiskInfo(c.target, c.virtual_size, 65536) for c in changes),
                                resume={t: o for t, o in resume.items() if o > 0})
        todo = sum(total_length(_after(c.extents, header.resume.get(c.target, 0)), zero=False) for c in changes)
        with _progress_bar(todo, snap.name) as bar:
            self._guard(lambda: self.writer.write(header))
            for c in changes:
                self._guard(lambda c=c: self._stream_disk(daemon, pool, c, header.resume.get(c.target, 0), bar))
            self._guard(self.writer.trailer)
        ok = self._guard(lambda: self.reader.expect(Ok))
        if ok.snapshot != snap.id:
            raise ProtocolError(f"the destination confirmed snapshot {ok.snapshot}, not {snap.id} it was sent",
                                hint="the destination is not a compatible vmrepl receiver; check its version "
                                     "and --remote-command")
        self._held = ReceiverHello(snapshots=self.held.snapshots, partial=None, pruned=self.held.pruned)
        self.sent_ids.add(snap.id)
        return Sent(id=snap.id, name=snap.name, base=step.base, bytes_changed=sum(c.bytes_changed for c in changes),
                    bytes_sent=self.writer.bytes_written - sent_before, seconds=time.monotonic() - started,
                    position=step.position, notes=tuple(n for c in changes for n in c.fallbacks))

    def prefetch(self, daemon: StorageDaemon) -> None:
        """While the destination starts: find the changed extents of the step most likely planned, the
        newest snapshot on the anchor this destination held last time. A wrong guess costs only this."""
        target = next((t for t in self.catalog.targets(self.vm_uuid)
                       if t.host == str(parse_destination(self.options.destination))), None)
        own = self.catalog.snapshots(self.vm_uuid)
        base = self.catalog.find_snapshot(target.anchor) if target and target.anchor else None
        if base is None or not own or own[-1].id == base.id:
            return
        for disk in own[-1].disks:
            with contextlib.suppress(VmreplError):  # the step itself meets the error again, or not
                self._prefetched[(base.id, own[-1].id, disk.target)] = disk_changes(
                    self.catalog, daemon, base, own[-1], disk.target)

    def estimate(self, step: planner.Step, daemon: StorageDaemon) -> tuple[int, bool]:
        """What `send(step)` would count as changed, from change tracking alone (no data is read), and
        whether tracking could tell: if not, all the data the snapshot holds, of which the digest
        comparison at send time keeps only what differs."""
        snap = self.catalog.find_snapshot(step.snapshot)
        base = self.catalog.find_snapshot(step.base) if step.base else None
        assert snap is not None
        found = [self._tracked_changes(daemon, base, snap, d.target) for d in snap.disks]
        return sum(c.bytes_changed for c, _ in found), all(tracked for _, tracked in found)

    def _changes(self, daemon: StorageDaemon, base: Snapshot | None, snap: Snapshot, target: str) -> DiskChanges:
        changes, tracked = self._tracked_changes(daemon, base, snap, target)
        return changes if tracked or base is None else self._differing_blocks(daemon, base, changes)

    def _tracked_changes(self, daemon: StorageDaemon, base: Snapshot | None, snap: Snapshot,
                         target: str) -> tuple[DiskChanges, bool]:
        """The changes since `base` as tracking gives them; (all the data `snap` holds, False) when
        tracking cannot tell."""
        if base and (found := self._prefetched.pop((base.id, snap.id, target), None)):
            return found, True
        try:
            return disk_changes(self.catalog, daemon, base, snap, target), True
        except ChangeTrackingError as err:
            return full_disk_changes(daemon, snap, target, reason=str(err)), base is None

    def _differing_blocks(self, daemon: StorageDaemon, base: Snapshot, full: DiskChanges) -> DiskChanges:
        """Tracking cannot say what changed since `base` (invariant 7): compare digests of the blocks that
        hold data with what the destination reads for `base`, and keep only the blocks that differ."""
        bs = COMPARE_BLOCK
        data = [e for e in full.extents if not e.zero]
        blocks = sorted({i for e in data for i in range(e.offset // bs, (e.end - 1) // bs + 1)})
        theirs: list[str | None] = []
        for at in range(0, len(blocks), MAX_BLOCKS):  # one exchange per frame-sized batch
            batch = tuple(blocks[at:at + MAX_BLOCKS])
            self._guard(lambda: self.writer.write(BlockDigestRequest(base.id, full.target, bs, batch)))
            reply = self._guard(lambda: self.reader.expect(BlockDigestReply)).digests
            if len(reply) != len(batch):
                raise ProtocolError(f"the destination sent {len(reply)} block digests for {len(batch)} blocks")
            theirs += reply
        with daemon.reader(full.image) as export:
            differing = {i for i, digest in zip(blocks, theirs) if digest is None or digest != block_digest(
                pread(export.nbd, i * bs, min(bs, full.virtual_size - i * bs)))}
        kept = [piece for piece in _by_block(data, bs) if piece.offset // bs in differing]
        note = f"compared {len(blocks)} blocks of {full.target} with the destination's {base.name}: " \
               f"sending the {len(differing)} that differ"
        return DiskChanges(target=full.target, image=full.image, virtual_size=full.virtual_size,
                           base_image=None, extents=union(kept, [e for e in full.extents if e.zero]),
                           fallbacks=[*full.fallbacks, note])

    def _stream_disk(self, daemon: StorageDaemon, pool: ThreadPoolExecutor, changes: DiskChanges, start: int,
                     bar: ProgressBar) -> None:
        # Two stages, each bounded: extents being read (NBD reads queued on one connection, which
        # the daemon serves far cheaper than one at a time), then batches of about BATCH_BYTES being
        # encoded. zstd gives up on incompressible data within 10 us per 64 KiB, less than handing
        # it to a worker costs: after a batch that did not compress, the next is encoded here; after
        # one that did, the pool compresses batches in parallel (zstd releases the GIL).
        reads: deque[tuple[Extent, bytearray, int]] = deque()
        batch: list[tuple[int, bytearray]] = []
        batch_bytes = 0
        encodes: deque[Future[list[EncodedData]]] = deque()
        compressing = True

        def write(keep: int) -> None:
            nonlocal compressing
            while len(encodes) > keep:
                frames = encodes.popleft().result()
                for frame in frames:
                    self.writer.write_encoded(frame)
                    bar.update(frame.length)
                compressing = any(len(f.payload) < f.length for f in frames)

        def seal() -> None:
            nonlocal batch_bytes
            if not batch:
                return
            if compressing:
                encodes.append(pool.submit(_encode_all, list(batch)))
            else:
                encodes.append(Future())
                encodes[-1].set_result(_encode_all(batch))
            batch.clear()
            batch_bytes = 0
            write(BATCHES_IN_FLIGHT)

        def encode(keep: int) -> None:
            nonlocal batch_bytes
            while len(reads) > keep:
                piece, buf, cookie = reads.popleft()
                while not h.aio_command_completed(cookie):
                    h.poll(-1)
                batch.append((piece.offset, buf))
                batch_bytes += len(buf)
                if batch_bytes >= BATCH_BYTES:
                    seal()

        def finish() -> None:
            """Everything read so far goes out, in offset order."""
            encode(0)
            seal()
            write(0)

        with daemon.reader(changes.image) as export:
            h = export.nbd
            try:
                for extent in _after(changes.extents, start):
                    if extent.zero:  # one frame, whatever its size (docs/FORMAT.md)
                        finish()
                        self.writer.zero(extent.offset, extent.length)
                        continue
                    for piece in split([extent]):
                        buf = bytearray(piece.length)
                        reads.append((piece, buf, h.aio_pread(buf, piece.offset)))
                        encode(READS_IN_FLIGHT)
                finish()
            except nbd.Error as err:
                raise SourceError(f"reading {changes.image} failed: {err.string}",
                                  hint="see qemu-storage-daemon's message") from None
            finally:
                for future in encodes:
                    future.cancel()
                for future in encodes:
                    if not future.cancelled():
                        future.exception()
                for _, _, cookie in reads:  # the export goes next: let queued reads land first
                    with contextlib.suppress(nbd.Error):
                        while not h.aio_command_completed(cookie):
                            h.poll(-1)
        self.writer.end_disk()

    # --- verify --------------------------------------------------------------------------------

    def remote_digests(self, snapshot_ids: list[str]) -> dict[str, dict[str, str] | None]:
        self._guard(lambda: self.writer.write(VerifyRequest(tuple(snapshot_ids))))
        reply: VerifyReply = self._guard(lambda: self.reader.expect(VerifyReply))
        return reply.digests


def _encode_all(batch: list[tuple[int, bytearray]]) -> list[EncodedData]:
    return [encode_data(offset, data) for offset, data in batch]


class ProgressBar(Protocol):
    def update(self, n: int) -> None: ...


class _NoBar:
    def update(self, n: int) -> None:
        pass


def _progress_bar(total: int, name: str) -> AbstractContextManager[ProgressBar]:
    """A progress bar on a terminal; tqdm is imported only then (it costs 20 ms of start-up)."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext(_NoBar())
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc=name, leave=False)


def _by_block(extents: list[Extent], block: int) -> Iterator[Extent]:
    """The extents cut at every multiple of `block`, so that each piece lies in one block."""
    for e in extents:
        pos = e.offset
        while pos < e.end:
            end = min(e.end, (pos // block + 1) * block)
            yield Extent(pos, end - pos, e.zero)
            pos = end


def _after(extents: list[Extent], start: int) -> Iterator[Extent]:
    """The parts of `extents` at or after `start` (a resumed disk)."""
    for e in extents:
        if e.end <= start:
            continue
        if e.offset < start:
            yield Extent(start, e.end - start, e.zero)
        else:
            yield e
