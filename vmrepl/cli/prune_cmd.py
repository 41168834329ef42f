"""`vmrepl prune VM --keep SPEC [--drop-partial] [--dry-run]`: retention on either side; anchors are never
pruned. `--drop-partial` (with or without --keep) discards VM's interrupted incoming transfer here.

Snapshots taken here go by block commit (source/prune.py); received ones by rebuilding the next younger
layer without them (sink/prune.py), after which this host tells senders not to send them again. A VM
that failed over or back holds both kinds: one grid covers them all, each kind goes its own way.

A transfer that stopped part-way keeps its partial layers and progress file on the destination until the
sender resumes it; a source that never sends that VM again leaves them for good. `--drop-partial` is
the way out (as `zfs receive -A` is for `zfs receive -s`): under the lock `vmrepl receive` takes, so a
transfer under way is never touched, and before the retention, which then no longer keeps the dropped
transfer's base for it. The next replicate sends that snapshot again from its start."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import click

from ..units import human_bytes, local_time
from .common import Env, catalog_vm, format_table, global_options, locked_domain, pass_env

if TYPE_CHECKING:
    from ..catalog import Catalog, Snapshot
    from ..sink.store import PartialTransfer, Store


@click.command("prune")
@click.argument("vm")
@click.option("--keep", "spec", metavar="SPEC",
              help="Retention grid, e.g. last=24,hourly=48,daily=30,weekly=8,monthly=12.")
@click.option("--drop-partial", is_flag=True,
              help="Discard VM's interrupted incoming transfer on this host (a destination): its partial layers "
                   "and progress file (see `vmrepl status`). Refused while a transfer of VM runs; the next "
                   "replicate sends that snapshot again from its start. VM may be the uuid `status` shows.")
@click.option("--dry-run", is_flag=True, help="Say what would go; change nothing.")
@global_options(connect=True, lock=True)
@pass_env
def prune(env: Env, vm: str, spec: str | None, drop_partial: bool, dry_run: bool) -> None:
    """Remove VM's snapshots that the retention grid (--keep) does not keep (never an anchor or the newest),
    and with --drop-partial its interrupted incoming transfer; at least one of the two."""
    from ..errors import UsageError
    from ..retention import parse_keep

    if spec is None and not drop_partial:
        raise UsageError("nothing to prune: give --keep SPEC, --drop-partial, or both", hint="see vmrepl prune --help")
    rules = parse_keep(spec) if spec is not None else None  # a bad grid is refused before anything goes
    outcome = Outcome()
    catalogued = True
    if drop_partial:
        catalogued = _drop_partial(env, vm, dry_run, outcome)
    if rules is not None and catalogued:  # a VM that only a partial transfer named has nothing to keep or prune
        _retention(env, vm, rules, dry_run, outcome, partial_dropped=drop_partial)
    doc = {"pruned": outcome.pruned, "dry_run": dry_run,
           "protected": [{"name": outcome.names[i], "reason": why} for i, why in outcome.protected.items()],
           "dropped_partial": [p.snapshot_id for p in outcome.dropped_partial]}

    def text() -> str:
        lines = _partial_lines(vm, outcome.dropped_partial, dry_run) if drop_partial else []
        if rules is None:
            return "\n".join(lines)
        verb = "would prune" if dry_run else "pruned"
        pruned = outcome.pruned
        lines.append(f"{vm}: {verb} {len(pruned)} snapshot(s)" + (f": {', '.join(pruned)}" if pruned else ""))
        if outcome.protected:
            lines.append(format_table(["KEPT", "WHY"], [[outcome.names[i], why] for i, why in outcome.protected.items()]))
        return "\n".join(lines)

    env.emit(doc, text)


def _retention(env: Env, vm: str, rules: dict[str, int], dry_run: bool, outcome: Outcome, *,
               partial_dropped: bool) -> None:
    with env.catalog() as catalog:
        uuid = catalog.vm_uuid(vm)
        origins = {s.origin for s in catalog.snapshots(uuid)} if uuid else set()
    if origins != {"received"}:  # snapshots taken here (or none yet): the domain's
        _prune_local(env, vm, rules, dry_run, outcome, mixed="received" in origins)
    if "received" in origins:
        assert uuid is not None
        _prune_received(env, uuid, rules, dry_run, outcome, partial_dropped=partial_dropped)


@dataclass
class Outcome:
    """What a prune did, over both kinds of snapshot (a VM that failed over has both)."""

    pruned: list[str] = field(default_factory=list)        # names
    protected: dict[str, str] = field(default_factory=dict)  # id -> why kept
    names: dict[str, str] = field(default_factory=dict)      # id -> name
    dropped_partial: list[PartialTransfer] = field(default_factory=list)

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


def _prune_received(env: Env, uuid: str, rules: dict[str, int], dry_run: bool, outcome: Outcome, *,
                    partial_dropped: bool) -> None:
    """Received snapshots go by rebuilding the next younger layer without them (sink/prune.py).
    `partial_dropped`: --drop-partial went first; a dry run's partial is still there, and must not keep
    its base in the plan shown, as the real run's no longer does."""
    from ..qemu.storage_daemon import StorageDaemon
    from ..retention import to_keep
    from ..sink import chain
    from ..sink import prune as received
    from ..sink.store import Store

    with env.catalog() as catalog, env.vm_lock(uuid):
        store = Store(env.state_dir, catalog)
        if dry_run:
            snaps = catalog.snapshots(uuid)
            outcome.add(snaps, *received.plan(store, uuid, to_keep(snaps, rules), without_partial=partial_dropped))
            return
        with StorageDaemon() as daemon:
            chain.finish_insertions(store, daemon, uuid)  # a late snapshot's graft first: one line per disk
            received.sweep(store, uuid)
            snaps = catalog.snapshots(uuid)
            gone, protected = received.plan(store, uuid, to_keep(snaps, rules))
            for snap in gone:
                received.prune_one(store, daemon, snap)
            outcome.add(snaps, gone, protected)


def _drop_partial(env: Env, vm: str, dry_run: bool, outcome: Outcome) -> bool:
    """Discard VM's interrupted incoming transfers (with `dry_run`, only list them) under the VM's lock, the
    one `vmrepl receive` holds for its whole session; True if the catalog knows the VM."""
    from ..errors import LockedError
    from ..sink.store import Store

    with env.catalog() as catalog:
        store = Store(env.state_dir, catalog)
        uuid = _partial_vm(catalog, store, vm)
        lock = ExitStack()
        try:
            lock.enter_context(env.vm_lock(uuid))
        except LockedError:
            raise LockedError(f"a transfer of {vm} is running on this host (another vmrepl run holds its lock)",
                              hint="its partial is in use: retry once it has ended") from None
        with lock:
            transfers = store.partial_transfers(uuid)  # listed under the lock: none is under way now
            if not dry_run:
                for transfer in transfers:
                    store.drop_partial(uuid, transfer.snapshot_id)
        outcome.dropped_partial += transfers
        return catalog.vm_uuid(vm) is not None


def _partial_vm(catalog: Catalog, store: Store, vm: str) -> str:
    """The uuid of `vm`: a VM the catalog knows (by name or uuid), else one whose first full send stopped
    before its commit (no catalog row names it yet: its progress file has the name)."""
    from ..errors import NotFoundError, UsageError

    known = catalog.vm_uuid(vm)
    if known == vm:
        return known  # given as a uuid: no name can make it ambiguous
    named = {u for u in store.partial_vms() if vm in (u, *(t.vm_name for t in store.partial_transfers(u)))}
    if len(candidates := named | ({known} if known else set())) > 1:  # e.g. a VM defined anew under its old name
        raise UsageError(f"{vm!r} names more than one VM here: {', '.join(sorted(candidates))}",
                         hint="give the VM's uuid (vmrepl status --json shows it)")
    uuid = known or next(iter(named), None)
    if uuid is None:
        raise NotFoundError(f"no VM {vm!r} in the catalog at {catalog.path.parent}, and no partial transfer of it",
                            hint="`vmrepl status` lists VMs and their partial transfers; check --state-dir")
    return uuid


def _partial_lines(vm: str, dropped: list[PartialTransfer], dry_run: bool) -> list[str]:
    if not dropped:
        return [f"{vm}: no partial transfer here"]
    verb = "would drop" if dry_run else "dropped"
    return [f"{vm}: {verb} the partial transfer of snapshot {p.snapshot_id} ({human_bytes(p.bytes)}, last progress "
            f"{local_time(p.since_ns)})" for p in dropped]
