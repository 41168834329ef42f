"""The `vmrepl` command line: one module per command, one error exit path for all of them."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback

import click

from .. import __version__
from ..errors import VmreplError
from .common import Env, global_options

# command name -> "module:function"; a run imports only its own command's module (and what that
# needs), so `replicate` starts its ssh connect, and `receive` answers, sooner.
COMMANDS = {
    "snapshot": "snapshot_cmd:snapshot", "list": "list_cmd:list_", "changes": "changes_cmd:changes",
    "replicate": "replicate_cmd:replicate", "receive": "receive_cmd:receive", "verify": "verify_cmd:verify",
    "clone": "clone_cmd:clone", "recover": "recover_cmd:recover", "status": "status_cmd:status",
    "metrics": "metrics_cmd:metrics", "prune": "prune_cmd:prune", "hook-event": "hook_event_cmd:hook_event",
}


class LazyGroup(click.Group):
    """A group whose commands are imported when named (click's documented lazy-loading pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, function = COMMANDS[cmd_name].split(":")
        command: click.Command = getattr(importlib.import_module(f".{module}", __name__), function)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="vmrepl")
@global_options(connect=True)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Replicate libvirt/QEMU VM snapshots over SSH, sending only what changed."""
    env = ctx.ensure_object(Env)
    logging.basicConfig(level=logging.DEBUG if env.debug else logging.WARNING,
                        format="vmrepl: %(levelname)s: %(message)s")



def main(argv: list[str] | None = None) -> None:
    """The `vmrepl` console script. Run as a program (no `argv`), it ends without the interpreter's
    teardown, which takes 30-40 ms with paramiko's and cryptography's modules loaded, at the end of
    every run: by then every command has closed (and fsynced) what it wrote and stopped its daemons."""
    status = _run(sys.argv[1:] if argv is None else argv)
    if argv is not None:
        sys.exit(status)
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`vmrepl list | head`)
        status = status or 1
    sys.stderr.flush()
    os._exit(status)


def _run(args: list[str]) -> int:
    """Run one command and give its exit status; a failure is reported here, as one line on stderr."""
    debug = "--debug" in args or bool(os.environ.get("VMREPL_DEBUG"))
    try:
        cli.main(args=args, prog_name="vmrepl", standalone_mode=False)
        return 0
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.ClickException as err:  # usage errors: unknown command, bad option
        click.echo(f"vmrepl: {err.format_message()}", err=True)
        return err.exit_code
    except click.exceptions.Abort:
        click.echo("vmrepl: interrupted", err=True)
        return 130
    except VmreplError as err:
        if debug:
            traceback.print_exc()
        click.echo(f"vmrepl: {_one_line(str(err))}", err=True)  # libvirt's and QEMU's messages may span lines
        return err.exit_code
    except KeyboardInterrupt:
        click.echo("vmrepl: interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as err:  # a bug: still one line, unless --debug
        if debug:
            traceback.print_exc()
        click.echo(f"vmrepl: internal error: {type(err).__name__}: {_one_line(str(err))} (rerun with --debug for a "
                   "traceback)", err=True)
        return 1


def _one_line(message: str) -> str:
    return " ".join(message.split())
