"""What every command shares: the global options, the state dir and catalog, output as text or JSON."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..catalog import Catalog
from ..state import resolve_state_dir

DEFAULT_CONNECT = "qemu:///system"


@dataclass
class Env:
    """The global options, whether given before or after the command name."""

    json: bool = False
    state_dir_option: str | None = None
    connect: str = DEFAULT_CONNECT
    debug: bool = False
    lock_wait: float = 0.0  # --wait: how long to wait for another run on the same VM

    @functools.cached_property
    def state_dir(self) -> Path:
        return resolve_state_dir(self.state_dir_option)

    def vm_lock(self, vm_uuid: str, *, at_least: float = 0.0) -> contextlib.AbstractContextManager[None]:
        """The VM's lock (one vmrepl run per VM), waited for up to --wait seconds (`at_least` these)."""
        from ..state import vm_lock

        return vm_lock(self.state_dir, vm_uuid, wait_seconds=max(self.lock_wait, at_least))

    def catalog(self) -> Catalog:
        return Catalog(self.state_dir)

    def emit(self, document: Any, text: str | Callable[[], str]) -> None:
        """Print `document` as JSON with --json, else the human text."""
        if self.json:
            json.dump(document, sys.stdout, indent=2, sort_keys=False)
            sys.stdout.write("\n")
        else:
            out = text() if callable(text) else text
            if out:
                click.echo(out)


def _setter(attribute: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def store(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value is not None and value is not False:
            setattr(ctx.ensure_object(Env), attribute, value)

    return store


def global_options(*, connect: bool = False, lock: bool = False) -> Callable[[Callable], Callable]:
    """Add --json, --state-dir, --debug (and --connect for libvirt commands, --wait for those that take
    a VM's lock) to a command or group."""

    def decorate(f: Callable) -> Callable:
        options = [
            click.option("--json", "json_", is_flag=True, expose_value=False, callback=_setter("json"),
                         help="Print one JSON document on stdout."),
            click.option("--state-dir", type=str, expose_value=False, callback=_setter("state_dir_option"),
                         help="State directory (default $VMREPL_STATE_DIR or /var/lib/vmrepl)."),
            click.option("--debug", is_flag=True, expose_value=False, callback=_setter("debug"),
                         help="Show tracebacks and debug logging."),
        ]
        if connect:
            options.append(click.option("--connect", "-c", type=str, expose_value=False, callback=_setter("connect"),
                                        help=f"libvirt URI (default {DEFAULT_CONNECT})."))
        if lock:
            options.append(click.option("--wait", "lock_wait", type=click.FloatRange(min=0), metavar="SECONDS",
                                        expose_value=False, callback=_setter("lock_wait"),
                                        help="Wait up to SECONDS for another vmrepl run on the same VM "
                                             "(default: fail at once)."))
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


pass_env = click.make_pass_decorator(Env, ensure=True)


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


@contextlib.contextmanager
def locked_domain(env: Env, vm: str, *, wait_at_least: float = 0.0) -> Iterator[tuple[Any, Catalog]]:
    """The libvirt domain `vm` and the catalog, with the VM's lock held: one vmrepl run per VM."""
    from ..names import safe_name
    from ..source import domain

    conn = domain.connect(env.connect)
    try:
        dom = domain.lookup(conn, safe_name("VM name", vm))
        with env.catalog() as catalog, env.vm_lock(dom.UUIDString(), at_least=wait_at_least):
            yield dom, catalog
    finally:
        conn.close()


def catalog_vm(catalog: Catalog, vm: str) -> str:
    """The uuid of a VM this host's catalog knows (by name or uuid), else a NotFoundError."""
    from ..errors import NotFoundError

    uuid = catalog.vm_uuid(vm)
    if uuid is None:
        raise NotFoundError(f"no VM {vm!r} in the catalog at {catalog.path.parent}",
                            hint="take a snapshot first (vmrepl snapshot VM) or check --state-dir")
    return uuid


def parse_rate(text: str | None) -> int | None:
    """'500K', '20M', '1G' or plain bytes per second."""
    from ..errors import UsageError

    if text is None:
        return None
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number, unit = text.rstrip("KMGkmg"), text[len(text.rstrip("KMGkmg")):].upper()
    try:
        rate = int(float(number) * units[unit])
    except (ValueError, KeyError, OverflowError):  # OverflowError: "inf"
        raise UsageError(f"invalid rate {text!r}", hint="give bytes per second, e.g. 500K, 20M or 1G") from None
    if rate <= 0:
        raise UsageError(f"invalid rate {text!r}", hint="the rate must be positive")
    return rate


def connection_options(f: Callable) -> Callable:
    """The ssh options of commands that talk to a destination (replicate, verify); they arrive as `ssh`."""
    options = [
        click.option("--to", "destination", required=True, metavar="[USER@]HOST[:PORT]", help="The destination."),
        click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), help="SSH private key."),
        click.option("--known-hosts", type=click.Path(dir_okay=False, path_type=Path),
                     help="known_hosts file (besides ~/.ssh/known_hosts or UserKnownHostsFile)."),
        click.option("--accept-new-host-key", is_flag=True, help="Trust and record an unknown host key."),
        click.option("--remote-command", default="vmrepl receive", show_default=True,
                     help="What runs on the destination (e.g. a venv path, with --state-dir)."),
        click.option("--bwlimit", metavar="RATE", help="Limit the send rate, bytes/s (K, M, G suffixes)."),
        click.option("--ssh-config", metavar="FILE",
                     help="ssh client config to look HOST up in (default ~/.ssh/config; 'none': none)."),
    ]

    @functools.wraps(f)
    def wrapper(*args: Any, destination: str, identity: Path | None, known_hosts: Path | None,
                accept_new_host_key: bool, remote_command: str, bwlimit: str | None, ssh_config: str | None,
                **kwargs: Any) -> Any:
        from ..transport import ConnectOptions

        return f(*args, ssh=ConnectOptions(destination=destination, identity=identity, known_hosts=known_hosts,
                                           accept_new_host_key=accept_new_host_key, remote_command=remote_command,
                                           bwlimit=parse_rate(bwlimit), ssh_config=ssh_config), **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
