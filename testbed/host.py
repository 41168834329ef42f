"""A second "host" on this machine: a network namespace with its own sshd, reached over a veth pair.

    root namespace (the source)  vmrepl-s0 10.213.0.1/30  <-->  vmrepl-d0 10.213.0.2/30  netns vmrepl-dst

Files, all under run/hosts/ (mode 0755 dirs)::

    dst/sshd/          sshd_config, host key, pid file, log, authorized_keys
    dst/state/         the destination's vmrepl state dir (VMREPL_STATE_DIR of every ssh session)
    src/state/         the source's vmrepl state dir
    src/id_ed25519     the replication user's key (root on the destination)
    src/known_hosts    the destination's pinned host key, for strict host-key checking
    src/keys/NAME      further identities, e.g. one whose authorized_keys line forces a command

`start()` is idempotent and rebuilds whatever a killed run left half-there (netns, veth, sshd pid);
`stop()` ends sshd by its PID and removes the namespace. Processes run in the namespace through
`ns_argv()`; a later own libvirtd will need a mount namespace with a private /run as well, which
belongs there. More hosts like it: `SecondHost(index=N)`. CLI: `python -m testbed.host start|stop|env [INDEX]`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from vmrepl.state import write_file_durably

from . import ROOT, RUN_DIR, VMREPL, pid_alive, public_dir, run

DEFAULT_NETNS = "vmrepl-dst"
ADDRESS = "10.213.0.2"
PREFIX_LEN = 30
USER = "root"


class SecondHost:
    """Host `index` 0 is the one above; index N (1..63) is another one, for tests that need more
    destinations or a host of their own: netns vmrepl-dstN, 10.213.0.(4N+1) <-> 10.213.0.(4N+2),
    veth vmrepl-sN/vmrepl-dN, files under run/hostsN/."""

    def __init__(self, index: int = 0) -> None:
        if not 0 <= index < 64:
            raise ValueError(f"host index {index} is outside 0..63")
        suffix = str(index) if index else ""
        self.index = index
        self.netns = DEFAULT_NETNS + suffix
        self.base = RUN_DIR / f"hosts{suffix}"
        self.source_address = f"10.213.0.{4 * index + 1}"
        self.address = f"10.213.0.{4 * index + 2}"
        self.veth_source = f"vmrepl-s{index}"
        self.veth_dest = f"vmrepl-d{index}"
        self.port = 22
        self.user = USER
        sshd = self.base / "dst" / "sshd"
        self.sshd_dir = sshd
        self.sshd_config = sshd / "sshd_config"
        self.host_key = sshd / "ssh_host_ed25519_key"
        self.pid_file = sshd / "sshd.pid"
        self.log_file = sshd / "sshd.log"
        self.authorized_keys = sshd / "authorized_keys"
        self.dst_state = self.base / "dst" / "state"
        self.src_state = self.base / "src" / "state"
        self.identity = self.base / "src" / "id_ed25519"
        self.known_hosts = self.base / "src" / "known_hosts"
        self.keys_dir = self.base / "src" / "keys"
        self._lock_fd: int | None = None

    @property
    def destination(self) -> str:
        """`USER@HOST` as `vmrepl replicate --to` takes it."""
        return f"{self.user}@{self.address}"

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> SecondHost:
        """Bring the host up, reusing a healthy one and rebuilding a broken one; returns self."""
        with self._lock():
            if self.running():
                return self
            self._teardown()
            self._prepare_files()
            self._network()
            self._start_sshd()
        return self

    def stop(self) -> None:
        """End sshd by its PID and remove the namespace (keys and state dirs stay)."""
        with self._lock():
            self._teardown()

    def running(self) -> bool:
        """sshd of this host alive in its namespace and the source side of the veth configured."""
        pid = self.sshd_pid()
        if pid is None or not self._netns_exists():
            return False
        addresses = run(["ip", "-o", "addr", "show", "dev", self.veth_source], check=False).stdout
        return f"{self.source_address}/{PREFIX_LEN}" in addresses and _reachable(self.address, self.port, 1.0)

    # --- its own libvirtd (started on demand: failover tests) ------------------------------------------

    @property
    def libvirt_dir(self) -> Path:
        return self.base / "dst" / "libvirt"

    @property
    def libvirt_uri(self) -> str:
        """The URI of the host's own libvirtd, reached through its socket from the source side."""
        return f"qemu:///system?socket={self.libvirt_dir / 'run' / 'libvirt' / 'libvirt-sock'}"

    def start_libvirtd(self) -> str:
        """Start virtlogd and libvirtd inside the namespace, with private /run, /etc/libvirt and
        /var/{lib,cache,log}/libvirt bound from `libvirt_dir` (a mount namespace of their own), unless
        they run already; returns `libvirt_uri`."""
        with self._lock():
            if self._libvirt_pids()["libvirtd"] is not None:
                return self.libvirt_uri
            self._stop_libvirtd()
            base = self.libvirt_dir
            for d in ("run", "lib", "cache", "log"):
                public_dir(base / d)
            if not (base / "etc" / "qemu.conf").exists():
                shutil.copytree("/etc/libvirt", base / "etc", symlinks=True, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("hooks"))
                with open(base / "etc" / "qemu.conf", "a") as conf:
                    conf.write("\n# vmrepl test bed: no cgroup controllers in a namespace without systemd\n"
                               "cgroup_controllers = [ ]\n")
            binds = [("run", "/run"), ("lib", "/var/lib/libvirt"), ("cache", "/var/cache/libvirt"),
                     ("log", "/var/log/libvirt"), ("etc", "/etc/libvirt")]
            script = "set -e; mount --make-rprivate /; " + "".join(
                f"mount --bind {shlex.quote(str(base / d))} {target}; " for d, target in binds) + \
                "virtlogd -d; libvirtd -d"
            run(self.ns_argv("unshare", "--mount", "sh", "-c", script))
            deadline = time.monotonic() + 30
            while run(["virsh", "-q", "-c", self.libvirt_uri, "uri"], check=False).returncode != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the libvirtd of {self.netns} does not answer on {self.libvirt_uri}")
                time.sleep(0.2)
        return self.libvirt_uri

    def _libvirt_pids(self) -> dict[str, int | None]:
        pids: dict[str, int | None] = {}
        for daemon in ("libvirtd", "virtlogd"):
            try:
                pid = int((self.libvirt_dir / "run" / f"{daemon}.pid").read_text().strip())
                alive = Path(f"/proc/{pid}/comm").read_text().strip() == daemon
            except (OSError, ValueError):
                pid, alive = 0, False
            pids[daemon] = pid if alive else None
        return pids

    def _stop_libvirtd(self) -> None:
        for pid in self._libvirt_pids().values():
            if pid is not None:
                _terminate(pid)

    def sshd_pid(self) -> int | None:
        """PID of this host's sshd, if its pid file names a live sshd started with our config."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        # sshd rewrites its argv into one title string that still holds the config path.
        return pid if str(self.sshd_config).encode() in cmdline else None

    @contextlib.contextmanager
    def session(self) -> Iterator[SecondHost]:
        """Use the host for a block (a test session): started if needed, stopped at the end unless
        another session (another pytest run in this checkout) still holds it."""
        public_dir(self.base)
        users = self.base / "users.lock"
        fd = os.open(users, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            self.start()
            yield self
        finally:
            os.close(fd)
        fd = os.open(users, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return
        try:
            self.stop()
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def link_rate(self, rate: str) -> Iterator[None]:
        """Limit what the source sends to this host to `rate` (tc's syntax, e.g. "1gbit") for a block:
        a token bucket on the source's veth, as a real link of that speed would. The other direction
        (acknowledgements, the receiver's replies) stays free."""
        run(["tc", "qdisc", "replace", "dev", self.veth_source, "root", "tbf", "rate", rate,
             "burst", "256kb", "latency", "50ms"])
        try:
            yield
        finally:
            run(["tc", "qdisc", "del", "dev", self.veth_source, "root"], check=False)

    # --- access ---------------------------------------------------------------------------------

    def ns_argv(self, *argv: str) -> list[str]:
        """A command line that runs `argv` inside the host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def ssh_argv(self, *remote: str, identity: Path | None = None, known_hosts: Path | None = None) -> list[str]:
        """An OpenSSH command line to the host with strict host-key checking and no prompts."""
        return ["ssh", "-i", str(identity or self.identity), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", "-p", str(self.port),
                self.destination, *remote]

    def new_identity(self, name: str, *, command: str | None = None) -> Path:
        """A further key pair `src/keys/NAME` authorized on the host; with `command`, its line is
        `command="...",restrict` so sshd runs only that. Returns the private key's path."""
        key = public_dir(self.keys_dir) / name
        if not key.exists():
            _keygen(key)
        self.authorize(key.with_suffix(".pub"), command=command)
        return key

    def authorize(self, public_key: Path, *, command: str | None = None) -> str:
        """Set the authorized_keys line of `public_key` (replacing its previous one); returns the line."""
        kind, blob = public_key.read_text().split()[:2]
        line = f"{kind} {blob}"
        if command is not None:
            line = 'command="{}",restrict {}'.format(command.replace('"', '\\"'), line)
        with self._lock():
            old = self.authorized_keys.read_text().splitlines() if self.authorized_keys.exists() else []
            kept = [entry for entry in old if blob not in entry.split()]
            _write_atomically(self.authorized_keys, "".join(f"{entry}\n" for entry in [*kept, line]))
        return line

    def ssh_config(self, alias: str, *, identity: Path | None = None, known_hosts: Path | None = None,
                   **options: str) -> str:
        """An ssh_config `Host` block that reaches this host as `alias`; keywords add or replace options."""
        block = {"HostName": self.address, "Port": str(self.port), "User": self.user,
                 "IdentityFile": str(identity or self.identity), "IdentitiesOnly": "yes",
                 "UserKnownHostsFile": str(known_hosts or self.known_hosts), **options}
        return f"Host {alias}\n" + "".join(f"    {key} {value}\n" for key, value in block.items())

    def vmrepl_args(self, receiver_state: Path, *, identity: Path | None = None,
                    known_hosts: Path | None = None, remote: str | None = None) -> list[str]:
        """`vmrepl replicate|verify` options that reach this host's `vmrepl receive --state-dir RECEIVER_STATE`."""
        return ["--to", self.destination, "--identity", str(identity or self.identity),
                "--known-hosts", str(known_hosts or self.known_hosts),
                "--remote-command", remote or f"{VMREPL} receive --state-dir {receiver_state}"]

    def env(self) -> dict[str, str]:
        """The environment a shell (or a test) uses to reach the host with vmrepl."""
        return {
            "VMREPL_DST": self.destination,
            "VMREPL_IDENTITY": str(self.identity),
            "VMREPL_KNOWN_HOSTS": str(self.known_hosts),
            "VMREPL_SRC_STATE": str(self.src_state),
            "VMREPL_DST_STATE": str(self.dst_state),
            "VMREPL_STATE_DIR": str(self.src_state),
            "VMREPL_NETNS": self.netns,
        }

    # --- internals ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise start, stop and authorized_keys edits between processes (re-entrant per object)."""
        if self._lock_fd is not None:
            yield
            return
        public_dir(self.base)
        fd = os.open(self.base / "host.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd = fd
            yield
        finally:
            self._lock_fd = None
            os.close(fd)

    def _netns_exists(self) -> bool:
        return Path("/run/netns", self.netns).exists()

    def _teardown(self) -> None:
        self._stop_libvirtd()  # its domains' QEMUs stay: tests remove their domains themselves
        pid = self.sshd_pid()
        if pid is not None:
            _terminate(pid)
        self.pid_file.unlink(missing_ok=True)
        if self._netns_exists():
            run(["ip", "netns", "del", self.netns])
        # The veth pair goes with the namespace, unless a half-built run left the source end alone.
        run(["ip", "link", "del", self.veth_source], check=False)

    def _prepare_files(self) -> None:
        for d in (self.sshd_dir, self.dst_state, self.src_state, self.identity.parent):
            public_dir(d)
        if not self.host_key.exists():
            _keygen(self.host_key)
        if not self.identity.exists():
            _keygen(self.identity)
        kind, blob = self.host_key.with_suffix(".pub").read_text().split()[:2]
        host = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        _write_atomically(self.known_hosts, f"{host} {kind} {blob}\n")
        self.authorize(self.identity.with_suffix(".pub"))
        path = f"{ROOT / '.venv' / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        _write_atomically(self.sshd_config, f"""\
# Written by testbed/host.py; sshd of the test destination in netns {self.netns}.
ListenAddress {self.address}
Port {self.port}
HostKey {self.host_key}
PidFile {self.pid_file}
AuthorizedKeysFile {self.authorized_keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# The checkout may sit below directories owned by another user; these keys are throwaway ones.
StrictModes no
# Every session finds the checkout's vmrepl and uses the destination's state dir.
SetEnv PATH={path} VMREPL_STATE_DIR={self.dst_state}
MaxStartups 64
MaxSessions 64
Subsystem sftp /usr/lib/openssh/sftp-server
""")

    def _network(self) -> None:
        ns = ["ip", "-n", self.netns]
        for argv in (
            ["ip", "netns", "add", self.netns],
            ["ip", "link", "add", self.veth_source, "type", "veth", "peer", "name", self.veth_dest,
             "netns", self.netns],
            ["ip", "addr", "add", f"{self.source_address}/{PREFIX_LEN}", "dev", self.veth_source],
            ["ip", "link", "set", self.veth_source, "up"],
            [*ns, "addr", "add", f"{self.address}/{PREFIX_LEN}", "dev", self.veth_dest],
            [*ns, "link", "set", self.veth_dest, "up"],
            [*ns, "link", "set", "lo", "up"],
        ):
            run(argv)

    def _start_sshd(self) -> None:
        public_dir(Path("/run/sshd"))
        run(self.ns_argv("/usr/sbin/sshd", "-f", str(self.sshd_config), "-E", str(self.log_file)))
        deadline = time.monotonic() + 10
        while not (self.sshd_pid() and _reachable(self.address, self.port, 0.5)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd in netns {self.netns} did not come up; see {self.log_file}")
            time.sleep(0.05)


def _keygen(path: Path) -> None:
    """An ed25519 key pair at `path` and `path.pub`, written under temporary names then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    for p in (tmp, tmp.with_name(tmp.name + ".pub")):
        p.unlink(missing_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"vmrepl-testbed-{path.name}", "-f", tmp])
    os.replace(tmp.with_name(tmp.name + ".pub"), path.with_suffix(".pub"))
    os.replace(tmp, path)


def _write_atomically(path: Path, text: str) -> None:
    write_file_durably(path, text.encode())
    path.chmod(0o644)  # sshd's StrictModes wants no group or other write bits, whatever the umask


def _terminate(pid: int) -> None:
    """SIGTERM, then SIGKILL after 5 s; returns once the process is gone."""
    sig = signal.SIGTERM
    deadline = time.monotonic() + 5
    while pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        time.sleep(0.02)


def _reachable(address: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or argv[0] not in ("start", "stop", "env") or not all(a.isdigit() for a in argv[1:]):
        print("usage: python -m testbed.host start|stop|env [INDEX]", file=sys.stderr)
        return 2
    host = SecondHost(int(argv[1]) if len(argv) == 2 else 0)
    if argv[0] == "start":
        host.start()
        print(f"second host up: {host.destination} in netns {host.netns} (sshd pid {host.sshd_pid()})")
    elif argv[0] == "stop":
        host.stop()
        print(f"second host stopped: netns {host.netns}")
    else:
        print("".join(f"export {k}={shlex.quote(v)}\n" for k, v in host.env().items()), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
