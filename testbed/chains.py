"""Source snapshots as plain qcow2 chains, and the stream `vmrepl replicate` would send of them: for sink
tests and benchmarks that need many snapshots without a VM (tests/integration/test_insert.py,
bench/insert_cost.py)."""

from __future__ import annotations

import io
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmrepl.extents import Extent, split, union
from vmrepl.qemu import img
from vmrepl.qemu.storage_daemon import StorageDaemon, pread
from vmrepl.sink.chain import own_clusters
from vmrepl.wire import DiskInfo, End, FrameWriter, Hello, SnapshotHeader

MiB = 1 << 20
CLUSTER = 65536
SIZE = 8 * MiB

# A write: (offset, length, pattern byte); pattern None writes zeros.
Write = tuple[int, int, int | None]


@dataclass
class Source:
    """Source snapshots of one VM as plain qcow2 chains: per disk, file k holds round k's writes and is
    backed by file k - 1, so file k reads as snapshot k (numbered from 1)."""

    root: Path
    disks: Sequence[str] = ("vda",)
    vm_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    count: int = 0
    size: int = SIZE

    def image(self, target: str, k: int) -> Path:
        return self.root / f"{target}-{k}.qcow2"

    def snapshot(self, writes: dict[str, list[Write]]) -> int:
        self.count += 1
        k = self.count
        for target in self.disks:
            below = self.image(target, k - 1) if k > 1 else None
            img.create(self.image(target, k), size=self.size, backing=below and below.name)
            commands = [f"write -z {o} {n}" if p is None else f"write -P {p} {o} {n}" for o, n, p in writes.get(target, [])]
            if commands:
                subprocess.run(["qemu-io", "-f", "qcow2", *(a for c in commands for a in ("-c", c)),
                                str(self.image(target, k))], check=True, capture_output=True)
        return k

    def delta(self, target: str, k: int, base: int | None) -> list[Extent]:
        """What changed from `base` to `k`: every cluster the layers in between hold of their own."""
        return union(*(own_clusters(self.image(target, j)) for j in range((base or 0) + 1, k + 1)))

    def stream(self, steps: Sequence[tuple[int, int | None]], daemon: StorageDaemon) -> bytes:
        """One session sending each (snapshot, base) in turn, as `vmrepl replicate` would."""
        out = io.BytesIO()
        w = FrameWriter(out)
        w.write(Hello(self.vm_uuid, "vm"))
        for k, base in steps:
            disks = tuple(DiskInfo(t, img.info(self.image(t, k))["virtual-size"], CLUSTER) for t in self.disks)
            w.write(SnapshotHeader(id=f"s{k}", name=f"snap{k}", parent=f"s{k - 1}" if k > 1 else None,
                                   base=f"s{base}" if base else None, created_ns=1000 * k, generation=k,
                                   definition="<domain/>", disks=disks))
            for target in self.disks:
                with daemon.reader(self.image(target, k)) as r:
                    for piece in split(self.delta(target, k, base)):
                        if piece.zero:
                            w.zero(piece.offset, piece.length)
                        else:
                            w.data(piece.offset, pread(r.nbd, piece.offset, piece.length))
                w.end_disk()
            w.trailer()
        w.write(End())
        return out.getvalue()


def bases_for(order: Sequence[int]) -> list[tuple[int, int | None]]:
    """Each arrival's base as the planner picks it on a linear lineage: the youngest held older one."""
    held: set[int] = set()
    steps = []
    for k in order:
        steps.append((k, max((j for j in held if j < k), default=None)))
        held.add(k)
    return steps
