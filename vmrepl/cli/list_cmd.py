"""`vmrepl list VM`: the VM's snapshots held on this host, oldest first."""

from __future__ import annotations

import click

from ..units import local_time
from .common import Env, catalog_vm, format_table, global_options, pass_env


@click.command("list")
@click.argument("vm")
@global_options()
@pass_env
def list_(env: Env, vm: str) -> None:
    """List the snapshots of VM held on this host, oldest first."""
    with env.catalog() as catalog:
        snapshots = catalog.snapshots(catalog_vm(catalog, vm))

    def text() -> str:
        rows = [[s.name, s.id[:8], s.generation,
                 local_time(s.created_ns),
                 (s.parent or "-")[:8], ",".join(d.target for d in s.disks)] for s in snapshots]
        return format_table(["NAME", "ID", "GEN", "CREATED", "PARENT", "DISKS"], rows)

    env.emit([s.as_json() for s in snapshots], text)
