"""A fork below a received chain's base: the VM is recovered on the second host onto an OLDER replicated
snapshot (s1 of s0, s1, s2), runs and is snapshotted there (b1 on s1, b2 on b1) and fails back. On the
original host the received b1 then stands on s1's layer while s2's own layer does too: two branches on
one file (and on the second host s2's received layer and the recovered overlay stand on s1's layer).

Failback sends deltas on s1, never full copies; retention on both hosts prunes what it may and keeps
what a branch stands on, with the reason; every snapshot stays identical on both hosts throughout."""

from __future__ import annotations

import os

from testbed.vm import VM, remove_domain, vm_name
from vmrepl.qemu import img

MiB = 1 << 20
SLACK = 64 * 1024  # per snapshot: header, definition, frame overhead, zero markers
TARGETS = ("vda", "vdb")


def listing(run_vmrepl, state, vm: str) -> dict[str, dict]:
    """`vmrepl list VM` as {name: snapshot}, oldest first."""
    return {s["name"]: s for s in run_vmrepl("list", vm, "--json", state_dir=state).json()}


def image(snap: dict, target: str) -> str:
    return os.path.normpath(next(d["image"] for d in snap["disks"] if d["target"] == target))


def backing(path: str) -> str:
    return os.path.normpath(img.info(path)["full-backing-filename"])


def assert_layers_sound(snaps: dict[str, dict]) -> None:
    """`qemu-img check` is clean on every listed layer."""
    for name, snap in snaps.items():
        for disk in snap["disks"]:
            report = img.check(disk["image"])
            assert not report.get("corruptions") and not report.get("check-errors"), (name, disk, report)


def assert_same_on_both(mine: dict[str, dict], theirs: dict[str, dict]) -> None:
    """Each snapshot both hosts hold reads the same through its chain on both (qemu-img compare)."""
    shared = mine.keys() & theirs.keys()
    assert shared
    for name in shared:
        for target in TARGETS:
            assert img.compare(image(mine[name], target), image(theirs[name], target)), f"{name} {target} differs"


def verify_both_ways(run_vmrepl, second_host, src_state, dst_state, vm_there: str, vm_home: str) -> None:
    """`vmrepl verify` from each host to the other exits 0 and reports every shared disk matching."""
    for vm, mine, theirs in [(vm_there, dst_state, src_state), (vm_home, src_state, dst_state)]:
        report = run_vmrepl("verify", vm, "--json", *second_host.vmrepl_args(theirs), state_dir=mine).json()
        assert report and all(d["match"] for r in report for d in r["disks"]), report


def reasons(doc: dict) -> dict[str, str]:
    return {p["name"]: p["reason"] for p in doc["protected"]}


def prune(run_vmrepl, state, vm: str, keep: str, *options: str) -> dict:
    """`vmrepl prune` after a `--dry-run` that must announce the same (a reason may name another
    snapshot: the dry run does not merge what goes before it looks at the next)."""
    planned = run_vmrepl("prune", vm, "--keep", keep, "--dry-run", *options, "--json", state_dir=state).json()
    done = run_vmrepl("prune", vm, "--keep", keep, *options, "--json", state_dir=state).json()
    assert (sorted(planned["pruned"]), set(reasons(planned))) == (sorted(done["pruned"]), set(reasons(done))), \
        (planned, done)
    return done


def status_of(run_vmrepl, state, vm_uuid: str) -> dict:
    (entry,) = [v for v in run_vmrepl("status", "--json", state_dir=state).json()["vms"] if v["vm_uuid"] == vm_uuid]
    return entry


def replicated_s0_s1_s2(make_vm, second_host, src_state, dst_state, run_vmrepl):
    """A running two-disk VM with s0, s1, s2 (each with its own writes) replicated to the second host,
    then shut off: the original host "fails". Returns the VM and the original host's listing."""
    vm = make_vm({"vda": 64 * MiB, "vdb": 32 * MiB})
    for i, name in enumerate(["s0", "s1", "s2"]):
        vm.write_random("vda", i * 4 * MiB, MiB)
        vm.write_random("vdb", i * 2 * MiB, MiB // 2)
        run_vmrepl("snapshot", vm.name, "--name", name, state_dir=src_state)
    sent = run_vmrepl("replicate", vm.name, "--json", *second_host.vmrepl_args(dst_state), state_dir=src_state).json()
    home = listing(run_vmrepl, src_state, vm.name)
    ids = {n: s["id"] for n, s in home.items()}
    assert [(s["id"], s["base"]) for s in sent] == [(ids["s0"], None), (ids["s1"], ids["s0"]), (ids["s2"], ids["s1"])]
    vm.shutoff()
    return vm, home


def test_failover_onto_an_older_snapshot_forks_and_fails_back_as_deltas(make_vm, second_host, dst_libvirt,
                                                                       src_state, dst_state, run_vmrepl):
    """Same name and UUID on the second host's own libvirtd: the VM holds both kinds on both hosts."""
    uri, dst_conn = dst_libvirt
    vm, home = replicated_s0_s1_s2(make_vm, second_host, src_state, dst_state, run_vmrepl)
    ids = {n: s["id"] for n, s in home.items()}
    to_home, to_there = second_host.vmrepl_args(src_state), second_host.vmrepl_args(dst_state)
    home_disk = {t: str(vm.current_image(t)) for t in TARGETS}  # the original domain's disks, on s2

    try:
        done = run_vmrepl("recover", vm.name, "--snapshot", "s1", "--start", "--connect", uri, "--json",
                          state_dir=dst_state).json()
        assert (done["vm"], done["vm_uuid"], done["snapshot"]) == (vm.name, vm.uuid, ids["s1"])
        there = VM(dst_conn, vm.name, vm.dir)
        assert there.is_running()
        away = listing(run_vmrepl, dst_state, vm.name)
        for t in TARGETS:  # it runs s1's disks, not s2's
            assert img.compare(str(there.current_image(t)), image(away["s1"], t))
            assert not img.compare(str(there.current_image(t)), image(away["s2"], t))

        there.write_random("vda", 8 * MiB, MiB)  # where s2 wrote too, other bytes
        there.write_random("vdb", 4 * MiB, MiB)
        b1 = run_vmrepl("snapshot", vm.name, "--name", "b1", "--connect", uri, "--json", state_dir=dst_state).json()
        assert b1["parent"] == ids["s1"] and b1["generation"] == home["s2"]["generation"] + 1
        there.write_random("vda", 16 * MiB, MiB // 2)
        b2 = run_vmrepl("snapshot", vm.name, "--name", "b2", "--connect", uri, "--json", state_dir=dst_state).json()
        assert b2["parent"] == b1["id"]

        # Failback: b1 goes as a delta on s1 (not on s2, younger but not its ancestor), b2 on b1.
        plan = run_vmrepl("replicate", vm.name, "--dry-run", "--json", *to_home, state_dir=dst_state).json()
        assert [(p["id"], p["base"], p["position"], p["bytes_changed"]) for p in plan] == [
            (b1["id"], ids["s1"], "append", 2 * MiB), (b2["id"], b1["id"], "append", MiB // 2)], plan
        back = run_vmrepl("replicate", vm.name, "--json", *to_home, state_dir=dst_state).json()
        assert [(b["id"], b["base"], b["position"]) for b in back] == [
            (b1["id"], ids["s1"], "append"), (b2["id"], b1["id"], "append")], back
        assert 2 * MiB <= back[0]["bytes_sent"] <= 1.01 * 2 * MiB + SLACK, back  # random data: no less either
        assert MiB // 2 <= back[1]["bytes_sent"] <= 1.01 * MiB // 2 + SLACK, back
        verify_both_ways(run_vmrepl, second_host, src_state, dst_state, vm.name, vm.name)

        home, away = listing(run_vmrepl, src_state, vm.name), listing(run_vmrepl, dst_state, vm.name)
        assert list(home) == list(away) == ["s0", "s1", "s2", "b1", "b2"]
        assert [home[n]["parent"] for n in home] == [None, ids["s0"], ids["s1"], ids["s1"], b1["id"]]
        assert_same_on_both(home, away)
        for t in TARGETS:  # the fork, on both hosts: s2's layer and b1's both stand on s1's
            assert backing(image(home["s2"], t)) == backing(image(home["b1"], t)) == image(home["s1"], t)
            assert backing(image(away["s2"], t)) == backing(image(away["b1"], t)) == image(away["s1"], t)
            assert backing(image(home["b2"], t)) == image(home["b1"], t)
        # Status: both hold 5 snapshots, b2 the newest; the second host's anchor on the original one is b2.
        # The original host has not sent since the failover: its record still names s2.
        st_home, st_away = status_of(run_vmrepl, src_state, vm.uuid), status_of(run_vmrepl, dst_state, vm.uuid)
        assert (st_home["snapshots"], st_home["newest"]) == (st_away["snapshots"], st_away["newest"]) == (5, b2["id"])
        ((t_away,), (t_home,)) = st_away["targets"], st_home["targets"]
        assert (t_away["anchor"], t_away["last_result"]) == (b2["id"], "ok")
        assert (t_home["anchor"], t_home["last_result"]) == (ids["s2"], "ok")

        # Retention on the original host (its domain shut off, on s2): the received b1 goes (b2 rebuilt
        # onto s1's layer); s0 and s1 stay, since merging s1's layer (into s0's) or s2's (into s1's) would
        # pull a file from under the received chain; s2 is an anchor and the domain's disks stand on it.
        b1_home = home["b1"]
        pruned = prune(run_vmrepl, src_state, vm.name, "last=1")
        assert pruned["pruned"] == ["b1"], pruned
        why = reasons(pruned)
        assert set(why) == {"s0", "s1", "s2"}, pruned
        assert why["s0"].startswith("another chain stands on the layer of s1"), pruned
        assert why["s1"].startswith("another chain stands on its layer"), pruned
        home = listing(run_vmrepl, src_state, vm.name)
        assert list(home) == ["s0", "s1", "s2", "b2"]
        for t in TARGETS:
            assert backing(image(home["b2"], t)) == image(home["s1"], t)
            assert not os.path.exists(image(b1_home, t))  # its layer is deleted
            assert img.compare(home_disk[t], image(home["s2"], t))  # the original domain's disk reads as s2
        assert not vm.is_running()
        assert_layers_sound(home)
        verify_both_ways(run_vmrepl, second_host, src_state, dst_state, vm.name, vm.name)
        assert_same_on_both(home, listing(run_vmrepl, dst_state, vm.name))

        # Retention on the second host (the domain runs, on b2 over b1 over the recovered s1): local b1
        # goes (b2 merged into its layer while the domain runs), received s0 goes (s1 rebuilt without it);
        # s1 stays, the recovered domain's chain stands on it. s2 stays: the newest snapshot received
        # here, which the original host's next delta would be based on (nothing stands on its layer).
        pruned = prune(run_vmrepl, dst_state, vm.name, "last=1", "--connect", uri)
        assert sorted(pruned["pruned"]) == ["b1", "s0"], pruned
        why = reasons(pruned)
        assert set(why) == {"s1", "s2"}, pruned
        assert why["s1"] == "a VM recovered from it (vmrepl recover) stands on its layers", pruned
        assert why["s2"] == "the newest snapshot received here: its sender's next delta is based on it", pruned
        assert there.is_running()
        away = listing(run_vmrepl, dst_state, vm.name)
        assert list(away) == ["s1", "s2", "b2"]
        for t in TARGETS:
            assert img.compare(str(there.current_image(t)), image(away["b2"], t))  # no write since b2
        assert_layers_sound(away)
        verify_both_ways(run_vmrepl, second_host, src_state, dst_state, vm.name, vm.name)
        assert_same_on_both(home, away)

        # Life goes on where the domain runs: b3 is a delta on b2 (b1 is gone on both sides).
        there.write_random("vda", 20 * MiB, MiB)
        there.write_zeroes("vda", 0, MiB)  # s0's data there: zeros cost a marker
        b3 = run_vmrepl("snapshot", vm.name, "--name", "b3", "--connect", uri, "--json", state_dir=dst_state).json()
        assert b3["parent"] == b2["id"]
        back = run_vmrepl("replicate", vm.name, "--json", *to_home, state_dir=dst_state).json()
        assert [(b["id"], b["base"], b["position"]) for b in back] == [(b3["id"], b2["id"], "append")], back
        assert back[0]["bytes_sent"] <= 1.01 * MiB + SLACK, back
        verify_both_ways(run_vmrepl, second_host, src_state, dst_state, vm.name, vm.name)
        # The original host has nothing the second lacks: not s0, pruned there, nor anything else.
        assert run_vmrepl("replicate", vm.name, "--json", *to_there, state_dir=src_state).json() == []
        assert status_of(run_vmrepl, src_state, vm.uuid)["targets"][0]["anchor"] == b3["id"]

        # Other grids. On the original host nothing is kept by the grid: b2 goes (b3 onto s1's layer);
        # b3 is the newest; s2, no longer an anchor, is what the domain's disks stand on.
        pruned = prune(run_vmrepl, src_state, vm.name, "last=0")
        assert pruned["pruned"] == ["b2"], pruned
        why = reasons(pruned)
        assert set(why) == {"s0", "s1", "s2", "b3"}, pruned
        assert why["s2"] == "the domain's disks stand on it", pruned
        assert why["b3"].startswith("the newest snapshot"), pruned
        home = listing(run_vmrepl, src_state, vm.name)
        assert list(home) == ["s0", "s1", "s2", "b3"]
        for t in TARGETS:
            assert backing(image(home["b3"], t)) == image(home["s1"], t)
            assert img.compare(home_disk[t], image(home["s2"], t))
        assert_layers_sound(home)
        # On the second host `daily=1,weekly=1` keeps only b3 (the newest of the latest day and week,
        # whenever the test runs): local b2 goes, merged while the domain runs.
        pruned = prune(run_vmrepl, dst_state, vm.name, "daily=1,weekly=1", "--connect", uri)
        assert pruned["pruned"] == ["b2"], pruned
        assert set(reasons(pruned)) == {"s1", "s2"}, pruned
        assert there.is_running()
        away = listing(run_vmrepl, dst_state, vm.name)
        assert list(away) == ["s1", "s2", "b3"]
        assert_layers_sound(away)
        verify_both_ways(run_vmrepl, second_host, src_state, dst_state, vm.name, vm.name)
        assert_same_on_both(home, away)

        # And again: b4 a delta on b3, equal on both hosts.
        there.write_random("vdb", 16 * MiB, MiB)
        b4 = run_vmrepl("snapshot", vm.name, "--name", "b4", "--connect", uri, "--json", state_dir=dst_state).json()
        back = run_vmrepl("replicate", vm.name, "--json", *to_home, state_dir=dst_state).json()
        assert [(b["id"], b["base"]) for b in back] == [(b4["id"], b3["id"])], back
        assert back[0]["bytes_sent"] <= 1.01 * MiB + SLACK, back
        verify_both_ways(run_vmrepl, second_host, src_state, dst_state, vm.name, vm.name)
        home, away = listing(run_vmrepl, src_state, vm.name), listing(run_vmrepl, dst_state, vm.name)
        assert list(home) == ["s0", "s1", "s2", "b3", "b4"] and list(away) == ["s1", "s2", "b3", "b4"]
        assert_same_on_both(home, away)
        assert_layers_sound(home)
        assert_layers_sound(away)
        st_home, st_away = status_of(run_vmrepl, src_state, vm.uuid), status_of(run_vmrepl, dst_state, vm.uuid)
        assert (st_home["snapshots"], st_home["newest"]) == (5, b4["id"])
        assert (st_away["snapshots"], st_away["newest"], st_away["targets"][0]["anchor"]) == (4, b4["id"], b4["id"])

        # Failing back for good: the second host's domain stops (kept defined, shut off), a last snapshot b5
        # (taken offline) goes home; there the old domain, on s2, is undefined and the VM recovered on b5.
        there.write_random("vda", 24 * MiB, MiB)
        there.shutoff()
        b5 = run_vmrepl("snapshot", vm.name, "--name", "b5", "--connect", uri, "--json", state_dir=dst_state).json()
        assert b5["parent"] == b4["id"]
        back = run_vmrepl("replicate", vm.name, "--json", *to_home, state_dir=dst_state).json()
        assert [(b["id"], b["base"]) for b in back] == [(b5["id"], b4["id"])], back
        assert back[0]["bytes_sent"] <= 1.01 * MiB + SLACK, back
        uuid = vm.uuid
        remove_domain(vm.conn, vm.name)
        done = run_vmrepl("recover", vm.name, "--snapshot", "b5", "--start", "--json", state_dir=src_state).json()
        assert (done["vm_uuid"], done["snapshot"]) == (uuid, b5["id"]) and vm.is_running()
        vm.write_random("vdb", 24 * MiB, MiB)
        a1 = run_vmrepl("snapshot", vm.name, "--name", "a1", "--json", state_dir=src_state).json()
        assert a1["parent"] == b5["id"] and a1["generation"] == b5["generation"] + 1
        out = run_vmrepl("replicate", vm.name, "--json", *to_there, state_dir=src_state).json()
        assert [(o["id"], o["base"]) for o in out] == [(a1["id"], b5["id"])], out
        assert out[0]["bytes_sent"] <= 1.01 * MiB + SLACK, out
        verify_both_ways(run_vmrepl, second_host, src_state, dst_state, vm.name, vm.name)

        # Home, running on b5: the received b3 and b4 go (b5 rebuilt onto s1's layer, under the running
        # domain); b5 stays, the domain was recovered from it; s0, s1 as before; s2 heads a branch that
        # nothing follows any more here (kept: a local snapshot goes only by merging the next one into it).
        pruned = prune(run_vmrepl, src_state, vm.name, "last=1")
        assert sorted(pruned["pruned"]) == ["b3", "b4"], pruned
        why = reasons(pruned)
        assert set(why) == {"s0", "s1", "s2", "b5"}, pruned
        assert why["b5"] == "a VM recovered from it (vmrepl recover) stands on its layers", pruned
        assert why["s1"].startswith("another chain stands on its layer"), pruned
        assert vm.is_running()
        home = listing(run_vmrepl, src_state, vm.name)
        assert list(home) == ["s0", "s1", "s2", "b5", "a1"]
        for t in TARGETS:
            assert backing(image(home["b5"], t)) == image(home["s1"], t)
            assert img.compare(str(vm.current_image(t)), image(home["a1"], t))  # no write since a1
        assert_layers_sound(home)
        # Away, shut off on b5: local b3 goes (b4 merged into its layer offline); b4 stays, since merging b5
        # into it would pull b5's file from under the received a1; b5 is an anchor; s1 as before. The
        # received s2 goes now: the end of the original host's old branch, on which nothing stands, and no
        # longer the newest snapshot received here (a1 is).
        s2_away = away["s2"]
        pruned = prune(run_vmrepl, dst_state, vm.name, "last=1", "--connect", uri)
        assert pruned["pruned"] == ["b3", "s2"], pruned
        why = reasons(pruned)
        assert set(why) == {"s1", "b4", "b5"}, pruned
        assert why["b4"].startswith("another chain stands on the layer of b5"), pruned
        away = listing(run_vmrepl, dst_state, vm.name)
        assert list(away) == ["s1", "b4", "b5", "a1"]
        for t in TARGETS:
            assert not os.path.exists(image(s2_away, t))
        for t in TARGETS:
            assert backing(image(away["a1"], t)) == image(away["b5"], t)
        assert_layers_sound(away)
        verify_both_ways(run_vmrepl, second_host, src_state, dst_state, vm.name, vm.name)
        assert_same_on_both(home, away)

        # And on: a2 a delta on a1.
        vm.write_random("vda", 28 * MiB, MiB)
        a2 = run_vmrepl("snapshot", vm.name, "--name", "a2", "--json", state_dir=src_state).json()
        out = run_vmrepl("replicate", vm.name, "--json", *to_there, state_dir=src_state).json()
        assert [(o["id"], o["base"]) for o in out] == [(a2["id"], a1["id"])], out
        assert out[0]["bytes_sent"] <= 1.01 * MiB + SLACK, out
        verify_both_ways(run_vmrepl, second_host, src_state, dst_state, vm.name, vm.name)
        assert_same_on_both(listing(run_vmrepl, src_state, vm.name), listing(run_vmrepl, dst_state, vm.name))
        st_home, st_away = status_of(run_vmrepl, src_state, uuid), status_of(run_vmrepl, dst_state, uuid)
        assert (st_home["newest"], st_home["targets"][0]["anchor"], st_away["newest"]) == (a2["id"], a2["id"], a2["id"])
    finally:
        remove_domain(dst_conn, vm.name)


def test_recovered_as_a_new_vm_onto_an_older_snapshot_fails_back_latest_first(make_vm, libvirt_conn, second_host,
                                                                              src_state, dst_state, run_vmrepl):
    """`recover --as NEW` onto s1: NEW's snapshots stand on the original VM's s1 on both hosts (a clone of
    it, in effect). Failing back newest first inserts b1 under b2 on the original host, on the fork."""
    vm, home = replicated_s0_s1_s2(make_vm, second_host, src_state, dst_state, run_vmrepl)
    ids = {n: s["id"] for n, s in home.items()}
    to_home, to_there = second_host.vmrepl_args(src_state), second_host.vmrepl_args(dst_state)
    home_disk = {t: str(vm.current_image(t)) for t in TARGETS}
    new = vm_name("forked")

    try:
        done = run_vmrepl("recover", vm.name, "--snapshot", "s1", "--as", new, "--start", "--json",
                          state_dir=dst_state).json()
        assert done["vm"] == new and done["vm_uuid"] != vm.uuid and done["snapshot"] == ids["s1"]
        there = VM(libvirt_conn, new, vm.dir)
        assert there.is_running()
        there.write_random("vda", 8 * MiB, MiB)  # where s2 wrote too, other bytes
        there.write_random("vdb", 4 * MiB, MiB)
        b1 = run_vmrepl("snapshot", new, "--name", "b1", "--json", state_dir=dst_state).json()
        assert b1["parent"] == ids["s1"] and b1["vm_uuid"] == there.uuid
        there.write_random("vda", 16 * MiB, MiB // 2)
        b2 = run_vmrepl("snapshot", new, "--name", "b2", "--json", state_dir=dst_state).json()
        assert b2["parent"] == b1["id"]

        # Newest first: b2 on s1 (b1 not there yet), then b1 on s1, inserted under b2. (Positions:
        # test_a_fork_of_a_new_vm_is_planned_at_the_end_of_its_own_sequence.)
        back = run_vmrepl("replicate", new, "--latest-first", "--json", *to_home, state_dir=dst_state).json()
        assert [(b["id"], b["base"]) for b in back] == [(b2["id"], ids["s1"]), (b1["id"], ids["s1"])], back
        assert back[0]["bytes_sent"] <= 1.01 * (2 * MiB + MiB // 2) + SLACK, back
        assert back[1]["bytes_sent"] <= 1.01 * 2 * MiB + SLACK, back
        verify_both_ways(run_vmrepl, second_host, src_state, dst_state, new, vm.name)

        home, away = listing(run_vmrepl, src_state, vm.name), listing(run_vmrepl, dst_state, vm.name)
        forked_home, forked_away = listing(run_vmrepl, src_state, new), listing(run_vmrepl, dst_state, new)
        assert list(home) == list(away) == ["s0", "s1", "s2"]
        assert list(forked_home) == list(forked_away) == ["b1", "b2"]
        assert [s["parent"] for s in forked_home.values()] == [ids["s1"], b1["id"]]
        assert_same_on_both(home, away)
        assert_same_on_both(forked_home, forked_away)
        for t in TARGETS:  # on the original host: s2's layer and b1's on s1's; b2 rebuilt onto b1
            assert backing(image(home["s2"], t)) == backing(image(forked_home["b1"], t)) == image(home["s1"], t)
            assert backing(image(forked_home["b2"], t)) == image(forked_home["b1"], t)
        st = status_of(run_vmrepl, dst_state, there.uuid)
        assert (st["snapshots"], st["newest"], [t["anchor"] for t in st["targets"]]) == (2, b2["id"], [b2["id"]])
        st = status_of(run_vmrepl, src_state, there.uuid)
        assert (st["snapshots"], st["newest"], st["targets"]) == (2, b2["id"], [])
        st = status_of(run_vmrepl, src_state, vm.uuid)
        assert (st["snapshots"], st["newest"], [t["anchor"] for t in st["targets"]]) == (3, ids["s2"], [ids["s2"]])

        # The original host. Its VM: nothing goes; s0 and s1 carry NEW's received chain, s2 is the newest.
        pruned = prune(run_vmrepl, src_state, vm.name, "last=1")
        assert pruned["pruned"] == [], pruned
        why = reasons(pruned)
        assert set(why) == {"s0", "s1"}, pruned
        assert why["s0"].startswith("another chain stands on the layer of s1"), pruned
        assert why["s1"].startswith("another chain stands on its layer"), pruned
        # NEW, all received there: b1 goes, b2 is rebuilt onto the original VM's s1 layer.
        pruned = prune(run_vmrepl, src_state, new, "last=1")
        assert (pruned["pruned"], pruned["protected"]) == (["b1"], []), pruned
        home, forked_home = listing(run_vmrepl, src_state, vm.name), listing(run_vmrepl, src_state, new)
        assert list(home) == ["s0", "s1", "s2"] and list(forked_home) == ["b2"]
        for t in TARGETS:
            assert backing(image(forked_home["b2"], t)) == image(home["s1"], t)
            assert img.compare(home_disk[t], image(home["s2"], t))  # the original domain's disk reads as s2
        assert_layers_sound(home | {f"forked {n}": s for n, s in forked_home.items()})
        verify_both_ways(run_vmrepl, second_host, src_state, dst_state, new, vm.name)

        # The second host. The original VM, all received: s0 goes (s1 rebuilt under the running NEW),
        # s1 stays for NEW, s2 as the newest (the original host's next delta is based on it).
        pruned = prune(run_vmrepl, dst_state, vm.name, "last=0")
        assert pruned["pruned"] == ["s0"], pruned
        why = reasons(pruned)
        assert why == {"s1": "a VM recovered from it (vmrepl recover) stands on its layers",
                       "s2": "the newest snapshot: the next delta from the source is based on it"}, pruned
        # NEW, running: b1 goes (b2 merged into its layer), b2 is the newest and the anchor.
        pruned = prune(run_vmrepl, dst_state, new, "last=0")
        assert pruned["pruned"] == ["b1"], pruned
        assert set(reasons(pruned)) == {"b2"}, pruned
        assert there.is_running()
        away, forked_away = listing(run_vmrepl, dst_state, vm.name), listing(run_vmrepl, dst_state, new)
        assert list(away) == ["s1", "s2"] and list(forked_away) == ["b2"]
        for t in TARGETS:
            assert img.compare(str(there.current_image(t)), image(forked_away["b2"], t))
        assert_layers_sound(away | {f"forked {n}": s for n, s in forked_away.items()})
        verify_both_ways(run_vmrepl, second_host, src_state, dst_state, new, vm.name)
        assert_same_on_both(home, away)
        assert_same_on_both(forked_home, forked_away)

        # NEW goes on: b3 a delta on b2, then retention on both hosts again.
        there.write_random("vdb", 20 * MiB, MiB)
        b3 = run_vmrepl("snapshot", new, "--name", "b3", "--json", state_dir=dst_state).json()
        back = run_vmrepl("replicate", new, "--json", *to_home, state_dir=dst_state).json()
        assert [(b["id"], b["base"]) for b in back] == [(b3["id"], b2["id"])], back
        assert back[0]["bytes_sent"] <= 1.01 * MiB + SLACK, back
        assert run_vmrepl("replicate", vm.name, "--json", *to_there, state_dir=src_state).json() == []
        pruned = prune(run_vmrepl, src_state, new, "hourly=1")
        assert pruned["pruned"] == ["b2"], pruned
        pruned = prune(run_vmrepl, dst_state, new, "last=1")
        assert pruned["pruned"] == ["b2"] and there.is_running(), pruned
        forked_home, forked_away = listing(run_vmrepl, src_state, new), listing(run_vmrepl, dst_state, new)
        assert list(forked_home) == list(forked_away) == ["b3"]
        for t in TARGETS:
            assert backing(image(forked_home["b3"], t)) == image(home["s1"], t)
        assert_layers_sound(forked_home)
        assert_layers_sound(forked_away)
        verify_both_ways(run_vmrepl, second_host, src_state, dst_state, new, vm.name)
        assert_same_on_both(forked_home, forked_away)
    finally:
        remove_domain(libvirt_conn, new)


def test_a_fork_of_a_new_vm_is_planned_at_the_end_of_its_own_sequence(make_vm, libvirt_conn, second_host,
                                                                      src_state, dst_state, run_vmrepl):
    """NEW (recovered as a new VM onto s1) has no snapshot on the original host: its first lands at the end
    of its own sequence, after its base s1. s2 is the original VM's, on another branch: nothing of it is
    rebased, and `position`, `before` and the reason must not say otherwise."""
    vm, home = replicated_s0_s1_s2(make_vm, second_host, src_state, dst_state, run_vmrepl)
    ids = {n: s["id"] for n, s in home.items()}
    to_home = second_host.vmrepl_args(src_state)
    new = vm_name("forked")
    try:
        run_vmrepl("recover", vm.name, "--snapshot", "s1", "--as", new, "--start", state_dir=dst_state)
        there = VM(libvirt_conn, new, vm.dir)
        there.write_random("vda", 8 * MiB, MiB)
        b1 = run_vmrepl("snapshot", new, "--name", "b1", "--json", state_dir=dst_state).json()
        there.write_random("vda", 16 * MiB, MiB)
        b2 = run_vmrepl("snapshot", new, "--name", "b2", "--json", state_dir=dst_state).json()

        plan = run_vmrepl("replicate", new, "--dry-run", "--json", *to_home, state_dir=dst_state).json()
        newest_first = run_vmrepl("replicate", new, "--latest-first", "--dry-run", "--json", *to_home,
                                  state_dir=dst_state).json()
        back = run_vmrepl("replicate", new, "--json", *to_home, state_dir=dst_state).json()
        for t in TARGETS:  # what happens is right: s2 is left alone, b1 stands on s1
            assert backing(image(home["s2"], t)) == image(home["s1"], t)
        assert [(b["id"], b["base"]) for b in back] == [(b1["id"], ids["s1"]), (b2["id"], b1["id"])], back
        # what is said about it
        assert [(p["id"], p["base"], p["position"], p["before"]) for p in plan] == [
            (b1["id"], ids["s1"], "append", None), (b2["id"], b1["id"], "append", None)], plan
        assert [(p["id"], p["base"], p["position"], p["before"]) for p in newest_first] == [
            (b2["id"], ids["s1"], "append", None), (b1["id"], ids["s1"], "insert", b2["id"])], newest_first
        assert not any("before s2" in p["reason"] for p in plan + newest_first), plan + newest_first
        assert [b["position"] for b in back] == ["append", "append"], back
    finally:
        remove_domain(libvirt_conn, new)
