"""The demo that `scripts/demo` runs (after setup and `python -m testbed.host start`).

For now it shows the machinery replication stands on: a throwaway VM runs under libvirt, a pattern
written into its disk from the host reads back from the qcow2 file, and the second host answers
over ssh with its pinned host key. Each step is one `step()` line; grow the demo by adding steps
to `demo()`.
"""

from __future__ import annotations

import sys

import libvirt

from . import run
from .host import SecondHost
from .vm import MiB, VM, cleanup_leftovers, create_vm, domain_type, read_matches

URI = "qemu:///system"


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def demo(host: SecondHost, vm: VM) -> bool:
    """The demo's steps; True when everything showed what it should."""
    disks = ", ".join(f"{t} {vm.current_image(t)}" for t in vm.targets())
    step(f"VM {vm.name} runs under libvirt ({domain_type(URI)}, no OS); disks: {disks}")

    offset, length, byte = 1 * MiB, 256 * 1024, 0xAB
    vm.write_pattern("vda", offset, length, byte)
    step(f"wrote {length} bytes of {byte:#x} at offset {offset} into vda of the running VM (HMP qemu-io)")
    image = vm.current_image("vda")
    ok = read_matches(image, offset, length, byte) and not read_matches(image, offset, length, byte ^ 0xFF)
    step(f"read back from {image} with qemu-io: {'the pattern is there' if ok else 'MISMATCH'}")

    remote = run(host.ssh_argv(f"ip -o -4 addr show dev {host.veth_dest} | awk '{{print $4}}'"), check=False)
    reached = remote.returncode == 0
    step(f"second host {host.destination} (netns {host.netns}) over ssh with its pinned host key: "
         + (f"answers from {remote.stdout.strip()}" if reached else f"FAILED: {remote.stderr.strip()}"))
    return ok and reached


def main() -> int:
    conn = libvirt.open(URI)
    try:
        cleanup_leftovers(conn)
        vm = create_vm(conn, {"vda": 64 * MiB, "vdb": 32 * MiB}, label="demo")
        try:
            ok = demo(SecondHost(), vm)
        finally:
            vm.remove()
            step(f"removed VM {vm.name}")
    finally:
        conn.close()
    step("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
