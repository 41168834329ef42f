"""`vmrepl clone VM SNAPSHOT NEWVM`: a linked clone on a snapshot; it replicates as a delta on it."""

from __future__ import annotations

from pathlib import Path

import click

from ..names import safe_name
from .common import Env, global_options, locked_domain, pass_env


@click.command("clone")
@click.argument("vm")
@click.argument("snapshot_ref", metavar="SNAPSHOT")
@click.argument("new_vm", metavar="NEWVM")
@global_options(connect=True, lock=True)
@pass_env
def clone(env: Env, vm: str, snapshot_ref: str, new_vm: str) -> None:
    """Define NEWVM as a linked clone of VM at SNAPSHOT (overlays on the snapshot's images)."""
    from ..source.define import define_on_snapshot

    safe_name("VM name", new_vm)
    with locked_domain(env, vm) as (dom, catalog):
        snap = catalog.snapshot(dom.UUIDString(), snapshot_ref)
        clone_dom = define_on_snapshot(dom.connect(), snap, new_vm, Path(snap.disks[0].image).parent,
                                       keep_uuid=False)
        catalog.upsert_vm(clone_dom.UUIDString(), new_vm)
    doc = {"vm": new_vm, "vm_uuid": clone_dom.UUIDString(), "origin": snap.id, "origin_vm": snap.vm_name}
    env.emit(doc, f"{new_vm}: linked clone of {snap.vm_name} at {snap.name}")
