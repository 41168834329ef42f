"""Delta replication against its peers, side by side: vmrepl, rsync, a full copy, the OpenSSH ceiling.

For each disk size and content kind, a shut-off throwaway VM gets a base image with data in 60% of
the disk (4 MiB chunks at random places), is snapshotted and sent whole once. Then, RUNS times: 2% of
the disk changes in 64 KiB extents at random places, a snapshot is taken, and the four peers move that
change to the second host, in an order that rotates every run:

- vmrepl: `vmrepl replicate` of the one new snapshot (a delta on the previous one), timed as a whole
  command (start-up, ssh connect, bitmap query, reading, compressing, sending, the receiver's commit).
- rsync: `rsync --inplace --no-whole-file` of the whole image, a single qcow2 file that took the same
  writes in place (as the VM's own disk would, without snapshots), onto the destination's copy of the
  previous state.
- full copy: `cat IMAGE | ssh host 'cat > FILE'` of that same qcow2 file (the naive peer).
- ceiling: `ssh host 'cat > FILE' < CHANGED` of exactly the changed bytes (one file holding the
  extents back to back, in page cache): what one OpenSSH stream can move.

Then the same rounds again (without the full copy) over a link limited to 1 Gbit/s, a token bucket
(`tc ... tbf`) on the source's end of the veth: the loopback link is faster than anything on these 2
cores, so without it compression only costs CPU; over a gigabit link, as between two real hosts, it
saves time.

After each run, `ssh host true` and a `vmrepl replicate` with nothing to send measure what each side
pays before any data moves (connect, authentication, start-up), so that the transfers can also be
compared without it. Every OpenSSH peer uses aes128-gcm, OpenSSH's fastest cipher here. Bytes are what each tool sends
(vmrepl's stream, rsync's "Total bytes sent", the file sizes) and, as a check, the growth of the
source veth's tx counter (the smallest over the runs: other users of the second host only add to it).
"Machine CPU s" is the busy CPU time of the whole machine during the peer's run (both ends, sshd,
qemu-storage-daemon; the smallest over the runs, since other engineers' work only adds to it).

Run from the checkout: `.venv/bin/python bench/replicate_delta.py [--runs N] [--sizes 4,8] [--kinds
random,binaries] [--no-profile] [--no-link]`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import common as c
from testbed import VMREPL
from testbed.host import SecondHost
from testbed.vm import VM

FILL = 0.6
CHUNK = 4 * c.MiB
CHANGE = 0.02
EXTENT = 64 * c.KiB
CORPUS = 768 * c.MiB
PEERS = ("vmrepl", "rsync", "full copy", "ceiling")
# The link-limited rounds leave the full copy out: over a slow link it only measures the link.
LINK_RATE, LINK_LABEL = "1gbit", "1 Gbit/s"
LINKED_PEERS = ("vmrepl", "rsync", "ceiling")
VETH_TX = Path("/sys/class/net/vmrepl-s0/statistics/tx_bytes")
PROFILE_RATE = 200
PROFILE_CHANGE = 5  # times the benchmark's change (overlaps make it a little less)


@dataclass
class Samples:
    seconds: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    sent: dict[str, list[int]] = field(default_factory=lambda: collections.defaultdict(list))
    wire: dict[str, list[int]] = field(default_factory=lambda: collections.defaultdict(list))
    machine_cpu: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    rss_kib: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    inner: list[float] = field(default_factory=list)


@dataclass
class Result:
    size: int
    kind: str
    image_bytes: int
    changed: int
    initial: tuple[float, int]
    samples: Samples
    linked: Samples | None  # the same rounds over a link limited to LINK_RATE
    profile: str | None


# --- content ---------------------------------------------------------------------------------------

class Content:
    """Where the bytes come from: fresh random bytes, or real binaries (ELF programs and libraries)."""

    def __init__(self, kind: str, rng: random.Random) -> None:
        self.kind = kind
        self.rng = rng
        self.corpus = _binaries(CORPUS) if kind == "binaries" else None

    def chunk(self, n: int) -> bytes:
        """n bytes for the base image."""
        if self.corpus is None:
            return os.urandom(n)
        start = self.rng.randrange(0, len(self.corpus) - n) & ~(c.MiB - 1)
        return bytes(self.corpus[start:start + n])

    def extent(self) -> bytes:
        """64 KiB for a change: a window at an arbitrary byte offset, so that it matches no block of
        the old image (rsync could otherwise find it there)."""
        if self.corpus is None:
            return os.urandom(EXTENT)
        start = self.rng.randrange(0, len(self.corpus) - EXTENT)
        return bytes(self.corpus[start:start + EXTENT])


def _binaries(limit: int) -> memoryview:
    buf = bytearray()
    for top in ("/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib"):
        for root, _dirs, files in os.walk(top):
            for name in sorted(files):
                path = os.path.join(root, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                with open(path, "rb") as f:
                    if f.read(4) != b"\x7fELF":
                        continue
                    buf += b"\x7fELF" + f.read(limit - len(buf) - 4)
                if len(buf) >= limit:
                    return memoryview(buf)
    return memoryview(buf)


def fill_base(image: Path, size: int, content: Content, rng: random.Random) -> None:
    with c.nbd_image(image) as h:
        for offset in range(0, size, CHUNK):
            if rng.random() < FILL:
                c.pwrite(h, content.chunk(CHUNK), offset)


def make_change(size: int, content: Content, rng: random.Random) -> list[tuple[int, bytes]]:
    count = int(size * CHANGE) // EXTENT
    slots = sorted(rng.sample(range(size // EXTENT), count))
    return [(slot * EXTENT, content.extent()) for slot in slots]


def apply_change(image: Path, change: list[tuple[int, bytes]]) -> None:
    with c.nbd_image(image) as h:
        for offset, data in change:
            h.pwrite(data, offset)


# --- the peers -------------------------------------------------------------------------------------

class Bench:
    def __init__(self, host: SecondHost, work: Path) -> None:
        self.host = host
        self.src_state = c.public_dir(work / "src-state")
        self.dst_state = c.public_dir(work / "dst-state")
        self.peer_dir = c.public_dir(work / "dst-peers")
        self.ssh = c.ssh_command(host)

    def receive_command(self) -> str:
        return f"{VMREPL} receive --state-dir {self.dst_state}"

    def replicate_argv(self, vm: str, remote_command: str | None = None) -> list[str]:
        return [str(VMREPL), "replicate", vm, "--to", self.host.destination, "--identity", str(self.host.identity),
                "--known-hosts", str(self.host.known_hosts), "--remote-command",
                remote_command or self.receive_command(), "--json", "--state-dir", str(self.src_state)]

    def vmrepl(self, vm: str, samples: Samples | None) -> tuple[float, int]:
        t = c.timed(self.replicate_argv(vm))
        [sent] = json.loads(t.stdout)
        if samples is not None:
            samples.rss_kib.append(t.max_rss_kib)
            samples.cpu.append(t.cpu_seconds)
            samples.inner.append(sent["seconds"])
        return t.seconds, sent["bytes_sent"]

    def rsync(self, image: Path) -> tuple[float, int]:
        seconds, proc = c.stopwatch(["rsync", "--inplace", "--no-whole-file", "--stats", "-e", shlex.join(self.ssh),
                                     image, f"{self.host.destination}:{self.peer_dir / 'rsync.qcow2'}"])
        sent = next(int(line.split(":")[1].split()[0].replace(",", ""))
                    for line in proc.stdout.decode().splitlines() if line.startswith("Total bytes sent"))
        return seconds, sent

    def cat(self, path: Path, name: str) -> tuple[float, int]:
        with open(path, "rb") as f:
            seconds, _ = c.stopwatch([*self.ssh, self.host.destination, f"cat > {self.peer_dir / name}"], stdin=f)
        return seconds, path.stat().st_size


def tx_bytes() -> int:
    return int(VETH_TX.read_text())


def busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy so far (both ends of a transfer run here)."""
    user, nice, system, idle, iowait, *rest = map(int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:])
    return (user + nice + system + sum(rest[:3])) / os.sysconf("SC_CLK_TCK")


# --- one configuration -----------------------------------------------------------------------------

def run_config(bench: Bench, size: int, kind: str, runs: int, work: Path,
               profile: bool, link_rate: str | None) -> Result:
    rng = random.Random(f"{size}-{kind}")
    content = Content(kind, rng)
    vm = c.create_vm(size, f"bench-{size // c.GiB}g-{kind}")
    try:
        fill_base(c.current_image(vm), size, content, rng)
        flat = work / "flat.qcow2"
        subprocess.run(["cp", "--sparse=always", c.current_image(vm), flat], check=True)
        subprocess.run(["cp", "--sparse=always", flat, bench.peer_dir / "rsync.qcow2"], check=True)
        image_bytes = flat.stat().st_size
        c.vmrepl_json("snapshot", vm.name, state_dir=bench.src_state)
        initial = bench.vmrepl(vm.name, None)
        print(f"  {size // c.GiB} GiB {kind}: image {image_bytes / c.GiB:.2f} GiB, initial full send "
              f"{initial[0]:.1f} s, {initial[1] / c.GiB:.2f} GiB sent", flush=True)
        samples, changed = run_rounds(bench, vm, flat, work, size, content, rng, runs, PEERS)
        linked = None
        if link_rate:
            with bench.host.link_rate(link_rate):
                linked, _ = run_rounds(bench, vm, flat, work, size, content, rng, runs, LINKED_PEERS)
        prof = None
        if profile:  # a larger delta, so that streaming outweighs start-up in the samples
            change = [e for _ in range(PROFILE_CHANGE) for e in make_change(size, content, rng)]
            apply_change(c.current_image(vm), change)
            c.vmrepl_json("snapshot", vm.name, state_dir=bench.src_state)
            prof = profile_sender(bench, vm.name, c.public_dir(c.BENCH_DIR / "profiles"), kind)
        return Result(size, kind, image_bytes, changed, initial, samples, linked, prof)
    finally:
        c.remove_vm(vm)
        for leftover in (bench.peer_dir / "rsync.qcow2", bench.peer_dir / "full.qcow2", work / "flat.qcow2"):
            leftover.unlink(missing_ok=True)


def run_rounds(bench: Bench, vm: VM, flat: Path, work: Path, size: int, content: Content, rng: random.Random,
               runs: int, peer_names: tuple[str, ...]) -> tuple[Samples, int]:
    """`runs` rounds of change, snapshot and each peer's transfer (order rotating); returns the
    samples and the bytes changed per round."""
    samples = Samples()
    changed = 0
    for i in range(runs):
        change = make_change(size, content, rng)
        changed = len(change) * EXTENT
        apply_change(c.current_image(vm), change)
        apply_change(flat, change)
        changed_file = work / "changed.bin"
        with open(changed_file, "wb") as f:
            for _offset, data in change:
                f.write(data)
        c.vmrepl_json("snapshot", vm.name, state_dir=bench.src_state)
        peers = {"vmrepl": lambda: bench.vmrepl(vm.name, samples),
                 "rsync": lambda: bench.rsync(flat),
                 "full copy": lambda: bench.cat(flat, "full.qcow2"),
                 "ceiling": lambda: bench.cat(changed_file, "changed.bin")}
        order = peer_names[i % len(peer_names):] + peer_names[:i % len(peer_names)]
        for peer in order:
            before, cpu_before = tx_bytes(), busy_cpu_seconds()
            seconds, sent = peers[peer]()
            samples.wire[peer].append(tx_bytes() - before)
            samples.machine_cpu[peer].append(busy_cpu_seconds() - cpu_before)
            samples.seconds[peer].append(seconds)
            samples.sent[peer].append(sent)
        # What each side pays before any data moves, to compare the transfers without it.
        samples.seconds["ssh true"].append(c.stopwatch([*bench.ssh, bench.host.destination, "true"])[0])
        samples.seconds["vmrepl no-op"].append(c.timed(bench.replicate_argv(vm.name)).seconds)
        print(f"  run {i + 1}: " + ", ".join(f"{p} {samples.seconds[p][-1]:.2f} s" for p in samples.seconds),
              flush=True)
    return samples, changed


# --- profile ---------------------------------------------------------------------------------------

def profile_sender(bench: Bench, vm: str, out_dir: Path, kind: str) -> str | None:
    """Sample the CPU of both ends of one replicate with py-spy (every thread, idle time left out) and
    return their summaries. The receiver is attached by PID from a shell that then execs it (py-spy
    writes to stdout, which is the receiver's stream), so its first 0.2 s (start-up) go unsampled."""
    py_spy = Path(sys.executable).with_name("py-spy")
    if not py_spy.exists():
        return None
    sender, receiver = out_dir / f"sender-{kind}.txt", out_dir / f"receiver-{kind}.txt"
    receiver.unlink(missing_ok=True)
    spy = f"{py_spy} record --native --format raw --threads -r {PROFILE_RATE}"
    remote = f"sh -c '( sleep 0.2; {spy} -o {receiver} --pid $$ >/dev/null 2>&1 ) & exec {bench.receive_command()}'"
    subprocess.run([*spy.split(), "-o", sender, "--", *bench.replicate_argv(vm, remote)], check=True,
                   capture_output=True)
    deadline = time.monotonic() + 10
    while not receiver.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    parts = ["Sender:\n\n" + summarize_profile(sender, _SENDER)]
    if receiver.exists():
        parts.append("Receiver (`vmrepl receive`, one thread):\n\n"
                     + summarize_profile(receiver, _RECEIVER, per_thread=False))
    return "\n\n".join(parts)


def summarize_profile(path: Path, categories: tuple[tuple[tuple[str, ...], str], ...], *,
                      per_thread: bool = True) -> str:
    """Where the sender's samples went, from py-spy's collapsed native+Python stacks
    (`thread (TID): NAME;frame;...;frame COUNT`): per thread, and per kind of work."""
    threads: collections.Counter[str] = collections.Counter()
    work: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        threads[_thread(frames)] += int(count)
        work[_category(frames, categories)] += int(count)
    total = sum(work.values())

    def rows(counter: collections.Counter[str]) -> list[list[str]]:
        return [[name, f"{100 * n / total:.0f}%"] for name, n in counter.most_common()]

    return (f"{total} samples at {PROFILE_RATE} Hz (py-spy --native, idle threads left out; a thread blocked in "
            "recv or a queue still shows as 'waiting').\n\n"
            + (c.table(["thread", "samples"], rows(threads)) + "\n\n" if per_thread else "")
            + c.table(["work (first matching kind in this order)", "samples"], rows(work)))


def _thread(frames: list[str]) -> str:
    name = frames[0].partition(": ")[2] or "unnamed (native)"
    if name.startswith("ThreadPoolExecutor"):
        return "pool workers (checksum + compress, compressible data)"
    if name.startswith("Thread-") and any("paramiko" in f for f in frames):
        return "paramiko transport thread"
    if name == "MainThread":
        return "main thread (NBD reads, framing, paramiko send)"
    return name


# A sample goes to the first kind (in this order) that any frame of its stack matches.
_SENDER = (
    (("ZSTD_", "HIST_", "zstd"), "zstd compress"),
    (("XXH", "xxhash"), "xxh3 checksum"),
    (("libcrypto", "aead.py", "EVP_", "aes", "gcm"), "AES-GCM in paramiko (cryptography/OpenSSL)"),
    (("read_all (paramiko", "Condition.wait", "thread.py:81", "select (", "_wait_for"), "waiting (recv, queue, lock)"),
    (("nbd",), "NBD read (libnbd)"),
    (("packet.py",), "paramiko packetizer (framing, padding, socket send)"),
    (("paramiko",), "paramiko channel (window, locks)"),
    (("wire.py",), "vmrepl wire framing"),
    (("importlib", "<frozen", "_compiler.py", "dataclasses.py"), "start-up (imports)"),
    (("storage_daemon", "qmp/"), "qemu-storage-daemon setup (QMP)"),
    (("changes.py",), "changed extents (bitmap block status)"),
    (("catalog", "sqlite"), "catalog (SQLite)"),
    (("threading.py", "concurrent/futures"), "threads (futures, locks)"),
)


_RECEIVER = (
    (("ZSTD_decompress", "decompress ("), "zstd decompress"),
    (("XXH", "xxhash"), "xxh3 checksum"),
    (("DeltaFilter", "differing_runs"), "comparing with the base (NBD read of the base, diff)"),
    (("LayerWriter", "commit"), "writing the layer (NBD writes, flush, fsync)"),
    (("readinto", "_exact"), "reading the stream (stdin from sshd)"),
    (("catalog", "sqlite", "store.py"), "catalog and progress"),
    (("storage_daemon", "qmp/"), "qemu-storage-daemon setup (QMP)"),
)


def _category(frames: list[str], categories: tuple[tuple[tuple[str, ...], str], ...]) -> str:
    for needles, name in categories:
        if any(n in frame for frame in frames[1:] for n in needles):
            return name
    return "other"


# --- report ----------------------------------------------------------------------------------------

def report(results: list[Result], runs: int) -> str:
    rows, checks = [], []
    for r in results:
        s = r.samples
        med = {p: c.median(s.seconds[p]) for p in PEERS}
        for p in PEERS:
            rows.append([f"{r.size // c.GiB} GiB", r.kind, p, f"{med[p]:.2f}", _mb(c.median(s.sent[p])),
                         _mb(min(s.wire[p])), f"{r.changed / med[p] / 1e6:.0f}", f"{min(s.machine_cpu[p]):.2f}",
                         f"{max(s.rss_kib) / 1024:.0f} MiB" if p == "vmrepl" else ""])
        label = f"{r.size // c.GiB} GiB {r.kind}"
        vs_ceiling = med["vmrepl"] / med["ceiling"]
        # Without the fixed cost of each side (connect, start-up): vmrepl minus a no-op replicate, the
        # ceiling minus `ssh true`.
        net = (med["vmrepl"] - c.median(s.seconds["vmrepl no-op"])) / (med["ceiling"] - c.median(s.seconds["ssh true"]))
        vs_rsync = med["rsync"] / med["vmrepl"]
        if r.kind == "random":
            checks.append([label, "vmrepl within 2x of the ceiling", f"{vs_ceiling:.2f}x", _ok(vs_ceiling <= 2)])
            checks.append([label, "... transfer only, fixed costs taken out", f"{net:.2f}x", _ok(net <= 2)])
        else:
            checks.append([label, "vmrepl faster than the ceiling", f"{vs_ceiling:.2f}x", _ok(vs_ceiling < 1)])
            checks.append([label, "... transfer only, fixed costs taken out", f"{net:.2f}x", _ok(net < 1)])
        checks.append([label, "rsync / vmrepl >= 3", f"{vs_rsync:.1f}x", _ok(vs_rsync >= 3)])
    for kind in sorted({r.kind for r in results}):
        by_size = sorted((r.size, c.median(r.samples.seconds["rsync"]) / c.median(r.samples.seconds["vmrepl"]))
                         for r in results if r.kind == kind)
        if len(by_size) > 1:
            grows = all(b[1] > a[1] for a, b in zip(by_size, by_size[1:]))
            checks.append([kind, "margin over rsync grows with the disk",
                           " -> ".join(f"{v:.1f}x" for _, v in by_size), _ok(grows)])
    linked_rows = []
    for r in (r for r in results if r.linked):
        s = r.linked
        med = {p: c.median(s.seconds[p]) for p in LINKED_PEERS}
        for p in LINKED_PEERS:
            linked_rows.append([f"{r.size // c.GiB} GiB", r.kind, p, f"{med[p]:.2f}", _mb(c.median(s.sent[p])),
                                f"{med[p] / med['ceiling']:.2f}x", f"{min(s.machine_cpu[p]):.2f}"])
        label = f"{r.size // c.GiB} GiB {r.kind}, {LINK_LABEL} link"
        vs_ceiling = med["vmrepl"] / med["ceiling"]
        if r.kind == "random":
            checks.append([label, "vmrepl within 2x of the ceiling", f"{vs_ceiling:.2f}x", _ok(vs_ceiling <= 2)])
        else:
            checks.append([label, "vmrepl faster than the ceiling", f"{vs_ceiling:.2f}x", _ok(vs_ceiling < 1)])
        vs_rsync = med["rsync"] / med["vmrepl"]
        checks.append([label, "rsync / vmrepl >= 3", f"{vs_rsync:.1f}x", _ok(vs_rsync >= 3)])
    rss = max(max(r.samples.rss_kib) for r in results) / 1024
    checks.append(["all", "vmrepl sender peak RSS bounded (same for 4 and 8 GiB)", f"{rss:.0f} MiB", _ok(rss < 256)])
    details = [[f"{r.size // c.GiB} GiB", r.kind, f"{r.image_bytes / c.GiB:.2f} GiB", _mb(r.changed),
                f"{r.initial[0]:.1f} s / {_mb(r.initial[1])}", f"{c.median(r.samples.inner):.2f}",
                f"{c.median(r.samples.cpu):.2f}", f"{c.median(r.samples.seconds['vmrepl no-op']):.2f}",
                f"{c.median(r.samples.seconds['ssh true']):.2f}"] for r in results]
    linked = [f"The same rounds again over a link limited to {LINK_LABEL} (a token bucket on the source's veth), "
              "as between two hosts on a gigabit network:",
              c.table(["disk", "content", "peer", "seconds (median)", "MB sent", "/ ceiling", "machine CPU s (min)"],
                      linked_rows)] if linked_rows else []
    return "\n\n".join([
        c.table(["disk", "content", "peer", "seconds (median)", "MB sent", "MB on veth (min)",
                 "MB/s of changed data", "machine CPU s (min)", "sender peak RSS"], rows),
        c.table(["disk", "content", "qcow2 image", "MB changed", "vmrepl initial full send", "vmrepl's own seconds",
                 "vmrepl sender CPU s", "vmrepl no-op replicate s", "ssh true s"], details),
        *linked,
        "Targets (issue 5), from the medians above:",
        c.table(["case", "target", "measured", "met"], checks),
    ])


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def _ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="4,8", help="disk sizes in GiB, comma-separated")
    parser.add_argument("--kinds", default="random,binaries")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-link", action="store_true", help=f"skip the rounds over a {LINK_LABEL} link")
    parser.add_argument("--no-doc", action="store_true", help="print the tables only")
    args = parser.parse_args()
    sizes = [int(s) * c.GiB for s in args.sizes.split(",")]
    kinds = args.kinds.split(",")
    work = c.fresh_dir("replicate_delta")
    results = []
    started = time.monotonic()
    # The session's shared lock keeps a test run that ends meanwhile from stopping the host under us.
    with SecondHost().session() as host:
        bench = Bench(host, work)
        try:
            for size in sizes:
                for kind in kinds:
                    profile = not args.no_profile and size == sizes[0]
                    results.append(run_config(bench, size, kind, args.runs, work, profile,
                                              None if args.no_link else LINK_RATE))
        finally:
            shutil.rmtree(work, ignore_errors=True)
            c.remove_own_vms()
    elapsed = time.monotonic() - started
    text = report(results, args.runs)
    print(text)
    profiles = [f"### CPU profile, {r.size // c.GiB} GiB {r.kind}, one extra delta of about 10%\n\n{r.profile}"
                for r in results if r.profile]
    for p in profiles:
        print("\n" + p)
    if not args.no_doc:
        c.write_report("replicate_delta", "Delta replication: vmrepl against rsync, a full copy and the OpenSSH ceiling",
                       f"{args.runs} runs per peer, alternating; the whole run took {elapsed / 60:.1f} min",
                       __doc__, text, *profiles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
