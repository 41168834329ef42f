"""SSH transport: an exec channel to `vmrepl receive` on the destination, via paramiko.

`connect()` returns a Connection whose `reader` and `writer` are binary file objects for
wire.FrameReader / wire.FrameWriter. It logs in to each hop that destination.py finds in the ssh
client config (jump hosts first, each tunnelled through the one before). Host keys are checked
strictly (~/.ssh/known_hosts or UserKnownHostsFile, plus `--known-hosts`); an unknown key is refused
unless the caller or the config accepts new keys, a changed key always is. The remote stderr is
drained by a thread (so a chatty remote cannot stall the channel) and named in the error when the
remote command fails. docs/SSH.md shows the authorized_keys line that pins the receiver.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import logging
import os
import re
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

# paramiko imports invoke (and with it yaml) only to run `Match exec` lines of ssh_config files, which
# vmrepl does not run (destination.py says so); without it paramiko imports in 55 ms instead of 90.
sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]
import paramiko  # noqa: E402

from .destination import Hop, route
from .errors import AuthError, HostKeyError, TransportError, UsageError
from .state import fsync_dir

DEFAULT_REMOTE_COMMAND = "vmrepl receive"
# aes128-gcm is paramiko's fastest cipher (shared/PLATFORM.md); ctr modes are the fallbacks.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")
CONNECT_TIMEOUT = 15.0
# How long to wait, at end of stream, for the remote exit status before reporting a plain drop.
EXIT_WAIT = 5.0
STDERR_KEEP = 64 << 10

# paramiko logs failed handshakes and socket errors ("ERROR: Socket exception: ..."); vmrepl reports
# each failure as its one-line error, so those records must not reach the root logger the CLI sets up.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False
log = logging.getLogger(__name__)


def user_known_hosts() -> Path:
    return Path("~/.ssh/known_hosts").expanduser()


# --- channel as file objects --------------------------------------------------------------------

class _TokenBucket:
    """At most `rate` bytes/s on average, in bursts of at most `burst` bytes."""

    def __init__(self, rate: int) -> None:
        if rate <= 0:
            raise UsageError(f"invalid bandwidth limit {rate}", hint="give a positive rate in bytes per second")
        self.rate = rate
        self.burst = max(16 << 10, min(rate // 8, 1 << 20))
        self.tokens = float(self.burst)
        self.last = time.monotonic()

    def take(self, n: int) -> None:
        """Wait until `n` (<= burst) bytes may go."""
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= n:
                self.tokens -= n
                return
            time.sleep((n - self.tokens) / self.rate)


class _ChannelWriter(io.RawIOBase):
    """The channel's stdin side; every write is sent in full (rate-limited if asked)."""

    def __init__(self, conn: Connection, bucket: _TokenBucket | None) -> None:
        self._conn = conn
        self._bucket = bucket

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        try:
            if self._bucket is None:
                self._conn.channel.sendall(view)
            else:
                for start in range(0, len(view), self._bucket.burst):
                    chunk = view[start:start + self._bucket.burst]
                    self._bucket.take(len(chunk))
                    self._conn.channel.sendall(chunk)
        except (OSError, EOFError, paramiko.SSHException) as err:
            raise self._conn.failure(f"sending failed: {err or type(err).__name__}") from None
        return len(view)

    def close(self) -> None:
        """Signal end of input to the remote command."""
        if not self.closed:
            try:
                self._conn.channel.shutdown_write()
            except OSError:
                pass
        super().close()


class _ChannelReader(io.RawIOBase):
    """The channel's stdout side. At end of stream it waits briefly for the exit status and raises
    TransportError naming the remote stderr if the command failed."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:
        try:
            data = self._conn.channel.recv(len(buf))
        except (OSError, EOFError, paramiko.SSHException) as err:
            raise self._conn.failure(f"receiving failed: {err or type(err).__name__}") from None
        if not data:
            status = self._conn.exit_status(EXIT_WAIT)
            if status != 0:
                raise self._conn.failure("the remote end closed the stream")
            return 0
        n = len(data)
        buf[:n] = data
        return n


# --- connection ---------------------------------------------------------------------------------

class Connection:
    """One ssh session running the remote command. `reader`/`writer` are the command's stdout and
    stdin as binary files; `stderr()` what it wrote to stderr so far (the last 64 KiB)."""

    def __init__(self, destination: Hop, transports: list[paramiko.Transport], channel: paramiko.Channel,
                 command: str, bwlimit: int | None) -> None:
        self.destination = destination
        self.transport = transports[-1]
        self._jumps = transports[:-1]  # the jump hosts' logins the session is tunnelled through
        self.channel = channel
        self.command = command
        self.cipher = self.transport.remote_cipher
        self._stderr = bytearray()
        self._stderr_done = threading.Event()
        threading.Thread(target=self._drain_stderr, name="ssh-stderr", daemon=True).start()
        self.writer = _ChannelWriter(self, _TokenBucket(bwlimit) if bwlimit else None)
        self.reader = io.BufferedReader(_ChannelReader(self), buffer_size=1 << 20)

    def _drain_stderr(self) -> None:
        try:
            while chunk := self.channel.recv_stderr(32 << 10):
                self._stderr += chunk
                del self._stderr[:-STDERR_KEEP]
        except (OSError, EOFError):  # EOFError: the window adjust a read sends found the transport closed
            pass
        finally:
            self._stderr_done.set()

    def stderr(self) -> str:
        return self._stderr.decode("utf-8", "replace")

    def exit_status(self, timeout: float) -> int | None:
        """The remote command's exit status, or None if it has not exited within `timeout`."""
        if not self.transport.is_active():
            timeout = 0  # a dropped connection brings no status any more
        if self.channel.status_event.wait(timeout):
            status = self.channel.recv_exit_status()
            return None if status == -1 else status  # -1: closed without a status, i.e. dropped
        return None

    def failure(self, what: str) -> TransportError:
        """The error to raise when the stream breaks: the remote command's failure if it failed
        (with the last line of its stderr), else a dropped connection (retryable)."""
        status = self.exit_status(EXIT_WAIT if self.channel.closed or self.channel.eof_received else 0.5)
        self._stderr_done.wait(1.0)
        lines = [line.strip() for line in self.stderr().splitlines() if line.strip()]
        if status is not None and status != 0:
            detail = lines[-1] if lines else f"exit status {status}"
            err = TransportError(f"remote command failed on {self.destination.host}: {detail}",
                                 hint=f"check that {self.command!r} runs there (see --remote-command)")
            err.retryable = False
            return err
        return TransportError(f"connection to {self.destination.host} dropped: {what}",
                              hint="check the network and the destination, then retry")

    def close(self) -> None:
        for stream in (self.writer, self.reader):
            stream.close()
        self.channel.close()
        for transport in (self.transport, *reversed(self._jumps)):
            transport.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ConnectOptions:
    destination: str
    identity: Path | None = None
    known_hosts: Path | None = None
    accept_new_host_key: bool = False
    remote_command: str = DEFAULT_REMOTE_COMMAND
    bwlimit: int | None = None
    ssh_config: str | None = None


class Opening:
    """`connect` with `options`, in a thread started at once; `result()` waits for the Connection (or
    raises what connecting raised). The caller does other work meanwhile: the connect is mostly
    waiting for the network and for the destination."""

    def __init__(self, options: ConnectOptions) -> None:
        self._future: Future[Connection] = Future()
        threading.Thread(target=self._run, args=(options,), name="ssh-connect", daemon=True).start()

    def _run(self, o: ConnectOptions) -> None:
        try:
            self._future.set_result(connect(o.destination, identity=o.identity, known_hosts=o.known_hosts,
                                            accept_new_host_key=o.accept_new_host_key,
                                            remote_command=o.remote_command, bwlimit=o.bwlimit,
                                            ssh_config=o.ssh_config))
        except BaseException as err:  # noqa: BLE001 - raised again by result(), in the caller's thread
            self._future.set_exception(err)

    def result(self) -> Connection:
        return self._future.result()


def connect(destination: str, *, identity: Path | None = None, known_hosts: Path | None = None,
            accept_new_host_key: bool = False, remote_command: str = DEFAULT_REMOTE_COMMAND,
            bwlimit: int | None = None, ssh_config: str | None = None,
            timeout: float = CONNECT_TIMEOUT) -> Connection:
    """Open an authenticated ssh session to `destination` (looked up in `ssh_config`, through its jump
    hosts) and run the remote command in it. `identity` is the destination's key; `known_hosts` and
    `accept_new_host_key` hold for every hop. `bwlimit` caps what is sent, in bytes per second. An
    authorized_keys `command=` on the destination replaces `remote_command`; the forced command then
    names its own state dir."""
    hops = route(destination, ssh_config)
    transports: list[paramiko.Transport] = []
    try:
        for i, hop in enumerate(hops):
            hop_timeout = hop.connect_timeout or timeout
            sock = _tunnel(transports[-1], hops[i - 1], hop, hop_timeout) if i else _open_socket(hop, hop_timeout)
            transports.append(paramiko.Transport(sock))
            _login(transports[-1], hop, identity if hop is hops[-1] else None, known_hosts,
                   accept_new_host_key or hop.accept_new_host_key, hop_timeout)
        dest = hops[-1]
        try:
            channel = transports[-1].open_session(timeout=timeout)
            channel.exec_command(remote_command)
        except (paramiko.SSHException, OSError) as err:
            raise TransportError(f"{dest.host} refused to run {remote_command!r}: {err}",
                                 hint="check sshd's configuration there") from None
        return Connection(dest, transports, channel, remote_command, bwlimit)
    except BaseException:
        for transport in reversed(transports):
            transport.close()
        raise


def _login(transport: paramiko.Transport, hop: Hop, identity: Path | None, known_hosts: Path | None,
           accept_new: bool, timeout: float) -> None:
    """Handshake, host key check and authentication of one hop."""
    own_files = hop.known_hosts or (user_known_hosts(),)
    known = _load_known_hosts([*own_files, known_hosts])
    _negotiate(transport, hop, [k.key for k in known.lookup(hop.known_hosts_name)], timeout)
    _check_host_key(transport.get_remote_server_key(), hop, known, known_hosts or own_files[0], accept_new)
    _authenticate(transport, hop, identity)


def _open_socket(dest: Hop, timeout: float) -> socket.socket:
    where = f"{dest.host} port {dest.port}"
    try:
        sock = socket.create_connection((dest.host, dest.port), timeout=timeout)
    except socket.gaierror as err:
        raise TransportError(f"cannot resolve {dest.host}: {err.strerror}",
                             hint="check the host name (and ~/.ssh/config) and DNS") from None
    except TimeoutError:
        raise TransportError(f"cannot connect to {where}: timed out after {timeout:g} s",
                             hint="check the address, the network and that sshd listens there") from None
    except OSError as err:
        raise TransportError(f"cannot connect to {where}: {err.strerror or err}",
                             hint="check the address and that sshd listens there") from None
    # A peer that vanishes without a FIN is noticed in about 90 s, even while the receiver works.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return sock


def _tunnel(jump: paramiko.Transport, jump_hop: Hop, dest: Hop, timeout: float) -> paramiko.Channel:
    """A direct-tcpip channel from the jump host `jump` to `dest` (ssh's ProxyJump, `ssh -W`)."""
    via = jump_hop.host  # not jump.getpeername(): behind a first jump that is the first jump's address
    try:
        return jump.open_channel("direct-tcpip", (dest.host, dest.port), ("127.0.0.1", 0), timeout=timeout)
    except paramiko.ChannelException as err:
        raise TransportError(f"jump host {via} cannot reach {dest.host} port {dest.port}: {err.text}",
                             hint="check the address, and that sshd there allows forwarding (AllowTcpForwarding)"
                             ) from None
    except (paramiko.SSHException, OSError, EOFError) as err:
        raise TransportError(f"connection to jump host {via} dropped: {err or type(err).__name__}",
                             hint="check the network and the jump host, then retry") from None


@dataclass(frozen=True)
class _KnownKey:
    """One key line of a known_hosts file: its host patterns, its key and where it stands (FILE:LINE)."""
    patterns: tuple[str, ...]
    key: paramiko.PKey
    where: str

    def matches(self, name: str) -> bool:
        """OpenSSH's rules: any pattern (hashed `|1|`, `*`/`?` wildcards) matches, and no `!pattern` does."""
        hit = False
        for pattern in self.patterns:
            negated = pattern.startswith("!")
            pattern = pattern.removeprefix("!")
            if pattern.startswith("|1|"):
                try:
                    found = hmac.compare_digest(paramiko.HostKeys.hash_host(name, pattern), pattern)
                except (ValueError, IndexError, AssertionError):  # a broken salt matches nothing
                    found = False
            else:
                wildcard = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
                found = re.fullmatch(wildcard, name, re.IGNORECASE) is not None
            if found and negated:
                return False
            hit = hit or found
        return hit


@dataclass(frozen=True)
class _KnownHosts:
    keys: tuple[_KnownKey, ...]
    revoked: tuple[_KnownKey, ...]  # @revoked lines: refused for every host

    def lookup(self, name: str) -> list[_KnownKey]:
        return [k for k in self.keys if k.matches(name)]


def _load_known_hosts(files: list[Path | None]) -> _KnownHosts:
    """The keys of the known_hosts `files` that exist. A line paramiko cannot read is skipped with a
    warning naming it (OpenSSH skips it too): one bad line must not stop every replication."""
    keys: list[_KnownKey] = []
    revoked: list[_KnownKey] = []
    for path in files:
        if path is None or not path.exists():
            continue
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError as err:
            raise HostKeyError(f"cannot read known hosts file {path}: {err.strerror or err}",
                               hint="check its permissions") from None
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            where = f"{path}:{number}"
            marker = fields.pop(0) if fields[0].startswith("@") else None
            if marker not in (None, "@revoked"):
                log.debug("%s: %s line skipped: vmrepl does not use host certificates", where, marker)
                continue
            key = _parse_key(fields, where)
            if key is not None:
                (revoked if marker else keys).append(_KnownKey(tuple(fields[0].split(",")), key, where))
    return _KnownHosts(tuple(keys), tuple(revoked))


def _parse_key(fields: list[str], where: str) -> paramiko.PKey | None:
    if len(fields) < 3:
        log.warning("%s: skipped a known_hosts line without host, key type and key", where)
        return None
    try:
        return paramiko.PKey.from_type_string(fields[1], base64.b64decode(fields[2], validate=True))
    except paramiko.UnknownKeyType:
        log.debug("%s: skipped a %s key, a type paramiko does not support", where, fields[1][:40])
    except (ValueError, TypeError, paramiko.SSHException) as err:
        log.warning("%s: skipped a known_hosts line whose key cannot be read (%s)", where, str(err)[:80])
    return None


def _key_types(keys: list[paramiko.PKey]) -> set[str]:
    """The host key algorithms that present `keys`: an ssh-rsa key is offered as rsa-sha2-512/256."""
    names = {k.get_name() for k in keys}
    return names | ({"rsa-sha2-512", "rsa-sha2-256"} if "ssh-rsa" in names else set())


def _negotiate(transport: paramiko.Transport, dest: Hop, known: list[paramiko.PKey],
               timeout: float) -> None:
    options = transport.get_security_options()
    options.ciphers = tuple(c for c in CIPHERS if c in options.ciphers)
    options.compression = ("none",)  # the stream is compressed by vmrepl already
    # Ask for a key type we know for this host first, so a second key type is not taken for a change.
    wanted = _key_types(known)
    preferred = [k for k in options.key_types if k in wanted]
    if preferred:
        options.key_types = tuple(preferred + [k for k in options.key_types if k not in preferred])
    try:
        transport.start_client(timeout=timeout)
    except (paramiko.SSHException, EOFError, OSError) as err:
        raise TransportError(f"ssh handshake with {dest.host} port {dest.port} failed: {err or type(err).__name__}",
                             hint="check that an ssh server listens there") from None


def _fingerprint(key: paramiko.PKey) -> str:
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


def _check_host_key(key: paramiko.PKey, dest: Hop, known_hosts: _KnownHosts, record_in: Path,
                    accept_new: bool) -> None:
    name = dest.known_hosts_name
    revoked = next((k for k in known_hosts.revoked if k.key == key), None)
    if revoked is not None:
        raise HostKeyError(f"host key of {name} ({_fingerprint(key)}) is revoked ({revoked.where}); refusing "
                           "to connect", hint="give the host a new key and add it to known_hosts")
    known = known_hosts.lookup(name)
    if any(k.key == key for k in known):
        return
    same_type = [k for k in known if k.key.get_name() == key.get_name()]
    if same_type:
        raise HostKeyError(f"host key of {name} has CHANGED (now {_fingerprint(key)}, known at "
                           f"{same_type[0].where}); refusing to connect",
                           hint="if the host was reinstalled, remove its old line from known_hosts and retry")
    if known:
        types = ", ".join(sorted({k.key.get_name() for k in known}))
        raise HostKeyError(f"host key of {name} is unknown ({_fingerprint(key)}), and the host no longer offers "
                           f"the key types known for it ({types}); refusing to connect",
                           hint="if its keys were replaced, check the new fingerprint, then add it to known_hosts")
    if not accept_new:
        raise HostKeyError(f"host key of {name} is unknown ({_fingerprint(key)})",
                           hint="add it to known_hosts or pass --accept-new-host-key")
    _append_known_host(record_in, f"{name} {key.get_name()} {key.get_base64()}\n")


def _append_known_host(path: Path, line: str) -> None:
    """Append `line` in place (O_APPEND), keeping the file's mode, owner and symlinks, and fsync it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    created = not path.exists()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            st = os.fstat(fd)
            data = line.encode()
            if st.st_size and os.pread(fd, 1, st.st_size - 1) != b"\n":
                data = b"\n" + data  # a last line without its newline must not run into ours
            while data:
                data = data[os.write(fd, data):]
            if stat.S_ISREG(st.st_mode):  # UserKnownHostsFile /dev/null: nothing to keep, nor to fsync
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise HostKeyError(f"cannot record the host key in {path}: {err.strerror or err}",
                           hint="check its permissions and free space, or add the key with ssh-keyscan") from None
    if created:
        fsync_dir(path.resolve().parent)


def _authenticate(transport: paramiko.Transport, dest: Hop, identity: Path | None) -> None:
    """`identity` alone if given; else the hop's IdentityFile keys, then (unless IdentitiesOnly) the
    ssh-agent's keys, then the default key files if no IdentityFile was given."""
    if identity is not None:
        _try_keys(transport, dest, [(str(identity), _load_key(identity))])
        return
    candidates = _loadable_keys(dest.identities)
    agent: paramiko.Agent | None = None
    try:
        if not dest.identities_only:
            try:
                agent = paramiko.Agent()  # without SSH_AUTH_SOCK it simply has no keys
                candidates += [(f"agent key {_fingerprint(k)}", k) for k in agent.get_keys()]
            except (paramiko.SSHException, OSError, EOFError) as err:
                log.warning("ssh-agent at %s does not answer (%s); trying the key files only",
                            os.environ.get("SSH_AUTH_SOCK"), err or type(err).__name__)
        if not dest.identities:
            home = Path("~/.ssh").expanduser()
            candidates += _loadable_keys(p for p in (home / name for name in DEFAULT_KEYS) if p.exists())
        _try_keys(transport, dest, candidates)
    finally:
        if agent is not None:
            agent.close()


def _try_keys(transport: paramiko.Transport, dest: Hop, candidates: list[tuple[str, paramiko.PKey]]) -> None:
    if not candidates:
        raise AuthError(f"no key to log in to {dest.host} with",
                        hint="pass --identity KEY, name one with IdentityFile in ~/.ssh/config, or load one "
                             "into ssh-agent")
    for _, key in candidates:
        try:
            transport.auth_publickey(dest.user, key)
        except paramiko.AuthenticationException:
            continue
        except (paramiko.SSHException, OSError) as err:
            raise TransportError(f"connection to {dest.host} dropped during login: {err}",
                                 hint="check the destination's sshd, then retry") from None
        if transport.is_authenticated():
            return
    tried = ", ".join(label for label, _ in candidates)
    raise AuthError(f"{dest.host} refused the key for {dest.user} (tried {tried})",
                    hint=f"authorize the key in {dest.user}'s authorized_keys there, or pass --identity KEY")


def _loadable_keys(paths: Iterable[Path]) -> list[tuple[str, paramiko.PKey]]:
    """The keys of these files that load; a missing or encrypted one is passed over, as ssh does
    (the agent may hold it)."""
    keys = []
    for path in paths:
        try:
            keys.append((str(path), _load_key(path)))
        except AuthError as err:
            log.debug("key file %s passed over: %s", path, err)
    return keys


def _load_key(path: Path) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(path)
    except (paramiko.PasswordRequiredException, TypeError):  # TypeError: cryptography's, for OpenSSH-format keys
        raise AuthError(f"identity {path} is encrypted",
                        hint="load it into ssh-agent (ssh-add) and leave out --identity: with it, vmrepl uses "
                             "only that file") from None
    except (OSError, paramiko.SSHException, ValueError) as err:
        why = re.sub(r"\s*See https?://\S+ for more details\.", "", str(err))  # cryptography's FAQ link
        raise AuthError(f"cannot load identity {path}: {why}", hint="pass an OpenSSH private key file") from None
