"""Out-of-order arrivals end to end: a real VM, `vmrepl snapshot`, `vmrepl replicate` over ssh to the
second host's `vmrepl receive`; after every step each destination snapshot equals its source and each
disk's layers form one line, oldest at the bottom."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.integration.test_replicate import assert_destination_matches, listing, replicate
from vmrepl.sink.chain import backing_of

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
