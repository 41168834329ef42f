"""`--to` and the ssh client config it is looked up in (pure: files under tmp_path, nothing connects;
tests/integration/test_ssh_config.py logs in through such files)."""

from __future__ import annotations

import getpass
import os
from pathlib import Path

import pytest

from vmrepl.destination import Destination, Hop, parse_destination, route
from vmrepl.errors import UsageError


@pytest.mark.parametrize("text, expected", [
    ("backup1", Destination("backup1")),
    ("root@10.213.0.2", Destination("10.213.0.2", 22, "root")),
    ("repl@host.example.org:2222", Destination("host.example.org", 2222, "repl")),
    ("[fd00::2]:2200", Destination("fd00::2", 2200)),
    ("root@[fd00::2]", Destination("fd00::2", 22, "root")),
    ("fd00::2", Destination("fd00::2")),
])
def test_parse_destination(text: str, expected: Destination) -> None:
    assert parse_destination(text) == expected
    assert parse_destination(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "root@", "@host", "host:", "host:0", "host:70000", "host:ssh", "[fd00::2",
                                  "[nothost]:22", "fd00::2:22x", "-oProxyCommand=x", "a b", "ro ot@host"])
def test_parse_destination_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="invalid destination.*write \\[USER@\\]HOST\\[:PORT\\]"):
        parse_destination(text)


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`config(text)`: an ssh config file holding `text`; its path as a string. HOME is tmp_path."""
    monkeypatch.setenv("HOME", str(tmp_path))

    def write(text: str) -> str:
        path = tmp_path / "ssh_config"
        path.write_text(text)
        return str(path)
    return write


def test_an_alias_takes_its_host_user_port_keys_and_known_hosts(config, tmp_path: Path) -> None:
    cfg = config("""\
Host backup
    HostName 10.0.0.5
    User repl
    Port 2222
    IdentityFile ~/.ssh/repl_key
    IdentityFile /etc/vmrepl/second_key
    IdentitiesOnly yes
    UserKnownHostsFile ~/kh1 /etc/kh2
    HostKeyAlias backup-host
    StrictHostKeyChecking accept-new
    ConnectTimeout 7
Host *
    User fallback
    Port 2200
""")
    assert route("backup", cfg) == [Hop(
        host="10.0.0.5", port=2222, user="repl",
        identities=(tmp_path / ".ssh/repl_key", Path("/etc/vmrepl/second_key")), identities_only=True,
        known_hosts=(tmp_path / "kh1", Path("/etc/kh2")), host_key_alias="backup-host",
        accept_new_host_key=True, connect_timeout=7.0)]
    assert route("backup", cfg)[0].known_hosts_name == "backup-host"  # as ssh: an alias names no port
    # what --to spells out wins; `Host *` fills in what no earlier block gave
    (hop,) = route("root@backup:22", cfg)
    assert (hop.host, hop.user, hop.port, hop.known_hosts_name) == ("10.0.0.5", "root", 22, "backup-host")
    (other,) = route("elsewhere", cfg)
    assert (other.host, other.user, other.port, other.identities) == ("elsewhere", "fallback", 2200, ())


def test_without_a_file_the_destination_is_taken_as_written(config, tmp_path: Path) -> None:
    assert not (tmp_path / ".ssh/config").exists()
    expected = [Hop(host="backup", port=22, user=getpass.getuser())]
    assert route("backup") == expected  # no ~/.ssh/config: nothing to look up
    cfg = config("Host backup\n    HostName 10.0.0.5\n")
    assert route("backup", "none") == route("backup", "NONE") == expected  # as `ssh -F none`
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh/config").write_text(Path(cfg).read_text())
    assert route("backup")[0].host == "10.0.0.5"  # ~/.ssh/config is the default


def test_strict_host_key_checking(config) -> None:
    for value, accepts in [("yes", False), ("ask", False), ("accept-new", True), ("no", True), ("off", True)]:
        cfg = config(f"Host b\n    StrictHostKeyChecking {value}\n")
        assert route("b", cfg)[0].accept_new_host_key is accepts, value


def test_jump_hosts_are_looked_up_and_come_first(config) -> None:
    cfg = config("""\
Host backup
    HostName 10.0.1.5
    ProxyJump bastion,ops@inner:2022
Host bastion
    HostName 192.0.2.1
    User jumper
    IdentityFile /keys/bastion
Host inner
    HostName 10.0.1.1
    ProxyJump outer
Host outer
    HostName 198.51.100.7
""")
    hops = route("root@backup", cfg)
    # as `ssh -J bastion,inner`: inner is reached through bastion, so inner's own ProxyJump does not apply
    assert [(h.host, h.port, h.user) for h in hops] == [
        ("192.0.2.1", 22, "jumper"), ("10.0.1.1", 2022, "ops"), ("10.0.1.5", 22, "root")]
    # a first hop's own jumps are followed
    assert [h.host for h in route("inner", cfg)] == ["198.51.100.7", "10.0.1.1"]
    assert hops[0].identities == (Path("/keys/bastion"),)


@pytest.mark.parametrize("text, message", [
    ("Host a\n    ProxyJump b\nHost b\n    ProxyJump a\n", "the jump hosts of . lead more than 8 hops deep"),
    ("Host a\n    ProxyCommand nc %h %p\n", "gives a a ProxyCommand, which vmrepl does not run; reach it with ProxyJump"),
    ("Match exec \"true\"\n    User x\n", "has a `Match exec` line, which vmrepl does not run"),
    ("Host a\n    Port ssh\n", "gives a a bad port 'ssh'; give a number from 1 to 65535"),
    ("Host a\n    ConnectTimeout soon\n", "gives a a bad connecttimeout 'soon'; give a time"),
    ("Host a\n    ConnectTimeout 1000000000000\n", "gives a a bad connecttimeout '1000000000000'"),
    ("Match host \"a\n    User x\n", "cannot parse ssh config .*: No closing quotation"),
    ("Match e\\xec \"true\"\n    User x\n", "has a `Match exec` line"),  # shell quoting hides no exec
    ("Match host b !exec \"true\"\n    User x\n", "has a `Match exec` line"),
    ("Include other.conf\nHost a\n    User x\n", "has an `Include` line, which vmrepl does not follow"),
    ("Host a\n    Port \u00b2\n", "gives a a bad port"),
    ("Host a\n  =oops\n", "cannot parse ssh config .*: Unparsable line"),
    ("Host a\n    ProxyJump b c\n", "invalid destination 'b c'"),
])
def test_a_config_vmrepl_cannot_follow_is_one_line(config, text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        route("a", config(text))
    assert "\n" not in str(info.value)


def test_proxy_command_none_is_no_proxy(config) -> None:
    assert route("a", config("Host a\n    HostName 10.0.0.9\n    ProxyCommand none\n"))[0].host == "10.0.0.9"


def test_an_unreadable_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"cannot read ssh config {tmp_path}/missing: No such file"):
        route("a", str(tmp_path / "missing"))


def test_ssh_config_values_read_as_ssh_reads_them(config, tmp_path: Path) -> None:
    cfg = config("""\
Host plain
    UserKnownHostsFile none
    ConnectTimeout 1m30s
Host tokens
    HostName 10.0.0.9
    Port 2022
    UserKnownHostsFile ~/.ssh/kh_%h_%p %d/kh_%r
Match host exec.example.org
    User matched
""")
    (plain,) = route("plain", cfg)
    assert plain.known_hosts == (Path(os.devnull),)  # `none`: no user file, not a file named ./none
    assert plain.connect_timeout == 90
    (tokens,) = route("repl@tokens", cfg)
    assert tokens.known_hosts == (tmp_path / ".ssh/kh_10.0.0.9_2022", tmp_path / "kh_repl")
    assert route("exec.example.org", cfg)[0].user == "matched"  # a host named exec... is no `Match exec`
    with pytest.raises(UsageError, match="bad port"):
        route("a:\u00b2")


def test_proxycommand_none_first_means_direct(config) -> None:
    """The usual way to exempt one host from a `Host *` jump: `ProxyCommand none` (or `ProxyJump none`)
    in its own block, which comes first; ssh then connects directly."""
    cfg = config("Host backup1\n    ProxyCommand none\nHost bastion backup2\n    ProxyJump none\n"
                 "Host *\n    ProxyJump bastion\n")
    assert [h.host for h in route("backup1", cfg)] == ["backup1"]
    assert [h.host for h in route("backup2", cfg)] == ["backup2"]
    assert [h.host for h in route("other", cfg)] == ["bastion", "other"]
