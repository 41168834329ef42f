"""`vmrepl hook-event DOMAIN OPERATION`: what the libvirt hook (hooks/qemu) hands over, run detached.

- started: check that every active layer carries a sound `vmrepl` bitmap and log the result; a lost
  bitmap is not rebuilt here (the next snapshot must still know that this layer's bitmap is incomplete:
  it records the layer as allocation-tracked and starts a fresh bitmap).
- release (the domain's QEMU is gone): take a final snapshot when the VM is listed in
  STATE/snapshot-on-shutdown (one VM name a line, or `*`).
"""

from __future__ import annotations

import time

import click

from ..errors import VmreplError
from ..hooks import hooks_dir
from .common import Env, global_options, locked_domain, pass_env

SETTLE_SECONDS = 30.0


@click.command("hook-event", hidden=True)
@click.argument("vm")
@click.argument("operation", type=click.Choice(["started", "release"]))
@global_options(connect=True)
@pass_env
def hook_event(env: Env, vm: str, operation: str) -> None:
    """Handle a libvirt hook event (called by hooks/qemu, detached from libvirtd)."""
    import libvirt

    from ..source import domain
    from ..source.snapshot import take_snapshot

    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    if operation == "started":
        conn = domain.connect(env.connect)  # returns once libvirtd has finished starting the domain
        dom = domain.lookup(conn, vm)
        deadline = time.monotonic() + SETTLE_SECONDS
        while not domain.is_running(dom) and time.monotonic() < deadline:
            time.sleep(0.5)
        nodes = domain.top_bitmaps(dom)
        lost = [d.target for d in domain.disks(dom)
                if (b := nodes.get(d.image, ("", None))[1]) is None or b.get("inconsistent")]
        state = f"no sound change tracking on {', '.join(lost)} (the next snapshot falls back and rebuilds it)" if lost \
            else "change tracking ok"
        click.echo(f"{stamp} {vm} started: {state}")
        return
    wanted = env.state_dir / "snapshot-on-shutdown"
    names = wanted.read_text().split() if wanted.is_file() else []
    if vm not in names and "*" not in names:
        return
    try:
        with locked_domain(env, vm, wait_at_least=600) as (dom, catalog):
            state, reason = dom.state()  # a reason's number means something else in another state
            gone = {libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated", libvirt.VIR_DOMAIN_SHUTOFF_SAVED: "saved"}
            if state == libvirt.VIR_DOMAIN_SHUTOFF and reason in gone:
                click.echo(f"{stamp} {vm} {gone[reason]}: no snapshot")
                return
            snap = take_snapshot(dom.connect(), dom, catalog, name=None, quiesce=False,
                                 hooks_dir=hooks_dir(env.state_dir))
        click.echo(f"{stamp} {vm} shut down: snapshot {snap.name} ({snap.id})")
    except VmreplError as err:
        click.echo(f"{stamp} {vm} shut down: no snapshot: {err}")
