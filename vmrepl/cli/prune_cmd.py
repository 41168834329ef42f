"""`vmrepl prune VM --keep SPEC [--dry-run]`: retention on either side; anchors are never pruned.

Snapshots taken here go by block commit (source/prune.py); received ones by rebuilding the next younger
layer without them (sink/prune.py), after which this host tells senders not to send them again. A VM
that failed over or back holds both kinds: one grid covers them all, each kind goes its own way."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import click

from .common import Env, catalog_vm, format_table, global_options, locked_domain, pass_env

if TYPE_CHECKING:
    from ..catalog import Snapshot


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
        origins = {s.origin for s in catalog.snapshots(uuid)} if uuid else set()
    outcome = Outcome()
    if origins != {"received"}:  # snapshots taken here (or none yet): the domain's
        _prune_local(env, vm, rules, dry_run, outcome, mixed="received" in origins)
    if "received" in origins:
        assert uuid is not None
        _prune_received(env, uuid, rules, dry_run, outcome)
    doc = {"pruned": outcome.pruned, "dry_run": dry_run,
           "protected": [{"name": outcome.names[i], "reason": why} for i, why in outcome.protected.items()]}

    def text() -> str:
        verb = "would prune" if dry_run else "pruned"
        pruned = outcome.pruned
        lines = [f"{vm}: {verb} {len(pruned)} snapshot(s)" + (f": {', '.join(pruned)}" if pruned else "")]
        if outcome.protected:
            lines.append(format_table(["KEPT", "WHY"], [[outcome.names[i], why] for i, why in outcome.protected.items()]))
        return "\n".join(lines)

    env.emit(doc, text)


@dataclass
class Outcome:
    """What a prune did, over both kinds of snapshot (a VM that failed over has both)."""

    pruned: list[str] = field(default_factory=list)        # names
    protected: dict[str, str] = field(default_factory=dict)  # id -> why kept
    names: dict[str, str] = field(default_factory=dict)      # id -> name

    def add(self, snaps: list[Snapshot], pruned: list[Snapshot], protected: dict[str, str]) -> None:
        self.names |= {s.id: s.name for s in snaps}
        self.pruned += [s.name for s in pruned]
        self.protected |= protected


def _prune_local(env: Env, vm: str, rules: dict[str, int], dry_run: bool, outcome: Outcome, *, mixed: bool) -> None:
    """Snapshots taken here go by block commit (source/prune.py)."""
    from ..errors import NotFoundError
    from ..retention import to_keep
    from ..source.prune import (disk_chains, files_of_other_domains, files_under_received, finish_merges, plan_prune,
                                prune_one)

    with ExitStack() as stack:
        try:
            dom, catalog = stack.enter_context(locked_domain(env, vm))
        except NotFoundError:
            if not mixed:
                raise
            _keep_orphans(env, vm, outcome)  # e.g. the domain recovered here was undefined after failback
            return
        uuid = dom.UUIDString()
        if not dry_run:
            finish_merges(dom, catalog, uuid)  # a prune that a crash interrupted
        snaps = catalog.snapshots(uuid)
        chains = disk_chains(dom)
        others = files_of_other_domains(dom.connect(), dom) | files_under_received(catalog, chains)
        gone, protected = plan_prune(catalog, uuid, to_keep(snaps, rules), others, chains)
        outcome.add(snaps, gone if dry_run else [prune_one(dom, catalog, s) for s in gone], protected)


def _keep_orphans(env: Env, vm: str, outcome: Outcome) -> None:
    with env.catalog() as catalog:
        snaps = catalog.snapshots(catalog_vm(catalog, vm))
    local = [s for s in snaps if s.origin == "local"]
    outcome.add(snaps, [], {s.id: "taken here by a domain that is no longer defined here" for s in local})


def _prune_received(env: Env, uuid: str, rules: dict[str, int], dry_run: bool, outcome: Outcome) -> None:
    """Received snapshots go by rebuilding the next younger layer without them (sink/prune.py)."""
    from ..qemu.storage_daemon import StorageDaemon
    from ..retention import to_keep
    from ..sink import chain
    from ..sink import prune as received
    from ..sink.store import Store
    from ..state import vm_lock

    with env.catalog() as catalog, vm_lock(env.state_dir, uuid):
        store = Store(env.state_dir, catalog)
        if dry_run:
            snaps = catalog.snapshots(uuid)
            outcome.add(snaps, *received.plan(store, uuid, to_keep(snaps, rules)))
            return
        with StorageDaemon() as daemon:
            chain.finish_insertions(store, daemon, uuid)  # a late snapshot's graft first: one line per disk
            received.sweep(store, uuid)
            snaps = catalog.snapshots(uuid)
            gone, protected = received.plan(store, uuid, to_keep(snaps, rules))
            for snap in gone:
                received.prune_one(store, daemon, snap)
            outcome.add(snaps, gone, protected)
