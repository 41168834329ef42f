"""`vmrepl changes VM --since A [--until B] [--disk T]`: changed extents between two snapshots."""

from __future__ import annotations

import click

from ..errors import UsageError
from .common import Env, catalog_vm, format_table, global_options, pass_env


@click.command("changes")
@click.argument("vm")
@click.option("--since", "since_ref", required=True, help="The older snapshot (id, id prefix or name).")
@click.option("--until", "until_ref", help="The younger snapshot (default: the newest).")
@click.option("--disk", "disk_target", help="Only this disk (e.g. vda).")
@global_options()
@pass_env
def changes(env: Env, vm: str, since_ref: str, until_ref: str | None, disk_target: str | None) -> None:
    """List the extents that changed between two snapshots, from the dirty bitmaps."""
    from ..qemu.storage_daemon import StorageDaemon
    from ..source.changes import disk_changes

    with env.catalog() as catalog:
        uuid = catalog_vm(catalog, vm)
        since = catalog.snapshot(uuid, since_ref)
        until = catalog.snapshot(uuid, until_ref) if until_ref else catalog.snapshots(uuid)[-1]
        if since.generation >= until.generation and since.id != until.id:
            raise UsageError(f"--since {since.name} is not older than --until {until.name}",
                             hint="give the older snapshot as --since")
        targets = [until.disk(disk_target).target] if disk_target else [d.target for d in until.disks]
        rows = []
        with StorageDaemon() as daemon:
            for target in targets:
                result = disk_changes(catalog, daemon, since, until, target)
                for note in result.fallbacks:
                    click.echo(f"vmrepl: warning: {note}", err=True)
                rows += [{"disk": target, "offset": e.offset, "length": e.length, "zero": e.zero}
                         for e in result.extents]

    def text() -> str:
        data = sum(r["length"] for r in rows if not r["zero"])
        zero = sum(r["length"] for r in rows if r["zero"])
        table = format_table(["DISK", "OFFSET", "LENGTH", "ZERO"],
                             [[r["disk"], r["offset"], r["length"], "yes" if r["zero"] else ""] for r in rows])
        return f"{table}\n{len(rows)} extents: {data} bytes of data, {zero} bytes of zeros"

    env.emit(rows, text)
