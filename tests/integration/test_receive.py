"""Out-of-order arrivals end to end: a real VM, `vmrepl snapshot`, `vmrepl replicate` over ssh to the
second host's `vmrepl receive`; after every step each destination snapshot equals its source and each
disk's layers form one line, oldest at the bottom."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from testbed import VMREPL
from tests.integration.test_replicate import assert_destination_matches, listing, replicate
from vmrepl import wire
from vmrepl.errors import LockedError, ProtocolError, VmreplError
from vmrepl.sink.chain import backing_of
from vmrepl.state import vm_lock

MiB = 1 << 20
DISKS = {"vda": 32 * MiB, "vdb": 16 * MiB}


def take_snapshots(vm, run_vmrepl, src_state: Path, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    ids = []
    for _ in range(count):
        for _ in range(4):
            disk = rng.choice(sorted(DISKS))
            length = rng.choice([65536, 300_000, MiB])
            vm.write_pattern(disk, rng.randrange(0, DISKS[disk] - length, 512), length, rng.randrange(1, 256))
        vm.write_zeroes("vdb", rng.randrange(0, DISKS["vdb"] - MiB, 65536), 256 * 1024)
        ids.append(json.loads(run_vmrepl("snapshot", vm.name, "--json", state_dir=src_state).stdout)["id"])
    return ids


def assert_linear(run_vmrepl, dst_state: Path, vm) -> None:
    held = listing(run_vmrepl, dst_state, vm)
    for target in DISKS:
        below = None
        for snap in held:
            image = Path(next(d["image"] for d in snap["disks"] if d["target"] == target))
            assert backing_of(image) == below, f"{target} of {snap['name']} is not backed by its predecessor"
            below = image
    assert not list(dst_state.glob("vms/*/inserting/*.json")), "an insertion was left unfinished"


def test_late_snapshot_is_grafted_in(make_vm, second_host, src_state, dst_state, run_vmrepl):
    vm = make_vm(DISKS)
    s1, s2, s3 = take_snapshots(vm, run_vmrepl, src_state, 3, seed=11)
    for sid in (s1, s3):
        replicate(run_vmrepl, second_host, src_state, dst_state, vm, "--snapshot", sid)
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)
    result = replicate(run_vmrepl, second_host, src_state, dst_state, vm, "--snapshot", s2)
    assert [(r["id"], r["base"], r["position"]) for r in result] == [(s2, s1, "insert")]
    assert [s["id"] for s in listing(run_vmrepl, dst_state, vm)] == [s1, s2, s3]
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)
    assert_linear(run_vmrepl, dst_state, vm)
    run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)


def test_latest_first_then_backfill(make_vm, second_host, src_state, dst_state, run_vmrepl):
    vm = make_vm(DISKS)
    ids = take_snapshots(vm, run_vmrepl, src_state, 4, seed=12)
    result = replicate(run_vmrepl, second_host, src_state, dst_state, vm, "--latest-first")
    assert [r["id"] for r in result] == [ids[3], *ids[:3]]
    assert [r["position"] for r in result] == ["append", "insert", "insert", "insert"]
    assert [s["id"] for s in listing(run_vmrepl, dst_state, vm)] == ids
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)
    assert_linear(run_vmrepl, dst_state, vm)
    run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)


def test_a_silent_sender_does_not_hold_the_receiver_forever(dst_state):
    """A sender that vanished without closing the connection: the receiver gives up and exits 1."""
    import subprocess
    import time

    from testbed import VMREPL

    env = {"VMREPL_RECEIVE_IDLE_SECONDS": "1", "PATH": "/usr/bin:/bin"}
    started = time.monotonic()
    proc = subprocess.Popen([str(VMREPL), "receive", "--state-dir", str(dst_state)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        proc.wait(timeout=30)
        err = proc.stderr.read().decode()
    finally:
        proc.stdin.close()
        proc.kill()
    assert proc.returncode == 1
    assert time.monotonic() - started < 20
    assert err.strip() == "vmrepl: the sender sent nothing for 1 s; giving up; run replicate again: it resumes what arrived"


VM_UUID = "6a1c1a55-2f7e-4c1b-9d7e-0f1e2d3c4b5a"


def receive(dst_state: Path, stream: bytes, env: dict[str, str] | None = None
            ) -> tuple[wire.ReceiverHello, wire.FrameReader, int]:
    """One `vmrepl receive` session fed `stream` (the sender's whole side, written up front): its hello,
    a reader of the rest of its answer, and its exit status."""
    proc = subprocess.run([str(VMREPL), "receive", "--state-dir", str(dst_state)], input=stream,
                          capture_output=True, timeout=60, env={**os.environ, **(env or {})})
    reader = wire.FrameReader(io.BytesIO(proc.stdout), peer="destination")
    return reader.expect(wire.ReceiverHello), reader, proc.returncode


def sender(header: wire.SnapshotHeader | None, disks: Sequence[Sequence[tuple[int, bytes]]] = (), *,
           complete: bool = True, vm_uuid: str = VM_UUID) -> bytes:
    """The sender's stream: hello, `header`, then per disk its DATA frames and DISK_END (the last disk's
    DISK_END and the trailer only if `complete`); only the hello without a header."""
    out = io.BytesIO()
    w = wire.FrameWriter(out)
    w.write(wire.Hello(vm_uuid=vm_uuid, vm_name=f"crafted-{vm_uuid[:4]}"))
    if header is None:
        return out.getvalue()
    w.write(header)
    for i, extents in enumerate(disks):
        for offset, data in extents:
            w.data(offset, data)
        if complete or i < len(disks) - 1:
            w.end_disk()
    if complete:
        w.trailer()
        w.write(wire.End())
    w.flush()
    return out.getvalue()


def test_a_resume_past_what_the_receiver_stored_is_refused(dst_state: Path) -> None:
    """The receiver checks the sender's resume offsets against what it stored itself: a start past it would
    commit a layer with a hole that reads the base (the digests cover only the stream)."""
    header = wire.SnapshotHeader(id="s1", name="s1", parent=None, base=None, created_ns=1, generation=1,
                                 definition="<domain/>", disks=(wire.DiskInfo("vda", MiB, 65536),
                                                                wire.DiskInfo("vdb", MiB, 65536)))
    page = bytes([7]) * 4096
    # vda arrives whole, vdb's layer is begun, then the sender vanishes.
    hello, _, status = receive(dst_state, sender(header, [[(0, page)], [(0, page)]], complete=False))
    assert status == 1 and hello.partial is None
    hello, _, _ = receive(dst_state, sender(None))
    assert hello.partial and (hello.partial.snapshot, hello.partial.base) == ("s1", None)
    assert (hello.partial.disks["vda"], hello.partial.disks.get("vdb", 0)) == (MiB, 0)
    for resume, detail in [({"vda": MiB, "vdb": MiB // 2}, f"disk vdb of s1 at offset {MiB // 2}, but this "
                                                           "transfer is stored here up to 0"),
                           ({"vda": MiB // 2}, f"disk vda of s1 at offset {MiB // 2}, but this transfer is "
                                               f"stored here up to {MiB}")]:
        crafted = replace(header, resume=resume)
        rest = [[(o, page) for o in (MiB // 2, 3 * MiB // 4) if o >= resume.get(d.target, 0)]
                for d in header.disks]
        _, reader, status = receive(dst_state, sender(crafted, rest))
        with pytest.raises(ProtocolError, match=f"^destination: the sender resumes {detail}"):
            reader.expect(wire.Ok)
        assert status == 1
    # The honest resume, at the offsets the receiver reported, still completes.
    honest = replace(header, resume={"vda": MiB})
    _, reader, status = receive(dst_state, sender(honest, [[], [(0, page)]]))
    assert reader.expect(wire.Ok) == wire.Ok("s1") and status == 0


def test_an_abandoned_transfer_leaves_nothing_behind(dst_state: Path) -> None:
    """When the sender sends another snapshot instead of resuming, the interrupted transfer goes whole:
    its partial layers, its progress file, and the layers of the disks that had arrived complete."""
    disks = (wire.DiskInfo("vda", MiB, 65536), wire.DiskInfo("vdb", MiB, 65536))
    s1 = wire.SnapshotHeader(id="s1", name="s1", parent=None, base=None, created_ns=1, generation=1,
                             definition="<domain/>", disks=disks)
    page = bytes([7]) * 4096
    receive(dst_state, sender(s1, [[(0, page)], [(0, page)]], complete=False))
    vm_dir = dst_state / "vms" / VM_UUID
    left = {p.relative_to(vm_dir).as_posix() for p in vm_dir.rglob("*") if p.is_file()}
    assert {"disks/vda/s1.qcow2", "incoming/s1.json"} <= left, left
    s2 = replace(s1, id="s2", name="s2", created_ns=2, generation=2)
    _, reader, status = receive(dst_state, sender(s2, [[(0, page)], [(4096, page)]]))
    assert reader.expect(wire.Ok) == wire.Ok("s2") and status == 0
    left = {p.relative_to(vm_dir).as_posix() for p in vm_dir.rglob("*") if p.is_file()}
    assert left == {"disks/vda/s2.qcow2", "disks/vdb/s2.qcow2", "definitions/s2.xml"}, left


def test_a_transfer_stopped_before_its_first_resume_point_is_found(dst_state: Path) -> None:
    """A transfer that stops early (a small delta never reaches a resume point) is still reported by the
    next hello, and dropped when another snapshot comes: no orphaned partial layer stays behind."""
    s1 = wire.SnapshotHeader(id="s1", name="s1", parent=None, base=None, created_ns=1, generation=1,
                             definition="<domain/>", disks=(wire.DiskInfo("vda", MiB, 65536),))
    page = bytes([7]) * 4096
    _, _, status = receive(dst_state, sender(s1, [[(0, page)]], complete=False))
    assert status == 1 and (dst_state / "vms" / VM_UUID / "disks" / "vda" / ".s1.qcow2.partial").exists()
    hello, _, _ = receive(dst_state, sender(None))
    assert hello.partial == wire.Partial("s1", None, {"vda": 0})
    s2 = replace(s1, id="s2", name="s2", created_ns=2, generation=2)
    _, reader, status = receive(dst_state, sender(s2, [[(0, page)]]))
    assert reader.expect(wire.Ok) == wire.Ok("s2") and status == 0
    vm_dir = dst_state / "vms" / VM_UUID
    assert {p.relative_to(vm_dir).as_posix() for p in vm_dir.rglob("*") if p.is_file()} == \
        {"disks/vda/s2.qcow2", "definitions/s2.xml"}


def test_a_failure_outside_vmrepls_errors_still_reaches_the_sender(dst_state: Path) -> None:
    """The receiver tells the sender of any failure in one ERROR frame, not only of its own errors (here a
    state dir damaged by hand: `incoming` is a file), and exits with one line, not a traceback."""
    (dst_state / "vms" / VM_UUID).mkdir(parents=True)
    (dst_state / "vms" / VM_UUID / "incoming").write_text("not a directory")
    header = wire.SnapshotHeader(id="s1", name="s1", parent=None, base=None, created_ns=1, generation=1,
                                 definition="<domain/>", disks=(wire.DiskInfo("vda", MiB, 65536),))
    proc = subprocess.run([str(VMREPL), "receive", "--state-dir", str(dst_state)], capture_output=True,
                          input=sender(header, [[(0, bytes(4096))]]), timeout=60)
    reader = wire.FrameReader(io.BytesIO(proc.stdout), peer="destination")
    reader.expect(wire.ReceiverHello)
    with pytest.raises(VmreplError, match="^destination: internal error: NotADirectoryError: .*incoming"):
        reader.expect(wire.Ok)
    assert proc.returncode == 1 and proc.stderr.decode().count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr.decode()


def test_a_clone_waits_for_its_origin_vm(dst_state: Path) -> None:
    """A linked clone's layer stands on its origin VM's: the receiver holds the origin's lock too (a prune of
    the origin could remove the base meanwhile), waiting for it, then failing with a message naming it."""
    origin_uuid = "0c1a55e5-2f7e-4c1b-9d7e-0f1e2d3c4b5a"
    disk = wire.DiskInfo("vda", MiB, 65536)
    origin = wire.SnapshotHeader(id="o1", name="o1", parent=None, base=None, created_ns=1, generation=1,
                                 definition="<domain/>", disks=(disk,))
    _, reader, status = receive(dst_state, sender(origin, [[(0, bytes([1]) * 65536)]], vm_uuid=origin_uuid))
    assert reader.expect(wire.Ok) == wire.Ok("o1") and status == 0
    clone = replace(origin, id="c1", name="c1", parent="o1", base="o1", created_ns=2, generation=2)
    stream = sender(clone, [[(65536, bytes([2]) * 65536)]])
    with vm_lock(dst_state, origin_uuid):
        started = time.monotonic()
        _, reader, status = receive(dst_state, stream, env={"VMREPL_ORIGIN_LOCK_SECONDS": "2"})
        took = time.monotonic() - started
    with pytest.raises(LockedError, match="^destination: another vmrepl run is working on VM crafted-0c1a, "
                                          "the origin of this clone; wait for it to finish, then retry$"):
        reader.expect(wire.Ok)
    # It waited the 2 s it was given (a run that did not wait fails well within them), not the default 600.
    assert 2 <= took < 2 + 15, took
    assert status == 1 and not list(dst_state.glob(f"vms/{VM_UUID}/disks/vda/*"))
    _, reader, status = receive(dst_state, stream)
    assert reader.expect(wire.Ok) == wire.Ok("c1") and status == 0
    layer = dst_state / "vms" / VM_UUID / "disks" / "vda" / "c1.qcow2"
    assert backing_of(layer) == dst_state / "vms" / origin_uuid / "disks" / "vda" / "o1.qcow2"


WRONG_OK = """
import sys
from vmrepl import wire
reader, writer = wire.FrameReader(sys.stdin.buffer), wire.FrameWriter(sys.stdout.buffer)
reader.expect(wire.Hello)
writer.write(wire.ReceiverHello())
while not isinstance(reader.read(), wire.Trailer):
    pass
writer.write(wire.Ok("someone-else"))
"""


def test_an_ok_for_another_snapshot_is_refused(make_vm, second_host, src_state, dst_state, run_vmrepl,
                                               work_dir: Path) -> None:
    """A receiver that confirms a snapshot other than the one sent has not committed it."""
    vm = make_vm({"vda": 4 * MiB})
    sid = json.loads(run_vmrepl("snapshot", vm.name, "--json", state_dir=src_state).stdout)["id"]
    script = work_dir / "wrong_ok.py"
    script.write_text(WRONG_OK)
    remote = f"{VMREPL.parent / 'python'} {script}"
    result = run_vmrepl("replicate", vm.name, *second_host.vmrepl_args(dst_state, remote=remote),
                        state_dir=src_state, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith(f"vmrepl: the destination confirmed snapshot someone-else, not {sid} it was sent")
    # Not recorded as committed: the destination said it holds nothing, so there is no anchor, and the
    # next run (against that destination) bases nothing on the snapshot.
    (status,) = run_vmrepl("status", "--json", state_dir=src_state).json()["vms"]
    (target,) = status["targets"]
    assert target["host"] == second_host.destination and target["anchor"] is None, target
    assert target["last_result"].startswith(f"failed: the destination confirmed snapshot someone-else, not {sid}")
