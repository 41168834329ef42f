"""`vmrepl status`: per VM and target, the newest snapshot, the anchor, the lag and the last result; on a
destination also each interrupted incoming transfer (what `zfs receive -s` leaves as a resume token)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import click

from ..units import human_bytes, human_duration, local_time
from .common import Env, format_table, global_options, pass_env

if TYPE_CHECKING:
    from ..catalog import Catalog
    from ..sink.store import Store


@click.command("status")
@global_options()
@pass_env
def status(env: Env) -> None:
    """Show each VM's newest snapshot and, per target, its anchor, lag and last result; below the table,
    each partial incoming transfer held here (`vmrepl prune VM --drop-partial` discards one)."""
    from ..sink.store import Store

    with env.catalog() as catalog:
        store = Store(env.state_dir, catalog)
        vms = [{**vm, "partial": [p.as_json() for p in store.partial_transfers(vm["vm_uuid"])]}
               for vm in vm_reports(catalog, time.time_ns())]
        vms += _uncatalogued(store, {vm["vm_uuid"] for vm in vms})

    def text() -> str:
        if not vms:
            return "no VMs in the catalog"
        rows = []
        for vm in vms:
            for t in vm["targets"] or [{"host": "-", "anchor": None, "lag_seconds": None, "last_result": ""}]:
                lag = "-" if t["lag_seconds"] is None else human_duration(t["lag_seconds"])
                rows.append([vm["vm"], vm["snapshots"], (vm["newest"] or "-")[:8], t["host"],
                             (t["anchor"] or "-")[:8], lag, t["last_result"] or "-"])
        table = format_table(["VM", "SNAPSHOTS", "NEWEST", "TARGET", "ANCHOR", "LAG", "LAST"], rows)
        return "\n".join([table, *_partial_lines(vms)])

    env.emit({"vms": vms}, text)


def vm_reports(catalog: Catalog, now_ns: int) -> list[dict]:
    """Per catalogued VM: its snapshot count, its newest snapshot and, per target, the anchor, the lag
    (the anchor's age) and the last result. `status --json` prints these; `metrics` exports them."""
    vms = []
    for uuid, name in catalog.vms():
        snapshots = catalog.snapshots(uuid)
        newest = snapshots[-1] if snapshots else None
        targets = []
        for target in catalog.targets(uuid):
            # by id, not among the VM's own: a clone's first anchor is its origin's snapshot
            anchor = catalog.find_snapshot(target.anchor) if target.anchor else None
            targets.append({
                "host": target.host,
                "anchor": target.anchor,
                "lag_seconds": round((now_ns - anchor.created_ns) / 1e9, 1) if anchor else None,
                "last_result": target.last_result,
                "last_run_ns": target.last_run_ns,
            })
        vms.append({
            "vm": name,
            "vm_uuid": uuid,
            "snapshots": len(snapshots),
            "newest": newest.id if newest else None,
            "newest_created_ns": newest.created_ns if newest else None,
            "targets": targets,
        })
    return vms


def _uncatalogued(store: Store, catalogued: set[str]) -> list[dict]:
    """VMs that only a partial transfer names: their first full send stopped before its commit. No
    catalog row gives a name: the progress file's does (the uuid, for a file an older vmrepl wrote)."""
    found = []
    for uuid in store.partial_vms():
        partial = store.partial_transfers(uuid) if uuid not in catalogued else []
        if partial:
            found.append({"vm": partial[0].vm_name or uuid, "vm_uuid": uuid, "snapshots": 0, "newest": None,
                          "newest_created_ns": None, "targets": [], "partial": [p.as_json() for p in partial]})
    return found


def _partial_lines(vms: list[dict]) -> list[str]:
    """One line per partial transfer, below the table: its columns stay as they were for scripts."""
    lines = []
    names = [vm["vm"] for vm in vms]
    for vm in vms:
        ref = vm["vm"] if names.count(vm["vm"]) == 1 else vm["vm_uuid"]  # a name two VMs share: the uuid
        for p in vm["partial"]:
            since = local_time(p["since_ns"])
            lines.append(f"PARTIAL {vm['vm']}: snapshot {p['snapshot_id'][:8]} on base {(p['base_id'] or '-')[:8]}, "
                         f"{human_bytes(p['bytes'])}, last progress {since}; "
                         f"resumed by the next replicate, or discard: vmrepl prune {ref} --drop-partial")
    return lines
