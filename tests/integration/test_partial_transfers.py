"""Interrupted incoming transfers on a destination, seen with `vmrepl status` and discarded with `vmrepl
prune VM --drop-partial` (what `zfs receive -s` and `zfs receive -A` are to ZFS), against the real `vmrepl
receive`: first on crafted streams cut part-way (a first full send, so no catalog row names the VM; a
delta whose base the partial kept from the retention; a transfer still under way, which is not touched),
then on a running VM whose replication over ssh is killed: the next replicate sends that snapshot again
from its start, and `verify` passes."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from pathlib import Path

import pytest

from testbed import VMREPL
from tests.integration.test_faults import DELTA, DISKS, SLOW, MiB, Rig, wait_until
from tests.integration.test_receive import VM_UUID, receive, sender
from vmrepl import wire
from vmrepl.state import CRASH_ENV
from vmrepl.units import human_bytes

PAGE = 4096
CRAFTED_DISKS = (wire.DiskInfo("vda", MiB, 65536), wire.DiskInfo("vdb", MiB, 65536))


# --- helpers --------------------------------------------------------------------------------------

def header(k: int, base: int | None = None) -> wire.SnapshotHeader:
    """Snapshot `sk` of the crafted VM, sent as a delta on `s{base}` (a full send without one)."""
    return wire.SnapshotHeader(id=f"s{k}", name=f"s{k}", parent=f"s{k - 1}" if k > 1 else None,
                               base=f"s{base}" if base else None, created_ns=k, generation=k,
                               definition="<domain/>", disks=CRAFTED_DISKS)


def data(k: int) -> list[list[tuple[int, bytes]]]:
    return [[(0, bytes([k]) * PAGE)], [(PAGE, bytes([k]) * PAGE)]]


def stop_part_way(dst: Path, k: int, base: int | None = None) -> None:
    """Send `sk` until vda arrived whole and vdb's layer is begun, then vanish."""
    _, _, status = receive(dst, sender(header(k, base), data(k), complete=False))
    assert status == 1


def commit(dst: Path, k: int, base: int | None = None) -> None:
    _, reader, status = receive(dst, sender(header(k, base), data(k)))
    assert reader.expect(wire.Ok) == wire.Ok(f"s{k}") and status == 0


def files(vm_dir: Path) -> dict[str, int]:
    """Every file under the VM's directory (relative path -> inode): a file replaced shows too."""
    return {p.relative_to(vm_dir).as_posix(): p.stat().st_ino for p in vm_dir.rglob("*") if p.is_file()}


def allocated(paths: list[Path]) -> int:
    return sum(p.stat().st_blocks * 512 for p in paths)


def status(run_vmrepl, dst: Path) -> list[dict]:  # type: ignore[no-untyped-def]
    return json.loads(run_vmrepl("status", "--json", state_dir=dst).stdout)["vms"]


def partial_lines(run_vmrepl, dst: Path) -> list[str]:  # type: ignore[no-untyped-def]
    return [line for line in run_vmrepl("status", state_dir=dst).stdout.splitlines() if line.startswith("PARTIAL")]


def prune(run_vmrepl, dst: Path, *args: str, check: bool = True):  # type: ignore[no-untyped-def]
    return run_vmrepl("prune", *args, state_dir=dst, check=check)


# --- crafted streams -------------------------------------------------------------------------------

def test_a_first_send_stopped_part_way_is_shown_and_dropped(dst_state: Path, run_vmrepl) -> None:
    """No catalog row names the VM yet: `status` lists it by the name its progress file keeps (by uuid
    when an older vmrepl wrote the file without one), and `prune NAME --drop-partial` takes it; the next
    send of that snapshot starts afresh and commits."""
    stop_part_way(dst_state, 1)
    vm_dir = dst_state / "vms" / VM_UUID
    layers = [vm_dir / "disks" / "vda" / "s1.qcow2", vm_dir / "disks" / "vdb" / ".s1.qcow2.partial"]
    progress = vm_dir / "incoming" / "s1.json"
    assert set(files(vm_dir)) == {"disks/vda/s1.qcow2", "disks/vdb/.s1.qcow2.partial", "incoming/s1.json"}
    assert allocated(layers) > 0

    assert status(run_vmrepl, dst_state) == [{
        "vm": "crafted-6a1c", "vm_uuid": VM_UUID, "snapshots": 0, "newest": None, "newest_created_ns": None,
        "targets": [], "partial": [{"snapshot_id": "s1", "base_id": None, "since_ns": progress.stat().st_mtime_ns,
                                    "bytes": allocated(layers)}]}]
    (line,) = partial_lines(run_vmrepl, dst_state)
    assert line.startswith(f"PARTIAL crafted-6a1c: snapshot s1 on base -, {human_bytes(allocated(layers))}, "
                           "last progress ")
    assert line.endswith("vmrepl prune crafted-6a1c --drop-partial")

    doc = json.loads(progress.read_text())  # as an older vmrepl wrote it: no name, so the uuid stands in
    del doc["vm_name"]
    progress.write_text(json.dumps(doc))
    assert [vm["vm"] for vm in status(run_vmrepl, dst_state)] == [VM_UUID]

    before = files(vm_dir)
    dry = prune(run_vmrepl, dst_state, VM_UUID, "--drop-partial", "--dry-run", "--json").json()
    assert dry == {"pruned": [], "dry_run": True, "protected": [], "dropped_partial": ["s1"]}
    assert files(vm_dir) == before
    assert prune(run_vmrepl, dst_state, VM_UUID, "--drop-partial", "--dry-run").stdout.startswith(
        f"{VM_UUID}: would drop the partial transfer of snapshot s1 (")

    done = prune(run_vmrepl, dst_state, VM_UUID, "--drop-partial", "--json").json()
    assert done == {"pruned": [], "dry_run": False, "protected": [], "dropped_partial": ["s1"]}
    assert files(vm_dir) == {}
    assert status(run_vmrepl, dst_state) == [] and partial_lines(run_vmrepl, dst_state) == []

    hello, _, _ = receive(dst_state, sender(None))
    assert hello.partial is None  # the sender is told of nothing to resume: it sends s1 from its start
    commit(dst_state, 1)
    assert set(files(vm_dir)) == {"disks/vda/s1.qcow2", "disks/vdb/s1.qcow2", "definitions/s1.xml"}


def test_a_first_send_stopped_part_way_is_dropped_by_the_vms_name(dst_state: Path, run_vmrepl) -> None:
    stop_part_way(dst_state, 1)
    done = prune(run_vmrepl, dst_state, "crafted-6a1c", "--drop-partial", "--json").json()
    assert done["dropped_partial"] == ["s1"] and files(dst_state / "vms" / VM_UUID) == {}


def test_a_name_two_vms_share_is_not_guessed(dst_state: Path, run_vmrepl) -> None:
    """The source defined the VM anew (a new uuid, the old name) and its first send stopped: `status`
    names that transfer by uuid, and `prune NAME --drop-partial` refuses to pick one of the two."""
    commit(dst_state, 1)
    other = "6a1c0000-0000-4000-8000-000000000000"  # the same name, crafted-6a1c
    first = dataclasses.replace(header(1), id="t1", name="t1")  # snapshot ids are unique across VMs
    _, _, code = receive(dst_state, sender(first, data(1), complete=False, vm_uuid=other))
    assert code == 1
    (line,) = partial_lines(run_vmrepl, dst_state)
    assert line.endswith(f"vmrepl prune {other} --drop-partial")
    both = prune(run_vmrepl, dst_state, "crafted-6a1c", "--drop-partial", check=False)
    assert both.returncode == 2 and both.stderr.splitlines() == [
        f"vmrepl: 'crafted-6a1c' names more than one VM here: {other}, {VM_UUID}; "
        "give the VM's uuid (vmrepl status --json shows it)"]
    assert prune(run_vmrepl, dst_state, other, "--drop-partial", "--json").json()["dropped_partial"] == ["t1"]
    assert files(dst_state / "vms" / other) == {} and partial_lines(run_vmrepl, dst_state) == []


def test_dropping_a_partial_makes_its_layers_gone_before_its_progress_file(dst_state: Path, monkeypatch) -> None:
    """A crash in between must not leave layer files that no progress file names (nothing would find
    them again): their directories are fsynced before the progress file goes."""
    from vmrepl.catalog import Catalog
    from vmrepl.sink import store as store_module

    stop_part_way(dst_state, 1)
    events: list[tuple[str, str]] = []
    unlink = Path.unlink
    monkeypatch.setattr(store_module, "fsync_dir", lambda d: events.append(("fsync", Path(d).name)))
    monkeypatch.setattr(Path, "unlink", lambda p, **kw: (events.append(("unlink", p.name)), unlink(p, **kw))[1])
    with Catalog(dst_state) as catalog:
        store_module.Store(dst_state, catalog).drop_partial(VM_UUID, "s1")
    assert events.index(("fsync", "vda")) < events.index(("unlink", "s1.json"))
    assert events.index(("fsync", "vdb")) < events.index(("unlink", "s1.json"))
    assert events[-1] == ("fsync", "incoming")


def test_drop_partial_with_keep_prunes_what_the_partial_kept(dst_state: Path, run_vmrepl) -> None:
    """A partial delta on s1 keeps s1 from the retention (its base, and its layers stand on s1's);
    `--drop-partial --keep` drops it first, so s1 goes; the dry run says so and changes nothing."""
    commit(dst_state, 1)
    commit(dst_state, 2, base=1)
    stop_part_way(dst_state, 3, base=1)
    vm_dir = dst_state / "vms" / VM_UUID
    (vm,) = status(run_vmrepl, dst_state)
    assert (vm["vm"], vm["snapshots"], vm["newest"]) == ("crafted-6a1c", 2, "s2")
    assert [(p["snapshot_id"], p["base_id"]) for p in vm["partial"]] == [("s3", "s1")]

    kept = prune(run_vmrepl, dst_state, VM_UUID, "--keep", "last=1", "--dry-run", "--json").json()
    assert kept["pruned"] == [] and kept["dropped_partial"] == []
    assert "interrupted transfer" in {p["name"]: p["reason"] for p in kept["protected"]}["s1"]

    before = files(vm_dir)
    dry = prune(run_vmrepl, dst_state, VM_UUID, "--keep", "last=1", "--drop-partial", "--dry-run", "--json").json()
    assert (dry["pruned"], dry["dropped_partial"]) == (["s1"], ["s3"])
    assert files(vm_dir) == before

    done = prune(run_vmrepl, dst_state, "crafted-6a1c", "--keep", "last=1", "--drop-partial", "--json").json()
    assert (done["pruned"], done["dropped_partial"]) == (["s1"], ["s3"])
    assert set(files(vm_dir)) == {"disks/vda/s2.qcow2", "disks/vdb/s2.qcow2", "definitions/s2.xml"}
    (vm,) = status(run_vmrepl, dst_state)
    assert (vm["snapshots"], vm["partial"]) == (1, [])


def test_a_transfer_under_way_is_not_touched(dst_state: Path, run_vmrepl) -> None:
    """While `vmrepl receive` holds the VM's lock, `prune --drop-partial` (dry run or not) refuses in one
    line and leaves every file; once the session ended, the same command drops what it left."""
    receiver = subprocess.Popen([str(VMREPL), "receive", "--state-dir", str(dst_state)], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    vm_dir = dst_state / "vms" / VM_UUID
    try:
        assert receiver.stdin is not None
        receiver.stdin.write(sender(header(1), data(1), complete=False))  # vdb's DISK_END never comes
        receiver.stdin.flush()
        wait_until(lambda: (vm_dir / "disks" / "vdb" / ".s1.qcow2.partial").exists(), "vdb's layer is begun")
        (vm,) = status(run_vmrepl, dst_state)  # status takes no lock: it shows the transfer under way
        assert [p["snapshot_id"] for p in vm["partial"]] == ["s1"]
        before = files(vm_dir)
        for extra in [(), ("--dry-run",), ("--keep", "last=1")]:
            refused = prune(run_vmrepl, dst_state, VM_UUID, "--drop-partial", *extra, check=False)
            assert refused.returncode == 1, refused.stderr
            assert refused.stderr.splitlines() == [
                f"vmrepl: a transfer of {VM_UUID} is running on this host (another vmrepl run holds its lock); "
                "its partial is in use: retry once it has ended"]
            assert refused.stdout == ""
        assert files(vm_dir) == before
        assert receiver.poll() is None, "the receiver did not survive the refused prunes"
        receiver.stdin.close()
        assert receiver.wait(timeout=60) == 1  # the stream ended mid-disk
    finally:
        receiver.kill()
        receiver.wait()
    assert files(vm_dir) == before
    assert prune(run_vmrepl, dst_state, VM_UUID, "--drop-partial", "--json").json()["dropped_partial"] == ["s1"]
    assert files(vm_dir) == {}


def test_a_commit_that_stopped_before_removing_its_progress_file_is_not_partial(dst_state: Path, run_vmrepl) -> None:
    """The receiver dies between the catalog row and the removal of the progress file (FORMAT.md,
    "Committing a snapshot", step 6): the snapshot is held, nothing is partial."""
    commit(dst_state, 1)
    _, _, code = receive(dst_state, sender(header(2, base=1), data(2)), env={CRASH_ENV: "after-catalog"})
    stale = dst_state / "vms" / VM_UUID / "incoming" / "s2.json"
    assert code != 0 and stale.exists()
    (vm,) = status(run_vmrepl, dst_state)
    assert (vm["snapshots"], vm["partial"]) == (2, [])
    prune(run_vmrepl, dst_state, VM_UUID, "--keep", "last=1", "--dry-run")
    assert stale.exists()  # a dry run changes nothing, not even a leftover it would tidy
    hello, _, _ = receive(dst_state, sender(None))
    assert hello.partial is None  # nothing to resume: s2 is held
    assert not stale.exists()  # and the leftover is gone, so it no longer keeps s1 as a base
    done = prune(run_vmrepl, dst_state, VM_UUID, "--keep", "last=1", "--drop-partial", "--json").json()
    assert (done["pruned"], done["dropped_partial"]) == (["s1"], [])


def test_prune_needs_keep_or_drop_partial(dst_state: Path, run_vmrepl) -> None:
    neither = prune(run_vmrepl, dst_state, VM_UUID, check=False)
    assert (neither.returncode, neither.stderr.splitlines()) == (2, [
        "vmrepl: nothing to prune: give --keep SPEC, --drop-partial, or both; see vmrepl prune --help"])
    unknown = prune(run_vmrepl, dst_state, "nosuchvm", "--drop-partial", check=False)
    assert unknown.returncode == 1 and len(unknown.stderr.splitlines()) == 1
    assert unknown.stderr.startswith("vmrepl: no VM 'nosuchvm' in the catalog at ")


# --- a real VM, replication killed over ssh --------------------------------------------------------

@pytest.fixture
def rig(make_vm, second_host, src_state, dst_state, work_dir, run_vmrepl) -> Rig:
    (work_dir / "home").mkdir()
    return Rig(make_vm(DISKS, label="partial"), second_host, src_state, dst_state, work_dir, run_vmrepl)


def test_a_killed_replication_is_shown_dropped_and_sent_again(rig: Rig) -> None:
    first = rig.snapshot({"vda": MiB, "vdb": MiB})
    rig.replicate()
    before = rig.destination()
    snap = rig.snapshot(DELTA)
    sender_proc = rig.start_replicate(*SLOW)
    try:
        wait_until(lambda: rig.layer_file(snap, "vda").exists(), "vda has arrived whole")
    finally:
        sender_proc.kill()
        sender_proc.wait()
    rig.no_receiver_left()
    vm_dir = rig.dst / "vms" / snap["vm_uuid"]
    mine = [p for p in vm_dir.rglob(f"*{snap['id']}*") if p.is_file()]
    layers = [p for p in mine if p.parent.parent.name == "disks"]
    progress = vm_dir / "incoming" / f"{snap['id']}.json"
    assert progress in mine and rig.layer_file(snap, "vda") in layers, mine

    # status: the catalogued VM as before, plus its partial transfer
    (vm,) = status(rig.run_vmrepl, rig.dst)
    assert {k: v for k, v in vm.items() if k != "partial"} == {
        "vm": rig.vm.name, "vm_uuid": snap["vm_uuid"], "snapshots": 1, "newest": first["id"],
        "newest_created_ns": first["created_ns"], "targets": []}
    assert vm["partial"] == [{"snapshot_id": snap["id"], "base_id": first["id"],
                              "since_ns": progress.stat().st_mtime_ns, "bytes": allocated(layers)}]
    assert vm["partial"][0]["bytes"] >= DELTA["vda"]  # vda's changed data arrived whole
    text = rig.run_vmrepl("status", state_dir=rig.dst).stdout.splitlines()
    assert re.match(r"VM +SNAPSHOTS +NEWEST +TARGET +ANCHOR +LAG +LAST$", text[0]), text
    assert text[1].split()[:3] == [rig.vm.name, "1", first["id"][:8]]
    assert text[2].startswith(f"PARTIAL {rig.vm.name}: snapshot {snap['id'][:8]} on base {first['id'][:8]}, ")

    # the dry run changes nothing; the real one takes every file of the transfer, nothing else
    tree = files(vm_dir)
    dry = prune(rig.run_vmrepl, rig.dst, rig.vm.name, "--drop-partial", "--dry-run", "--json").json()
    assert dry["dropped_partial"] == [snap["id"]] and files(vm_dir) == tree
    done = prune(rig.run_vmrepl, rig.dst, rig.vm.name, "--drop-partial", "--json").json()
    assert done == {"pruned": [], "dry_run": False, "protected": [], "dropped_partial": [snap["id"]]}
    assert not [p for p in vm_dir.rglob(f"*{snap['id']}*") if p.is_file()]
    assert rig.destination() == before
    (vm,) = status(rig.run_vmrepl, rig.dst)
    assert vm["partial"] == [] and partial_lines(rig.run_vmrepl, rig.dst) == []

    # the next replicate sends the snapshot whole again (a resume would skip vda, 2/3 of it)
    (sent,) = rig.replicate().json()
    assert sent["id"] == snap["id"]
    assert sent["bytes_sent"] > 0.9 * sent["bytes_changed"], sent
    held, layers_after = rig.destination()
    assert [s["id"] for s in held] == [first["id"], snap["id"]]
    assert before[1].items() <= layers_after.items()
    assert not progress.exists()
    rig.verify()
