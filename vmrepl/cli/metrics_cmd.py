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
    from .status_cmd import vm_reports

    now = time.time_ns()
    with env.catalog() as catalog:
        reports = vm_reports(catalog, now)
    samples: list[tuple[str, dict[str, str], float]] = []  # family, labels, value
    for vm in reports:
        labels = {"vm": vm["vm"], "vm_uuid": vm["vm_uuid"]}
        samples.append(("vmrepl_snapshots", labels, vm["snapshots"]))
        if vm["newest_created_ns"] is not None:
            samples.append(("vmrepl_newest_snapshot_age_seconds", labels,
                            round((now - vm["newest_created_ns"]) / 1e9, 1)))
        for target in vm["targets"]:
            target_labels = {**labels, "target": target["host"]}
            if target["lag_seconds"] is not None:
                samples.append(("vmrepl_target_lag_seconds", target_labels, target["lag_seconds"]))
            samples.append(("vmrepl_target_last_run_ok", target_labels, int(target["last_result"] == "ok")))
    lines = []
    for family, help_text in FAMILIES.items():
        lines += [f"# HELP {family} {help_text}", f"# TYPE {family} gauge"]
        lines += [f"{family}{_labels(labels)} {value}" for name, labels, value in samples if name == family]
    env.emit({"metrics": [{"name": name, "labels": labels, "value": value} for name, labels, value in samples]},
             "\n".join(lines))
