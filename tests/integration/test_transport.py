"""The SSH transport against a real sshd: the second host of testbed/host.py (netns, 10.213.0.2)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.host import SecondHost
from vmrepl import transport, wire
from vmrepl.errors import AuthError, HostKeyError, TransportError, UsageError

VM = "6a1c1a55-2f7e-4c1b-9d7e-0f1e2d3c4b5a"


@pytest.fixture(scope="module")
def host() -> Iterator[SecondHost]:
    with SecondHost().session() as h:
        yield h


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No ~/.ssh/known_hosts, default key or agent of the machine leaks into a test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


def open_to(host: SecondHost, command: str, **kwargs) -> transport.Connection:
    options = {"identity": host.identity, "known_hosts": host.known_hosts, **kwargs}
    return transport.connect(host.destination, remote_command=command, **options)


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


# --- against sshd -------------------------------------------------------------------------------

def test_cat_round_trips_64_mib(host: SecondHost) -> None:
    block = os.urandom(1 << 20)
    received = bytearray()
    with open_to(host, "cat") as conn:
        assert conn.cipher == "aes128-gcm@openssh.com"
        reader = threading.Thread(target=lambda: received.extend(conn.reader.read()))
        reader.start()
        start = time.monotonic()
        for _ in range(64):
            conn.writer.write(block)
        conn.writer.close()
        reader.join(60)
        seconds = time.monotonic() - start
        assert conn.exit_status(5) == 0
    assert len(received) == 64 << 20 and received == block * 64
    print(f"\n64 MiB through `cat` and back: {64 / seconds:.0f} MiB/s ({seconds:.2f} s)")


def test_wire_stream_through_the_channel(host: SecondHost) -> None:
    header = wire.SnapshotHeader(id="s1", name="n1", parent=None, base=None, created_ns=1, generation=1,
                                 definition="<domain/>", disks=(wire.DiskInfo("vda", 1 << 30, 65536),))
    data = os.urandom(3 << 20)
    with open_to(host, "cat") as conn:
        w = wire.FrameWriter(conn.writer)
        w.write(wire.Hello(vm_uuid=VM, vm_name="web"))
        w.write(header)
        w.data(0, data)
        w.zero(4 << 20, 1 << 20)
        w.end_disk()
        w.trailer()
        r = wire.FrameReader(conn.reader)
        assert r.expect(wire.Hello).vm_uuid == VM
        assert r.expect(wire.SnapshotHeader) == header
        assert bytes(r.expect(wire.Data).data) == data
        assert r.expect(wire.Zero).length == 1 << 20
        r.expect(wire.DiskEnd)
        r.expect(wire.Trailer)


def test_unknown_host_key_is_refused_then_accepted_and_written(host: SecondHost, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    with pytest.raises(HostKeyError, match=r"host key of 10\.213\.0\.2 is unknown .*--accept-new-host-key"):
        open_to(host, "true", known_hosts=known)
    assert not known.exists()
    open_to(host, "true", known_hosts=known, accept_new_host_key=True).close()
    kind, blob = host.host_key.with_suffix(".pub").read_text().split()[:2]
    assert known.read_text() == f"10.213.0.2 {kind} {blob}\n"
    open_to(host, "true", known_hosts=known).close()   # now known, no flag needed


def test_changed_host_key_is_always_refused(host: SecondHost, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_host_key")
    kind, blob = other.with_suffix(".pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"10.213.0.2 {kind} {blob}\n")
    for accept in (False, True):
        with pytest.raises(HostKeyError, match="host key of 10.213.0.2 has CHANGED"):
            open_to(host, "true", known_hosts=known, accept_new_host_key=accept)
    assert known.read_text() == f"10.213.0.2 {kind} {blob}\n"


def test_wrong_identity_is_an_auth_error(host: SecondHost, tmp_path: Path) -> None:
    stranger = keygen(tmp_path / "stranger")
    with pytest.raises(AuthError, match="10.213.0.2 refused the key for root"):
        open_to(host, "true", identity=stranger)


def test_default_key_is_used_without_identity(host: SecondHost, isolated_home: Path) -> None:
    ssh = isolated_home / ".ssh"
    ssh.mkdir()
    (ssh / "id_ed25519").write_bytes(host.identity.read_bytes())
    with transport.connect(host.destination, known_hosts=host.known_hosts, remote_command="echo hi") as conn:
        assert conn.reader.read() == b"hi\n"
    with pytest.raises(AuthError, match="no key to log in"):
        (ssh / "id_ed25519").unlink()
        transport.connect(host.destination, known_hosts=host.known_hosts, remote_command="true")


def test_nothing_listening_is_a_transport_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransportError, match=f"cannot connect to 127.0.0.1 port {port}: Connection refused") as info:
        transport.connect(f"root@127.0.0.1:{port}", identity=None, known_hosts=None)
    assert info.value.retryable


def test_bwlimit_holds_the_rate(host: SecondHost) -> None:
    rate = 2 << 20
    size = 6 << 20
    with open_to(host, "cat > /dev/null", bwlimit=rate) as conn:
        start = time.monotonic()
        for _ in range(size >> 20):
            conn.writer.write(bytes(1 << 20))
        conn.writer.close()
        assert conn.exit_status(30) == 0
        measured = size / (time.monotonic() - start)
    assert 0.8 * rate <= measured <= 1.2 * rate, f"{measured / (1 << 20):.2f} MiB/s for a 2 MiB/s limit"


def test_remote_command_not_found_names_it(host: SecondHost) -> None:
    with open_to(host, "vmrepl-no-such-command receive") as conn:
        with pytest.raises(TransportError) as info:
            wire.FrameReader(conn.reader).read()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("remote command failed on 10.213.0.2: ")
    assert "vmrepl-no-such-command: command not found" in message
    assert not info.value.retryable


def test_remote_stderr_does_not_stall_the_channel(host: SecondHost) -> None:
    # 4 MiB on stderr, more than the channel window, before any stdout.
    with open_to(host, "head -c 4194304 /dev/zero >&2; echo done") as conn:
        assert conn.reader.read() == b"done\n"
        assert len(conn.stderr()) == transport.STDERR_KEEP


def test_forced_command_replaces_the_requested_one(host: SecondHost) -> None:
    pinned = host.new_identity("pinned-cat", command="cat")
    with open_to(host, "vmrepl receive --state-dir /nonexistent", identity=pinned) as conn:
        conn.writer.write(b"pinned\n")
        conn.writer.close()
        assert conn.reader.read() == b"pinned\n"


def test_dropped_connection_is_retryable(host: SecondHost) -> None:
    conn = open_to(host, "cat")
    conn.writer.write(b"x")
    conn.transport.sock.shutdown(socket.SHUT_RDWR)
    with pytest.raises(TransportError) as info:
        for _ in range(64):
            conn.writer.write(bytes(1 << 20))
        wire.FrameReader(conn.reader).read()
    assert str(info.value).startswith("connection to 10.213.0.2 dropped: ")
    assert info.value.retryable
    conn.close()



def test_a_broken_agent_is_passed_over(host: SecondHost, isolated_home: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An SSH_AUTH_SOCK whose agent hangs up: the default key files still log in."""
    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def hang_up() -> None:
        with contextlib.suppress(OSError):
            while True:
                server.accept()[0].close()

    threading.Thread(target=hang_up, daemon=True).start()
    monkeypatch.setenv("SSH_AUTH_SOCK", str(path))
    (isolated_home / ".ssh").mkdir()
    (isolated_home / ".ssh" / "id_ed25519").write_bytes(host.identity.read_bytes())
    try:
        with transport.connect(host.destination, known_hosts=host.known_hosts, remote_command="echo hi") as conn:
            assert conn.reader.read() == b"hi\n"
    finally:
        server.close()


def test_an_encrypted_identity_names_what_to_do(host: SecondHost, tmp_path: Path) -> None:
    key = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(key)], check=True)
    with pytest.raises(AuthError, match=r"is encrypted; load it into ssh-agent \(ssh-add\) and leave out --identity"):
        open_to(host, "true", identity=key)


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e400", "0", "-5M", "12Q"])
def test_bad_rates_are_usage_errors(text: str) -> None:
    from vmrepl.cli.common import parse_rate
    with pytest.raises(UsageError, match=f"invalid rate {text!r}"):
        parse_rate(text)



# --- through an ssh client config (destination.py) ----------------------------------------------

def run_remote(alias: str, command: str, config_text: str, tmp_path: Path) -> str:
    """`command`'s output on the host that `alias` names in an ssh config holding `config_text`."""
    config = tmp_path / "ssh_config"
    config.write_text(config_text)
    with transport.connect(alias, remote_command=command, ssh_config=str(config)) as conn:
        out = conn.reader.read().decode()
        assert conn.exit_status(5) == 0
    return out


def test_an_alias_logs_in_with_its_configured_key_and_known_hosts(host: SecondHost, tmp_path: Path) -> None:
    key = host.new_identity("alias-only", command='echo "alias-key:$SSH_ORIGINAL_COMMAND"')
    assert run_remote("backup", "hostname", host.ssh_config("backup", identity=key), tmp_path) == "alias-key:hostname\n"


def test_known_hosts_and_accept_new_from_the_config(host: SecondHost, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts.cfg"
    with pytest.raises(HostKeyError, match=r"host key of 10\.213\.0\.2 is unknown"):
        run_remote("backup", "true", host.ssh_config("backup", known_hosts=known), tmp_path)
    assert not known.exists()
    config = host.ssh_config("backup", known_hosts=known, StrictHostKeyChecking="accept-new")
    assert run_remote("backup", "echo in", config, tmp_path) == "in\n"
    assert known.read_text().split()[:2] == [host.address, "ssh-ed25519"]  # recorded in UserKnownHostsFile
    assert run_remote("backup", "echo again", host.ssh_config("backup", known_hosts=known), tmp_path) == "again\n"
    # the "never check" idiom: every key is new, and is recorded nowhere
    config = host.ssh_config("backup", known_hosts=Path("/dev/null"), StrictHostKeyChecking="no")
    assert run_remote("backup", "echo unchecked", config, tmp_path) == "unchecked\n"


def test_a_jump_host_tunnels_the_session(host: SecondHost, tmp_path: Path) -> None:
    """ProxyJump through the second host to itself: its sshd then sees the session come from its own
    address instead of the source's."""
    direct = host.ssh_config("direct")
    jumped = host.ssh_config("backup", ProxyJump="bastion") + host.ssh_config("bastion")
    assert run_remote("direct", "echo $SSH_CONNECTION", direct, tmp_path).split()[0] == host.source_address
    assert run_remote("backup", "echo $SSH_CONNECTION", jumped, tmp_path).split()[0] == host.address

    unreachable = host.ssh_config("backup", ProxyJump="bastion", Port="1") + host.ssh_config("bastion")
    with pytest.raises(TransportError, match=r"^jump host 10\.213\.0\.2 cannot reach 10\.213\.0\.2 port 1: ") as info:
        run_remote("backup", "true", unreachable, tmp_path)
    assert "\n" not in str(info.value)
