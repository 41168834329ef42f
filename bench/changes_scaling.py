"""`vmrepl changes` costs what changed, not what the disk holds: a 1 GiB disk against a 64 GiB sparse one.

Three shut-off throwaway VMs: a 1 GiB disk, a 64 GiB disk, both taking the same writes (64 KiB at the
same random cluster offsets, all inside the first GiB), and a 64 GiB disk taking the same number of
writes spread over all of it. Each VM is snapshotted, then for each write count (0 first: the fixed
cost) the writes go into its current image (through qemu-nbd, so the image's dirty bitmap records
them) and a snapshot is taken. `vmrepl changes VM --since PREV --until THIS --json` is then timed as
a whole command (interpreter start-up, catalog, qemu-storage-daemon, NBD block status on the bitmap),
RUNS times per case, alternating between the VMs; the result is checked to cover exactly the bytes
written and to come from the bitmaps (no fallback warning). A whole-disk method would cost 64 times
more on the 64 GiB disks; the last column shows what it costs there against the 1 GiB disk. The cost
follows the number of extents reported (writes spread over 64 GiB merge less than within 1 GiB).

Run from the checkout: `.venv/bin/python bench/changes_scaling.py [--runs N] [--no-doc]`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import common as c

WRITE = 64 * c.KiB
COUNTS = (0, 100, 1000, 5000)


@dataclass(frozen=True)
class Case:
    label: str
    size: int
    spread: int  # writes land in [0, spread)


CASES = (Case("1 GiB", c.GiB, c.GiB), Case("64 GiB sparse, same writes", 64 * c.GiB, c.GiB),
         Case("64 GiB sparse, writes over all of it", 64 * c.GiB, 64 * c.GiB))


def write_clusters(image: Path, offsets: list[int]) -> None:
    block = b"\xab" * WRITE
    with c.nbd_image(image) as h:
        for offset in offsets:
            h.pwrite(block, offset)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    args = parser.parse_args()
    state = c.fresh_dir("changes_scaling")
    started = time.monotonic()
    vms = [c.create_vm(case.size, f"bench-changes-{i}") for i, case in enumerate(CASES)]
    rows = []
    try:
        prev = [c.vmrepl_json("snapshot", vm.name, state_dir=state)["id"] for vm in vms]
        rng = random.Random(1)
        for count in COUNTS:
            near = rng.sample(range(c.GiB // WRITE), count)
            far = rng.sample(range(64 * c.GiB // WRITE), count)
            snaps = []
            for vm, case in zip(vms, CASES):
                slots = near if case.spread == c.GiB else far
                write_clusters(c.current_image(vm), [s * WRITE for s in slots])
                snaps.append(c.vmrepl_json("snapshot", vm.name, state_dir=state)["id"])
            times: list[list[float]] = [[] for _ in CASES]
            reported = [0] * len(CASES)
            for _run in range(args.runs):
                for i, vm in enumerate(vms):
                    argv = [c.VMREPL, "changes", vm.name, "--since", prev[i], "--until", snaps[i], "--json",
                            "--state-dir", state]
                    seconds, proc = c.stopwatch(argv)
                    if b"warning" in proc.stderr:  # a fallback (allocation map) is not what is measured here
                        raise RuntimeError(f"{CASES[i].label}: {proc.stderr.decode().strip()}")
                    extents = json.loads(proc.stdout)
                    covered = sum(e["length"] for e in extents if not e["zero"])
                    if covered != count * WRITE:
                        raise RuntimeError(f"{CASES[i].label}: changes covers {covered} bytes, {count * WRITE} written")
                    times[i].append(seconds)
                    reported[i] = len(extents)
            for i, case in enumerate(CASES):
                rows.append([case.label, count, reported[i], f"{count * WRITE / c.MiB:.1f}",
                             f"{c.median(times[i]):.3f}", f"{min(times[i]):.3f}", f"{max(times[i]):.3f}",
                             f"{c.median(times[i]) / c.median(times[0]):.2f}"])
                print(" | ".join(map(str, rows[-1])), flush=True)
            prev = snaps
    finally:
        c.remove_own_vms()
        shutil.rmtree(state, ignore_errors=True)
    elapsed = time.monotonic() - started
    rows.sort(key=lambda r: ([case.label for case in CASES].index(r[0]), r[1]))
    text = c.table(["disk", "64 KiB writes", "extents (adjacent writes merge)", "MiB changed", "seconds (median)",
                    "min", "max", "vs 1 GiB, same count"], rows)
    print(text)
    if not args.no_doc:
        c.write_report("changes_scaling", "`vmrepl changes`: cost follows the changes, not the disk size",
                       f"{args.runs} runs per case, alternating between the disks; the whole run took "
                       f"{elapsed / 60:.1f} min", __doc__, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
