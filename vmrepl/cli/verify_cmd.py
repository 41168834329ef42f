"""`vmrepl verify VM --to HOST`: content digests of each shared snapshot, compared across both hosts."""

from __future__ import annotations

import click

from ..errors import NotFoundError, VmreplError
from .common import Env, catalog_vm, connection_options, format_table, global_options, pass_env


@click.command("verify")
@click.argument("vm")
@connection_options
@click.option("--snapshot", "snapshot_ref", help="Verify only this snapshot.")
@global_options()
@pass_env
def verify(env: Env, vm: str, ssh, snapshot_ref: str | None) -> None:  # type: ignore[no-untyped-def]
    """Compare each shared snapshot's content on both hosts, reading through their chains."""
    from ..digest import image_digest
    from ..qemu.storage_daemon import StorageDaemon
    from ..replicate import Session

    with env.catalog() as catalog:
        uuid = catalog_vm(catalog, vm)
        mine = [catalog.snapshot(uuid, snapshot_ref)] if snapshot_ref else catalog.snapshots(uuid)
        with Session(catalog, uuid, ssh) as session:
            held = {h.id for h in session.held.snapshots}
            shared = [s for s in mine if s.id in held]
            if not shared:
                raise NotFoundError(f"{ssh.destination} holds no snapshot of {vm} that this host has"
                                    + (f" ({mine[0].name})" if snapshot_ref else ""),
                                    hint="replicate first")
            remote = session.remote_digests([s.id for s in shared])
        report, bad = [], []
        with StorageDaemon() as daemon:
            for snap in shared:
                theirs = remote.get(snap.id) or {}
                disks = []
                for layer in snap.disks:
                    ours = image_digest(layer.image, daemon=daemon)
                    match = theirs.get(layer.target) == ours
                    disks.append({"target": layer.target, "source": ours, "destination": theirs.get(layer.target),
                                  "match": match})
                    if not match:
                        bad.append(f"{snap.name} disk {layer.target}")
                report.append({"id": snap.id, "name": snap.name, "disks": disks})

    env.emit(report, lambda: format_table(
        ["SNAPSHOT", "DISK", "DIGEST", "RESULT"],
        [[r["name"], d["target"], d["source"][:16], "ok" if d["match"] else "DIFFERS"] for r in report
         for d in r["disks"]]))
    if bad:
        raise VmreplError(f"{len(bad)} disk(s) differ on {ssh.destination}: {', '.join(bad)}",
                          hint="replicate those snapshots again, or investigate the destination's storage")
