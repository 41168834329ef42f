"""Pruning received snapshots on a destination, on real chains written by the real `vmrepl receive`:
the snapshots that stay read byte for byte as their sources, chains stay linear, the pruned layers'
files go, the receiver tells senders what was pruned, a pruned snapshot can still be sent again by
name, and a crash at each step leaves readable chains that the next prune finishes."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_insert import assert_destination_sound, held, layer, random_writes, receive
from tests.integration.test_replicate import assert_destination_matches, listing, replicate
from testbed import VMREPL
from testbed.chains import Source, bases_for
from vmrepl.catalog import Catalog
from vmrepl.qemu import img
from vmrepl.qemu.storage_daemon import StorageDaemon
from vmrepl.sink import prune as received
from vmrepl.sink.chain import backing_of
from vmrepl.state import CRASH_ENV
from vmrepl.sink.store import Store
from vmrepl.wire import End, FrameReader, FrameWriter, Hello, ReceiverHello

MiB = 1 << 20


def prune(dst: Path, keep: str, *options: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMREPL_")} | ({CRASH_ENV: crash_at} if crash_at else {})
    return subprocess.run([str(VMREPL), "prune", "vm", "--keep", keep, *options, "--json", "--state-dir", str(dst)],
                          capture_output=True, text=True, env=env, timeout=120)


def files(dst: Path) -> dict[Path, int]:
    return {p: p.stat().st_ino for p in (dst / "vms").rglob("*") if p.is_file()}


def receiver_hello(dst: Path, src: Source, since_generation: int = 0) -> ReceiverHello:
    """What `vmrepl receive` tells a sender that says hello for this VM."""
    out = io.BytesIO()
    w = FrameWriter(out)
    w.write(Hello(src.vm_uuid, "vm", since_generation=since_generation))
    w.write(End())
    proc = receive(dst, out.getvalue())
    assert proc.returncode == 0, proc.stderr
    return FrameReader(io.BytesIO(proc.stdout), peer="receiver").expect(ReceiverHello)


@pytest.fixture
def source(work_dir: Path) -> Source:
    src = Source(work_dir / "src", disks=("vda", "vdb"))
    src.root.mkdir()
    rng = random.Random(11)
    for _ in range(5):
        src.snapshot({t: random_writes(rng, 5) for t in src.disks})
    return src


def test_prune_keeps_the_rest_byte_for_byte_and_is_not_sent_again(work_dir: Path, source: Source,
                                                                   daemon: StorageDaemon) -> None:
    dst = work_dir / "dst"
    assert receive(dst, source.stream(bases_for([1, 2, 3, 4, 5]), daemon)).returncode == 0

    before = files(dst)
    dry = prune(dst, "last=2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["pruned"] == ["snap1", "snap2", "snap3"] and files(dst) == before

    done = prune(dst, "last=2")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pruned"] == ["snap1", "snap2", "snap3"]
    assert held(dst, source) == [4, 5]
    assert_destination_sound(dst, source)  # 4 is now the bottom of each chain, 5 stands on it
    assert backing_of(layer(dst, source, "vda", 4)) is None
    assert not [p for k in (1, 2, 3) for t in source.disks for p in [layer(dst, source, t, k)] if p.exists()]
    assert not list((dst / "vms" / source.vm_uuid / "definitions").glob("s[123].xml"))

    hello = receiver_hello(dst, source)
    assert [s.id for s in hello.snapshots] == ["s4", "s5"] and set(hello.pruned) == {"s1", "s2", "s3"}
    # A sender that holds generations 2 and up could only send s2 and s3 again: s1 is not listed (so
    # the hello follows the source's retention, not every snapshot ever pruned here).
    assert set(receiver_hello(dst, source, since_generation=2).pruned) == {"s2", "s3"}

    # Asked for by name, a pruned snapshot arrives again, inserted below 4; it is no longer "pruned".
    proc = receive(dst, source.stream([(3, None)], daemon))
    assert proc.returncode == 0, proc.stderr
    assert held(dst, source) == [3, 4, 5]
    assert_destination_sound(dst, source)
    assert set(receiver_hello(dst, source).pruned) == {"s1", "s2"}


def test_a_snapshot_in_the_middle_goes(work_dir: Path, source: Source, daemon: StorageDaemon) -> None:
    dst = work_dir / "dst"
    assert receive(dst, source.stream(bases_for([1, 2, 3, 4]), daemon)).returncode == 0
    with Catalog(dst) as catalog:
        store = Store(dst, catalog)
        received.prune_one(store, daemon, catalog.find_snapshot("s2"))
    assert held(dst, source) == [1, 3, 4]
    assert_destination_sound(dst, source)  # 3's layer, rebuilt, stands on 1's and reads as before


def test_protected_snapshots_stay(work_dir: Path, source: Source, daemon: StorageDaemon) -> None:
    dst = work_dir / "dst"
    assert receive(dst, source.stream(bases_for([1, 2, 3]), daemon)).returncode == 0
    (dst / "vms" / source.vm_uuid / "recovered" / "s2").mkdir(parents=True)  # as `vmrepl recover` leaves it
    proc = prune(dst, "last=0")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["pruned"] == ["snap1"]
    assert {p["name"]: p["reason"] for p in doc["protected"]} == {
        "snap2": "a VM recovered from it (vmrepl recover) stands on its layers",
        "snap3": "the newest snapshot: the next delta from the source is based on it"}
    assert held(dst, source) == [2, 3]
    assert_destination_sound(dst, source)


STEPS = ["rebuild-written", "rebuild-renamed", "prune-rebuilt", "prune-forgotten"]


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_each_step_of_a_prune(work_dir: Path, source: Source, daemon: StorageDaemon, step: str) -> None:
    dst = work_dir / "dst"
    assert receive(dst, source.stream(bases_for([1, 2, 3]), daemon)).returncode == 0
    proc = prune(dst, "last=1", crash_at=step)
    assert proc.returncode == -9, f"prune did not reach {step}: {proc.stderr!r}"
    for target in source.disks:  # every catalogued snapshot still reads as its source
        for k in held(dst, source):
            assert img.compare(source.image(target, k), layer(dst, source, target, k)), f"{target} of {k} after {step}"
    proc = prune(dst, "last=1")
    assert proc.returncode == 0, proc.stderr
    assert held(dst, source) == [3]
    assert_destination_sound(dst, source)
    assert sorted(p.name for p in (dst / "vms" / source.vm_uuid / "disks" / "vda").iterdir()) == ["s3.qcow2"]


def test_a_sender_does_not_send_pruned_snapshots_again(make_vm, second_host, src_state, dst_state, run_vmrepl):
    vm = make_vm({"vda": 32 * MiB})
    ids = []
    for i in range(4):
        vm.write_random("vda", i * 4 * MiB, MiB)
        ids.append(json.loads(run_vmrepl("snapshot", vm.name, "--json", state_dir=src_state).stdout)["id"])
    assert [r["id"] for r in replicate(run_vmrepl, second_host, src_state, dst_state, vm)] == ids

    pruned = json.loads(run_vmrepl("prune", vm.name, "--keep", "last=1", "--json", state_dir=dst_state).stdout)
    assert len(pruned["pruned"]) == 3
    assert [s["id"] for s in listing(run_vmrepl, dst_state, vm)] == ids[-1:]
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)

    vm.write_random("vda", 20 * MiB, MiB)
    ids.append(json.loads(run_vmrepl("snapshot", vm.name, "--json", state_dir=src_state).stdout)["id"])
    result = replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    assert [(r["id"], r["base"]) for r in result] == [(ids[-1], ids[-2])]  # the pruned ones stay away

    result = replicate(run_vmrepl, second_host, src_state, dst_state, vm, "--snapshot", ids[1])
    assert [(r["id"], r["position"]) for r in result] == [(ids[1], "insert")]  # asked for by name
    assert [s["id"] for s in listing(run_vmrepl, dst_state, vm)] == [ids[1], ids[3], ids[4]]
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)


def test_a_disk_that_grew_after_the_pruned_snapshot(work_dir: Path, daemon: StorageDaemon) -> None:
    src = Source(work_dir / "src")
    src.root.mkdir()
    src.snapshot({"vda": [(0, 2 * MiB, 0x11)]})
    src.snapshot({"vda": [(MiB, 2 * MiB, 0x22), (7 * MiB, MiB, 0x33)]})
    src.size *= 2  # snapshot 3's disk is twice as large, written past the old end too
    src.snapshot({"vda": [(6 * MiB, 4 * MiB, 0x44), (12 * MiB, MiB, None)]})
    dst = work_dir / "dst"
    assert receive(dst, src.stream(bases_for([1, 2, 3]), daemon)).returncode == 0
    with Catalog(dst) as catalog:
        store = Store(dst, catalog)
        received.prune_one(store, daemon, catalog.find_snapshot("s2"))  # 3 now stands on 1, half its size
        assert_destination_sound(dst, src)
        received.prune_one(store, daemon, catalog.find_snapshot("s1"))  # 3 is the whole chain
    assert held(dst, src) == [3]
    assert_destination_sound(dst, src)


def test_a_layer_that_another_file_stands_on_stays(work_dir: Path, source: Source, daemon: StorageDaemon) -> None:
    """Any qcow2 in the store that names a layer as its backing keeps that layer: here the overlay that
    `vmrepl clone` puts beside the layer it clones (a partial transfer or a fork would count the same),
    which no catalog row names. A rebuild's leftover does not count, and goes."""
    dst = work_dir / "dst"
    assert receive(dst, source.stream(bases_for([1, 2, 3]), daemon)).returncode == 0
    overlay = layer(dst, source, "vda", 1).with_name("clone-vda.qcow2")
    img.create(overlay, size=source.size, backing=layer(dst, source, "vda", 1))
    leftover = layer(dst, source, "vda", 3).with_name(".s3.qcow2.rebased")  # a rebuild killed before its rename
    img.create(leftover, size=source.size, backing=layer(dst, source, "vda", 2))

    proc = prune(dst, "last=0")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["pruned"] == ["snap2"], doc
    assert {p["name"]: p["reason"].split(" (")[0] for p in doc["protected"]} == {
        "snap1": "other layers stand on its layer", "snap3": "the newest snapshot: the next delta from the source is based on it"}
    assert held(dst, source) == [1, 3] and not leftover.exists()
    assert_destination_sound(dst, source)
    assert img.compare(source.image("vda", 1), overlay)
