"""The `vmrepl` command line: one module per command, one error exit path for all of them."""

from __future__ import annotations

import logging
import os
import sys
import traceback

import click

from .. import __version__
from ..errors import VmreplError
from . import (changes_cmd, clone_cmd, hook_event_cmd, list_cmd, metrics_cmd, prune_cmd, receive_cmd, recover_cmd, replicate_cmd,
               snapshot_cmd, status_cmd, verify_cmd)
from .common import Env, global_options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="vmrepl")
@global_options(connect=True)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Replicate libvirt/QEMU VM snapshots over SSH, sending only what changed."""
    env = ctx.ensure_object(Env)
    logging.basicConfig(level=logging.DEBUG if env.debug else logging.WARNING,
                        format="vmrepl: %(levelname)s: %(message)s")


for command in (snapshot_cmd.snapshot, list_cmd.list_, changes_cmd.changes, replicate_cmd.replicate,
                receive_cmd.receive, verify_cmd.verify, clone_cmd.clone, recover_cmd.recover, status_cmd.status,
                metrics_cmd.metrics, prune_cmd.prune,
                hook_event_cmd.hook_event):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or bool(os.environ.get("VMREPL_DEBUG"))
    try:
        cli.main(args=args, prog_name="vmrepl", standalone_mode=False)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except click.ClickException as err:  # usage errors: unknown command, bad option
        click.echo(f"vmrepl: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("vmrepl: interrupted", err=True)
        sys.exit(130)
    except VmreplError as err:
        if debug:
            traceback.print_exc()
        click.echo(f"vmrepl: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("vmrepl: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
    except Exception as err:  # a bug: still one line, unless --debug
        if debug:
            traceback.print_exc()
        click.echo(f"vmrepl: internal error: {type(err).__name__}: {err} (rerun with --debug for a traceback)",
                   err=True)
        sys.exit(1)
