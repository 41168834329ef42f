"""`vmrepl prune VM --keep SPEC [--dry-run]`: retention on either side; anchors are never pruned.

On the source (the VM is a domain here, its snapshots taken here) snapshots go by block commit
(source/prune.py); on a destination (every snapshot of the VM was received) by rebuilding the next
younger layer without them (sink/prune.py), and the destination then tells senders not to send
them again."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from .common import Env, format_table, global_options, locked_domain, pass_env

if TYPE_CHECKING:
    from ..catalog import Catalog, Snapshot


@click.command("prune")
@click.argument("vm")
@click.option("--keep", "spec", required=True, metavar="SPEC",
              help="Retention grid, e.g. last=24,hourly=48,daily=30,weekly=8,monthly=12.")
@click.option("--dry-run", is_flag=True, help="Say what would go; change nothing.")
@global_options(connect=True)
@pass_env
def prune(env: Env, vm: str, spec: str, dry_run: bool) -> None:
    """Remove VM's snapshots that the retention grid does not keep (never an anchor or the newest)."""
    from ..retention import parse_keep

    rules = parse_keep(spec)
    with env.catalog() as catalog:
        uuid = catalog.vm_uuid(vm)
        received = uuid is not None and _all_received(catalog, uuid)
    if received:
        pruned, protected, names = _prune_received(env, uuid, rules, dry_run)
    else:
        pruned, protected, names = _prune_local(env, vm, rules, dry_run)
    doc = {"pruned": pruned, "dry_run": dry_run,
           "protected": [{"name": names[i], "reason": why} for i, why in protected.items()]}

    def text() -> str:
        verb = "would prune" if dry_run else "pruned"
        lines = [f"{vm}: {verb} {len(pruned)} snapshot(s)" + (f": {', '.join(pruned)}" if pruned else "")]
        if protected:
            lines.append(format_table(["KEPT", "WHY"], [[names[i], why] for i, why in protected.items()]))
        return "\n".join(lines)

    env.emit(doc, text)


def _all_received(catalog: Catalog, uuid: str) -> bool:
    snaps = catalog.snapshots(uuid)
    return bool(snaps) and all(s.origin == "received" for s in snaps)


Outcome = tuple[list[str], dict[str, str], dict[str, str]]  # pruned names, protected id -> why, id -> name


def _names(snaps: list[Snapshot]) -> dict[str, str]:
    return {s.id: s.name for s in snaps}


def _prune_local(env: Env, vm: str, rules: dict[str, int], dry_run: bool) -> Outcome:
    from ..retention import to_keep
    from ..source.prune import files_of_other_domains, plan_prune, prune_one

    with locked_domain(env, vm) as (dom, catalog):
        uuid = dom.UUIDString()
        keep = to_keep(catalog.snapshots(uuid), rules)
        gone, protected = plan_prune(catalog, uuid, keep, files_of_other_domains(dom.connect(), dom))
        names = _names(catalog.snapshots(uuid))
        pruned = [s.name for s in gone] if dry_run else [prune_one(dom, catalog, s).name for s in gone]
    return pruned, protected, names


def _prune_received(env: Env, uuid: str, rules: dict[str, int], dry_run: bool) -> Outcome:
    from ..qemu.storage_daemon import StorageDaemon
    from ..retention import to_keep
    from ..sink import chain
    from ..sink import prune as received
    from ..sink.store import Store
    from ..state import vm_lock

    with env.catalog() as catalog, vm_lock(env.state_dir, uuid):
        store = Store(env.state_dir, catalog)
        names = _names(catalog.snapshots(uuid))
        if dry_run:
            gone, protected = received.plan(store, uuid, to_keep(catalog.snapshots(uuid), rules))
            return [s.name for s in gone], protected, names
        with StorageDaemon() as daemon:
            chain.finish_insertions(store, daemon, uuid)  # a late snapshot's graft first: one line per disk
            received.sweep(store, uuid)
            gone, protected = received.plan(store, uuid, to_keep(catalog.snapshots(uuid), rules))
            for snap in gone:
                received.prune_one(store, daemon, snap)
    return [s.name for s in gone], protected, names
