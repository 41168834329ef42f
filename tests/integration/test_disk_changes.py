"""Invariant 6: the set of disks may change between snapshots. A disk added since the base travels whole
(sparse), a resized disk keeps its chain, a detached disk ends its chain; the other disks are unaffected."""

from __future__ import annotations

import subprocess

from vmrepl.qemu import img

MiB = 1 << 20


def check_all(run_vmrepl, vm, src_state, dst_state) -> None:
    source = {s["id"]: s for s in run_vmrepl("list", vm.name, "--json", state_dir=src_state).json()}
    for snap in run_vmrepl("list", vm.name, "--json", state_dir=dst_state).json():
        theirs = {d["target"]: d for d in snap["disks"]}
        mine = {d["target"]: d for d in source[snap["id"]]["disks"]}
        assert theirs.keys() == mine.keys()
        for target, disk in mine.items():
            assert theirs[target]["virtual_size"] == disk["virtual_size"]
            assert img.compare(disk["image"], theirs[target]["image"]), (snap["name"], target)


def test_added_resized_and_detached_disks(make_vm, libvirt_conn, second_host, src_state, dst_state, run_vmrepl):
    vm = make_vm({"vda": 32 * MiB, "vdb": 16 * MiB}, start=False)
    vm.write_pattern("vda", 0, MiB, 0x01)
    vm.write_pattern("vdb", 0, MiB, 0x02)
    run_vmrepl("snapshot", vm.name, state_dir=src_state)
    run_vmrepl("replicate", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)

    # a disk attached since the base, and vdb grown
    extra = vm.dir / "vdc.qcow2"
    img.create(extra, size=8 * MiB)
    extra.chmod(0o644)
    subprocess.run(["virsh", "-q", "attach-disk", vm.name, str(extra), "vdc", "--subdriver", "qcow2", "--config"],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "resize", "-q", "-f", "qcow2", str(vm.current_image("vdb")), str(24 * MiB)],
                   check=True)
    vm.write_pattern("vdc", MiB, MiB, 0x03)
    vm.write_pattern("vdb", 20 * MiB, MiB, 0x04)  # in the grown part
    vm.write_pattern("vda", 4 * MiB, 65536, 0x05)
    second = run_vmrepl("snapshot", vm.name, "--json", state_dir=src_state).json()
    assert {d["target"]: d["virtual_size"] for d in second["disks"]} == {"vda": 32 * MiB, "vdb": 24 * MiB,
                                                                       "vdc": 8 * MiB}
    (sent,) = run_vmrepl("replicate", vm.name, "--json", *second_host.vmrepl_args(dst_state), state_dir=src_state).json()
    assert sent["bytes_sent"] < 3 * MiB // 10  # patterns compress; vdc went whole but sparse
    check_all(run_vmrepl, vm, src_state, dst_state)
    held = {d["target"]: d["image"] for d in run_vmrepl("list", vm.name, "--json", state_dir=dst_state).json()[-1]["disks"]}
    assert "backing-filename" not in img.info(held["vdc"])  # a new disk starts its own chain
    assert "backing-filename" in img.info(held["vdb"])      # a resized disk keeps its chain

    # vdc detached again: its chain ends, the others go on
    subprocess.run(["virsh", "-q", "detach-disk", vm.name, "vdc", "--config"], check=True, capture_output=True)
    vm.write_pattern("vda", 8 * MiB, 65536, 0x06)
    third = run_vmrepl("snapshot", vm.name, "--json", state_dir=src_state).json()
    assert [d["target"] for d in third["disks"]] == ["vda", "vdb"]
    run_vmrepl("replicate", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)
    check_all(run_vmrepl, vm, src_state, dst_state)
    run_vmrepl("verify", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)
