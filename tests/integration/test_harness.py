"""The test bed is real: libvirt runs the VMs, host-side writes land in their qcow2 files, and the second
host answers over ssh only with its pinned host key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from testbed import ROOT, run, wait_until
from testbed.host import SecondHost
from testbed.vm import CLUSTER_SIZE, KiB, MiB, cleanup_leftovers, domain_type, read_matches


def qemu_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())


def data_extents(image: Path) -> list[tuple[int, int]]:
    """(offset, length) of the ranges the image itself holds as data (not via backing, not zero)."""
    out = run(["qemu-img", "map", "-U", "--output=json", image]).stdout
    return [(e["start"], e["length"]) for e in json.loads(out) if e["data"] and e["depth"] == 0]


def test_vm_runs_under_libvirt(make_vm):
    vm = make_vm({"vda": 16 * MiB, "vdb": 8 * MiB}, label="runs")

    assert vm.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    cmdline = Path(f"/proc/{qemu_pid(vm.name)}/cmdline").read_bytes().split(b"\0")
    assert cmdline[0].endswith(b"qemu-system-x86_64")
    assert vm.xml().get("type") == domain_type()
    assert "q35" in vm.xml().find("os/type").get("machine")
    assert vm.targets() == ["vda", "vdb"]
    for target, size in (("vda", 16 * MiB), ("vdb", 8 * MiB)):
        info = json.loads(run(["qemu-img", "info", "-U", "--output=json", vm.current_image(target)]).stdout)
        assert (info["format"], info["virtual-size"], info["cluster-size"]) == ("qcow2", size, CLUSTER_SIZE)
        assert Path(info["filename"]).parent == vm.dir


def test_pattern_written_into_running_vm_reads_back_from_qcow2(make_vm):
    vm = make_vm({"vda": 16 * MiB, "vdb": 16 * MiB}, label="pattern")
    vm.write_pattern("vdb", 3 * MiB, 512 * KiB, 0xAB)
    image = vm.current_image("vdb")

    assert read_matches(image, 3 * MiB, 512 * KiB, 0xAB)
    assert not read_matches(image, 3 * MiB, 512 * KiB, 0xCD)
    assert read_matches(image, 0, 3 * MiB, 0)
    assert data_extents(image) == [(3 * MiB, 512 * KiB)]
    assert data_extents(vm.current_image("vda")) == []  # the write went to vdb's device, not vda's

    vm.write_zeroes("vdb", 3 * MiB, 64 * KiB)
    assert read_matches(image, 3 * MiB, 64 * KiB, 0)
    assert read_matches(image, 3 * MiB + 64 * KiB, 448 * KiB, 0xAB)

    with pytest.raises(ValueError):
        vm.write_pattern("vdb", 16 * MiB - 4 * KiB, 8 * KiB, 0xAB)


def test_pattern_written_into_shut_off_vm(make_vm):
    vm = make_vm({"vda": 8 * MiB, "vdb": 8 * MiB}, start=False, label="offline")
    vm.write_pattern("vda", 1 * MiB, 64 * KiB, 0x5A)
    assert read_matches(vm.current_image("vda"), 1 * MiB, 64 * KiB, 0x5A)
    vm.start()  # the image is still a valid disk for QEMU
    assert vm.is_running()


def test_current_image_follows_an_external_snapshot(make_vm):
    vm = make_vm({"vda": 8 * MiB, "vdb": 8 * MiB}, label="overlay")
    vm.write_pattern("vda", 0, 64 * KiB, 0x11)
    base = vm.current_image("vda")
    overlay = vm.dir / "vda.overlay.qcow2"
    vm.dom.snapshotCreateXML(
        f"<domainsnapshot><disks><disk name='vda' snapshot='external'><source file='{overlay}'/></disk>"
        "<disk name='vdb' snapshot='no'/></disks></domainsnapshot>",
        libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)

    assert vm.current_image("vda") == overlay
    vm.write_pattern("vda", 64 * KiB, 64 * KiB, 0x22)
    assert read_matches(overlay, 0, 64 * KiB, 0x11) and read_matches(overlay, 64 * KiB, 64 * KiB, 0x22)
    assert read_matches(base, 64 * KiB, 64 * KiB, 0)


def test_leftovers_of_a_killed_run_are_removed(libvirt_conn, make_vm):
    mine = make_vm({"vda": 4 * MiB}, start=False, label="survivor")
    killed = subprocess.run(
        [sys.executable, "-c", "import libvirt, os, signal; from testbed.vm import create_vm;"
         "vm = create_vm(libvirt.open('qemu:///system'), {'vda': 4 << 20}, label='killed'); print(vm.name, flush=True);"
         "os.kill(os.getpid(), signal.SIGKILL)"],
        cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    name = killed.stdout.strip()
    assert libvirt_conn.lookupByName(name).isActive()

    assert name in cleanup_leftovers(libvirt_conn)
    assert name not in [d.name() for d in libvirt_conn.listAllDomains()]
    assert not (mine.dir.parent / name).exists()
    assert mine.dom.name() == mine.name and mine.dir.is_dir()  # a live run's VM stays


def test_ssh_to_second_host_with_strict_host_key_checking(second_host):
    out = run(second_host.ssh_argv("ip -o -4 addr show; readlink /proc/self/ns/net; echo $VMREPL_STATE_DIR;"
                                   " vmrepl --version")).stdout
    assert f"{second_host.address}/30" in out
    assert os.readlink("/proc/self/ns/net") not in out  # the session runs in the other namespace
    assert str(second_host.dst_state) in out and "vmrepl" in out


def test_ssh_refused_with_a_wrong_or_unknown_host_key(second_host, work_dir):
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", work_dir / "other"])
    kind, blob = (work_dir / "other.pub").read_text().split()[:2]
    wrong = work_dir / "known_hosts.wrong"
    wrong.write_text(f"{second_host.address} {kind} {blob}\n")
    unknown = work_dir / "known_hosts.empty"
    unknown.write_text("")

    for known_hosts in (wrong, unknown):
        proc = run(second_host.ssh_argv("true", known_hosts=known_hosts), check=False)
        assert proc.returncode == 255 and "Host key verification failed" in proc.stderr, proc.stderr
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in run(
        second_host.ssh_argv("true", known_hosts=wrong), check=False).stderr


def test_forced_command_key(second_host):
    key = second_host.new_identity("forced-echo", command='echo "forced:$SSH_ORIGINAL_COMMAND"')
    assert run(second_host.ssh_argv("hostname", identity=key)).stdout.strip() == "forced:hostname"
    assert run(second_host.ssh_argv("echo", "free")).stdout.strip() == "free"  # other keys are unaffected


@pytest.fixture
def own_host() -> Iterator[SecondHost]:
    """A host of this test's own (index 1), so that killing its sshd disturbs no other test."""
    host = SecondHost(index=1)
    yield host.start()
    host.stop()


def test_a_host_left_by_a_killed_run_is_rebuilt_at_start(own_host: SecondHost, second_host: SecondHost):
    old = own_host.sshd_pid()
    os.kill(old, signal.SIGKILL)  # the netns, veth pair and pid file stay behind
    wait_until(lambda: not own_host.running(), "the killed sshd is gone", timeout=10)  # the signal is asynchronous
    own_host.start()
    assert own_host.sshd_pid() not in (None, old)
    assert run(own_host.ssh_argv("hostname -I")).stdout.split() == [own_host.address]
    assert run(second_host.ssh_argv("hostname -I")).stdout.split() == [second_host.address]  # untouched

    own_host.stop()
    assert not own_host.running() and not Path("/run/netns", own_host.netns).exists()


def test_link_rate_limits_what_the_source_sends_for_the_block_only(own_host: SecondHost):
    def send(n: int) -> float:
        started = time.monotonic()
        subprocess.run(own_host.ssh_argv("cat > /dev/null"), input=os.urandom(n), check=True)
        return time.monotonic() - started

    def qdiscs() -> str:
        return run(["tc", "qdisc", "show", "dev", own_host.veth_source]).stdout

    free = send(MiB)
    with own_host.link_rate("8mbit"):  # 1 MB/s: a MiB needs 0.8 s past the 256 KiB burst
        assert "tbf" in qdiscs()
        limited = send(MiB)
    assert "tbf" not in qdiscs()
    assert limited - free > 0.5, (limited, free)
