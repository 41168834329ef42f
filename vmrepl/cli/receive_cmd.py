"""`vmrepl receive`: the destination's end of replication, on stdin/stdout (run by ssh)."""

from __future__ import annotations

import sys

import click

from .common import Env, global_options, pass_env


@click.command("receive")
@global_options()
@pass_env
def receive(env: Env) -> None:
    """Receive snapshots on stdin/stdout (run by `vmrepl replicate` over ssh)."""
    from ..sink.receive import serve

    serve(sys.stdin.buffer, sys.stdout.buffer, env.state_dir)
