"""Host-key checking against known_hosts files as OpenSSH writes them, with a real ssh handshake: an
in-process paramiko server offering the host keys each test gives it."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from vmrepl import transport
from vmrepl.errors import HostKeyError


def keygen(path: Path, kind: str) -> paramiko.PKey:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    return paramiko.PKey.from_path(path)


class _Server(paramiko.ServerInterface):
    """Any key logs in; `exec` answers with exit status 0."""

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        channel.send_exit_status(0)
        return True


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, paramiko.PKey]:
    return {kind: keygen(tmp_path / f"host_{kind}", kind) for kind in ("rsa", "ed25519", "ecdsa")}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """`serve(*host_keys)` starts a server offering those keys; returns its known_hosts name."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    transports: list[paramiko.Transport] = []
    offered: list[paramiko.PKey] = []

    def accept() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            t = paramiko.Transport(sock)
            for key in offered:
                t.add_server_key(key)
            transports.append(t)
            try:
                t.start_server(server=_Server())
            except (paramiko.SSHException, EOFError, OSError):
                pass  # the client refused the host key and hung up

    def start(*host_keys: paramiko.PKey) -> str:
        offered.extend(host_keys)
        threading.Thread(target=accept, daemon=True).start()
        return f"[127.0.0.1]:{listener.getsockname()[1]}"

    yield start
    listener.close()
    for t in transports:
        t.close()


@pytest.fixture
def identity(tmp_path: Path) -> Path:
    keygen(tmp_path / "id", "ed25519")
    return tmp_path / "id"


def line(name: str, key: paramiko.PKey) -> str:
    return f"{name} {key.get_name()} {key.get_base64()}\n"


def connect(name: str, identity: Path, known: Path, **kwargs) -> tuple[str, paramiko.PKey]:
    """Log in and out; the host key algorithm negotiated and the host key the server showed."""
    port = name.rsplit(":", 1)[1]
    conn = transport.connect(f"root@127.0.0.1:{port}", identity=identity, known_hosts=known, remote_command="true",
                             **kwargs)
    try:
        return conn.transport.host_key_type, conn.transport.get_remote_server_key()
    finally:
        conn.close()


def unchanged(path: Path) -> tuple[int, int, str]:
    """What shows a rewrite of a file, even with the same text: its inode, mtime and text."""
    return path.stat().st_ino, path.stat().st_mtime_ns, path.read_text()


def test_a_known_rsa_key_is_asked_for_though_the_host_prefers_ed25519(serve, keys, identity, home, tmp_path) -> None:
    name = serve(keys["ed25519"], keys["rsa"])
    known = tmp_path / "known_hosts"
    known.write_text(line(name, keys["rsa"]))
    before = unchanged(known)
    kind, key = connect(name, identity, known)
    assert kind in ("rsa-sha2-512", "rsa-sha2-256") and key.asbytes() == keys["rsa"].asbytes()  # not ed25519
    assert unchanged(known) == before  # the ed25519 key is not recorded beside it


def test_any_matching_line_of_the_key_type_counts(serve, keys, identity, home, tmp_path) -> None:
    old = keygen(tmp_path / "old", "ed25519")
    name = serve(keys["ed25519"])
    known = tmp_path / "known_hosts"
    known.write_text(line(name, old) + line(name, keys["ed25519"]))
    before = unchanged(known)
    kind, key = connect(name, identity, known)
    assert kind == "ssh-ed25519" and key.asbytes() == keys["ed25519"].asbytes()
    assert unchanged(known) == before  # the first line is not taken for a change, nor replaced


def test_a_changed_key_of_a_known_type_is_refused(serve, keys, identity, home, tmp_path) -> None:
    old = keygen(tmp_path / "old", "ed25519")
    name = serve(keys["ed25519"], keys["rsa"])
    known = tmp_path / "known_hosts"
    known.write_text(line(name, old))
    with pytest.raises(HostKeyError, match=rf"has CHANGED \(now ssh-ed25519 SHA256:.*known at {known}:1\)"):
        connect(name, identity, known, accept_new_host_key=True)


def test_a_key_of_an_unknown_type_is_not_a_change_and_not_accepted(serve, keys, identity, home, tmp_path) -> None:
    name = serve(keys["ed25519"])
    known = tmp_path / "known_hosts"
    known.write_text(line(name, keys["ecdsa"]))
    for accept in (False, True):
        with pytest.raises(HostKeyError, match=r"is unknown \(.*no longer offers the key types known for it "
                                               r"\(ecdsa-sha2-nistp256\)"):
            connect(name, identity, known, accept_new_host_key=accept)
    assert known.read_text() == line(name, keys["ecdsa"])


def test_lines_paramiko_cannot_read_are_skipped_with_a_warning(serve, keys, identity, home, tmp_path,
                                                               caplog) -> None:
    name = serve(keys["ed25519"])
    known = tmp_path / "known_hosts"
    known.write_text(f"@cert-authority *.example.org {keys['rsa'].get_name()} {keys['rsa'].get_base64()}\n"
                     f"{name} ssh-ed25519 AAAA!!notbase64\n"
                     f"{name} ssh-ed25519\n"
                     + line(name, keys["ed25519"]))
    with caplog.at_level(logging.DEBUG, logger="vmrepl.transport"):
        connect(name, identity, known)
    messages = [r.getMessage() for r in caplog.records if r.name == "vmrepl.transport"]
    assert any(m.startswith(f"{known}:1: @cert-authority line skipped") for m in messages), messages
    assert any(m.startswith(f"{known}:2: skipped a known_hosts line whose key cannot be read") for m in messages)
    assert any(m.startswith(f"{known}:3: skipped a known_hosts line without") for m in messages)


def test_a_revoked_key_is_refused(serve, keys, identity, home, tmp_path) -> None:
    name = serve(keys["ed25519"])
    known = tmp_path / "known_hosts"
    known.write_text(line(name, keys["ed25519"]) + "@revoked * " + line("", keys["ed25519"]).lstrip())
    with pytest.raises(HostKeyError, match=rf"host key of .* is revoked \({known}:2\); refusing to connect"):
        connect(name, identity, known)


def test_hashed_names_and_wildcards_match(serve, keys, identity, home, tmp_path) -> None:
    name = serve(keys["ed25519"])
    known = tmp_path / "known_hosts"
    known.write_text(line(paramiko.HostKeys.hash_host(name), keys["ed25519"]))
    connect(name, identity, known)
    known.write_text(line("[127.0.0.*]:*,![127.0.0.1]:1", keys["ed25519"]))
    connect(name, identity, known)
    known.write_text(line(f"[127.0.0.*]:*,!{name}", keys["ed25519"]))
    with pytest.raises(HostKeyError, match="is unknown"):
        connect(name, identity, known)


def test_a_new_key_is_appended_in_place(serve, keys, identity, home, tmp_path) -> None:
    name = serve(keys["ed25519"])
    real = tmp_path / "dotfiles" / "known_hosts"
    real.parent.mkdir()
    real.write_text("other.example.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl")
    real.chmod(0o640)
    known = tmp_path / "known_hosts"
    known.symlink_to(real)
    connect(name, identity, known, accept_new_host_key=True)
    assert known.is_symlink() and oct(real.stat().st_mode & 0o777) == "0o640"
    assert real.read_text().splitlines()[1:] == [line(name, keys["ed25519"]).strip()]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".known_hosts")]
    connect(name, identity, known)
