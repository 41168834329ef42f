"""Late snapshots grafted into the middle of the destination's chains, on real qcow2 files and the real
`vmrepl receive`: content equal to the source after every step, chains linear, storage as in order,
and a crash at each step of an insertion leaves readable chains that the next session finishes."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmrepl.extents import Extent, total_length
from vmrepl.qemu import img
from vmrepl.qemu.storage_daemon import StorageDaemon
from vmrepl.sink.chain import backing_of, differing_runs, own_clusters, rebuild_onto
from vmrepl.state import CRASH_ENV
from testbed import VMREPL
from testbed.chains import SIZE, Source, Write, bases_for

MiB = 1 << 20
CLUSTER = 65536
def receive(dst: Path, stream: bytes, *, crash_at: str | None = None) -> subprocess.CompletedProcess:
    """One session of the real `vmrepl receive`; `crash_at` kills it (SIGKILL) at that step."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMREPL_")} | ({CRASH_ENV: crash_at} if crash_at else {})
    return subprocess.run([str(VMREPL), "receive", "--state-dir", str(dst)], input=stream, capture_output=True,
                          env=env, timeout=120)


def layer(dst: Path, src: Source, target: str, k: int) -> Path:
    return dst / "vms" / src.vm_uuid / "disks" / target / f"s{k}.qcow2"


def held(dst: Path, src: Source) -> list[int]:
    """The snapshots the destination's catalog holds (numbers k of ids `sK`)."""
    db = sqlite3.connect(dst / "catalog.sqlite")
    try:
        return sorted(int(r[0][1:]) for r in db.execute("SELECT id FROM snapshots WHERE vm_uuid = ? AND held",
                                                        (src.vm_uuid,)))
    finally:
        db.close()


def assert_destination_sound(dst: Path, src: Source, *, linear: bool = True) -> None:
    """Every held snapshot reads as its source, at its size, every layer checks clean, and (linear) each
    layer is backed by the layer of the next older held snapshot."""
    ks = held(dst, src)
    for target in src.disks:
        for i, k in enumerate(ks):
            path = layer(dst, src, target, k)
            assert img.compare(src.image(target, k), path), f"{target} of snapshot {k} differs from its source"
            # compare reads a missing tail as zeros: a layer of the wrong size would still pass it
            assert img.info(path)["virtual-size"] == img.info(src.image(target, k))["virtual-size"], \
                f"{target} of snapshot {k} has another size than its source"
            report = img.check(path)
            assert not (report.get("corruptions") or report.get("leaks") or report.get("check-errors")), report
            if linear:
                assert backing_of(path) == (layer(dst, src, target, ks[i - 1]) if i else None), \
                    f"{target} of {k} is not backed by its predecessor"
    assert not list((dst / "vms" / src.vm_uuid).glob("inserting/*.json")), "an insertion was left unfinished"
    assert not list((dst / "vms" / src.vm_uuid).glob("disks/*/.*")), "a hidden temporary file was left behind"


def stored_bytes(dst: Path, src: Source) -> int:
    """Data clusters held by all layers of the destination (zero clusters cost no data)."""
    return sum(total_length(own_clusters(layer(dst, src, t, k)), zero=False) for t in src.disks for k in held(dst, src))


def random_writes(rng: random.Random, n: int) -> list[Write]:
    out: list[Write] = []
    for _ in range(n):
        offset = rng.randrange(0, SIZE - 4096, 512)
        length = min(rng.choice([4096, 65536, 300_000, MiB]), SIZE - offset)
        out.append((offset, length, None if rng.random() < 0.2 else rng.randrange(1, 256)))
    return out


@pytest.fixture
def source(work_dir: Path) -> Source:
    src = Source(work_dir / "src")
    src.root.mkdir()
    rng = random.Random(7)
    for _ in range(4):
        src.snapshot({"vda": random_writes(rng, 6)})
    return src


def test_late_snapshot_is_inserted_between_two_held(work_dir: Path, source: Source, daemon: StorageDaemon) -> None:
    dst, ordered = work_dir / "dst", work_dir / "ordered"
    assert receive(ordered, source.stream(bases_for([1, 2, 3, 4]), daemon)).returncode == 0
    steps = bases_for([1, 2, 4])
    assert receive(dst, source.stream(steps, daemon)).returncode == 0
    assert_destination_sound(dst, source)
    layer4 = layer(dst, source, "vda", 4).stat().st_ino
    proc = receive(dst, source.stream([(3, 2)], daemon))
    assert proc.returncode == 0, proc.stderr
    assert held(dst, source) == [1, 2, 3, 4]
    assert layer(dst, source, "vda", 4).stat().st_ino != layer4, "snapshot 4's layer was not rebuilt"
    assert_destination_sound(dst, source)
    assert stored_bytes(dst, source) <= 1.05 * stored_bytes(ordered, source)


def test_receiving_a_snapshot_twice_is_a_no_op(work_dir: Path, source: Source, daemon: StorageDaemon) -> None:
    dst = work_dir / "dst"
    assert receive(dst, source.stream(bases_for([1, 2]), daemon)).returncode == 0
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (dst / "vms").rglob("*.qcow2")}
    again = receive(dst, source.stream([(2, 1)], daemon))  # e.g. two senders raced
    assert again.returncode == 0, again.stderr
    assert held(dst, source) == [1, 2]
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (dst / "vms").rglob("*.qcow2")} == before
    assert_destination_sound(dst, source)


def test_latest_first_then_backfill(work_dir: Path, source: Source, daemon: StorageDaemon) -> None:
    dst, ordered = work_dir / "dst", work_dir / "ordered"
    assert receive(ordered, source.stream(bases_for([1, 2, 3, 4]), daemon)).returncode == 0
    for step in bases_for([4, 1, 2, 3]):  # one session per arrival, checked after each
        proc = receive(dst, source.stream([step], daemon))
        assert proc.returncode == 0, proc.stderr
        assert_destination_sound(dst, source)
    assert stored_bytes(dst, source) <= 1.05 * stored_bytes(ordered, source)


def test_unchanged_rewrites_are_not_stored(work_dir: Path, daemon: StorageDaemon) -> None:
    """Item 3: a delta that rewrites clusters with the bytes they had stores none of them."""
    src = Source(work_dir / "src")
    src.root.mkdir()
    src.snapshot({"vda": [(0, 4 * MiB, 0x11)]})
    src.snapshot({"vda": [(0, 4 * MiB, 0x11), (2 * MiB, CLUSTER, 0x22)]})  # 4 MiB written, one cluster changed
    dst = work_dir / "dst"
    assert receive(dst, src.stream(bases_for([1, 2]), daemon)).returncode == 0
    assert_destination_sound(dst, src)
    assert own_clusters(layer(dst, src, "vda", 2)) == [Extent(2 * MiB, CLUSTER)]


def test_rebuild_cost_follows_the_layers_not_the_chain(work_dir: Path, daemon: StorageDaemon) -> None:
    """Below the two layers lies a chain of 12; the rebuild reads only the two layers' own clusters."""
    d = work_dir / "chain"
    d.mkdir()
    below = None
    for k in range(12):
        path = d / f"l{k}.qcow2"
        img.create(path, size=SIZE, backing=below and below.name)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {k + 1} {k * 512 * 1024} 512k", str(path)],
                       check=True, capture_output=True)
        below = path
    upper, lower = d / "upper.qcow2", d / "lower.qcow2"
    for path, pattern, offset in ((upper, 0x55, 0), (lower, 0x66, 3 * MiB)):
        img.create(path, size=SIZE, backing=below.name)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} 2M", str(path)],
                       check=True, capture_output=True)
    reference = d / "reference.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(upper), str(reference)], check=True)
    rebuilt = rebuild_onto(daemon, upper, lower, SIZE)
    assert (rebuilt.examined, rebuilt.kept) == (4 * MiB, 4 * MiB)
    assert backing_of(upper) == lower
    assert img.compare(reference, upper)
    # Y' keeps its own [0, 2M) and takes over [3M, 5M) from below, where the new layer differs.
    assert own_clusters(upper) == [Extent(0, 2 * MiB), Extent(3 * MiB, 2 * MiB)]


STEPS = ["before-catalog", "after-catalog", "rebuild-written", "rebuild-committed", "rebuild-renamed"]


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_each_step_of_an_insertion(work_dir: Path, daemon: StorageDaemon, step: str) -> None:
    src = Source(work_dir / "src", disks=("vda", "vdb"))
    src.root.mkdir()
    rng = random.Random(step)
    for _ in range(3):
        src.snapshot({t: random_writes(rng, 5) for t in src.disks})
    dst = work_dir / "dst"
    assert receive(dst, src.stream(bases_for([1, 3]), daemon)).returncode == 0
    late = src.stream([(2, 1)], daemon)
    proc = receive(dst, late, crash_at=step)
    assert proc.returncode == -9, f"the receiver did not reach {step}: {proc.stderr!r}"
    # Whatever the step, every catalogued snapshot reads as its source (chains may still be forked).
    for target in src.disks:
        for k in held(dst, src):
            assert img.compare(src.image(target, k), layer(dst, src, target, k)), f"{target} of {k} after {step}"
    # The next session finishes the job: a sender that finds 2 missing sends it again.
    proc = receive(dst, late if 2 not in held(dst, src) else src.stream([], daemon))
    assert proc.returncode == 0, proc.stderr
    assert held(dst, src) == [1, 2, 3]
    assert_destination_sound(dst, src)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(3, 5), data=st.data())
def test_random_arrival_orders(work_dir: Path, daemon: StorageDaemon, seed: int, count: int, data: st.DataObject) -> None:
    root = work_dir / f"case-{seed}-{count}"
    src = Source(root / "src")
    src.root.mkdir(parents=True)
    rng = random.Random(seed)
    for _ in range(count):
        src.snapshot({"vda": random_writes(rng, rng.randrange(1, 8))})
    order = data.draw(st.permutations(range(1, count + 1)))
    dst, ordered = root / "dst", root / "ordered"
    assert receive(ordered, src.stream(bases_for(range(1, count + 1)), daemon)).returncode == 0
    proc = receive(dst, src.stream(bases_for(order), daemon))
    assert proc.returncode == 0, proc.stderr
    assert_destination_sound(dst, src)
    assert stored_bytes(dst, src) <= 1.05 * stored_bytes(ordered, src), f"order {order}"


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(0, 4 * CLUSTER), mine=st.binary(min_size=1, max_size=3 * CLUSTER),
       flips=st.lists(st.integers(0, 3 * CLUSTER - 1), max_size=5), zeroed=st.booleans())
def test_differing_runs_against_a_model(offset: int, mine: bytes, flips: list[int], zeroed: bool) -> None:
    """Applying the runs to `theirs` gives `mine`; runs cover whole clusters that differ, zero runs are zeros."""
    if zeroed:
        mine = bytes(len(mine) // 2) + mine[len(mine) // 2:]
    theirs = bytearray(mine)
    for i in flips:
        if i < len(theirs):
            theirs[i] ^= 0xFF
    result = bytearray(theirs)
    for start, end, zero in differing_runs(offset, mine, bytes(theirs)):
        assert (offset + start) % CLUSTER == 0 or start == 0
        assert (offset + end) % CLUSTER == 0 or end == len(mine)
        assert not zero or mine[start:end] == bytes(end - start)
        for pos in range(start, end):  # every cluster in a run differs: nothing equal is kept
            if pos == start or (offset + pos) % CLUSTER == 0:
                stop = min(end, pos + CLUSTER - (offset + pos) % CLUSTER)
                assert mine[pos:stop] != theirs[pos:stop]
        result[start:end] = mine[start:end]
    assert result == mine
