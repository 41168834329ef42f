"""Issue 5: how to write a received layer. 512 MiB of incompressible data in 4 MiB extents every other
4 MiB (a 1 GiB disk), written into a new qcow2 layer and made durable, three ways, alternating:

- vmrepl: `LayerWriter` (a writable NBD export of qemu-storage-daemon, O_DIRECT + io_uring, 4 writes in
  flight, then flush, fsync, rename), as `vmrepl receive` does;
- qemu-io: one `qemu-io` process, one `write -s FILE OFFSET 4M` command per extent, then `flush`;
- raw file: Python writes the same bytes at the same offsets into a plain sparse file and fsyncs it:
  what the disk takes without qcow2 or QEMU, the ceiling.

Rerun: `.venv/bin/python bench/layer_write.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fresh_dir, machine, median, table, write_section  # noqa: E402
from vmrepl.qemu import img  # noqa: E402
from vmrepl.qemu.storage_daemon import StorageDaemon  # noqa: E402
from vmrepl.sink.layer import LayerWriter  # noqa: E402

MiB = 1 << 20
PIECE = 4 * MiB
DISK = 1024 * MiB
OFFSETS = range(0, DISK, 2 * PIECE)
RUNS = 3


def vmrepl_way(work: Path, data: bytes) -> float:
    final = work / "layer.qcow2"
    started = time.perf_counter()
    with StorageDaemon() as daemon, LayerWriter(final, backing=None, virtual_size=DISK, daemon=daemon) as w:
        for offset in OFFSETS:
            w.write(offset, data)
        w.commit()
    seconds = time.perf_counter() - started
    final.unlink()
    return seconds


def qemu_io_way(work: Path, data: bytes) -> float:
    image, source = work / "qemu-io.qcow2", work / "piece.bin"
    source.write_bytes(data)
    started = time.perf_counter()
    img.create(image, size=DISK)
    commands = [arg for offset in OFFSETS for arg in ("-c", f"write -s {source} {offset} {PIECE}")]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, "-c", "flush", str(image)], check=True, capture_output=True)
    seconds = time.perf_counter() - started
    image.unlink()
    return seconds


def raw_way(work: Path, data: bytes) -> float:
    path = work / "raw.img"
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, DISK)
        for offset in OFFSETS:
            os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


def main() -> None:
    work = fresh_dir("layer_write")
    data = os.urandom(PIECE)
    ways = {"vmrepl LayerWriter": vmrepl_way, "qemu-io write -s": qemu_io_way, "raw file + fsync": raw_way}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for run in range(RUNS):
        for name in list(ways)[run % len(ways):] + list(ways)[:run % len(ways)]:
            times[name].append(ways[name](work, data))
    written = len(OFFSETS) * PIECE
    rows = [[name, f"{median(t):.2f}", f"{written / median(t) / 1e6:.0f}"] for name, t in times.items()]
    text = f"""## Writing a received layer: the ways compared

Measured {machine()}; {RUNS} runs each, alternating, medians. Rerun: `.venv/bin/python bench/layer_write.py`.

{written // MiB} MiB of incompressible data in 4 MiB extents, every other 4 MiB of a 1 GiB disk, into a new
qcow2 layer, until durable. vmrepl's `LayerWriter` (writable NBD export of qemu-storage-daemon with
O_DIRECT and io_uring, 4 writes in flight) is what `vmrepl receive` uses; `qemu-io` runs one `write -s`
per extent in one process; the raw file is plain pwrite + fsync into a sparse file, the ceiling.

{table(["way", "seconds", "MB/s"], rows)}
"""
    write_section("layer_write", text)
    print(text)
    subprocess.run(["rm", "-rf", str(work)], check=True)


if __name__ == "__main__":
    main()
