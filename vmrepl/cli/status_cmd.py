"""`vmrepl status`: per VM and target, the newest snapshot, the anchor, the lag and the last result."""

from __future__ import annotations

import time

import click

from .common import Env, format_table, global_options, pass_env


@click.command("status")
@global_options()
@pass_env
def status(env: Env) -> None:
    """Show each VM's newest snapshot and, per target, its anchor, lag and last result."""
    now = time.time_ns()
    vms = []
    with env.catalog() as catalog:
        for uuid, name in catalog.vms():
            snapshots = catalog.snapshots(uuid)
            newest = snapshots[-1] if snapshots else None
            by_id = {s.id: s for s in snapshots}
            targets = []
            for target in catalog.targets(uuid):
                anchor = by_id.get(target.anchor) if target.anchor else None
                targets.append({
                    "host": target.host,
                    "anchor": target.anchor,
                    "lag_seconds": round((now - anchor.created_ns) / 1e9, 1) if anchor else None,
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

    def text() -> str:
        if not vms:
            return "no VMs in the catalog"
        rows = []
        for vm in vms:
            for t in vm["targets"] or [{"host": "-", "anchor": None, "lag_seconds": None, "last_result": ""}]:
                rows.append([vm["vm"], vm["snapshots"], (vm["newest"] or "-")[:8], t["host"],
                             (t["anchor"] or "-")[:8], "-" if t["lag_seconds"] is None else f"{t['lag_seconds']}s",
                             t["last_result"] or "-"])
        return format_table(["VM", "SNAPSHOTS", "NEWEST", "TARGET", "ANCHOR", "LAG", "LAST"], rows)

    env.emit({"vms": vms}, text)
