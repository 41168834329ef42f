"""Clones replicate as deltas on their origin snapshot; a domain recovered on the destination fails back
as deltas on the anchor (issue 6 items 5 and 6)."""

from __future__ import annotations

import os

import libvirt

from testbed.vm import VM, remove_domain, vm_name
from vmrepl.qemu import img

MiB = 1 << 20


def test_clone_replicates_as_a_delta_on_its_origin(make_vm, libvirt_conn, second_host, src_state, dst_state,
                                                    run_vmrepl):
    origin = make_vm({"vda": 64 * MiB})
    origin.write_random("vda", 0, 8 * MiB)
    base = run_vmrepl("snapshot", origin.name, "--json", state_dir=src_state).json()
    run_vmrepl("replicate", origin.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)

    name = vm_name("clone")
    try:
        made = run_vmrepl("clone", origin.name, base["id"], name, "--json", state_dir=src_state).json()
        assert made["origin"] == base["id"]
        clone = VM(libvirt_conn, name, origin.dir)
        clone.start()
        clone.write_random("vda", 16 * MiB, MiB)
        own = run_vmrepl("snapshot", name, "--json", state_dir=src_state).json()
        assert own["parent"] == base["id"] and own["vm_uuid"] != base["vm_uuid"]
        (sent,) = run_vmrepl("replicate", name, "--json", *second_host.vmrepl_args(dst_state), state_dir=src_state).json()
        assert sent["id"] == own["id"] and sent["base"] == base["id"]
        assert sent["bytes_sent"] <= 1.01 * MiB + 64 * 1024, sent
        run_vmrepl("verify", name, *second_host.vmrepl_args(dst_state), state_dir=src_state)
        (held,) = run_vmrepl("list", name, "--json", state_dir=dst_state).json()
        origin_layer = run_vmrepl("list", origin.name, "--json", state_dir=dst_state).json()[0]["disks"][0]["image"]
        assert os.path.normpath(img.info(held["disks"][0]["image"])["full-backing-filename"]) == origin_layer

        # Retention on the destination keeps the origin snapshot the clone's chain stands on.
        origin.write_random("vda", 32 * MiB, MiB)
        run_vmrepl("snapshot", origin.name, state_dir=src_state)
        run_vmrepl("replicate", origin.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)
        kept = run_vmrepl("prune", origin.name, "--keep", "last=0", "--json", state_dir=dst_state).json()
        assert kept["pruned"] == []
        assert {p["name"]: p["reason"] for p in kept["protected"]}[base["name"]] == \
            "a linked clone's chain stands on its layer"
        run_vmrepl("verify", name, *second_host.vmrepl_args(dst_state), state_dir=src_state)
    finally:
        remove_domain(libvirt_conn, name)


def test_failover_to_the_destinations_libvirtd_and_failback_as_a_delta(make_vm, second_host, dst_libvirt,
                                                                      src_state, dst_state, run_vmrepl):
    """The VM comes up on the second host's own libvirtd with its name and UUID, runs and is snapshotted
    there, and goes back to the original host as a delta on the anchor."""
    uri, dst_conn = dst_libvirt
    vm = make_vm({"vda": 64 * MiB, "vdb": 32 * MiB})
    vm.write_random("vda", 0, 4 * MiB)
    run_vmrepl("snapshot", vm.name, state_dir=src_state)
    anchor = run_vmrepl("snapshot", vm.name, "--json", state_dir=src_state).json()
    run_vmrepl("replicate", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)
    vm.shutoff()  # the source host "fails"

    try:
        done = run_vmrepl("recover", vm.name, "--snapshot", anchor["id"], "--start", "--connect", uri, "--json",
                          state_dir=dst_state).json()
        assert (done["vm"], done["vm_uuid"]) == (vm.name, vm.uuid)
        there = VM(dst_conn, vm.name, vm.dir)
        assert there.is_running() and vm.name not in [d.name() for d in vm.conn.listAllDomains(
            libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
        there.write_random("vdb", 8 * MiB, MiB)
        after = run_vmrepl("snapshot", vm.name, "--connect", uri, "--json", state_dir=dst_state).json()
        assert after["parent"] == anchor["id"] and after["generation"] == anchor["generation"] + 1
        back = run_vmrepl("replicate", vm.name, "--json", *second_host.vmrepl_args(src_state), state_dir=dst_state).json()
        assert [(b["id"], b["base"]) for b in back] == [(after["id"], anchor["id"])]
        assert back[0]["bytes_sent"] <= 1.01 * MiB + 64 * 1024, back
        run_vmrepl("verify", vm.name, *second_host.vmrepl_args(src_state), state_dir=dst_state)
        home = [s["id"] for s in run_vmrepl("list", vm.name, "--json", state_dir=src_state).json()]
        assert home[-1] == after["id"]  # the original host now holds the snapshot taken on the other side
    finally:
        remove_domain(dst_conn, vm.name)


def test_recovered_under_a_new_name_fails_back_as_a_delta(make_vm, libvirt_conn, second_host,
                                                          src_state, dst_state, run_vmrepl):
    vm = make_vm({"vda": 64 * MiB, "vdb": 32 * MiB})
    vm.write_random("vda", 0, 4 * MiB)
    run_vmrepl("snapshot", vm.name, state_dir=src_state)
    vm.write_random("vdb", MiB, 2 * MiB)
    anchor = run_vmrepl("snapshot", vm.name, "--json", state_dir=src_state).json()
    run_vmrepl("replicate", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)
    vm.shutoff()  # the source host "fails"

    name = vm_name("recovered")
    try:
        run_vmrepl("recover", vm.name, "--snapshot", anchor["id"], "--as", name, "--start", state_dir=dst_state)
        recovered = VM(libvirt_conn, name, vm.dir)
        assert recovered.is_running()
        recovered.write_random("vda", 32 * MiB, MiB)
        recovered.write_zeroes("vdb", MiB, MiB)
        after = run_vmrepl("snapshot", name, "--json", state_dir=dst_state).json()
        assert after["parent"] == anchor["id"]
        # failback: the destination sends to the original host's state (same sshd, other receiver state)
        back = run_vmrepl("replicate", name, "--json", *second_host.vmrepl_args(src_state), state_dir=dst_state).json()
        assert [(b["id"], b["base"]) for b in back] == [(after["id"], anchor["id"])]
        assert back[0]["bytes_sent"] <= 1.01 * MiB + 64 * 1024, back
        run_vmrepl("verify", name, *second_host.vmrepl_args(src_state), state_dir=dst_state)
    finally:
        remove_domain(libvirt_conn, name)
