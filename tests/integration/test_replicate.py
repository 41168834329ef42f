"""Replication end to end to the second host over ssh (issue 5): real VM, real sshd, real qcow2 chains."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from testbed import public_dir
from vmrepl.qemu import img

MiB = 1 << 20


def replicate(run_vmrepl, host, src_state: Path, dst_state: Path, vm, *extra: str) -> list[dict]:
    out = run_vmrepl("replicate", vm.name, "--json", *host.vmrepl_args(dst_state), *extra, state_dir=src_state)
    return json.loads(out.stdout)


def listing(run_vmrepl, state: Path, vm) -> list[dict]:
    return json.loads(run_vmrepl("list", vm.name, "--json", state_dir=state).stdout)


def assert_destination_matches(run_vmrepl, src_state: Path, dst_state: Path, vm) -> None:
    """Every destination snapshot reads as its source snapshot, at its size; every layer is a clean qcow2."""
    source = {s["id"]: s for s in listing(run_vmrepl, src_state, vm)}
    held = listing(run_vmrepl, dst_state, vm)
    assert held, "the destination holds nothing"
    for snap in held:
        mine = source[snap["id"]]
        assert (snap["generation"], snap["created_ns"], snap["parent"]) == \
            (mine["generation"], mine["created_ns"], mine["parent"])
        theirs = {d["target"]: d["image"] for d in snap["disks"]}
        for disk in mine["disks"]:
            layer = theirs[disk["target"]]
            assert img.compare(disk["image"], layer), f"{snap['name']} {disk['target']} differs"
            # compare reads a missing tail as zeros: a layer of the wrong size would still pass it
            assert img.info(layer)["virtual-size"] == img.info(disk["image"])["virtual-size"], \
                f"{snap['name']} {disk['target']} has another size"
            report = img.check(layer)
            assert not report.get("corruptions") and not report.get("leaks") and not report.get("check-errors")
            chain = img.info(layer, chain=True)
            assert all(entry["format"] == "qcow2" for entry in chain)
            assert Path(layer).is_relative_to(dst_state)


def test_five_rounds_on_a_running_two_disk_vm(make_vm, second_host, src_state, dst_state, run_vmrepl):
    vm = make_vm({"vda": 64 * MiB, "vdb": 32 * MiB})
    rng = random.Random(7)
    sent_ids = []
    for round_ in range(5):
        for _ in range(6):
            disk, size = rng.choice([("vda", 64 * MiB), ("vdb", 32 * MiB)])
            length = rng.choice([4096, 65536, 300_000, MiB])
            vm.write_pattern(disk, rng.randrange(0, size - length, 512), length, rng.randrange(1, 256))
        vm.write_random("vda", rng.randrange(0, 60 * MiB, 4096), 256 * 1024)
        vm.write_zeroes("vdb", rng.randrange(0, 30 * MiB, 65536), MiB)
        snap = json.loads(run_vmrepl("snapshot", vm.name, "--json", state_dir=src_state).stdout)
        result = replicate(run_vmrepl, second_host, src_state, dst_state, vm)
        assert [r["id"] for r in result] == [snap["id"]]
        assert result[0]["base"] == (sent_ids[-1] if sent_ids else None)
        assert result[0]["position"] == "append"
        sent_ids.append(snap["id"])
        assert_destination_matches(run_vmrepl, src_state, dst_state, vm)
    assert [s["id"] for s in listing(run_vmrepl, dst_state, vm)] == sent_ids
    assert replicate(run_vmrepl, second_host, src_state, dst_state, vm) == []  # nothing left: a no-op
    run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)
    status = json.loads(run_vmrepl("status", "--json", state_dir=src_state).stdout)
    (target,) = status["vms"][0]["targets"]
    assert target["anchor"] == sent_ids[-1] and target["last_result"] == "ok"
    # the same state for Prometheus (text) and for scripts (--json: one JSON document, as every command)
    vm_labels = f'vm="{vm.name}",vm_uuid="{vm.uuid}"'
    text = run_vmrepl("metrics", state_dir=src_state).stdout.splitlines()
    assert f"vmrepl_snapshots{{{vm_labels}}} 5" in text
    assert f'vmrepl_target_last_run_ok{{{vm_labels},target="{target["host"]}"}} 1' in text
    samples = {m["name"]: m for m in run_vmrepl("metrics", "--json", state_dir=src_state).json()["metrics"]}
    assert samples["vmrepl_snapshots"] == {"name": "vmrepl_snapshots", "labels": {"vm": vm.name, "vm_uuid": vm.uuid},
                                           "value": 5}
    assert samples["vmrepl_target_last_run_ok"]["labels"]["target"] == target["host"]
    assert 0 <= samples["vmrepl_target_lag_seconds"]["value"] < 600


def test_bytes_sent_follow_the_changed_bytes(make_vm, second_host, src_state, dst_state, run_vmrepl):
    vm = make_vm({"vda": 128 * MiB})
    for i in range(8):
        vm.write_random("vda", i * 8 * MiB, 2 * MiB)
    run_vmrepl("snapshot", vm.name, state_dir=src_state)
    replicate(run_vmrepl, second_host, src_state, dst_state, vm)

    changed = 0
    for i in range(16):  # 16 scattered incompressible extents, some overwriting old data
        vm.write_random("vda", i * 7 * MiB + 65536, 512 * 1024)
        changed += 512 * 1024
    run_vmrepl("snapshot", vm.name, state_dir=src_state)
    (delta,) = replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    assert changed <= delta["bytes_changed"] <= changed + 32 * 65536
    assert delta["bytes_sent"] <= 1.02 * delta["bytes_changed"] + 64 * 1024, delta

    vm.write_zeroes("vda", 0, 32 * MiB)  # zeros over data: a change that costs almost nothing
    run_vmrepl("snapshot", vm.name, state_dir=src_state)
    (zeros,) = replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    assert zeros["bytes_changed"] >= 32 * MiB
    assert zeros["bytes_sent"] < 0.01 * 32 * MiB, zeros
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)


def test_shut_off_vm_and_dry_run(make_vm, second_host, src_state, dst_state, run_vmrepl):
    vm = make_vm(start=False)
    vm.write_pattern("vda", 5 * MiB, MiB, 0x42)
    first = json.loads(run_vmrepl("snapshot", vm.name, "--json", state_dir=src_state).stdout)
    vm.write_pattern("vdb", 0, 65536, 0x43)
    second = json.loads(run_vmrepl("snapshot", vm.name, "--json", state_dir=src_state).stdout)
    plan = json.loads(run_vmrepl("replicate", vm.name, "--json", "--dry-run",
                                 *second_host.vmrepl_args(dst_state), state_dir=src_state).stdout)
    assert [(p["id"], p["base"], p["position"], p["tracked"]) for p in plan] == \
        [(first["id"], None, "append", True), (second["id"], first["id"], "append", True)]
    assert run_vmrepl("list", vm.name, state_dir=dst_state, check=False).returncode == 1  # a dry run sends nothing
    result = replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    assert [r["id"] for r in result] == [first["id"], second["id"]]
    assert [p["bytes_changed"] for p in plan] == [r["bytes_changed"] for r in result] == [MiB, 65536]  # the estimate
    assert result[1]["bytes_sent"] < 20 * 1024  # 64 KiB of a repeated byte, compressed
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)
    definition = dst_state / "vms" / vm.uuid / "definitions" / f"{second['id']}.xml"
    assert vm.name in definition.read_text()


def test_verify_names_the_snapshot_and_disk_that_differ(make_vm, second_host, src_state, dst_state, run_vmrepl):
    vm = make_vm()
    vm.write_pattern("vdb", MiB, MiB, 0x11)
    snap = json.loads(run_vmrepl("snapshot", vm.name, "--json", state_dir=src_state).stdout)
    replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    layer = next(d["image"] for d in listing(run_vmrepl, dst_state, vm)[0]["disks"] if d["target"] == "vdb")
    os.system(f"qemu-io -f qcow2 -c 'write -P 0x12 {MiB} 4096' {layer} >/dev/null")  # rot on the destination
    result = run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"vmrepl: 1 disk(s) differ on {second_host.destination}: {snap['name']} disk vdb;"
                                     " replicate those snapshots again, or investigate the destination's storage")


def test_an_ssh_config_alias_through_a_jump_host(make_vm, second_host, src_state, dst_state, run_vmrepl, work_dir):
    """`--to backup`, an alias of the admin's ssh config that goes through a jump host (here the second
    host itself): replicate, verify and status work by that name, and their sessions come from the
    jump host (as in test_transport.py's jump test: sshd sees its own address, not the source's)."""
    vm = make_vm(start=False)
    vm.write_pattern("vda", 3 * MiB, MiB, 0x5a)
    snap = json.loads(run_vmrepl("snapshot", vm.name, "--json", state_dir=src_state).stdout)
    config = work_dir / "ssh_config"
    config.write_text(second_host.ssh_config("backup", ProxyJump="bastion") + second_host.ssh_config("bastion"))
    seen = work_dir / "ssh_connection"  # the remote shell notes where each session came from, off stdout
    over = ["--to", "backup", "--ssh-config", str(config),
            "--remote-command", f"echo $SSH_CONNECTION >> {seen}; exec vmrepl receive --state-dir {dst_state}"]
    result = json.loads(run_vmrepl("replicate", vm.name, "--json", *over, state_dir=src_state).stdout)
    assert [r["id"] for r in result] == [snap["id"]]
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)
    run_vmrepl("verify", vm.name, *over, state_dir=src_state)
    assert [line.split()[0] for line in seen.read_text().splitlines()] == [second_host.address] * 2
    (status,) = json.loads(run_vmrepl("status", "--json", state_dir=src_state).stdout)["vms"]
    assert [(t["host"], t["anchor"]) for t in status["targets"]] == [("backup", snap["id"])]


@pytest.mark.parametrize("bad", ["root@", "root@host:notaport", "[::1"])
def test_bad_destination_is_a_usage_error(make_vm, src_state, run_vmrepl, bad):
    vm = make_vm(start=False)
    run_vmrepl("snapshot", vm.name, state_dir=src_state)
    result = run_vmrepl("replicate", vm.name, "--to", bad, state_dir=src_state, check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"vmrepl: invalid destination {bad!r}: "), result.stderr
    assert "; write [USER@]HOST[:PORT], e.g. " in result.stderr, result.stderr


def test_a_chain_rewritten_behind_vmrepls_back_costs_only_the_differing_blocks(
        make_vm, second_host, src_state, dst_state, run_vmrepl):
    """Invariant 7: when the base's layer is no longer below the snapshot (here the chain was flattened by
    hand, `qemu-img rebase -b ""`), vmrepl compares block digests with the destination and sends only the
    blocks that differ."""
    vm = make_vm({"vda": 64 * MiB})
    vm.write_random("vda", 0, 8 * MiB)
    run_vmrepl("snapshot", vm.name, state_dir=src_state)
    replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    vm.write_random("vda", 32 * MiB, MiB)
    vm.shutoff()
    subprocess.run(["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", str(vm.current_image("vda"))], check=True)
    run_vmrepl("snapshot", vm.name, state_dir=src_state)
    (plan,) = json.loads(run_vmrepl("replicate", vm.name, "--json", "--dry-run", *second_host.vmrepl_args(dst_state),
                                    state_dir=src_state).stdout)
    assert not plan["tracked"] and plan["bytes_changed"] >= 9 * MiB, plan  # at most all the data it holds
    result = run_vmrepl("replicate", vm.name, "--json", *second_host.vmrepl_args(dst_state), state_dir=src_state)
    assert "is no longer below" in result.stderr and "sending the 1 that differ" in result.stderr, result.stderr
    (sent,) = json.loads(result.stdout)
    assert sent["bytes_sent"] <= 1.02 * MiB + 64 * 1024, sent  # not the 9 MiB the disk holds
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)
    run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)


@pytest.mark.parametrize("cluster", [4096, 2 * MiB], ids=["4k-clusters", "2m-clusters"])
def test_source_disks_of_other_cluster_sizes(make_vm, second_host, src_state, dst_state, run_vmrepl, cluster):
    """Tuned images (4 KiB clusters for small random writes, 2 MiB with large disks): the bitmap's
    granularity follows the cluster size, the destination's layers keep 64 KiB clusters, and a small write
    still costs about its own size on the wire (the receiver drops what did not change)."""
    vm = make_vm({"vda": 64 * MiB}, start=False)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}",
                    vm.current_image("vda"), str(64 * MiB)], check=True)
    vm.start()
    vm.write_random("vda", 0, 3 * MiB)
    run_vmrepl("snapshot", vm.name, state_dir=src_state)
    replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    for i in range(3):
        vm.write_random("vda", 5 * MiB + i * 7 * MiB + 3 * 4096, 4096)
        vm.write_zeroes("vda", i * MiB, 65536)
        run_vmrepl("snapshot", vm.name, state_dir=src_state)
        (sent,) = replicate(run_vmrepl, second_host, src_state, dst_state, vm)
        assert sent["bytes_changed"] >= 4096 + 65536 and sent["bytes_sent"] < 4096 + 16 * 1024, sent
        assert_destination_matches(run_vmrepl, src_state, dst_state, vm)
    run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)


def test_a_gap_on_the_sending_host_costs_no_full_send(make_vm, second_host, src_state, dst_state, work_dir,
                                                      run_vmrepl):
    """Host B holds g1 and g3 but never got g2 (sent with --snapshot, or a --latest-first run stopped
    before its backfill); host C holds g1 and g2. When B sends g3 on to C (after a failover, say), its
    base is g1, found through the parent C recorded for g2: a delta, not the whole disk again."""
    vm = make_vm({"vda": 64 * MiB})
    ids = []
    for i, byte in enumerate((0x11, 0x22, 0x33)):
        vm.write_pattern("vda", 8 * MiB * i, 4 * MiB, byte)
        vm.write_random("vda", 8 * MiB * i + 4 * MiB, 4 * MiB)
        if i == 2:
            vm.write_pattern("vda", 0, MiB, 0x44)  # g3 also rewrites some of what g1 held
        ids.append(run_vmrepl("snapshot", vm.name, "--json", state_dir=src_state).json()["id"])
    third = public_dir(work_dir / "third-state")
    to_b, to_c = second_host.vmrepl_args(dst_state), second_host.vmrepl_args(third)
    for snapshot, destination in ((ids[0], to_b), (ids[2], to_b), (ids[0], to_c), (ids[1], to_c)):
        run_vmrepl("replicate", vm.name, "--snapshot", snapshot, *destination, state_dir=src_state)
    (sent,) = run_vmrepl("replicate", vm.name, "--json", *to_c, state_dir=dst_state).json()  # B to C
    assert (sent["id"], sent["base"]) == (ids[2], ids[0])
    assert sent["bytes_changed"] == 17 * MiB and sent["bytes_sent"] < 10 * MiB, sent  # g2's and g3's changes
    run_vmrepl("verify", vm.name, *to_c, state_dir=dst_state)
    run_vmrepl("verify", vm.name, *to_c, state_dir=src_state)  # and C's g3 is the original's
