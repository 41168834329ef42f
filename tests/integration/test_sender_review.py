"""Sender review: every snapshot on the destination reads as its source snapshot, byte for byte, also when
a disk shrank and grew again, the base is several snapshots back, or the source was edited outside vmrepl."""

from __future__ import annotations

import json
import subprocess

import libvirt

from tests.integration.test_replicate import assert_destination_matches, listing, replicate

MiB = 1 << 20


def resize(vm, target: str, size: int) -> None:
    """qemu-img resize of a shut-off VM's active layer (`--shrink` when smaller)."""
    args = ["qemu-img", "resize", "-q", "-f", "qcow2"]
    if size < vm.dom.blockInfo(target)[0]:
        args.append("--shrink")
    subprocess.run([*args, str(vm.current_image(target)), str(size)], check=True)


def snapshot(run_vmrepl, src_state, vm) -> dict:
    return json.loads(run_vmrepl("snapshot", vm.name, "--json", state_dir=src_state).stdout)


def test_a_disk_shrunk_and_grown_back_between_two_snapshots(make_vm, second_host, src_state, dst_state,
                                                             run_vmrepl):
    # QEMU zeroes the regrown part of a layer whose backing file is longer, but no dirty bitmap
    # records a resize: the destination's layer would still show the base's data there.
    vm = make_vm({"vda": 32 * MiB}, start=False)
    vm.write_pattern("vda", 20 * MiB, MiB, 0x11)
    snapshot(run_vmrepl, src_state, vm)
    replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    resize(vm, "vda", 16 * MiB)
    resize(vm, "vda", 32 * MiB)
    vm.write_pattern("vda", 0, 65536, 0x22)
    snapshot(run_vmrepl, src_state, vm)
    replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)
    run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)


def test_a_disk_shrunk_then_grown_with_the_base_two_snapshots_back(make_vm, second_host, src_state, dst_state,
                                                                   run_vmrepl):
    vm = make_vm({"vda": 32 * MiB}, start=False)
    vm.write_pattern("vda", 20 * MiB, MiB, 0x11)
    first = snapshot(run_vmrepl, src_state, vm)
    resize(vm, "vda", 16 * MiB)
    snapshot(run_vmrepl, src_state, vm)
    resize(vm, "vda", 32 * MiB)
    third = snapshot(run_vmrepl, src_state, vm)
    replicate(run_vmrepl, second_host, src_state, dst_state, vm, "--snapshot", first["id"])
    (sent,) = replicate(run_vmrepl, second_host, src_state, dst_state, vm, "--snapshot", third["id"])
    assert sent["base"] == first["id"]
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)
    run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)


def test_a_disabled_bitmap_on_a_shut_off_vm_is_not_trusted(make_vm, second_host, src_state, dst_state, run_vmrepl):
    # A bitmap that no longer records (`qemu-img bitmap --disable`, or any tool that left it so) misses
    # the writes made since; a running domain's is already refused (`recording`), a shut-off one's too.
    vm = make_vm({"vda": 16 * MiB}, start=False)
    vm.write_pattern("vda", 0, MiB, 0x11)
    snapshot(run_vmrepl, src_state, vm)
    replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    subprocess.run(["qemu-img", "bitmap", "--disable", "-f", "qcow2", str(vm.current_image("vda")), "vmrepl"],
                   check=True)
    vm.write_pattern("vda", 4 * MiB, MiB, 0x22)
    snapshot(run_vmrepl, src_state, vm)
    replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)


def reads_zeros(image: str, offset: int, length: int) -> bool:
    """Whether the image reads zeros there through its chain (qemu-io exits 1 on a pattern mismatch)."""
    return subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", f"read -P 0 {offset} {length}", image],
                          capture_output=True).returncode == 0


def test_a_prune_never_merges_a_shrunk_layer_into_a_longer_one(make_vm, second_host, src_state, dst_state,
                                                               run_vmrepl):
    # Merging s2 (16 MiB) into s1's layer (32 MiB) leaves s1's tail in the merged file; s3, grown back and
    # rebased onto that file, would read s1's old data where it read zeros.
    vm = make_vm({"vda": 32 * MiB}, start=False)
    vm.write_pattern("vda", 20 * MiB, MiB, 0x11)
    snapshot(run_vmrepl, src_state, vm)
    resize(vm, "vda", 16 * MiB)
    snapshot(run_vmrepl, src_state, vm)
    resize(vm, "vda", 32 * MiB)
    third = snapshot(run_vmrepl, src_state, vm)
    assert reads_zeros(third["disks"][0]["image"], 20 * MiB, MiB)
    run_vmrepl("prune", vm.name, "--keep", "last=2", state_dir=src_state)
    assert len(listing(run_vmrepl, src_state, vm)) == 3  # s1 stays: s2 is smaller
    third = next(s for s in listing(run_vmrepl, src_state, vm) if s["id"] == third["id"])
    assert reads_zeros(third["disks"][0]["image"], 20 * MiB, MiB)
    assert reads_zeros(str(vm.current_image("vda")), 20 * MiB, MiB)
    replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)
    run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)


def test_a_base_several_snapshots_back_over_lost_tracking_and_a_resize(make_vm, second_host, src_state, dst_state,
                                                                       run_vmrepl):
    # s1 -> s4 unions every layer in between: bitmaps, a layer whose bitmap QEMU's death left
    # inconsistent (its allocation map instead), and an online resize; then s2 and s3 are inserted.
    vm = make_vm({"vda": 16 * MiB, "vdb": 8 * MiB})
    vm.write_pattern("vda", 0, 2 * MiB, 0x01)
    first = snapshot(run_vmrepl, src_state, vm)
    replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    vm.write_pattern("vda", MiB, 65536, 0x02)
    snapshot(run_vmrepl, src_state, vm)
    vm.write_pattern("vdb", 3 * MiB, 65536, 0x03)
    vm.crash()
    vm.start()
    vm.write_zeroes("vda", 0, 65536)
    snapshot(run_vmrepl, src_state, vm)
    vm.dom.blockResize("vda", 24 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    vm.write_pattern("vda", 20 * MiB, 65536, 0x04)
    fourth = snapshot(run_vmrepl, src_state, vm)
    (sent,) = replicate(run_vmrepl, second_host, src_state, dst_state, vm, "--snapshot", fourth["id"])
    assert sent["base"] == first["id"]
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)
    assert [s["position"] for s in replicate(run_vmrepl, second_host, src_state, dst_state, vm)] == ["insert"] * 2
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)
    run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)


def test_a_disk_size_that_is_not_a_multiple_of_the_cluster(make_vm, second_host, src_state, dst_state, run_vmrepl):
    size = 16 * MiB + 1536
    vm = make_vm({"vda": size}, start=False)
    vm.write_pattern("vda", size - 4096, 4096, 0x05)
    snapshot(run_vmrepl, src_state, vm)
    replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    vm.write_pattern("vda", size - 1024, 1024, 0x06)
    vm.write_zeroes("vda", size - 8192, 2048)
    snapshot(run_vmrepl, src_state, vm)
    replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)
    run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)


def test_an_external_snapshot_taken_outside_vmrepl(make_vm, second_host, src_state, dst_state, run_vmrepl):
    # The user's own `virsh snapshot-create-as --disk-only` freezes a layer no catalog row names: its
    # writes come from its allocation map.
    vm = make_vm({"vda": 16 * MiB})
    vm.write_pattern("vda", 0, MiB, 0x01)
    snapshot(run_vmrepl, src_state, vm)
    replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    vm.write_pattern("vda", 2 * MiB, 65536, 0x02)
    subprocess.run(["virsh", "-q", "snapshot-create-as", vm.name, "mine", "--disk-only", "--atomic",
                    "--diskspec", f"vda,file={vm.dir}/vda.mine.qcow2"], check=True, capture_output=True)
    vm.write_pattern("vda", 4 * MiB, 65536, 0x03)
    snapshot(run_vmrepl, src_state, vm)
    replicate(run_vmrepl, second_host, src_state, dst_state, vm)
    assert_destination_matches(run_vmrepl, src_state, dst_state, vm)
