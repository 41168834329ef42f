"""Snapshots and changed extents on real libvirt VMs with two disks (issue 4)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import libvirt
import pytest

from testbed import wait_until
from testbed.vm import read_matches
from vmrepl.state import vm_lock

MiB = 1 << 20
CLUSTER = 64 * 1024


def snapshot(run_vmrepl, state: Path, vm, *extra: str) -> dict:
    return json.loads(run_vmrepl("snapshot", vm.name, "--json", *extra, state_dir=state).stdout)


def changes(run_vmrepl, state: Path, vm, since: str, *extra: str, check: bool = True):
    return run_vmrepl("changes", vm.name, "--since", since, "--json", *extra, state_dir=state, check=check)


def covered(extents: list[dict], disk: str, offset: int, length: int) -> bool:
    """Every byte of [offset, offset+length) of `disk` lies in some reported extent."""
    pos, end = offset, offset + length
    for e in sorted((e for e in extents if e["disk"] == disk), key=lambda e: e["offset"]):
        if e["offset"] <= pos < e["offset"] + e["length"]:
            pos = e["offset"] + e["length"]
            if pos >= end:
                return True
    return False


def span(extents: list[dict]) -> list[tuple[int, int]]:
    """The byte ranges the extents cover, merged, whatever their zero flags."""
    merged: list[list[int]] = []
    for e in sorted(extents, key=lambda e: e["offset"]):
        if merged and merged[-1][1] >= e["offset"]:
            merged[-1][1] = max(merged[-1][1], e["offset"] + e["length"])
        else:
            merged.append([e["offset"], e["offset"] + e["length"]])
    return [tuple(m) for m in merged]


def random_writes(rng: random.Random, vm, count: int) -> list[tuple[str, int, int, int]]:
    """`count` writes of 4 KiB .. 192 KiB at random offsets on both disks; returns what was written."""
    writes = []
    for _ in range(count):
        disk = rng.choice(["vda", "vdb"])
        size = 64 * MiB if disk == "vda" else 32 * MiB
        length = rng.choice([4096, 65536, 3 * 65536, 70000])
        offset = rng.randrange(0, size - length, 512)
        byte = rng.randrange(1, 255)
        vm.write_pattern(disk, offset, length, byte)
        writes.append((disk, offset, length, byte))
    return writes


def check_ground_truth(extents: list[dict], writes, zero_writes) -> None:
    for disk, offset, length, _ in writes:
        assert covered(extents, disk, offset, length), f"write {disk}@{offset}+{length} not reported"
    for disk, offset, length in zero_writes:
        assert covered([e for e in extents if e["zero"]], disk, offset, length), "zero write not flagged zero"
    written = sum(w[2] for w in writes) + sum(z[2] for z in zero_writes)
    reported = sum(e["length"] for e in extents)
    # cluster granularity: at most one extra cluster at each end of each write
    assert reported <= written + 2 * CLUSTER * (len(writes) + len(zero_writes)), (reported, written)


@pytest.mark.parametrize("running", [True, False], ids=["running", "shut-off"])
def test_changes_cover_exactly_the_writes(make_vm, src_state, run_vmrepl, running):
    vm = make_vm()
    rng = random.Random(4 if running else 5)
    random_writes(rng, vm, 5)
    first = snapshot(run_vmrepl, src_state, vm)
    if not running:
        vm.shutoff()
    writes = random_writes(rng, vm, 12)
    vm.write_zeroes("vda", 40 * MiB, 256 * 1024)
    vm.write_pattern("vdb", 8 * MiB, CLUSTER, 0x5a)
    vm.write_zeroes("vdb", 8 * MiB, CLUSTER)  # data then zeros over a whole cluster: a zero change
    second = snapshot(run_vmrepl, src_state, vm)
    assert second["parent"] == first["id"] and second["generation"] == first["generation"] + 1
    extents = json.loads(changes(run_vmrepl, src_state, vm, first["id"], "--until", second["id"]).stdout)
    check_ground_truth(extents, writes, [("vda", 40 * MiB, 256 * 1024)])
    assert covered([e for e in extents if e["zero"]], "vdb", 8 * MiB, CLUSTER)
    only_vdb = json.loads(changes(run_vmrepl, src_state, vm, first["id"], "--until", second["id"],
                                  "--disk", "vdb").stdout)
    assert only_vdb == [e for e in extents if e["disk"] == "vdb"]
    now = json.loads(changes(run_vmrepl, src_state, vm, first["id"], "--disk", "vdb").stdout)
    assert span(now) == span(only_vdb)  # nothing written since: the same bytes (zeros may split otherwise)


def test_snapshot_images_keep_their_instant(make_vm, src_state, run_vmrepl, libvirt_conn):
    """20 snapshots in a row on a running VM; each image reads back its own instant; virsh still works."""
    vm = make_vm()
    taken = []
    for i in range(20):
        vm.write_pattern("vda", i * MiB, 64 * 1024, 0x10 + i)
        vm.write_pattern("vdb", 0, 4096, 0x10 + i)  # overwritten every round
        taken.append(snapshot(run_vmrepl, src_state, vm))
    listed = json.loads(run_vmrepl("list", vm.name, "--json", state_dir=src_state).stdout)
    assert [s["id"] for s in listed] == [s["id"] for s in taken]
    assert [s["generation"] for s in listed] == list(range(1, 21))
    for i, snap in enumerate(taken):
        images = {d["target"]: d["image"] for d in snap["disks"]}
        assert read_matches(images["vda"], i * MiB, 64 * 1024, 0x10 + i)
        assert read_matches(images["vdb"], 0, 4096, 0x10 + i)
        if i + 1 < 20:
            assert read_matches(images["vda"], (i + 1) * MiB, 64 * 1024, 0)
    names = subprocess.run(["virsh", "-q", "snapshot-list", vm.name, "--name"], capture_output=True,
                           text=True, check=True).stdout.split()
    assert sorted(names) == sorted(s["name"] for s in taken)
    vm.shutoff()
    vm.start()  # the domain still boots from its 21-deep chain
    assert vm.is_running()


def test_killed_qemu_falls_back_and_rebuilds_tracking(make_vm, src_state, run_vmrepl):
    vm = make_vm()
    first = snapshot(run_vmrepl, src_state, vm)
    vm.write_pattern("vda", 3 * MiB, 65536, 0x33)
    vm.crash()
    vm.start()
    vm.write_pattern("vdb", 5 * MiB, 65536, 0x44)
    second = snapshot(run_vmrepl, src_state, vm)
    result = changes(run_vmrepl, src_state, vm, first["id"])
    assert "allocation map" in result.stderr  # says that it fell back
    extents = json.loads(result.stdout)
    assert covered(extents, "vda", 3 * MiB, 65536) and covered(extents, "vdb", 5 * MiB, 65536)
    # tracking was rebuilt at that snapshot: the next round uses bitmaps again, silently
    vm.write_pattern("vda", 7 * MiB, 65536, 0x55)
    snapshot(run_vmrepl, src_state, vm)
    result = changes(run_vmrepl, src_state, vm, second["id"])
    assert result.stderr == ""
    extents = json.loads(result.stdout)
    assert covered(extents, "vda", 7 * MiB, 65536)
    assert sum(e["length"] for e in extents) == 65536


def test_a_snapshot_that_fails_after_tracking_was_rebuilt_still_falls_back(make_vm, src_state, run_vmrepl):
    """The broken bitmap is replaced before libvirt snapshots; when that snapshot then fails, the fresh
    bitmap looks sound but lacks the writes made before it: neither `changes` nor the next snapshot may
    trust it (they did: the write below went missing from every later delta)."""
    vm = make_vm()
    first = snapshot(run_vmrepl, src_state, vm)
    vm.write_pattern("vda", 3 * MiB, 65536, 0x33)
    vm.crash()
    vm.start()
    failed = run_vmrepl("snapshot", vm.name, "--quiesce", state_dir=src_state, check=False)  # no guest agent
    assert failed.returncode == 1 and "cannot quiesce" in failed.stderr
    vm.write_pattern("vdb", 5 * MiB, 65536, 0x44)
    now = changes(run_vmrepl, src_state, vm, first["id"])  # up to the disk as it is now
    assert "no sound bitmap" in now.stderr and covered(json.loads(now.stdout), "vda", 3 * MiB, 65536)
    second = snapshot(run_vmrepl, src_state, vm)
    result = changes(run_vmrepl, src_state, vm, first["id"], "--until", second["id"])
    assert "allocation map" in result.stderr
    extents = json.loads(result.stdout)
    assert covered(extents, "vda", 3 * MiB, 65536) and covered(extents, "vdb", 5 * MiB, 65536)


def test_failing_pre_hook_leaves_nothing(make_vm, src_state, run_vmrepl):
    vm = make_vm()
    hooks = src_state / "hooks"
    hooks.mkdir()
    log = src_state / "hook.log"
    (hooks / "10-log").write_text(f"#!/bin/sh\necho \"$VMREPL_PHASE $VMREPL_VM ${{VMREPL_RESULT:-}}\" >> {log}\n")
    (hooks / "20-refuse").write_text("#!/bin/sh\n[ \"$VMREPL_PHASE\" = pre-snapshot ] && "
                                     "{ echo 'database will not freeze' >&2; exit 3; }\nexit 0\n")
    for hook in hooks.iterdir():
        hook.chmod(0o755)
    files_before = sorted(vm.dir.iterdir())
    result = run_vmrepl("snapshot", vm.name, state_dir=src_state, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "vmrepl: pre-snapshot hook 20-refuse failed (exit 3): database will not freeze; "
        "fix the hook or remove it from the hooks directory"]
    assert sorted(vm.dir.iterdir()) == files_before
    assert json.loads(run_vmrepl("status", "--json", state_dir=src_state).stdout)["vms"] == []
    (hooks / "20-refuse").unlink()
    snap = snapshot(run_vmrepl, src_state, vm)
    assert log.read_text().splitlines() == [  # post hooks run after a failed pre phase too (to thaw)
        f"pre-snapshot {vm.name} ", f"post-snapshot {vm.name} failed",
        f"pre-snapshot {vm.name} ", f"post-snapshot {vm.name} ok"]
    assert snap["generation"] == 1


def test_a_failing_post_hook_names_the_snapshot_it_follows(make_vm, src_state, run_vmrepl):
    """A thaw that fails after the snapshot was taken says the snapshot exists (a retry would take a
    second one); after a failed snapshot, the snapshot's own error stays the one reported."""
    vm = make_vm()
    hooks = src_state / "hooks"
    hooks.mkdir()
    (hooks / "10-thaw").write_text("#!/bin/sh\n[ \"$VMREPL_PHASE\" = post-snapshot ] && "  # \351: not UTF-8
                                   "{ printf 'cannot thaw caf\\351\\n' >&2; exit 4; }\nexit 0\n")
    (hooks / "10-thaw").chmod(0o755)
    taken = run_vmrepl("snapshot", vm.name, "--name", "nightly", state_dir=src_state, check=False)
    (held,) = run_vmrepl("list", vm.name, "--json", state_dir=src_state).json()
    assert (taken.returncode, taken.stdout, taken.stderr.splitlines()) == (1, "", [
        f"vmrepl: snapshot nightly ({held['id']}) was taken, but post-snapshot hook 10-thaw failed (exit 4): "
        "cannot thaw caf\ufffd; fix the hook or remove it from the hooks directory"])
    (hooks / "05-freeze").write_text("#!/bin/sh\n[ \"$VMREPL_PHASE\" = pre-snapshot ] && "
                                     "{ echo 'will not freeze' >&2; exit 3; }\nexit 0\n")
    (hooks / "05-freeze").chmod(0o755)
    refused = run_vmrepl("snapshot", vm.name, state_dir=src_state, check=False)
    assert refused.returncode == 1 and refused.stderr.splitlines() == [
        "vmrepl: WARNING: post-snapshot hook 10-thaw failed (exit 4): cannot thaw caf\ufffd; "
        "fix the hook or remove it from the hooks directory",
        "vmrepl: pre-snapshot hook 05-freeze failed (exit 3): will not freeze; "
        "fix the hook or remove it from the hooks directory"]
    assert len(run_vmrepl("list", vm.name, "--json", state_dir=src_state).json()) == 1


def test_a_freeze_hook_that_leaves_a_session_running_is_not_waited_for(make_vm, src_state, run_vmrepl):
    """The usual freeze: the pre hook starts a session that holds a read lock until the post hook ends
    it. Its output must not tie the snapshot to that session (the pipes stayed open until the timeout)."""
    vm = make_vm()
    hooks = src_state / "hooks"
    hooks.mkdir()
    pidfile = src_state / "session.pid"
    (hooks / "10-freeze").write_text(
        f"#!/bin/sh\ncase $VMREPL_PHASE in\n  pre-snapshot) sleep 120 & echo $! > {pidfile} ;;\n"
        f"  post-snapshot) kill $(cat {pidfile}) ;;\nesac\n")
    (hooks / "10-freeze").chmod(0o755)
    started = time.monotonic()
    snapshot(run_vmrepl, src_state, vm)
    assert time.monotonic() - started < 30
    session = Path(f"/proc/{pidfile.read_text().strip()}/stat")
    wait_until(lambda: not session.exists() or session.read_text().rsplit(")", 1)[1].split()[0] == "Z",
               "the post hook ends the session", timeout=10)  # a zombie, when no init reaps it here


def test_a_managed_saved_domain_is_not_snapshotted(make_vm, src_state, run_vmrepl):
    """Restoring a managed save image runs QEMU on the disks it was saved with, so the layer a snapshot
    froze meanwhile would be written again. Refused in one line; libvirt and the catalog unchanged."""
    vm = make_vm()
    snapshot(run_vmrepl, src_state, vm)
    files_before = sorted(vm.dir.iterdir())
    vm.dom.managedSave(0)
    refused = run_vmrepl("snapshot", vm.name, state_dir=src_state, check=False)
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1
    assert f"{vm.name} has a managed save image" in refused.stderr and "virsh managedsave-remove" in refused.stderr
    assert sorted(vm.dir.iterdir()) == files_before and vm.dom.snapshotNum(0) == 1
    assert len(run_vmrepl("list", vm.name, "--json", state_dir=src_state).json()) == 1
    vm.start()  # restored from the image, on the disks as they were: the snapshot still stands
    assert vm.is_running()
    snapshot(run_vmrepl, src_state, vm)


def test_bad_input_gets_one_line(make_vm, src_state, run_vmrepl, libvirt_conn, tmp_path):
    vm = make_vm()
    a = snapshot(run_vmrepl, src_state, vm)
    b = snapshot(run_vmrepl, src_state, vm)
    cases = {
        ("snapshot", "no-such-vm"): "no domain 'no-such-vm'",
        ("snapshot", vm.name, "--name", "../etc"): "invalid snapshot name '../etc'",
        ("changes", vm.name, "--since", "nope"): "no snapshot 'nope'",
        ("changes", vm.name, "--since", b["id"], "--until", a["id"]): "is not older than --until",
        ("changes", "ghost", "--since", a["id"]): "no VM 'ghost' in the catalog",
        ("changes", vm.name, "--since", a["id"], "--disk", "vdz"): "has no disk 'vdz'",
    }
    for args, message in cases.items():
        result = run_vmrepl(*args, state_dir=src_state, check=False)
        assert result.returncode in (1, 2), args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_raw_disk_is_refused(make_vm, src_state, run_vmrepl, libvirt_conn):
    vm = make_vm(start=False)
    xml = vm.dom.XMLDesc(0)
    raw = vm.dir / "raw.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "1M"], check=True)
    xml = xml.replace("</devices>", f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                                    f"<source file='{raw}'/><target dev='vdc' bus='virtio'/></disk></devices>")
    libvirt_conn.defineXML(xml)
    result = run_vmrepl("snapshot", vm.name, state_dir=src_state, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith(f"vmrepl: disk vdc of {vm.name} is raw, not qcow2; convert it")
    assert len(result.stderr.strip().splitlines()) == 1


def test_second_run_on_the_same_vm_fails_clearly(make_vm, src_state, run_vmrepl):
    vm = make_vm()
    with vm_lock(src_state, vm.uuid):
        result = run_vmrepl("snapshot", vm.name, state_dir=src_state, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "vmrepl: another vmrepl run is working on this VM; wait for it to finish, then retry"
    snapshot(run_vmrepl, src_state, vm)  # and the lock is free again


def test_wait_lets_a_second_run_queue_behind_the_first(make_vm, src_state, run_vmrepl):
    """`--wait SECONDS` (as `flock -w`): a timer's snapshot waits for a replicate still running."""
    vm = make_vm()
    held = threading.Event()

    def first_run() -> None:
        with vm_lock(src_state, vm.uuid):
            held.set()
            time.sleep(1.5)

    other = threading.Thread(target=first_run)
    other.start()
    held.wait()
    started = time.monotonic()
    short = run_vmrepl("snapshot", vm.name, "--wait", "0.3", state_dir=src_state, check=False)
    assert short.returncode == 1 and "another vmrepl run is working on this VM" in short.stderr
    assert snapshot(run_vmrepl, src_state, vm, "--wait", "30")["generation"] == 1
    assert time.monotonic() - started >= 1.4
    other.join()


def test_quiesce_without_guest_agent_is_refused_cleanly(make_vm, src_state, run_vmrepl):
    vm = make_vm()
    files_before = sorted(vm.dir.iterdir())
    result = run_vmrepl("snapshot", vm.name, "--quiesce", state_dir=src_state, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith(f"vmrepl: cannot quiesce {vm.name}: ")
    assert "install and start qemu-guest-agent" in result.stderr and len(result.stderr.splitlines()) == 1
    assert sorted(vm.dir.iterdir()) == files_before
    assert json.loads(run_vmrepl("status", "--json", state_dir=src_state).stdout)["vms"] == []
    snapshot(run_vmrepl, src_state, vm)  # and without --quiesce it works


@pytest.mark.parametrize("running", [True, False], ids=["running", "shut-off"])
def test_changes_up_to_the_disk_as_it_is_now(make_vm, src_state, run_vmrepl, running):
    """Without --until: the frozen layers' bitmaps and the active layer's (read from the running QEMU)."""
    vm = make_vm()
    first = snapshot(run_vmrepl, src_state, vm)
    vm.write_pattern("vda", 2 * MiB, 65536, 0x21)
    snapshot(run_vmrepl, src_state, vm)
    if not running:
        vm.shutoff()
    vm.write_pattern("vdb", 3 * MiB, 3 * 65536, 0x22)  # after the last snapshot: only in the active layer
    vm.write_pattern("vdb", 9 * MiB, 65536, 0x23)
    vm.write_zeroes("vdb", 9 * MiB, 65536)
    result = changes(run_vmrepl, src_state, vm, first["id"])
    assert result.stderr == ""  # from the bitmaps, no fallback
    extents = json.loads(result.stdout)
    assert covered(extents, "vda", 2 * MiB, 65536) and covered(extents, "vdb", 3 * MiB, 3 * 65536)
    assert covered([e for e in extents if e["zero"]], "vdb", 9 * MiB, 65536)
    assert sum(e["length"] for e in extents) == 5 * 65536
    if running:  # nothing of the peek is left in QEMU: no extra bitmap, no NBD server
        import libvirt_qemu

        nodes = json.loads(libvirt_qemu.qemuMonitorCommand(
            vm.dom, '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}', 0))["return"]
        assert {b["name"] for n in nodes for b in n.get("dirty-bitmaps", [])} == {"vmrepl"}
        assert changes(run_vmrepl, src_state, vm, first["id"]).stdout == result.stdout  # the server was stopped


def test_what_a_killed_changes_left_in_qemu_is_cleared(make_vm, src_state, run_vmrepl):
    """`changes` killed while it read the running QEMU (SIGKILL, a timeout) leaves its bitmap copy, its NBD
    server and its export in QEMU; the next `changes` clears them instead of failing until a restart."""
    from vmrepl.source.domain import monitor, top_bitmaps

    vm = make_vm()
    first = snapshot(run_vmrepl, src_state, vm)
    vm.write_pattern("vda", MiB, 65536, 0x31)
    expected = changes(run_vmrepl, src_state, vm, first["id"]).stdout
    node, _ = top_bitmaps(vm.dom)[str(vm.current_image("vda"))]
    socket_dir = Path(tempfile.mkdtemp(prefix="vmrepl-test-", dir="/run"))
    socket_dir.chmod(0o777)  # QEMU's user creates the socket
    try:
        monitor(vm.dom, "block-dirty-bitmap-add", node=node, name="vmrepl-peek", disabled=True)
        monitor(vm.dom, "nbd-server-start", addr={"type": "unix", "data": {"path": str(socket_dir / "nbd.sock")}})
        monitor(vm.dom, "block-export-add", type="nbd", id="vmrepl-live", **{"node-name": node})
        assert changes(run_vmrepl, src_state, vm, first["id"]).stdout == expected
        assert monitor(vm.dom, "query-block-exports") == []
        bitmaps = {b["name"] for n in monitor(vm.dom, "query-named-block-nodes", flat=True)
                   for b in n.get("dirty-bitmaps", [])}
        assert bitmaps == {"vmrepl"}
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_changes_of_a_running_disk_shrunk_and_grown_back(make_vm, src_state, run_vmrepl):
    """QEMU zeroes the regrown part of the active layer without marking its bitmap: the live report
    still names it, as the same changes read from the snapshot that freezes the layer do."""
    vm = make_vm({"vda": 32 * MiB})
    vm.write_pattern("vda", 20 * MiB, MiB, 0x11)
    first = snapshot(run_vmrepl, src_state, vm)
    vm.dom.blockResize("vda", 16 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    vm.dom.blockResize("vda", 32 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    vm.write_pattern("vda", 0, 65536, 0x22)
    live = changes(run_vmrepl, src_state, vm, first["id"])
    assert live.stderr == ""  # from the bitmaps, no fallback
    extents = json.loads(live.stdout)
    assert covered(extents, "vda", 0, 65536)
    assert covered([e for e in extents if e["zero"]], "vda", 20 * MiB, MiB)  # the old data reads zeros now
    second = snapshot(run_vmrepl, src_state, vm)
    frozen = changes(run_vmrepl, src_state, vm, first["id"], "--until", second["id"], "--disk", "vda")
    assert span(json.loads(frozen.stdout)) == span(extents)
