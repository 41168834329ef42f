"""`vmrepl changes VM --since A [--until B] [--disk T]`: changed extents between two snapshots, or from
a snapshot to the disk as it is now."""

from __future__ import annotations

import contextlib

import click

from ..errors import UsageError
from ..units import human_bytes
from .common import Env, catalog_vm, format_table, global_options, pass_env


@click.command("changes")
@click.argument("vm")
@click.option("--since", "since_ref", required=True, help="The older snapshot (id, id prefix or name).")
@click.option("--until", "until_ref", help="The younger snapshot (default: the disk as it is now).")
@click.option("--disk", "disk_target", help="Only this disk (e.g. vda).")
@global_options(connect=True, lock=True)
@pass_env
def changes(env: Env, vm: str, since_ref: str, until_ref: str | None, disk_target: str | None) -> None:
    """List the extents that changed since a snapshot (up to another, or to now), from the dirty bitmaps."""
    from ..qemu.storage_daemon import StorageDaemon
    from ..source import domain
    from ..source.changes import disk_changes, running_disk_changes

    with env.catalog() as catalog, contextlib.ExitStack() as stack:
        uuid = catalog_vm(catalog, vm)
        since = catalog.snapshot(uuid, since_ref)
        until = catalog.snapshot(uuid, until_ref) if until_ref else None
        if until and since.generation >= until.generation and since.id != until.id:
            raise UsageError(f"--since {since.name} is not older than --until {until.name}",
                             hint="give the older snapshot as --since")
        if until is None:  # up to the disk as it is now: ask libvirt (and the running QEMU)
            conn = domain.connect(env.connect)
            stack.callback(conn.close)
            dom = domain.lookup(conn, vm)
            # the running QEMU gets a bitmap copy and an NBD export: one run at a time, none during a snapshot/prune
            stack.enter_context(env.vm_lock(uuid, at_least=60))
            targets = [disk_target] if disk_target else [d.target for d in domain.disks(dom)]
        else:
            targets = [until.disk(disk_target).target] if disk_target else [d.target for d in until.disks]
        rows = []
        daemon = stack.enter_context(StorageDaemon())
        for target in targets:
            result = disk_changes(catalog, daemon, since, until, target) if until else \
                running_disk_changes(catalog, daemon, dom, since, target)
            for note in result.fallbacks:
                click.echo(f"vmrepl: warning: {note}", err=True)
            rows += [{"disk": target, "offset": e.offset, "length": e.length, "zero": e.zero}
                     for e in result.extents]

    def text() -> str:
        data = sum(r["length"] for r in rows if not r["zero"])
        zero = sum(r["length"] for r in rows if r["zero"])
        table = format_table(["DISK", "OFFSET", "LENGTH", "ZERO"],
                             [[r["disk"], r["offset"], r["length"], "yes" if r["zero"] else ""] for r in rows])
        return f"{table}\n{len(rows)} extents: {human_bytes(data)} of data, {human_bytes(zero)} of zeros"

    env.emit(rows, text)
