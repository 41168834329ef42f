"""LayerWriter and the content digest against real qemu-img, qemu-io and qemu-storage-daemon."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import xxhash

from tests.integration.test_qemu import CLUSTER, MiB
from testbed.vm import qemu_io
from vmrepl.digest import image_digest
from vmrepl.errors import NoSpaceError, SinkError
from vmrepl.extents import Extent
from vmrepl.qemu import img
from vmrepl.qemu.storage_daemon import StorageDaemon
from vmrepl.sink.chain import DeltaFilter, store_piece
from vmrepl.sink.layer import LayerWriter, partial_path

SIZE = 32 * MiB

# Three rounds of changes: (offset, length, pattern byte); pattern None writes zeros (write_zeroes).
ROUNDS: list[list[tuple[int, int, int | None]]] = [
    [(0, 1 * MiB, 0x11), (12345, 70000, 0x12), (9 * MiB, 9 * MiB + 7, 0x13), (SIZE - 4096, 4096, 0x14)],
    [(64 * 1024, 128 * 1024, None), (10 * MiB + 100, 1000, 0x21), (12 * MiB, 3 * MiB, None), (30 * MiB, 1 * MiB, 0x22)],
    [(0, 4096, 0x31), (12 * MiB + 512, 1024, 0x32), (9 * MiB, 64 * 1024, None), (20 * MiB, 5 * MiB, 0x33)],
]


def write_round(w: LayerWriter, changes: list[tuple[int, int, int | None]]) -> None:
    for offset, length, pattern in changes:
        if pattern is None:
            w.write_zeroes(offset, length)
        else:
            w.write(offset, bytes([pattern]) * length)


def reference_round(path: Path, changes: list[tuple[int, int, int | None]]) -> None:
    qemu_io(path, *(f"write -z {o} {n}" if p is None else f"write -P {p} {o} {n}" for o, n, p in changes))


def read_pattern(path: Path, offset: int, length: int, pattern: int) -> bool:
    proc = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", f"read -P {pattern} {offset} {length}", str(path)],
                          capture_output=True, text=True, check=True)
    return "Pattern verification failed" not in proc.stdout


def test_chain_of_three_layers_reads_back(work_dir: Path, daemon: StorageDaemon) -> None:
    reference = work_dir / "reference.qcow2"
    img.create(reference, size=SIZE)
    backing: Path | None = None
    layers = []
    for k, changes in enumerate(ROUNDS):
        final = work_dir / f"layer{k}.qcow2"
        with LayerWriter(final, backing=backing, virtual_size=SIZE, daemon=daemon) as w:
            write_round(w, changes)
            assert w.commit() == final
        reference_round(reference, changes)
        shutil.copyfile(reference, work_dir / f"reference{k}.qcow2")
        layers.append(final)
        backing = final
    for k, layer in enumerate(layers):
        assert img.compare(layer, work_dir / f"reference{k}.qcow2"), f"layer {k} differs"
        report = img.check(layer)
        assert report["check-errors"] == 0 and "corruptions" not in report and "leaks" not in report
    chain = img.info(layers[-1], chain=True)
    assert [Path(e["filename"]).name for e in chain] == ["layer2.qcow2", "layer1.qcow2", "layer0.qcow2"]
    assert chain[0]["backing-filename"] == "layer1.qcow2"  # relative: the chain can move as a whole
    assert not list(work_dir.glob(".*.partial"))


def test_write_zeroes_over_backing_data_reads_zero_and_writes_no_data(work_dir: Path, daemon: StorageDaemon) -> None:
    base = work_dir / "base.qcow2"
    img.create(base, size=SIZE)
    qemu_io(base, "write -P 0x77 0 8M")
    top = work_dir / "top.qcow2"
    with LayerWriter(top, backing=base, virtual_size=SIZE, daemon=daemon) as w:
        w.write_zeroes(1 * MiB, 2 * MiB)
        w.write_zeroes(5 * MiB + 100, 1000)  # inside one cluster: QEMU writes zeros into that cluster
        w.commit()
    assert read_pattern(top, 1 * MiB, 2 * MiB, 0) and read_pattern(top, 5 * MiB + 100, 1000, 0)
    assert read_pattern(top, 0, 1 * MiB, 0x77) and read_pattern(top, 5 * MiB, 100, 0x77)
    assert read_pattern(base, 0, 8 * MiB, 0x77)  # the backing file is untouched
    own = img.allocation_map(top, own_layer_only=True)
    assert Extent(1 * MiB, 2 * MiB, True) in own  # zero clusters, no data stored
    assert sum(e.length for e in own if not e.zero) <= CLUSTER


def test_exception_inside_the_block_leaves_no_file(work_dir: Path, daemon: StorageDaemon) -> None:
    final = work_dir / "layer.qcow2"
    with pytest.raises(RuntimeError):
        with LayerWriter(final, backing=None, virtual_size=SIZE, daemon=daemon) as w:
            w.write(0, b"x" * MiB)
            assert partial_path(final).exists() and not final.exists()
            raise RuntimeError("stream broke")
    assert sorted(os.listdir(work_dir)) == []
    assert daemon.qmp("query-block-exports") == []  # export and node released
    with LayerWriter(final, backing=None, virtual_size=SIZE, daemon=daemon):
        pass  # leaving without commit() is an abort too
    assert sorted(os.listdir(work_dir)) == []


def test_committed_layer_is_never_rewritten(work_dir: Path, daemon: StorageDaemon) -> None:
    final = work_dir / "layer.qcow2"
    img.create(final, size=SIZE)
    qemu_io(final, "write -P 0x61 0 64k")
    before = (final.stat().st_ino, final.read_bytes())
    with pytest.raises(SinkError, match="already exists"):
        with LayerWriter(final, backing=None, virtual_size=SIZE, daemon=daemon):
            pass
    assert (final.stat().st_ino, final.read_bytes()) == before  # neither replaced by rename nor written
    with LayerWriter(work_dir / "other.qcow2", backing=None, virtual_size=SIZE, daemon=daemon) as w:
        with pytest.raises(SinkError, match="outside the disk"):
            w.write(SIZE - 10, b"x" * 20)


def test_kept_partial_resumes(work_dir: Path, daemon: StorageDaemon) -> None:
    base = work_dir / "base.qcow2"
    img.create(base, size=SIZE)
    qemu_io(base, "write -P 0x55 0 32M")
    final = work_dir / "layer.qcow2"
    with pytest.raises(RuntimeError):
        with LayerWriter(final, backing=base, virtual_size=SIZE, daemon=daemon, keep_partial=True) as w:
            w.write(0, b"\x01" * (6 * MiB))
            w.flush()  # the resume point
            raise RuntimeError("connection dropped")
    assert partial_path(final).exists() and not final.exists()
    with LayerWriter.resume(final, daemon=daemon) as w:
        assert w.backing is not None and w.backing.resolve() == base.resolve()
        w.write_zeroes(10 * MiB, 2 * MiB)
        w.commit()
    assert not partial_path(final).exists()
    assert read_pattern(final, 0, 6 * MiB, 1) and read_pattern(final, 6 * MiB, 4 * MiB, 0x55)
    assert read_pattern(final, 10 * MiB, 2 * MiB, 0)
    with pytest.raises(SinkError, match="no partial"):
        LayerWriter.resume(work_dir / "nothing.qcow2", daemon=daemon)


def test_digest_follows_content_not_layering(work_dir: Path, daemon: StorageDaemon) -> None:
    flat = work_dir / "flat.qcow2"
    img.create(flat, size=SIZE)
    backing = None
    for k, changes in enumerate(ROUNDS):
        reference_round(flat, changes)
        final = work_dir / f"layer{k}.qcow2"
        with LayerWriter(final, backing=backing, virtual_size=SIZE, daemon=daemon) as w:
            write_round(w, changes)
            w.commit()
        backing = final
    digest = image_digest(flat, daemon=daemon)
    assert image_digest(backing, daemon=daemon) == digest
    with LayerWriter(work_dir / "again.qcow2", backing=None, virtual_size=SIZE, daemon=daemon) as w:
        for changes in ROUNDS:
            write_round(w, changes)
        assert w.digest() == digest  # the writer's own view, before commit

    explicit = work_dir / "explicit-zeros.qcow2"  # zeros written as data hash like holes
    img.create(explicit, size=SIZE)
    reference_round(explicit, [(o, n, 0 if p is None else p) for changes in ROUNDS for o, n, p in changes])
    qemu_io(explicit, "write -P 0 28M 2M")
    assert image_digest(explicit, daemon=daemon) == digest

    qemu_io(flat, "write -P 0x14 5M 1")  # one byte differs
    assert image_digest(flat, daemon=daemon) != digest
    other_size = work_dir / "bigger.qcow2"
    img.create(other_size, size=SIZE + MiB)
    img.create(work_dir / "empty.qcow2", size=SIZE)
    assert image_digest(other_size, daemon=daemon) != image_digest(work_dir / "empty.qcow2", daemon=daemon)


def test_digest_of_a_sparse_64_gib_disk_reads_only_its_data(work_dir: Path, daemon: StorageDaemon) -> None:
    path = work_dir / "sparse.qcow2"
    img.create(path, size=64 << 30)
    qemu_io(path, "write -P 1 0 1M", "write -P 2 40G 3M")
    start = time.monotonic()
    digest = image_digest(path, daemon=daemon)
    assert time.monotonic() - start < 10  # reading 64 GiB would take minutes
    # docs/FORMAT.md, "Verify", computed here: only blocks 0 and 40 GiB / 4 MiB hold data, each padded
    # with zeros to the 4 MiB block; every other block reads as zeros and adds nothing.
    block = 4 * MiB
    expected = hashlib.blake2b(digest_size=32, person=b"vmrepl-digest-1")
    expected.update((64 << 30).to_bytes(8, "little"))
    for index, data in ((0, b"\x01" * MiB), ((40 << 30) // block, b"\x02" * (3 * MiB))):
        expected.update(index.to_bytes(8, "little") + xxhash.xxh3_128(data + bytes(block - len(data))).digest())
    assert digest == expected.hexdigest()


def _resident() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_stays_bounded_writing_comparing_and_digesting(work_dir: Path, daemon: StorageDaemon) -> None:
    """Every queued NBD read and write lets go of its buffer once done: 384 MiB through each path
    (a layer written in 64 KiB writes, a second one compared with it, the digest of both) leaves
    resident memory within 64 MiB of where it started. (libnbd 1.14 never frees an nbd.Buffer.)"""
    size, chunk = 384 * MiB, 64 * 1024
    pattern = os.urandom(2 * MiB)
    base, top = work_dir / "base.qcow2", work_dir / "top.qcow2"
    before = _resident()
    with LayerWriter(base, backing=None, virtual_size=size, daemon=daemon) as w:
        for offset in range(0, size, chunk):
            w.write(offset, bytearray(pattern[offset % MiB:offset % MiB + chunk]))
        w.commit()
    assert _resident() - before < 64 * MiB
    with daemon.reader(base) as below, LayerWriter(top, backing=base, virtual_size=size, daemon=daemon,
                                                   backing_node=below.node) as w:
        delta = DeltaFilter(below.nbd)
        for offset in range(0, size, chunk):  # the second half of every MiB differs from the base
            data = bytearray(pattern[offset % MiB + (MiB if offset % MiB >= MiB // 2 else 0):][:chunk])
            for at, piece in delta.changed(offset, data, delta.below(offset, chunk)):
                store_piece(w, at, piece)
        w.commit()
    assert _resident() - before < 64 * MiB
    assert image_digest(top, daemon=daemon) != image_digest(base, daemon=daemon)
    assert _resident() - before < 64 * MiB
    assert img.allocation_map(top, own_layer_only=True) and \
        sum(e.length for e in img.allocation_map(top, own_layer_only=True)) == size // 2


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_is_no_space_and_leaves_nothing(work_dir: Path, daemon: StorageDaemon) -> None:
    small = work_dir / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16M", "tmpfs", str(small)], check=True)
    try:
        with pytest.raises(NoSpaceError):
            with LayerWriter(small / "layer.qcow2", backing=None, virtual_size=SIZE, daemon=daemon) as w:
                for offset in range(0, SIZE, MiB):
                    w.write(offset, os.urandom(MiB))
                w.commit()
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_partial_survives_a_killed_daemon_and_resumes(work_dir: Path) -> None:
    final = work_dir / "layer.qcow2"
    with pytest.raises(SinkError):
        with StorageDaemon() as d:
            with LayerWriter(final, backing=None, virtual_size=SIZE, daemon=d, keep_partial=True) as w:
                w.write(0, b"\x07" * (8 * MiB))
                w.flush()
                assert d.pid is not None
                os.kill(d.pid, 9)  # the receiver's QEMU dies mid-transfer
                w.write(8 * MiB, b"\x08" * MiB)
                w.flush()
    assert partial_path(final).exists() and not final.exists()
    with StorageDaemon() as d, LayerWriter.resume(final, daemon=d) as w:
        w.write(8 * MiB, b"\x08" * MiB)
        w.commit()
    assert read_pattern(final, 0, 8 * MiB, 7) and read_pattern(final, 8 * MiB, MiB, 8)
    assert img.check(final)["check-errors"] == 0
