"""Retention on the source (vmrepl prune): anchors stay, remaining snapshots read as before, and a pruned
snapshot that a destination still holds stays a delta base (issue 6 item 4)."""

from __future__ import annotations

import sqlite3

import pytest

from vmrepl.qemu import img
from vmrepl.state import CRASH_ENV

MiB = 1 << 20


def names(run_vmrepl, state, vm) -> list[str]:
    return [s["name"] for s in run_vmrepl("list", vm.name, "--json", state_dir=state).json()]


def test_prune_keeps_anchors_and_a_pruned_snapshot_stays_a_base(make_vm, second_host, src_state, dst_state,
                                                                 run_vmrepl):
    vm = make_vm({"vda": 64 * MiB})
    for i, name in enumerate(["s1", "s2"]):
        vm.write_random("vda", i * 4 * MiB, MiB)
        run_vmrepl("snapshot", vm.name, "--name", name, state_dir=src_state)
    run_vmrepl("replicate", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)  # anchor: s2
    # A received layer holds exactly its changes: read from its own clusters, which is no fallback.
    received = run_vmrepl("changes", vm.name, "--since", "s1", "--until", "s2", "--json", state_dir=dst_state)
    assert [(e["offset"], e["length"]) for e in received.json()] == [(4 * MiB, MiB)] and received.stderr == ""
    for i, name in enumerate(["s3", "s4"], 2):
        vm.write_random("vda", i * 4 * MiB, MiB)
        run_vmrepl("snapshot", vm.name, "--name", name, state_dir=src_state)
    images = {s["name"]: s["disks"][0]["image"] for s in run_vmrepl("list", vm.name, "--json", state_dir=src_state).json()}

    dry = run_vmrepl("prune", vm.name, "--keep", "last=1", "--dry-run", "--json", state_dir=src_state).json()
    assert dry["pruned"] == ["s1", "s3"] and names(run_vmrepl, src_state, vm) == ["s1", "s2", "s3", "s4"]
    assert {p["name"] for p in dry["protected"]} == {"s2"}  # the anchor (s4 is kept by the rule itself)
    run_vmrepl("prune", vm.name, "--keep", "last=1", state_dir=src_state)
    assert names(run_vmrepl, src_state, vm) == ["s2", "s4"]
    mine = {s["name"]: s["disks"][0]["image"] for s in run_vmrepl("list", vm.name, "--json", state_dir=src_state).json()}
    theirs = {s["name"]: s["disks"][0]["image"] for s in run_vmrepl("list", vm.name, "--json", state_dir=dst_state).json()}
    assert img.compare(mine["s2"], theirs["s2"])  # the anchor reads as before
    assert mine["s4"] == images["s3"]  # s4's layer was merged down into s3's, which s4 now owns
    assert vm.is_running()
    merged = run_vmrepl("replicate", vm.name, "--json", *second_host.vmrepl_args(dst_state), state_dir=src_state)
    assert merged.stderr == ""  # s4's layer, merged, holds exactly s3's and s4's changes: no fallback
    (sent,) = merged.json()
    assert sent["base"] == names_to_ids(run_vmrepl, src_state, vm)["s2"]
    assert 2 * MiB <= sent["bytes_sent"] <= 2 * MiB * 1.02 + 64 * 1024  # s3's and s4's changes, nothing more

    # The source forgets this destination, so s4, held there, is no anchor any more.
    vm.write_random("vda", 32 * MiB, MiB)
    run_vmrepl("snapshot", vm.name, "--name", "s5", state_dir=src_state)
    forget_targets(src_state)
    run_vmrepl("prune", vm.name, "--keep", "last=1", state_dir=src_state)
    assert names(run_vmrepl, src_state, vm) == ["s5"]
    plan = run_vmrepl("replicate", vm.name, "--dry-run", *second_host.vmrepl_args(dst_state), state_dir=src_state)
    assert "delta from s4" in plan.stdout  # pruned here, still the youngest base the destination holds
    (sent,) = run_vmrepl("replicate", vm.name, "--json", *second_host.vmrepl_args(dst_state), state_dir=src_state).json()
    # a superset of the true delta (s4's layer had become the chain's bottom: all 5 MiB written) ...
    assert MiB <= sent["bytes_sent"] <= 5 * MiB * 1.02 + 64 * 1024
    run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)
    layer = run_vmrepl("list", vm.name, "--json", state_dir=dst_state).json()[-1]["disks"][0]["image"]
    own = img.allocation_map(layer, own_layer_only=True)
    assert sum(e.length for e in own if not e.zero) <= MiB + 2 * 65536  # ... of which only s5's is stored


def names_to_ids(run_vmrepl, state, vm) -> dict[str, str]:
    return {s["name"]: s["id"] for s in run_vmrepl("list", vm.name, "--json", state_dir=state).json()}


def replicated_vm(make_vm, second_host, src_state, dst_state, run_vmrepl, *, snapshots: int, running: bool):
    """A two-disk VM with snapshots s1..sN, each with its own patterns, all on the destination."""
    vm = make_vm({"vda": 32 * MiB, "vdb": 16 * MiB}, start=running)
    for i in range(snapshots):
        vm.write_pattern("vda", i * MiB, MiB, 0x30 + i)
        vm.write_pattern("vdb", i * 65536, 65536, 0x40 + i)
        run_vmrepl("snapshot", vm.name, "--name", f"s{i + 1}", state_dir=src_state)
    run_vmrepl("replicate", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)
    return vm


def forget_targets(state) -> None:
    """The source forgets its destinations (their records are gone): no snapshot is an anchor any more."""
    db = sqlite3.connect(state / "catalog.sqlite")
    with db:
        db.execute("DELETE FROM targets")
    db.close()


def test_prune_of_a_shut_off_domain(make_vm, second_host, src_state, dst_state, run_vmrepl):
    vm = replicated_vm(make_vm, second_host, src_state, dst_state, run_vmrepl, snapshots=4, running=False)
    result = run_vmrepl("prune", vm.name, "--keep", "last=1", "--json", state_dir=src_state).json()
    assert result["pruned"] == ["s1", "s2", "s3"]
    assert names(run_vmrepl, src_state, vm) == ["s4"]
    run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)  # s4 reads as before
    for snap in run_vmrepl("list", vm.name, "--json", state_dir=src_state).json():
        for disk in snap["disks"]:
            assert not img.check(disk["image"]).get("corruptions")
    vm.start()  # the domain boots from the shortened chain
    vm.write_pattern("vda", 20 * MiB, 65536, 0x55)
    run_vmrepl("snapshot", vm.name, "--name", "s5", state_dir=src_state)
    (sent,) = run_vmrepl("replicate", vm.name, "--json", *second_host.vmrepl_args(dst_state), state_dir=src_state).json()
    assert sent["bytes_sent"] < 64 * 1024  # one compressible cluster: a delta on s4
    run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)
    bad = run_vmrepl("prune", vm.name, "--keep", "yearly=1", state_dir=src_state, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("vmrepl: invalid retention rule 'yearly=1'")


@pytest.mark.parametrize("running,step", [(True, "merge-begun"), (True, "merge-committed"), (True, "merge-recorded"),
                                          (False, "merge-committed")],
                         ids=["running-begun", "running-committed", "running-recorded", "shut-off-committed"])
def test_a_prune_killed_at_each_step_is_finished_by_the_next(make_vm, second_host, src_state, dst_state, run_vmrepl,
                                                             running, step):
    """The pruned snapshot turns into a ghost before its layer takes the younger one's data, so no
    visible snapshot ever reads wrong; the next prune finishes the merge and leaves no stray file."""
    vm = replicated_vm(make_vm, second_host, src_state, dst_state, run_vmrepl, snapshots=3, running=running)
    forget_targets(src_state)  # no anchor: s1 and s2 may go
    files = {p.name for p in vm.dir.iterdir()}

    crashed = run_vmrepl("prune", vm.name, "--keep", "last=1", env={CRASH_ENV: step}, check=False)
    assert crashed.returncode == -9, crashed.stderr
    assert names(run_vmrepl, src_state, vm) == ["s2", "s3"]  # s1 is a ghost from the first step on
    run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)  # s2, s3 read as before

    run_vmrepl("prune", vm.name, "--keep", "last=1", state_dir=src_state)
    assert names(run_vmrepl, src_state, vm) == ["s3"]
    run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)
    left = {p.name for p in vm.dir.iterdir()}
    assert not {f for f in files - left if ".s1." not in f and ".s2." not in f}  # only the merged tops went
    assert len(files - left) == 4  # s2's and s3's own layers of vda and vdb, merged down
    for snap in run_vmrepl("list", vm.name, "--json", state_dir=src_state).json():
        for disk in snap["disks"]:
            assert not img.check(disk["image"]).get("corruptions")


def test_another_domain_whose_chain_cannot_be_read_stops_a_prune(make_vm, src_state, run_vmrepl):
    """Whether the other domain stands on one of this VM's layers is unknown: nothing is merged, and the
    one line names that domain."""
    vm = make_vm({"vda": 32 * MiB}, start=False)
    for name in ["s1", "s2"]:
        vm.write_pattern("vda", 0, MiB, 0x41)
        run_vmrepl("snapshot", vm.name, "--name", name, state_dir=src_state)
    other = make_vm({"vda": 32 * MiB}, start=False)
    other.current_image("vda").unlink()
    refused = run_vmrepl("prune", vm.name, "--keep", "last=1", state_dir=src_state, check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith(f"vmrepl: cannot read the chain of disk vda of another domain, {other.name},")
    assert f"repair or undefine {other.name}, then prune again" in refused.stderr
    assert names(run_vmrepl, src_state, vm) == ["s1", "s2"]
