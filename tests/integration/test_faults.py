"""Fault tests (issue 5; DESIGN.md invariants 3 and 8): a replication of a running two-disk VM to the
second host is killed, cut, starved of space, corrupted or refused. Each time the user gets one clear
line and a non-zero exit; the destination's catalog and committed layers stay as they were (at most a
hidden, resumable partial is left); nothing stale (a receiver, a qemu-storage-daemon) survives; and the
next `replicate` completes, resumes without resending what arrived, and `verify` passes.
docs/RELIABILITY.md maps each test to the phase it breaks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import struct
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import xxhash

from testbed import VMREPL, pid_alive, run, wait_until
from testbed.host import SecondHost
from testbed.vm import VM
from vmrepl import wire

MiB = 1 << 20
DISKS = {"vda": 64 * MiB, "vdb": 32 * MiB}
# Incompressible data of the snapshot that gets interrupted: at --bwlimit 4M about 4 s for vda, 2 s for vdb.
DELTA = {"vda": 16 * MiB, "vdb": 8 * MiB}
SLOW = ("--bwlimit", "4M")
LOCKED = "another vmrepl run is working on this VM"


def children(pid: int) -> list[int]:
    """The direct children of `pid` (all its threads'), e.g. its qemu-storage-daemon."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def outcome(sender: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a sender that must now end by itself (at most 60 s): its exit status and stderr."""
    _, stderr = sender.communicate(timeout=60)
    return subprocess.CompletedProcess(sender.args, sender.returncode, "", stderr)


def assert_one_line(result: subprocess.CompletedProcess, pattern: str, exit_code: int = 1) -> None:
    """The failure is reported as exactly one `vmrepl: ...` line matching `pattern`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("vmrepl: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]


@dataclass
class Rig:
    """One running two-disk VM, its source state dir, a destination state dir reached over ssh."""

    vm: VM
    host: SecondHost
    src: Path
    dst: Path
    work: Path
    run_vmrepl: Callable[..., subprocess.CompletedProcess]

    @property
    def env(self) -> dict[str, str]:
        """No ~/.ssh of this machine (known_hosts, default keys, agent) leaks into a run."""
        return {"HOME": str(self.work / "home"), "SSH_AUTH_SOCK": ""}

    def ssh_args(self, *, remote: str | None = None, identity: Path | None = None,
                 known_hosts: Path | None = None) -> list[str]:
        return self.host.vmrepl_args(self.dst, identity=identity, known_hosts=known_hosts, remote=remote)

    def snapshot(self, data: dict[str, int]) -> dict:
        """Write `data[target]` bytes of fresh incompressible data at the start of each disk, snapshot."""
        for target, length in data.items():
            self.vm.write_random(target, 0, length)
        return json.loads(self.run_vmrepl("snapshot", self.vm.name, "--json", state_dir=self.src).stdout)

    def replicate(self, *extra: str, check: bool = True, timeout: float = 120,  # type: ignore[no-untyped-def]
                  **ssh) -> subprocess.CompletedProcess:
        return self.run_vmrepl("replicate", self.vm.name, "--json", *self.ssh_args(**ssh), *extra,
                               state_dir=self.src, check=check, env=self.env, timeout=timeout)

    def start_replicate(self, *extra: str, remote: str | None = None) -> subprocess.Popen:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("VMREPL_")} | self.env
        return subprocess.Popen([str(VMREPL), "replicate", self.vm.name, "--json", "--state-dir", str(self.src),
                                 *self.ssh_args(remote=remote), *extra], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=environ)

    def verify(self) -> None:
        self.run_vmrepl("verify", self.vm.name, *self.ssh_args(), state_dir=self.src, env=self.env)

    def destination(self) -> tuple[list[dict], dict[str, str]]:
        """What the destination shows: its catalog (`list --json`) and a digest of each layer it names."""
        listed = self.run_vmrepl("list", self.vm.name, "--json", state_dir=self.dst, check=False)
        if listed.returncode != 0:
            assert "no VM" in listed.stderr, listed.stderr
            return [], {}
        held = json.loads(listed.stdout)
        layers = {d["image"]: hashlib.sha256(Path(d["image"]).read_bytes()).hexdigest()
                  for s in held for d in s["disks"]}
        return held, layers

    def layer_file(self, snap: dict, target: str) -> Path:
        return self.dst / "vms" / snap["vm_uuid"] / "disks" / target / f"{snap['id']}.qcow2"

    def progress(self, snap: dict) -> dict | None:
        """The receiver's durable resume point of `snap`, if it saved one (sink/store.py)."""
        path = self.dst / "vms" / snap["vm_uuid"] / "incoming" / f"{snap['id']}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def receivers(self) -> list[int]:
        """Live `vmrepl receive` processes of this test's destination state dir, in the namespace."""
        pids = run(["ip", "netns", "pids", self.host.netns]).stdout.split()
        found = []
        for pid in map(int, pids):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"receive" in argv and str(self.dst).encode() in argv and pid_alive(pid):
                found.append(pid)
        return found

    def receiver(self) -> int:
        wait_until(self.receivers, "the receiver runs")
        (pid,) = self.receivers()
        return pid

    def no_receiver_left(self) -> None:
        wait_until(lambda: not self.receivers(), "the interrupted receiver has exited", timeout=20)

    def recovers(self, before: tuple[list[dict], dict[str, str]], snap: dict, *,
                 resend_at_most: float | None = None) -> None:
        """After a fault: the destination is as it was (a partial, if any, stays hidden), the next
        replicate sends `snap` (at most `resend_at_most` of its changed bytes), appends it without
        touching the older layers, and verify passes."""
        self.no_receiver_left()
        assert self.destination() == before
        (sent,) = self.replicate().json()
        assert sent["id"] == snap["id"]
        if resend_at_most is not None:
            assert sent["bytes_sent"] < resend_at_most * sent["bytes_changed"], sent
        held, layers = self.destination()
        assert [s["id"] for s in held] == [s["id"] for s in before[0]] + [snap["id"]]
        assert before[1].items() <= layers.items()
        self.verify()


@pytest.fixture
def rig(make_vm, second_host, src_state, dst_state, work_dir, run_vmrepl) -> Rig:
    (work_dir / "home").mkdir()
    return Rig(make_vm(DISKS, label="faults"), second_host, src_state, dst_state, work_dir, run_vmrepl)


@pytest.fixture
def replicated(rig: Rig) -> tuple[list[dict], dict[str, str]]:
    """A first snapshot already on the destination: the layers a failed transfer must not touch."""
    rig.snapshot({"vda": MiB, "vdb": MiB})
    rig.replicate()
    before = rig.destination()
    assert len(before[0]) == 1
    return before


# --- killed and cut transfers -------------------------------------------------------------------

def test_killed_sender_resumes_without_resending(rig: Rig, replicated) -> None:
    snap = rig.snapshot(DELTA)
    sender = rig.start_replicate(*SLOW)
    try:
        wait_until(lambda: rig.layer_file(snap, "vda").exists(), "vda has arrived whole")
        daemons = children(sender.pid)
        assert daemons, "the sender runs no qemu-storage-daemon?"
    finally:
        sender.kill()
        sender.wait()
    rig.no_receiver_left()
    assert not [pid for pid in daemons if pid_alive(pid)], "the sender's qemu-storage-daemon outlived it"
    assert rig.progress(snap)["offsets"]["vda"] == DISKS["vda"]
    # vda (2/3 of the delta) arrived whole, so the resumed run sends only vdb
    rig.recovers(replicated, snap, resend_at_most=0.5)


def test_a_damaged_partial_layer_is_sent_again(rig: Rig, replicated) -> None:
    """A partial layer with a resume point that no longer reads as qcow2 (a disk error under it) is
    dropped and its disk sent again; before, every resume was refused until someone deleted it by hand."""
    snap = rig.snapshot({"vda": 14 * MiB, "vdb": 2 * MiB})
    sender = rig.start_replicate("--bwlimit", "1M")
    damaged = rig.layer_file(snap, "vda").with_name(f".{snap['id']}.qcow2.partial")
    try:
        receiver = rig.receiver()
        wait_until(lambda: (rig.progress(snap) or {}).get("offsets", {}).get("vda", 0) > 0,
                   "the receiver saved a resume point inside vda")
        os.kill(receiver, signal.SIGKILL)
        outcome(sender)
    finally:
        sender.kill()
    with open(damaged, "r+b") as layer:
        layer.write(bytes(4096))  # the qcow2 header gone
    rig.recovers(replicated, snap)  # vda again from its start (with vdb, which had not begun)


def test_killed_receiver_resumes_from_its_last_progress_point(rig: Rig, replicated) -> None:
    """vda alone takes 14 s, past the receiver's 10 s progress interval (PROGRESS_SECONDS)."""
    snap = rig.snapshot({"vda": 14 * MiB, "vdb": 2 * MiB})
    sender = rig.start_replicate("--bwlimit", "1M")
    try:
        receiver = rig.receiver()
        wait_until(lambda: (rig.progress(snap) or {}).get("offsets", {}).get("vda", 0) > 0,
                   "the receiver saved a resume point inside vda")
        daemons = children(receiver)
        os.kill(receiver, signal.SIGKILL)
        result = outcome(sender)
    finally:
        sender.kill()
    assert_one_line(result, r"connection to 10\.213\.0\.2 dropped|remote command failed on 10\.213\.0\.2")
    assert not [pid for pid in daemons if pid_alive(pid)], "the receiver's qemu-storage-daemon outlived it"
    assert rig.progress(snap)["offsets"]["vda"] < DISKS["vda"]
    rig.recovers(replicated, snap, resend_at_most=0.6)


def test_cut_connection_resumes(rig: Rig, replicated) -> None:
    """The sshd process serving the session dies: both ends see the stream end, nothing hangs."""
    snap = rig.snapshot(DELTA)
    sender = rig.start_replicate(*SLOW)
    try:
        receiver = rig.receiver()
        wait_until(lambda: rig.layer_file(snap, "vda").exists(), "vda has arrived whole")
        session = parent(receiver)
        assert Path(f"/proc/{session}/cmdline").read_bytes().startswith(b"sshd"), "not an sshd session"
        os.kill(session, signal.SIGKILL)
        result = outcome(sender)
    finally:
        sender.kill()
    assert_one_line(result, r"connection to 10\.213\.0\.2 dropped")
    wait_until(lambda: not pid_alive(receiver), "the receiver noticed the cut and exited", timeout=20)
    rig.recovers(replicated, snap, resend_at_most=0.5)


def test_silent_sender_releases_the_destination(rig: Rig, replicated) -> None:
    """A sender that stops sending without closing the connection (a frozen process; a network path
    gone without FIN or RST looks the same to the receiver) must not hold the destination's VM lock
    for ever: the receiver gives up after its idle limit, keeping the partial."""
    snap = rig.snapshot(DELTA)
    sender = rig.start_replicate(*SLOW, remote=f"env VMREPL_RECEIVE_IDLE_SECONDS=4 {VMREPL} receive "
                                             f"--state-dir {rig.dst}")
    try:
        wait_until(lambda: rig.layer_file(snap, "vda").exists(), "vda has arrived whole")
        sender.send_signal(signal.SIGSTOP)
        rig.no_receiver_left()
    finally:
        sender.kill()
        sender.wait()
    assert rig.progress(snap)["offsets"]["vda"] == DISKS["vda"]
    rig.recovers(replicated, snap, resend_at_most=0.5)


@pytest.mark.parametrize("step", ["before-catalog", "after-catalog"])
def test_receiver_dies_at_commit(rig: Rig, replicated, step: str) -> None:
    """The receiver dies (VMREPL_CRASH_AT, sink/chain.py) with every layer renamed into place: just
    before the catalog row, or after it with the OK not yet sent (the ack is lost)."""
    snap = rig.snapshot(DELTA)
    failed = rig.replicate(check=False, remote=f"env VMREPL_CRASH_AT={step} {VMREPL} receive --state-dir {rig.dst}")
    assert_one_line(failed, r"connection to 10\.213\.0\.2 dropped|remote command failed on 10\.213\.0\.2")
    if step == "before-catalog":
        rig.recovers(replicated, snap, resend_at_most=0.01)  # every disk arrived: only the commit is left
        return
    rig.no_receiver_left()
    held, layers = rig.destination()
    assert [s["id"] for s in held] == [s["id"] for s in replicated[0]] + [snap["id"]]
    assert replicated[1].items() <= layers.items()
    assert rig.replicate().json() == []  # the snapshot is held: nothing to send again
    rig.verify()


# --- the destination cannot store or the stream is corrupt --------------------------------------

@pytest.fixture
def small_dst(rig: Rig):  # type: ignore[no-untyped-def]
    """The destination's state dir on a 48 MiB ext4 loop file system, 32 MiB of it taken by a ballast
    file; yields a function that frees that space. The file system is mounted in both mount
    namespaces: the testbed's sshd runs in its own (made by `ip netns exec`), and one block device
    mounted twice is one file system."""
    image = rig.work / "dst.img"
    run(["truncate", "-s", "48M", image])
    run(["mkfs.ext4", "-q", "-O", "^has_journal", "-m", "0", image])
    loop = run(["losetup", "--find", "--show", image]).stdout.strip()
    namespaces = [[], ["nsenter", "-t", str(rig.host.sshd_pid()), "-m"]]
    try:
        for ns in namespaces:
            run([*ns, "mount", loop, rig.dst])
        ballast = rig.dst / "ballast"
        run(["fallocate", "-l", "32M", ballast])
        yield ballast.unlink
    finally:
        for pid in rig.receivers():  # only if it hung on the full disk: the test has failed then
            os.kill(pid, signal.SIGKILL)
        for ns in reversed(namespaces):
            run([*ns, "umount", "-l", rig.dst], check=False)
        run(["losetup", "-d", loop], check=False)


def test_full_destination_disk(rig: Rig, small_dst: Callable[[], None]) -> None:
    rig.snapshot({"vda": MiB, "vdb": MiB})
    rig.replicate()
    before = rig.destination()
    snap = rig.snapshot(DELTA)
    failed = rig.replicate(check=False, timeout=60)  # about a second; a receiver hung on ENOSPC once
    assert_one_line(failed, r"No space left on device.*free space on the destination")
    rig.no_receiver_left()
    assert rig.destination() == before
    small_dst()
    rig.recovers(before, snap)


def test_destination_disk_full_to_the_last_block(rig: Rig, small_dst: Callable[[], None]) -> None:
    """Not even the transfer's progress file fits: still a one-line NoSpaceError, nothing left behind."""
    rig.snapshot({"vda": MiB, "vdb": MiB})
    rig.replicate()
    before = rig.destination()
    snap = rig.snapshot(DELTA)
    filler = rig.dst / "filler"
    run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], check=False)  # until ENOSPC
    try:
        failed = rig.replicate(check=False, timeout=60)
        assert_one_line(failed, r"No space left on device.*free space on the destination")
        rig.no_receiver_left()
        assert rig.destination() == before
    finally:
        filler.unlink()
    small_dst()
    rig.recovers(before, snap)


FLIP = """\
import sys
position, seen = int(sys.argv[1]), 0
while chunk := sys.stdin.buffer.read1(1 << 16):
    if seen <= position < seen + len(chunk):
        chunk = bytearray(chunk)
        chunk[position - seen] ^= 0x20
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
    seen += len(chunk)
"""


@pytest.mark.parametrize("position", [60, 5 * MiB], ids=["in-hello", "in-data"])
def test_flipped_byte_in_the_stream(rig: Rig, replicated, position: int) -> None:
    flip = rig.work / "flip.py"
    flip.write_text(FLIP)
    snap = rig.snapshot(DELTA)
    failed = rig.replicate(check=False, remote=f"python3 {flip} {position} | {VMREPL} receive --state-dir {rig.dst}")
    assert_one_line(failed, r"destination: stream corrupt: .*checksum")
    rig.recovers(replicated, snap)


# --- refused before anything is sent ------------------------------------------------------------

@pytest.mark.parametrize("case", ["changed-host-key", "unknown-host-key", "wrong-identity"])
def test_refused_host_or_identity(rig: Rig, case: str) -> None:
    rig.snapshot({"vda": MiB})
    other = rig.work / "other_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other])
    known = rig.work / "known_hosts"
    if case == "changed-host-key":
        kind, blob = other.with_suffix(".pub").read_text().split()[:2]
        known.write_text(f"{rig.host.address} {kind} {blob}\n")
        failed = rig.replicate(check=False, known_hosts=known)
        assert_one_line(failed, r"host key of 10\.213\.0\.2 has CHANGED .*refusing to connect")
    elif case == "unknown-host-key":
        known.write_text("")
        failed = rig.replicate(check=False, known_hosts=known)
        assert_one_line(failed, r"host key of 10\.213\.0\.2 is unknown .*--accept-new-host-key")
        assert known.read_text() == "", "an unknown key was recorded without --accept-new-host-key"
    else:
        failed = rig.replicate(check=False, identity=other)
        assert_one_line(failed, r"10\.213\.0\.2 refused the key for root")
    assert not any(rig.dst.iterdir()), "the destination was touched"
    (sent,) = rig.replicate().json()
    assert sent["base"] is None
    rig.verify()


# --- names that would escape the state dir ------------------------------------------------------

def control_frame(frame_type: int, body: dict) -> bytes:
    """A control frame as docs/FORMAT.md lays it out, with no check of its fields (FrameWriter would
    refuse to write the names below)."""
    head = struct.pack(">BI", frame_type, len(raw := json.dumps(body).encode()))
    return head + raw + struct.pack(">Q", xxhash.xxh3_64_intdigest(head + raw))


def receive(dst: Path, stream: bytes) -> tuple[subprocess.CompletedProcess, list]:
    """Run `vmrepl receive` on `stream`; returns the process and the frames it answered."""
    proc = subprocess.run([str(VMREPL), "receive", "--state-dir", str(dst)], input=stream, capture_output=True)
    reader, frames = wire.FrameReader(io.BytesIO(proc.stdout)), []
    while True:
        try:
            frames.append(reader.read())
        except wire.ProtocolError as err:
            assert "stream ended early" in str(err), err
            return proc, frames


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.name.startswith("catalog.sqlite-")}


@pytest.mark.parametrize("field, value", [
    ("id", "../escaped"), ("id", "a/b"), ("id", "ABS"), ("name", "../../escaped"), ("name", ".."),
    ("parent", "../escaped"), ("base", "ABS"), ("target", "../escaped"), ("target", "ABS"), ("target", "a/b"),
])
def test_receiver_refuses_names_that_escape(dst_state: Path, work_dir: Path, field: str, value: str) -> None:
    value = value.replace("ABS", str(work_dir / "escaped"))
    vm_uuid = str(uuid.uuid4())
    hello = io.BytesIO()
    wire.FrameWriter(hello).write(wire.Hello(vm_uuid=vm_uuid, vm_name="web"))
    ok, frames = receive(dst_state, hello.getvalue() + control_frame(wire.T_END, {}))
    assert ok.returncode == 0 and len(frames) == 1, ok.stderr
    before = tree(dst_state)
    disk = {"target": "vda", "virtual_size": MiB, "cluster_size": 65536}
    header = {"id": str(uuid.uuid4()), "name": "s1", "parent": None, "base": None, "created_ns": 1,
              "generation": 1, "definition": "<domain/>", "disks": [disk], "resume": {}}
    (disk if field == "target" else header)[field] = value
    proc, frames = receive(dst_state, hello.getvalue() + control_frame(wire.T_SNAPSHOT, header))
    assert proc.returncode == 1
    assert [type(f) for f in frames] == [wire.ReceiverHello, wire.Error], frames
    assert frames[1].kind == "ProtocolError" and f"'{field}'" in frames[1].message, frames[1]
    stderr = proc.stderr.decode().strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("vmrepl: ") and "not a safe name" in stderr[0], stderr
    assert tree(dst_state) == before
    assert not list(work_dir.glob("**/escaped*")), "a file was written outside the state dir"


@pytest.mark.parametrize("name", ["../x", "a/b", "/tmp/x", ".hidden", ".."])
def test_snapshot_refuses_names_that_escape(make_vm, src_state: Path, run_vmrepl, name: str) -> None:
    vm = make_vm(DISKS, label="faults")
    image = vm.current_image("vda")
    assert_one_line(run_vmrepl("snapshot", vm.name, "--name", name, check=False),
                    r"invalid snapshot name .*without '/' or '\.\.'", exit_code=2)
    assert_one_line(run_vmrepl("snapshot", name, check=False), r"invalid VM name", exit_code=2)
    assert vm.current_image("vda") == image, "a snapshot was taken anyway"
    assert not list(src_state.glob("**/*.qcow2"))


# --- one run per VM -----------------------------------------------------------------------------

def test_concurrent_replicates_of_one_vm(rig: Rig) -> None:
    snap = rig.snapshot(DELTA)
    first = rig.start_replicate(*SLOW)
    try:
        rig.receiver()
        log_before = rig.host.log_file.read_text()
        started = time.monotonic()
        second = rig.replicate(check=False)
        assert time.monotonic() - started < 5, "the second run waited instead of failing at once"
        assert_one_line(second, LOCKED)
        time.sleep(1)  # sshd logs a connection (accepted, or closed before authentication) when it ends
        assert rig.host.log_file.read_text() == log_before, "the refused run still connected to the destination"
        out, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert [s["id"] for s in json.loads(out)] == [snap["id"]]
    rig.verify()
