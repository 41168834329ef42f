"""Where `--to` leads: `[USER@]HOST[:PORT]`, looked up in the OpenSSH client configuration as ssh does.

HOST may be an alias of ~/.ssh/config (or of `--ssh-config FILE`, as `ssh -F`; `none` reads none), so
that an admin's host names, users, ports, keys, known_hosts files and jump hosts apply to vmrepl as they
do to ssh, rsync or syncoid. The options read are listed in `Hop`; the others are ignored, as is the
system-wide /etc/ssh/ssh_config. What --to spells out (user, port) wins over the file, as on ssh's
command line; each ProxyJump hop is looked up in the same file, its own jumps included.
"""

from __future__ import annotations

import getpass
import ipaddress
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError

DEFAULT_SSH_CONFIG = "~/.ssh/config"
MAX_HOPS = 8  # a jump host that (through others) names itself is a loop, not a route
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}  # ssh_config(5), TIME FORMATS


@dataclass(frozen=True)
class Destination:
    host: str
    port: int = 22
    user: str | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        return f"{user}{host}" + (f":{self.port}" if self.port != 22 else "")


@dataclass(frozen=True)
class Hop:
    """One ssh login on the way to the destination, with what the configuration says of it."""

    host: str                    # HostName (the alias resolved), what is connected to
    port: int                    # Port
    user: str                    # User, else the local user
    identities: tuple[Path, ...] = ()   # IdentityFile, in order
    identities_only: bool = False       # IdentitiesOnly: no agent or default keys besides them
    known_hosts: tuple[Path, ...] = ()  # UserKnownHostsFile: instead of ~/.ssh/known_hosts
    host_key_alias: str | None = None   # HostKeyAlias: the name the host key is filed under
    accept_new_host_key: bool = False   # StrictHostKeyChecking accept-new (or no)
    connect_timeout: float | None = None  # ConnectTimeout

    @property
    def known_hosts_name(self) -> str:
        """How OpenSSH names the host in known_hosts."""
        if self.host_key_alias:  # as ssh: the alias alone, without the port
            return self.host_key_alias.lower()
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def parse_destination(text: str) -> Destination:
    """`[USER@]HOST[:PORT]`, HOST a name, an IPv4 address or `[IPV6]` (bare IPv6 without a port)."""
    host, port, user = _split(text)
    return Destination(host=host, port=22 if port is None else port, user=user)


def _split(text: str) -> tuple[str, int | None, str | None]:
    """(host, port or None if not given, user or None)."""
    def bad(why: str) -> UsageError:
        return UsageError(f"invalid destination {text!r}: {why}",
                          hint="write [USER@]HOST[:PORT], e.g. root@backup1:2222 or root@[fd00::2]:22")
    user = None
    rest = text
    if "@" in rest:
        user, rest = rest.rsplit("@", 1)
        if not _USER.fullmatch(user):
            raise bad(f"bad user name {user!r}")
    port_text = None
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise bad("unbalanced brackets")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
        port_text = tail[1:] if tail else None
    elif rest.count(":") > 1:
        try:
            host = str(ipaddress.IPv6Address(rest))
        except ValueError:
            raise bad("an IPv6 address with a port must be in brackets") from None
    else:
        host, _, port_text = rest.partition(":")
        port_text = port_text if ":" in rest else None
        if not _HOSTNAME.fullmatch(host):
            raise bad(f"bad host name {host!r}")
    if port_text is None:
        return host, None, user
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 0 < int(port_text) < 65536:
        raise bad(f"bad port {port_text!r}")
    return host, int(port_text), user


def route(destination: str, ssh_config: str | None = None) -> list[Hop]:
    """The logins that reach `destination`: its ProxyJump hosts in order, then itself. `ssh_config` is
    the file to read (default ~/.ssh/config if it exists; `none`: no file)."""
    return _route(destination, _load(ssh_config), depth=0)


def _route(text: str, config: _Config | None, depth: int, direct: bool = False) -> list[Hop]:
    """`direct`: a later host of a ProxyJump list, reached through the one before it (as `ssh -J`),
    so its own ProxyJump/ProxyCommand do not apply."""
    host, port, user = _split(text)
    options = config.lookup(host) if config else {}
    if port is None:
        port = config.number(options, "port", host, 65535) if config and "port" in options else 22
    hostname = options.get("hostname", host)
    user = user or options.get("user") or getpass.getuser()
    alias = options.get("hostkeyalias")
    tokens = {"%%": "%", "%d": str(Path.home()), "%h": hostname, "%p": str(port), "%r": user,
              "%u": getpass.getuser(), "%n": host, "%k": alias or host}
    files = options.get("userknownhostsfile", "").split()
    hop = Hop(
        host=hostname,
        port=port,
        user=user,
        identities=tuple(Path(p).expanduser() for p in options.get("identityfile", [])),
        identities_only=options.get("identitiesonly", "").lower() in ("yes", "true"),
        known_hosts=(Path(os.devnull),) if [f.lower() for f in files] == ["none"] else tuple(
            Path(re.sub(r"%.", lambda m: tokens.get(m[0], m[0]), f)).expanduser() for f in files),
        host_key_alias=alias,
        accept_new_host_key=options.get("stricthostkeychecking", "").lower() in ("accept-new", "no", "off"),
        connect_timeout=config.seconds(options, "connecttimeout", host) if config and "connecttimeout" in options
        else None,
    )
    if direct:
        return [hop]
    jumps = options.get("proxyjump", "none")
    order = list(options)  # paramiko keeps the order values were obtained in: the first of the two wins
    command_first = "proxycommand" in options and (
        "proxyjump" not in options or order.index("proxycommand") < order.index("proxyjump"))
    if command_first and options["proxycommand"] is None:  # `ProxyCommand none` (paramiko: None): direct
        return [hop]
    if options.get("proxycommand") is not None and (jumps.lower() == "none" or command_first):
        assert config is not None
        raise UsageError(f"{config.path} gives {host} a ProxyCommand, which vmrepl does not run",
                         hint="reach it with ProxyJump instead (vmrepl tunnels through jump hosts itself)")
    if jumps.lower() == "none":
        return [hop]
    if depth >= MAX_HOPS:
        assert config is not None
        raise UsageError(f"{config.path}: the jump hosts of {host} lead more than {MAX_HOPS} hops deep",
                         hint="check its ProxyJump lines for a loop")
    first, *rest = (jump.strip().removeprefix("ssh://") for jump in jumps.split(","))
    # as ssh: `ProxyJump a,b` is `ssh -J a b`, so only a's own jumps are followed
    hops = _route(first, config, depth + 1) + [_route(j, config, depth + 1, direct=True)[0] for j in rest]
    return [*hops, hop]


class _Config:
    """A parsed ssh_config file; `lookup` gives a host's options (lowercase keys, first value wins)."""

    def __init__(self, path: Path) -> None:
        import paramiko  # transport imports it anyway, with `invoke` kept out

        self.path = path
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot read ssh config {path}: {getattr(err, 'strerror', None) or err}",
                             hint="check its permissions, or pass --ssh-config none") from None
        try:
            self._config = paramiko.SSHConfig.from_text(text)
        except (paramiko.SSHException, ValueError) as err:  # ConfigParseError; shlex's, on a Match line
            raise UsageError(f"cannot parse ssh config {path}: {err}", hint="fix that line") from None
        _refuse_what_vmrepl_does_not_follow(path, text)

    def lookup(self, host: str) -> dict[str, Any]:
        import paramiko

        try:
            return dict(self._config.lookup(host))
        except paramiko.SSHException as err:  # a bad Match line; CanonicalizeHostname that found nothing
            raise UsageError(f"cannot use ssh config {self.path} for {host}: {err}", hint="fix the file") from None

    def seconds(self, options: dict[str, Any], key: str, host: str) -> float | None:
        """A time as ssh reads it: `30`, `1m`, `1h30m`; `none`: the default."""
        text = options[key].lower()
        if text == "none":
            return None
        parts = re.findall(r"([0-9]+)([smhdw]?)", text)
        well_formed = bool(parts) and "".join(a + b for a, b in parts) == text
        value = sum(int(n) * _TIME_UNITS[u] for n, u in parts) if well_formed else -1
        if not 0 <= value <= 2**31 - 1:  # as ssh: beyond that is no time (nor a socket timeout)
            raise UsageError(f"ssh config {self.path} gives {host} a bad {key} {options[key]!r}",
                             hint="give a time such as 30, 30s or 2m")
        return value or None

    def number(self, options: dict[str, Any], key: str, host: str, high: int) -> int:
        text = options[key]
        if not re.fullmatch(r"[0-9]{1,9}", text) or not 0 < int(text) <= high:
            raise UsageError(f"ssh config {self.path} gives {host} a bad {key} {text!r}",
                             hint=f"give a number from 1 to {high}")
        return int(text)


_DIRECTIVE = re.compile(r"(\w+)(?:\s*=\s*|\s+)(.+)")  # a line as paramiko splits it
_CRITERIA_WITHOUT_ARGUMENT = {"all", "canonical", "final"}


def _refuse_what_vmrepl_does_not_follow(path: Path, text: str) -> None:
    """`Match exec` (paramiko would run it) and `Include` (paramiko skips it without a word).
    Match criteria are read as paramiko reads them (shell words), so quoting cannot hide an exec."""
    for line in text.splitlines():
        directive = _DIRECTIVE.match(line.strip())
        if directive is None:
            continue
        keyword = directive[1].lower()
        if keyword == "include":
            raise UsageError(f"ssh config {path} has an `Include` line, which vmrepl does not follow",
                             hint="give vmrepl a file without Include lines with --ssh-config")
        if keyword != "match":
            continue
        words = shlex.split(directive[2])  # parsed by paramiko already: balanced
        while words:
            criterion = words.pop(0).lower().removeprefix("!")
            if criterion == "exec":
                raise UsageError(f"ssh config {path} has a `Match exec` line, which vmrepl does not run",
                                 hint="use Host blocks, or give vmrepl a file of its own with --ssh-config")
            if criterion not in _CRITERIA_WITHOUT_ARGUMENT and words:
                words.pop(0)


def _load(ssh_config: str | None) -> _Config | None:
    if ssh_config is not None and ssh_config.lower() == "none":
        return None
    path = Path(ssh_config or DEFAULT_SSH_CONFIG).expanduser()
    if ssh_config is None and not path.exists():
        return None
    return _Config(path)
