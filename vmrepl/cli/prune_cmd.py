"""`vmrepl prune VM --keep SPEC [--dry-run]`: retention on the source; anchors are never pruned."""

from __future__ import annotations

import click

from .common import Env, format_table, global_options, locked_domain, pass_env


@click.command("prune")
@click.argument("vm")
@click.option("--keep", "spec", required=True, metavar="SPEC",
              help="Retention grid, e.g. last=24,hourly=48,daily=30,weekly=8,monthly=12.")
@click.option("--dry-run", is_flag=True, help="Say what would go; change nothing.")
@global_options(connect=True)
@pass_env
def prune(env: Env, vm: str, spec: str, dry_run: bool) -> None:
    """Remove VM's snapshots that the retention grid does not keep (never an anchor or the newest)."""
    from ..retention import parse_keep, to_keep
    from ..source.prune import files_of_other_domains, plan_prune, prune_one

    rules = parse_keep(spec)
    with locked_domain(env, vm) as (dom, catalog):
        uuid = dom.UUIDString()
        keep = to_keep(catalog.snapshots(uuid), rules)
        gone, protected = plan_prune(catalog, uuid, keep, files_of_other_domains(dom.connect(), dom))
        names = {s.id: s.name for s in catalog.snapshots(uuid)}
        pruned = [s.name for s in gone] if dry_run else [prune_one(dom, catalog, s).name for s in gone]
    doc = {"pruned": pruned, "dry_run": dry_run,
           "protected": [{"name": names[i], "reason": why} for i, why in protected.items()]}

    def text() -> str:
        verb = "would prune" if dry_run else "pruned"
        lines = [f"{vm}: {verb} {len(pruned)} snapshot(s)" + (f": {', '.join(pruned)}" if pruned else "")]
        if protected:
            lines.append(format_table(["KEPT", "WHY"], [[names[i], why] for i, why in protected.items()]))
        return "\n".join(lines)

    env.emit(doc, text)
