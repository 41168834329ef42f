"""Clones replicate as deltas on their origin snapshot; a domain recovered on the destination fails back
as deltas on the anchor (issue 6 items 5 and 6)."""

from __future__ import annotations

import dataclasses
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from tests.integration.test_prune import names
from testbed.vm import VM, remove_domain, vm_name
from vmrepl.catalog import Catalog
from vmrepl.errors import SourceError
from vmrepl.qemu import img
from vmrepl.source.define import define_on_snapshot

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
        assert {p["name"]: p["reason"] for p in kept["protected"]}[base["name"]].startswith(
            f"other layers stand on its layer ({own['id']}.qcow2)")  # the clone's first layer
        run_vmrepl("verify", name, *second_host.vmrepl_args(dst_state), state_dir=src_state)
    finally:
        remove_domain(libvirt_conn, name)


@pytest.mark.parametrize("explicit", [True, False], ids=["store-named-in-definition", "firmware-autoselected"])
def test_a_uefi_clone_gets_a_variable_store_of_its_own(make_vm, libvirt_conn, src_state, run_vmrepl, explicit):
    """Both domains write their UEFI variables, so the clone must not name its origin's store: a definition
    that names one (loader and nvram paths, as older tools write it) gets a copy of it (as virt-clone
    does); one that leaves the firmware to libvirt gets libvirt's fresh store for the clone's name."""
    origin = make_vm({"vda": 16 * MiB}, firmware="efi")
    live_os = origin.xml().find("os")  # the running domain's: it names the loader and the store
    origin_store = Path(live_os.findtext("nvram"))
    if explicit:
        origin.shutoff()
        live_os.remove(live_os.find("firmware"))
        definition = ET.fromstring(origin.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        definition.remove(definition.find("os"))
        definition.insert(0, live_os)
        libvirt_conn.defineXML(ET.tostring(definition, encoding="unicode"))
    base = run_vmrepl("snapshot", origin.name, "--json", state_dir=src_state).json()
    name = vm_name("uefi-clone")
    try:
        run_vmrepl("clone", origin.name, base["id"], name, state_dir=src_state)
        clone = VM(libvirt_conn, name, origin.dir)
        clone.start()
        store = Path(clone.xml().findtext("./os/nvram"))
        assert store != origin_store and store.is_file()
        if explicit:
            assert store.parent == origin.dir and store.read_bytes() == origin_store.read_bytes()
    finally:
        remove_domain(libvirt_conn, name)


@pytest.mark.parametrize("firmware", ["bios", "efi"])
def test_failover_to_the_destinations_libvirtd_and_failback_as_a_delta(make_vm, second_host, dst_libvirt,
                                                                      src_state, dst_state, run_vmrepl, firmware):
    """The VM comes up on the second host's own libvirtd with its name and UUID, runs and is snapshotted
    there, and goes back to the original host as a delta on the anchor. A UEFI VM too: its definition
    names its firmware, and the second host's libvirt gives it a variable store of its own."""
    uri, dst_conn = dst_libvirt
    vm = make_vm({"vda": 64 * MiB, "vdb": 32 * MiB}, firmware=firmware)
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
        assert (there.xml().findtext("./os/nvram") is not None) == (firmware == "efi")  # booted on OVMF there
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


def test_retention_after_failover_and_failback_prunes_both_kinds(make_vm, second_host, dst_libvirt,
                                                                 src_state, dst_state, run_vmrepl):
    """After a failover each host holds snapshots of both kinds for the VM: one grid prunes them all,
    each kind its own way, and never merges a layer that the other kind stands on."""
    uri, dst_conn = dst_libvirt
    vm = make_vm({"vda": 64 * MiB, "vdb": 32 * MiB})
    for i, name in enumerate(["s0", "s1", "s2"]):
        vm.write_random("vda", i * 4 * MiB, MiB)
        run_vmrepl("snapshot", vm.name, "--name", name, state_dir=src_state)
    run_vmrepl("replicate", vm.name, *second_host.vmrepl_args(dst_state), state_dir=src_state)
    vm.shutoff()  # the source host "fails"
    back_to_source = second_host.vmrepl_args(src_state)

    try:
        run_vmrepl("recover", vm.name, "--snapshot", "s2", "--start", "--connect", uri, state_dir=dst_state)
        there = VM(dst_conn, vm.name, vm.dir)
        for i, name in enumerate(["b1", "b2", "b3"]):
            there.write_random("vdb", i * 4 * MiB, MiB)
            run_vmrepl("snapshot", vm.name, "--name", name, "--connect", uri, state_dir=dst_state)
            if name == "b1":
                run_vmrepl("replicate", vm.name, *back_to_source, state_dir=dst_state)  # failback: b1 an anchor

        # The failed-over host: received s0 and s1 go (s2, which the domain was recovered from, is
        # rebuilt without them), local b2 goes (merged into b3's layer); s2 and the anchor b1 stay.
        done = run_vmrepl("prune", vm.name, "--keep", "last=1", "--connect", uri, "--json", state_dir=dst_state).json()
        assert sorted(done["pruned"]) == ["b2", "s0", "s1"], done
        assert {p["name"] for p in done["protected"]} == {"s2", "b1"}, done
        assert names(run_vmrepl, dst_state, vm) == ["s2", "b1", "b3"] and there.is_running()
        run_vmrepl("replicate", vm.name, *back_to_source, state_dir=dst_state)  # b3, a delta on b1
        run_vmrepl("verify", vm.name, *back_to_source, state_dir=dst_state)  # s2, b1 and b3 read as before

        # The original host: b1, received, goes (b3 is rebuilt onto s2's layer, taken here), and so does
        # s0 (s1's layer merged into its file, s2's pointed at it: b3 reads the same); s1 stays, since
        # merging s2's layer into it would pull the layer from under the received b3.
        home = run_vmrepl("prune", vm.name, "--keep", "last=1", "--json", state_dir=src_state).json()
        assert home["pruned"] == ["s0", "b1"], home
        why = {p["name"]: p["reason"] for p in home["protected"]}
        assert why["s1"].startswith("another chain stands on the layer of s2") and set(why) == {"s1", "s2"}, home
        assert names(run_vmrepl, src_state, vm) == ["s1", "s2", "b3"]
        run_vmrepl("verify", vm.name, *back_to_source, state_dir=dst_state)
        for snap in run_vmrepl("list", vm.name, "--json", state_dir=src_state).json():
            for disk in snap["disks"]:
                assert not img.check(disk["image"]).get("corruptions")

        # Failed back for good: the domain on the second host is undefined; what it took there stays.
        remove_domain(dst_conn, vm.name)
        left = run_vmrepl("prune", vm.name, "--keep", "last=1", "--connect", uri, "--json", state_dir=dst_state).json()
        assert left["pruned"] == [] and {p["name"]: p["reason"] for p in left["protected"]}["b1"] == \
            "taken here by a domain that is no longer defined here", left
    finally:
        remove_domain(dst_conn, vm.name)



def test_a_recover_that_libvirt_refuses_leaves_no_trace(make_vm, libvirt_conn, work_dir, src_state, run_vmrepl):
    """Its `recovered/ID/` directory would keep the snapshot from ever being pruned, and its overlays
    would stand on the layers: both go when libvirt refuses the definition."""
    vm = make_vm({"vda": 16 * MiB}, start=False)
    snap = run_vmrepl("snapshot", vm.name, "--json", state_dir=src_state).json()
    with Catalog(src_state) as catalog:
        stored = catalog.snapshot(snap["vm_uuid"], snap["id"])
    broken = dataclasses.replace(stored, definition=re.sub(r"<memory([^>]*)>\d+<", r"<memory\1>lots<", stored.definition))
    marker = work_dir / "recovered" / stored.id
    with pytest.raises(SourceError, match="libvirt refused the definition"):
        define_on_snapshot(libvirt_conn, broken, vm_name("recovered"), marker, keep_uuid=False)
    assert not marker.exists() and (work_dir / "recovered").is_dir()
