"""`vmrepl recover VM --snapshot ID [--as NEWVM] [--start]`: on the destination, run a replicated snapshot.

The domain is defined from the definition stored with the snapshot, on fresh overlays over its layers,
with change tracking from that instant: its snapshots later replicate back (failback) as deltas on it.
Without --as it keeps the VM's name and UUID, so that the original host sees the same VM coming back.
"""

from __future__ import annotations

import click

from ..errors import SourceError
from .common import Env, catalog_vm, global_options, pass_env


@click.command("recover")
@click.argument("vm")
@click.option("--snapshot", "snapshot_ref", required=True, help="The replicated snapshot to run from.")
@click.option("--as", "new_name", help="Define it under a new name and UUID (keeps the original's identity free).")
@click.option("--start", is_flag=True, help="Start the domain.")
@global_options(connect=True, lock=True)
@pass_env
def recover(env: Env, vm: str, snapshot_ref: str, new_name: str | None, start: bool) -> None:
    """Define (and start) a domain from a replicated snapshot held on this host."""
    import libvirt

    from ..names import safe_name
    from ..source import domain
    from ..source.define import define_on_snapshot

    with env.catalog() as catalog:
        uuid = catalog_vm(catalog, vm)
        conn = domain.connect(env.connect)
        try:
            with env.vm_lock(uuid):  # before the snapshot is looked up: a prune may be removing it
                snap = catalog.snapshot(uuid, snapshot_ref)
                name = safe_name("VM name", new_name or snap.vm_name)
                dom = define_on_snapshot(conn, snap, name, env.state_dir / "vms" / uuid / "recovered" / snap.id,
                                         keep_uuid=new_name is None)
                catalog.upsert_vm(dom.UUIDString(), name)
                if start:
                    try:
                        dom.create()
                    except libvirt.libvirtError as err:
                        raise SourceError(f"{name} is defined but did not start: {err.get_error_message()}",
                                          hint=f"see `virsh start {name}`") from err
            doc = {"vm": name, "vm_uuid": dom.UUIDString(), "snapshot": snap.id, "started": start}
        finally:
            conn.close()
    env.emit(doc, f"{name}: defined from {snap.name}" + (" and started" if start else ""))
