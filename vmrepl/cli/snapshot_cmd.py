"""`vmrepl snapshot VM`: all disks of the VM at one instant, kept on this host and catalogued."""

from __future__ import annotations

import click

from ..hooks import hooks_dir
from .common import Env, global_options, locked_domain, pass_env


@click.command("snapshot")
@click.argument("vm")
@click.option("--name", help="Snapshot name (default gGENERATION-UTCTIME).")
@click.option("--quiesce", is_flag=True, help="Freeze guest filesystems through the guest agent.")
@global_options(connect=True, lock=True)
@pass_env
def snapshot(env: Env, vm: str, name: str | None, quiesce: bool) -> None:
    """Take a snapshot of every disk of VM at one instant."""
    from ..source.snapshot import take_snapshot  # libvirt and QEMU modules load only when needed

    with locked_domain(env, vm) as (dom, catalog):
        snap = take_snapshot(dom.connect(), dom, catalog, name=name, quiesce=quiesce,
                             hooks_dir=hooks_dir(env.state_dir))
    env.emit(snap.as_json(), f"{snap.vm_name}: snapshot {snap.name} (id {snap.id}, generation {snap.generation})")
