"""`vmrepl metrics`: the catalog as Prometheus text (for node_exporter's textfile collector)."""

from __future__ import annotations

import time

import click

from .common import Env, global_options, pass_env

FAMILIES = {
    "vmrepl_snapshots": "Snapshots of the VM held on this host.",
    "vmrepl_newest_snapshot_age_seconds": "Age of the VM's newest snapshot on this host.",
    "vmrepl_target_lag_seconds": "Age of the newest snapshot the target holds (its anchor).",
    "vmrepl_target_last_run_ok": "1 if the last replication to the target succeeded.",
}


def _labels(labels: dict[str, str]) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


@click.command("metrics")
@global_options()
@pass_env
def metrics(env: Env) -> None:
    """Print snapshot counts, ages and replication lag per VM and target in Prometheus text format
    (with --json: the same samples as one JSON document)."""
    now = time.time_ns()
    samples: list[tuple[str, dict[str, str], float]] = []  # family, labels, value
    with env.catalog() as catalog:
        for uuid, name in catalog.vms():
            snapshots = catalog.snapshots(uuid)
            vm = {"vm": name, "vm_uuid": uuid}
            samples.append(("vmrepl_snapshots", vm, len(snapshots)))
            if snapshots:
                age = round((now - snapshots[-1].created_ns) / 1e9, 1)
                samples.append(("vmrepl_newest_snapshot_age_seconds", vm, age))
            for target in catalog.targets(uuid):
                labels = {**vm, "target": target.host}
                anchor = catalog.find_snapshot(target.anchor) if target.anchor else None
                if anchor:
                    samples.append(("vmrepl_target_lag_seconds", labels, round((now - anchor.created_ns) / 1e9, 1)))
                samples.append(("vmrepl_target_last_run_ok", labels, int(target.last_result == "ok")))
    lines = []
    for family, help_text in FAMILIES.items():
        lines += [f"# HELP {family} {help_text}", f"# TYPE {family} gauge"]
        lines += [f"{family}{_labels(labels)} {value}" for name, labels, value in samples if name == family]
    env.emit({"metrics": [{"name": name, "labels": labels, "value": value} for name, labels, value in samples]},
             "\n".join(lines))
