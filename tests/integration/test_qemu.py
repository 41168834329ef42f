"""vmrepl.qemu against the real qemu-img, qemu-io and qemu-storage-daemon (QMP + libnbd)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from testbed.vm import qemu_io
from vmrepl.errors import ChangeTrackingError, NotFoundError
from vmrepl.extents import Extent
from vmrepl.qemu import QemuError, img
from vmrepl.qemu.storage_daemon import (ALLOCATION, STATE_ZERO, StorageDaemon, allocation_extents, dirty_bitmap_context,
                                        dirty_extents, iter_block_status, pread)

MiB = 1 << 20
KiB = 1 << 10
CLUSTER = 64 * KiB


def make_inconsistent_bitmap(path: Path, name: str) -> None:
    """QEMU sets a persistent bitmap's in-use flag in the file when it opens the image writable and
    clears it on a clean close; a qemu-io killed with SIGKILL after a write leaves it set."""
    img.add_bitmap(path, name)
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin and proc.stdout
    proc.stdin.write("write -P 0x5 0 64k\n")
    proc.stdin.flush()
    assert "wrote" in proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_img_create_chain_map_check_compare(work_dir: Path) -> None:
    base, top = work_dir / "base.qcow2", work_dir / "top.qcow2"
    img.create(base, size=16 * MiB)
    img.create(top, size=16 * MiB, backing="base.qcow2")
    qemu_io(base, "write -P 0x11 0 128k", "write -P 0x22 8M 64k")
    qemu_io(top, "write -P 0x33 1M 64k", "write -z 0 64k")

    chain = img.info(top, chain=True)
    assert [Path(e["filename"]).name for e in chain] == ["top.qcow2", "base.qcow2"]
    assert chain[0]["backing-filename-format"] == "qcow2" and chain[0]["virtual-size"] == 16 * MiB

    assert img.allocation_map(top, own_layer_only=True) == [Extent(0, CLUSTER, True), Extent(1 * MiB, CLUSTER, False)]
    assert img.allocation_map(top, own_layer_only=False) == [
        Extent(0, CLUSTER, True), Extent(CLUSTER, CLUSTER, False), Extent(1 * MiB, CLUSTER, False),
        Extent(8 * MiB, CLUSTER, False)]

    assert img.check(top)["check-errors"] == 0 and "corruptions" not in img.check(top)
    assert img.compare(top, top) and not img.compare(top, base)
    # Another file, flattened (no backing file), reads the same; one byte changed in it, it does not.
    copy = work_dir / "copy.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "qcow2", str(top), str(copy)], check=True)
    assert "backing-filename" not in img.info(copy)
    assert img.compare(top, copy) and img.compare(copy, top)
    qemu_io(copy, "write -P 0x44 4M 1")
    assert not img.compare(top, copy) and not img.compare(copy, top)

    other = work_dir / "other.qcow2"
    img.create(other, size=16 * MiB)
    img.rebase_unsafe(top, "other.qcow2")
    assert img.info(top)["backing-filename"] == "other.qcow2"
    img.rebase_unsafe(top, None)
    assert "backing-filename" not in img.info(top)


def test_img_errors_are_one_line(work_dir: Path) -> None:
    with pytest.raises(NotFoundError) as err:
        img.info(work_dir / "missing.qcow2")
    assert "\n" not in str(err.value) and "missing.qcow2" in str(err.value)
    (work_dir / "junk.qcow2").write_bytes(b"QFI\xfb" + b"\0" * 508)
    with pytest.raises(QemuError) as err:
        img.check(work_dir / "junk.qcow2")
    assert "\n" not in str(err.value) and str(err.value).startswith("qemu-img check")


def test_bitmap_block_status_is_exactly_the_written_clusters(work_dir: Path, daemon: StorageDaemon) -> None:
    base, path = work_dir / "base.qcow2", work_dir / "disk.qcow2"
    img.create(base, size=64 * MiB)
    qemu_io(base, "write -P 0xdd 8M 1M")
    img.create(path, size=64 * MiB, backing="base.qcow2")
    img.add_bitmap(path, "vmrepl")
    qemu_io(path, "write -P 0xaa 0 64k", "write -P 0xbb 1048600 100", "write -P 0xcc 5M 130k", "write -z 8M 1M")
    assert img.bitmaps(path) == [{"name": "vmrepl", "flags": ["auto"], "granularity": CLUSTER}]

    node = daemon.add_image(path)
    assert [(b["name"], b["inconsistent"], b["persistent"]) for b in daemon.block_bitmaps(node)] == [("vmrepl", False, True)]
    h = daemon.connect(daemon.export(node, bitmaps=["vmrepl"]),
                       meta_contexts=[ALLOCATION, dirty_bitmap_context("vmrepl")])
    assert dirty_extents(h, "vmrepl") == [
        Extent(0, CLUSTER), Extent(1 * MiB, CLUSTER), Extent(5 * MiB, 3 * CLUSTER), Extent(8 * MiB, 1 * MiB)]
    # Data extents cover what was written and stay inside the written clusters (QEMU may report the
    # unwritten tail of a cluster as zero when the file has a hole there).
    data = [e for e in allocation_extents(h) if not e.zero]
    for offset, length in [(0, CLUSTER), (1048600, 100), (5 * MiB, 130 * KiB)]:
        assert any(e.offset <= offset and offset + length <= e.end for e in data)
    clusters = [Extent(0, CLUSTER), Extent(1 * MiB, CLUSTER), Extent(5 * MiB, 3 * CLUSTER)]
    assert all(any(c.offset <= e.offset and e.end <= c.end for c in clusters) for e in data)
    # The range written with zeros over the backing file's data is flagged zero (QEMU also sets HOLE,
    # meaning "no data stored", for qcow2 zero clusters).
    assert [(pos, n, flags & STATE_ZERO) for pos, n, flags in iter_block_status(h, ALLOCATION, 8 * MiB, 1 * MiB)] \
        == [(8 * MiB, 1 * MiB, STATE_ZERO)]
    assert pread(h, 8 * MiB, 1 * MiB) == bytes(1 * MiB)
    assert pread(h, 5 * MiB, 130 * KiB) == b"\xcc" * 130 * KiB
    assert pread(h, 1048600, 100) == b"\xbb" * 100
    h.shutdown()


def test_block_status_covers_ranges_beyond_32_bits(work_dir: Path, daemon: StorageDaemon) -> None:
    path = work_dir / "big.qcow2"
    size = 9 << 30  # sparse: more than one 32-bit block status request
    img.create(path, size=size)
    qemu_io(path, "write -P 1 5G 64k")
    h = daemon.connect(daemon.export(daemon.add_image(path)), meta_contexts=[ALLOCATION])
    status = list(iter_block_status(h, ALLOCATION))
    assert status[0][0] == 0 and sum(n for _, n, _ in status) == size
    assert all(a[0] + a[1] == b[0] for a, b in zip(status, status[1:]))
    assert [e for e in allocation_extents(h) if not e.zero] == [Extent(5 << 30, CLUSTER)]
    part = list(iter_block_status(h, ALLOCATION, (5 << 30) - 100, 200))
    assert part[0][0] == (5 << 30) - 100 and sum(n for _, n, _ in part) == 200
    with pytest.raises(ChangeTrackingError):
        list(iter_block_status(h, dirty_bitmap_context("vmrepl")))  # not asked for at connect
    h.shutdown()


def test_iter_block_status_asks_again_after_a_short_answer() -> None:
    class ShortAnswers:  # a server that covers at most 3 MiB per reply, the last extent overshooting
        def can_meta_context(self, context: str) -> bool:
            return True

        def get_size(self) -> int:
            return 10 * MiB

        def block_status(self, count: int, offset: int, callback) -> None:  # type: ignore[no-untyped-def]
            callback(ALLOCATION, offset, [1 * MiB, 0, 2 * MiB + 4096, 3], 0)

    status = list(iter_block_status(ShortAnswers(), ALLOCATION, 1 * MiB, 7 * MiB))  # type: ignore[arg-type]
    assert sum(n for _, n, _ in status) == 7 * MiB and status[-1][0] + status[-1][1] == 8 * MiB
    assert all(a[0] + a[1] == b[0] for a, b in zip(status, status[1:]))


def test_inconsistent_bitmap_is_reported_and_never_exported(work_dir: Path, daemon: StorageDaemon) -> None:
    path = work_dir / "crashed.qcow2"
    img.create(path, size=16 * MiB)
    make_inconsistent_bitmap(path, "vmrepl")
    assert "in-use" in img.bitmaps(path)[0]["flags"]
    node = daemon.add_image(path)
    assert [(b["name"], b["inconsistent"]) for b in daemon.block_bitmaps(node)] == [("vmrepl", True)]
    with pytest.raises(ChangeTrackingError, match="inconsistent"):
        daemon.export(node, bitmaps=["vmrepl"])


def test_bitmap_of_a_backing_file_is_not_taken_for_the_layers(work_dir: Path, daemon: StorageDaemon) -> None:
    base, top = work_dir / "base.qcow2", work_dir / "top.qcow2"
    img.create(base, size=16 * MiB)
    img.add_bitmap(base, "vmrepl")
    img.create(top, size=16 * MiB, backing="base.qcow2")
    node = daemon.add_image(top)
    assert daemon.block_bitmaps(node) == []
    with pytest.raises(ChangeTrackingError, match="no dirty bitmap"):
        daemon.export(node, bitmaps=["vmrepl"])


def test_read_only_chain_opens_while_another_process_writes_it(work_dir: Path, daemon: StorageDaemon) -> None:
    base, top = work_dir / "base.qcow2", work_dir / "top.qcow2"
    img.create(base, size=16 * MiB)
    qemu_io(base, "write -P 0x42 0 64k")
    img.create(top, size=16 * MiB, backing="base.qcow2")
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(base)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdin and holder.stdout
        holder.stdin.write("read 0 512\n")
        holder.stdin.flush()
        assert "read" in holder.stdout.readline()  # it holds the write lock now
        with pytest.raises(QemuError, match="lock"):
            img.check(base)
        h = daemon.connect(daemon.export(daemon.add_image(top)))
        assert pread(h, 0, 4096) == b"\x42" * 4096
        h.shutdown()
    finally:
        holder.kill()
        holder.wait()


def test_no_daemon_left_after_an_exception(work_dir: Path) -> None:
    with pytest.raises(RuntimeError):
        with StorageDaemon() as d:
            pid = d.pid
            assert pid is not None
            d.export(d.add_image(_small_image(work_dir)))
            raise RuntimeError("boom")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_refused_command_is_a_qemu_error(work_dir: Path, daemon: StorageDaemon) -> None:
    with pytest.raises(QemuError, match="blockdev-add"):
        daemon.add_image(work_dir / "missing.qcow2")
    assert daemon.block_bitmaps(daemon.add_image(_small_image(work_dir))) == []  # still answering


def _small_image(work_dir: Path) -> Path:
    path = work_dir / "small.qcow2"
    img.create(path, size=MiB)
    return path


def test_a_daemon_that_dies_is_named_as_such(work_dir: Path) -> None:
    with StorageDaemon() as d:
        d.add_image(_small_image(work_dir))  # talking to it
        os.kill(d.pid, signal.SIGSEGV)
        with pytest.raises(QemuError, match=r"qemu-storage-daemon was killed by signal 11 \(SIGSEGV\) during blockdev-add"):
            d.add_image(work_dir / "small.qcow2", writable=True)


def test_a_daemon_that_hangs_after_its_greeting_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu.qmp's connect has no timeout of its own: a daemon that stops answering mid-negotiation is
    killed after the start timeout, and named in one line."""
    monkeypatch.setattr("vmrepl.qemu.storage_daemon._START_TIMEOUT", 1.0)
    with StorageDaemon() as d:
        time.sleep(0.5)  # its greeting is on the socket
        os.kill(d.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(QemuError, match=r"was killed by signal 9 \(SIGKILL\) during its start"):
            d.qmp("query-version")
        assert time.monotonic() - started < 5
