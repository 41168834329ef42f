"""The demo that `scripts/demo` runs (after setup and `python -m testbed.host start`).

A throwaway VM with two disks runs under libvirt; data is written into it, it is snapshotted and
replicated over ssh to the second host (a network namespace with its own sshd), then written to again,
snapshotted and replicated as a delta, three rounds; `vmrepl verify` compares every replicated snapshot
on both hosts, and a table shows what each round changed, sent and took. Every step is a `vmrepl`
command as an admin would type it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import libvirt

from . import VMREPL, public_dir, run
from .host import SecondHost
from .vm import MiB, VM, cleanup_leftovers, create_vm, domain_type

URI = "qemu:///system"


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def vmrepl(host: SecondHost, *args: str) -> list | dict:
    """Run one vmrepl command on the source with --json, echoing it, and return its document."""
    shown = " ".join(a for a in args)
    print(f"    $ vmrepl {shown}", flush=True)
    env = {**os.environ, "VMREPL_STATE_DIR": str(host.src_state)}
    proc = subprocess.run([str(VMREPL), *args, "--json"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"demo FAILED: vmrepl {shown}: {proc.stderr.strip()}")
    for line in proc.stderr.splitlines():
        print(f"    {line}")
    return json.loads(proc.stdout)


def demo(host: SecondHost, vm: VM) -> bool:
    """The demo's steps; True when every replicated snapshot verified."""
    step(f"VM {vm.name} runs under libvirt ({domain_type(URI)}, no OS), disks vda 512 MiB and vdb 256 MiB")
    ssh = ["--to", host.destination, "--identity", str(host.identity), "--known-hosts", str(host.known_hosts)]
    rng = random.Random(1)
    rows = []
    for round_ in range(1, 4):
        if round_ == 1:
            vm.write_random("vda", 0, 48 * MiB)
            vm.write_random("vdb", 64 * MiB, 16 * MiB)
            what = "64 MiB of random data"
        else:
            for _ in range(8):
                vm.write_random(rng.choice(["vda", "vdb"]), rng.randrange(0, 250) * MiB, 256 * 1024)
            vm.write_zeroes("vda", 8 * MiB, 8 * MiB)
            what = "8 x 256 KiB of random data at random offsets and 8 MiB of zeros"
        step(f"round {round_}: wrote {what} into the running VM, then snapshot and replicate")
        snap = vmrepl(host, "snapshot", vm.name)
        (sent,) = vmrepl(host, "replicate", vm.name, *ssh)
        rows.append((snap["name"], "full (sparse)" if sent["base"] is None else "delta", sent))
    step("verify: content digests of every snapshot, read through the chains on both hosts")
    report = vmrepl(host, "verify", vm.name, *ssh)
    ok = all(d["match"] for snap in report for d in snap["disks"])
    held = run([str(VMREPL), "list", vm.name, "--state-dir", str(host.dst_state)]).stdout
    step(f"the second host holds:\n{held}")
    print(f"{'snapshot':<24} {'kind':<14} {'changed MiB':>12} {'sent MiB':>9} {'seconds':>8}")
    for name, kind, sent in rows:
        print(f"{name:<24} {kind:<14} {sent['bytes_changed'] / MiB:>12.2f} {sent['bytes_sent'] / MiB:>9.2f}"
              f" {sent['seconds']:>8.2f}")
    step("verify: " + ("every disk of every snapshot matches" if ok else "MISMATCH"))
    return ok


def main() -> int:
    host = SecondHost()
    for state in (host.src_state, host.dst_state):  # a fresh demo each time
        shutil.rmtree(state, ignore_errors=True)
        public_dir(state)
    conn = libvirt.open(URI)
    try:
        cleanup_leftovers(conn)
        vm = create_vm(conn, {"vda": 512 * MiB, "vdb": 256 * MiB}, label="demo")
        try:
            ok = demo(host, vm)
        finally:
            vm.remove()
            step(f"removed VM {vm.name}")
    finally:
        conn.close()
    step("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
