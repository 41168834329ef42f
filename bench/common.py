"""What the benchmarks share: the vmrepl CLI under /usr/bin/time, qcow2 writes over NBD, the second
host's ssh options, and docs/BENCHMARKS.md sections that a rerun replaces.

Everything a benchmark makes lives under run/bench/ (gitignored) and its VMs are testbed VMs, so a
killed run is cleaned up by `testbed.vm.cleanup_leftovers` like a killed test run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import libvirt
import nbd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts run as bench/X.py from the checkout

from testbed import ROOT, RUN_DIR, VMREPL, public_dir  # noqa: E402
from testbed import vm as testvm  # noqa: E402
from testbed.host import SecondHost  # noqa: E402

BENCH_DIR = RUN_DIR / "bench"
DOC = ROOT / "docs" / "BENCHMARKS.md"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CIPHER = "aes128-gcm@openssh.com"
LIBVIRT_URI = "qemu:///system"
LIBVIRT_RETRIES = 30
T = TypeVar("T")

DOC_HEAD = """# Benchmarks

Each section below is written by one script in `bench/`, which replaces only its own section (between
its markers) when rerun. Run them from the checkout as root, with the venv and the daemons of
`bash scripts/setup.sh`: `.venv/bin/python bench/NAME.py`. They create throwaway VMs under `run/` and
remove them afterwards. The CPU profiles need py-spy, which `scripts/setup.sh` installs (the `bench` extra;
without it they are left out); its raw stacks stay in `run/bench/profiles/`.

These machines have 2 cores shared by both ends of every transfer (the "destination" is a network
namespace on the same machine) and by other engineers' test runs, so absolute figures are noisy and
low; compare the ratios taken within one run (the peers run alternately, side by side).
"""


@dataclass(frozen=True)
class Timed:
    seconds: float
    max_rss_kib: int
    cpu_seconds: float
    stdout: str


def timed(argv: Sequence[str | os.PathLike], **kwargs) -> Timed:
    """Run argv under /usr/bin/time: wall seconds, peak RSS (KiB) and user+system CPU seconds."""
    fmt = "@@time %e %M %U %S"
    proc = subprocess.run(["/usr/bin/time", "-f", fmt, *map(str, argv)], capture_output=True, text=True, **kwargs)
    lines = proc.stderr.splitlines()
    marks = [line for line in lines if line.startswith("@@time ")]
    if proc.returncode != 0 or not marks:
        rest = "\n".join(line for line in lines if not line.startswith("@@time "))
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {rest.strip()}")
    _, wall, rss, user, system = marks[-1].split()
    return Timed(float(wall), int(rss), float(user) + float(system), proc.stdout)


def stopwatch(argv: Sequence[str | os.PathLike], **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    """Run argv (checked) and return its wall time with finer resolution than /usr/bin/time."""
    started = time.perf_counter()
    proc = subprocess.run([str(a) for a in argv], capture_output=True, **kwargs)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {proc.stderr!r:.500}")
    return elapsed, proc


def vmrepl_json(*args: str | os.PathLike, state_dir: Path) -> object:
    """Run a vmrepl command with --json against `state_dir` and return its document; a command that
    failed is tried once more a few seconds later (libvirtd may be restarting under another test)."""
    argv = [str(VMREPL), *map(str, args), "--json", "--state-dir", str(state_dir)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        time.sleep(3)
        proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"vmrepl {' '.join(map(str, args))}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


@contextlib.contextmanager
def nbd_image(image: Path, *, fmt: str = "qcow2") -> Iterator[nbd.NBD]:
    """A writable NBD handle on an image served by a private qemu-nbd (socket activation); the
    image is flushed and closed when the block ends."""
    h = nbd.NBD()
    h.connect_systemd_socket_activation(["qemu-nbd", "-f", fmt, "--discard=unmap", str(image)])
    try:
        yield h
        h.flush()
    finally:
        h.shutdown()
        del h


def pwrite(h: nbd.NBD, data: bytes | memoryview, offset: int) -> None:
    """Write `data` at `offset` in requests an NBD server accepts (at most 4 MiB each)."""
    view = memoryview(data)
    for start in range(0, len(view), 4 * MiB):
        h.pwrite(view[start:start + 4 * MiB], offset + start)


def create_vm(size: int, label: str) -> testvm.VM:
    """A shut-off throwaway VM with one disk `vda` of `size` bytes, on a fresh libvirt connection
    (libvirtd may have been restarted since the last one); tried again while libvirtd restarts."""
    for _ in range(LIBVIRT_RETRIES):
        with contextlib.suppress(libvirt.libvirtError):
            return testvm.create_vm(libvirt.open(LIBVIRT_URI), {"vda": size}, label=label, start=False)
        time.sleep(0.5)
    return testvm.create_vm(libvirt.open(LIBVIRT_URI), {"vda": size}, label=label, start=False)


def remove_own_vms() -> None:
    """Remove every test VM this process made, also those a failed create left half-made."""
    mine = f"{testvm.PREFIX}{os.getpid()}-"
    conn = libvirt.open(LIBVIRT_URI)
    try:
        for dom in conn.listAllDomains():
            if dom.name().startswith(mine):
                testvm.remove_domain(conn, dom.name())
    finally:
        conn.close()
    if testvm.VMS_DIR.is_dir():
        for directory in testvm.VMS_DIR.iterdir():
            if directory.name.startswith(mine):
                subprocess.run(["rm", "-rf", str(directory)], check=False)


def current_image(vm: testvm.VM, target: str = "vda") -> Path:
    return Path(_libvirt_retry(vm, lambda: vm.current_image(target)))


def remove_vm(vm: testvm.VM) -> None:
    _libvirt_retry(vm, vm.remove)


def _libvirt_retry(vm: testvm.VM, call: Callable[[], T]) -> T:
    """Run a libvirt call of `vm`, reconnecting while libvirtd restarts (other engineers' tests restart
    it; that must not end a long benchmark)."""
    for _ in range(LIBVIRT_RETRIES):
        try:
            return call()
        except libvirt.libvirtError:
            time.sleep(0.5)
            with contextlib.suppress(libvirt.libvirtError):
                vm.conn = libvirt.open(LIBVIRT_URI)
    return call()


def ssh_command(host: SecondHost) -> list[str]:
    """OpenSSH options for the second host (strict host keys, the bench's cipher, no prompts), without
    the destination: append `host.destination` and a remote command, or pass it as rsync's `-e`."""
    return ["ssh", "-c", CIPHER, *host.ssh_argv()[1:-1]]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fresh_dir(name: str) -> Path:
    """An empty 0755 directory run/bench/NAME (whatever a previous run left there is removed)."""
    path = BENCH_DIR / name
    if path.exists():
        subprocess.run(["rm", "-rf", str(path)], check=True)
    return public_dir(path)


def machine() -> str:
    """One line about this machine and the date, for the doc."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // (1 << 20)
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.split()[2]
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.split(",")[0]
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores ({cpu}), {mem} GiB RAM, "
            f"kernel {platform.release()}, QEMU {qemu}, {ssh}, Python {platform.python_version()}")


def write_section(name: str, text: str) -> None:
    """Put `text` into docs/BENCHMARKS.md between the markers of section `name`, replacing what a
    previous run wrote there (new sections go at the end); the file is replaced atomically."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    doc = DOC.read_text() if DOC.exists() else DOC_HEAD
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    doc = pattern.sub(lambda _m: block, doc) if pattern.search(doc) else f"{doc.rstrip()}\n\n{block}\n"
    tmp = DOC.with_name(f".{DOC.name}.tmp")
    tmp.write_text(doc)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(DOC)


def write_report(script: str, title: str, method: str, doc: str | None, *body: str) -> None:
    """Write the section of bench/SCRIPT.py: its title, the machine and `method` (how it ran), the
    description from the script's docstring (between its first paragraph and "Run from"), then `body`."""
    write_section(script, "\n\n".join([
        f"## {title}",
        f"Measured {machine()}; {method}. Rerun: `.venv/bin/python bench/{script}.py`.",
        (doc or "").split("\n\n", 1)[1].rsplit("\n\nRun from", 1)[0],
        *body]))


def table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (also readable on a terminal)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
