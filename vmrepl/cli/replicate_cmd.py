"""`vmrepl replicate VM --to HOST`: send the snapshots the destination lacks, each as a delta."""

from __future__ import annotations

import contextlib
import time

import click

from ..errors import UsageError, VmreplError
from ..units import human_bytes
from .common import Env, catalog_vm, connection_options, format_table, global_options, pass_env


@click.command("replicate")
@click.argument("vm")
@connection_options
@click.option("--snapshot", "snapshot_ref", help="Send only this snapshot (id, id prefix or name).")
@click.option("--all", "send_all", is_flag=True, help="Send every snapshot the destination lacks (the default).")
@click.option("--latest-first", is_flag=True, help="Send the newest first, then backfill the older ones.")
@click.option("--dry-run", is_flag=True, help="Print the plan; send nothing.")
@global_options(lock=True)
@pass_env
def replicate(env: Env, vm: str, ssh, snapshot_ref: str | None, send_all: bool, latest_first: bool,  # type: ignore[no-untyped-def]
              dry_run: bool) -> None:
    """Send VM's snapshots that the destination lacks, each as a delta on the youngest shared one."""
    from ..destination import parse_destination
    from ..transport import Opening

    if snapshot_ref and send_all:
        raise UsageError("--snapshot and --all exclude each other")
    host = str(parse_destination(ssh.destination))
    with env.catalog() as catalog, contextlib.ExitStack() as held:
        uuid = catalog_vm(catalog, vm)
        want = [catalog.snapshot(uuid, snapshot_ref).id] if snapshot_ref else None
        held.enter_context(env.vm_lock(uuid))  # a busy VM fails here, before any network traffic
        opening = Opening(ssh)  # connect while the rest is imported

        from concurrent.futures import ThreadPoolExecutor

        from .. import plan as planner
        from ..qemu.storage_daemon import StorageDaemon
        from ..replicate import WORKERS, Session

        session = held.enter_context(Session(catalog, uuid, ssh, opening=opening))
        if dry_run:
            with StorageDaemon() as daemon:
                steps = session.plan(want=want, latest_first=latest_first)
                sizes = {s.snapshot: session.estimate(s, daemon) for s in steps if not s.skip}
            names = {s.id: s.name for s in catalog.snapshots(uuid, ghosts=True)}
            env.emit([planner.as_json(s, sizes.get(s.snapshot)) for s in steps],
                     lambda: planner.render(steps, names, sizes))
            return
        results = []
        with StorageDaemon() as daemon, ThreadPoolExecutor(WORKERS) as pool:
            session.prefetch(daemon)  # while the destination starts
            steps = session.plan(want=want, latest_first=latest_first)
            try:
                for step in steps:
                    if step.skip:
                        continue
                    sent = session.send(step, daemon, pool)
                    for note in sent.notes:
                        click.echo(f"vmrepl: warning: {note}", err=True)
                    results.append(sent)
            except VmreplError as err:
                catalog.record_target(uuid, host, anchor=_anchor(catalog, uuid, session),
                                      result=f"failed: {err}", run_ns=time.time_ns())
                raise
        catalog.record_target(uuid, host, anchor=_anchor(catalog, uuid, session), result="ok",
                              run_ns=time.time_ns())

    def text() -> str:
        if not results:
            return "nothing to send: the destination holds every snapshot"
        rows = [[r.name, (r.base or "-")[:8], r.position, human_bytes(r.bytes_changed), human_bytes(r.bytes_sent),
                 f"{r.seconds:.2f}"] for r in results]
        return format_table(["SNAPSHOT", "BASE", "POSITION", "CHANGED", "SENT", "SECONDS"], rows)

    env.emit([r.as_json() for r in results], text)


def _anchor(catalog, uuid: str, session) -> str | None:  # type: ignore[no-untyped-def]
    """The youngest snapshot both hosts hold now."""
    held = {h.id for h in session.held.snapshots} | session.sent_ids
    shared = [s for s in catalog.snapshots(uuid) if s.id in held]
    return shared[-1].id if shared else None
