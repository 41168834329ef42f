"""Fixtures for every test: real libvirtd, throwaway VMs, the second host, fresh state dirs, and
`run_vmrepl` that runs the installed CLI as a subprocess.

Per-test files live in run/tests/PID/TEST/ (0755, reachable by libvirt-qemu); they are removed when
the test passes and kept when it fails, until a later session finds their owner gone.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import libvirt
import pytest

from testbed import RUN_DIR, VMREPL, pid_alive, public_dir
from testbed.host import SecondHost
from testbed.vm import VM, cleanup_leftovers, create_vm
from vmrepl.qemu.storage_daemon import StorageDaemon

TESTS_DIR = RUN_DIR / "tests"
MARKERS = {
    "libvirt": ("libvirt_conn", "make_vm"),
    "second_host": ("second_host",),
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "libvirt: uses libvirtd and throwaway VMs (set from the fixtures)")
    config.addinivalue_line("markers", "second_host: uses the second host in its network namespace (set from the fixtures)")
    config.addinivalue_line("markers", "restarts_libvirtd: restarts libvirtd, which cuts every open libvirt "
                                       "connection: such tests run last")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the real components they use, so `-m "not libvirt"` selects the quick ones; tests
    that restart libvirtd go last (the session's libvirt connection does not survive them)."""
    for item in items:
        for marker, fixtures in MARKERS.items():
            if any(f in getattr(item, "fixturenames", ()) for f in fixtures):
                item.add_marker(marker)
    items.sort(key=lambda item: item.get_closest_marker("restarts_libvirtd") is not None)


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_started] = time.monotonic()
    if TESTS_DIR.is_dir():
        for directory in TESTS_DIR.iterdir():
            if not (directory.name.isdigit() and pid_alive(int(directory.name))):
                shutil.rmtree(directory, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    started = config.stash.get(_started, None)
    if started is not None:
        terminalreporter.write_line(f"vmrepl test suite: {time.monotonic() - started:.1f} s in total")


_started = pytest.StashKey[float]()
_call_report = pytest.StashKey[pytest.TestReport]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_call_report] = report


# --- directories and the CLI ------------------------------------------------------------------------


@pytest.fixture
def work_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh 0755 directory for this test under run/ (unlike tmp_path, libvirt-qemu can reach it)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:100]
    path = TESTS_DIR / str(os.getpid()) / name
    shutil.rmtree(path, ignore_errors=True)
    public_dir(path)
    yield path
    report = request.node.stash.get(_call_report, None)
    if report is not None and report.passed:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def src_state(work_dir: Path) -> Path:
    """An empty vmrepl state dir for the source side of this test."""
    return public_dir(work_dir / "src-state")


@pytest.fixture
def dst_state(work_dir: Path) -> Path:
    """An empty vmrepl state dir for the destination side of this test (reach it over ssh with
    `vmrepl receive --state-dir DST_STATE`, e.g. via `replicate --remote-command`)."""
    return public_dir(work_dir / "dst-state")


class VmreplResult(subprocess.CompletedProcess):
    """A finished `vmrepl` run: args, returncode, stdout, stderr (str, or bytes when input was bytes)."""

    def json(self) -> object:
        return json.loads(self.stdout)


RunVmrepl = Callable[..., VmreplResult]


@pytest.fixture
def run_vmrepl(src_state: Path) -> RunVmrepl:
    """`run_vmrepl(*args, state_dir=src_state, check=True, input=None, env=None, user=None, timeout=300)`:
    run .venv/bin/vmrepl with VMREPL_STATE_DIR=state_dir (None leaves it unset). check=True fails the
    test on a non-zero exit. `user` runs it as that user (setpriv), e.g. to meet a permission error."""

    def run_vmrepl(*args: str | os.PathLike, state_dir: Path | None = src_state, check: bool = True,
                   input: str | bytes | None = None, env: Mapping[str, str] | None = None,
                   user: str | None = None, timeout: float = 300) -> VmreplResult:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("VMREPL_")}
        if state_dir is not None:
            environ["VMREPL_STATE_DIR"] = str(state_dir)
        environ.update(env or {})
        argv = [str(VMREPL), *map(str, args)]
        if user is not None:
            argv = ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--clear-groups", *argv]
        proc = subprocess.run(argv, input=input, capture_output=True, text=not isinstance(input, bytes),
                              env=environ, timeout=timeout)
        result = VmreplResult(proc.args, proc.returncode, proc.stdout, proc.stderr)
        if check and result.returncode != 0:
            raise AssertionError(f"vmrepl {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr}")
        return result

    return run_vmrepl


# --- real components ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[libvirt.virConnect]:
    """A connection to qemu:///system. Test VMs of killed runs are removed first; at the end, every
    domain named by `testbed.vm.vm_name()` in this session goes too (e.g. made by `vmrepl recover`)."""
    conn = libvirt.open("qemu:///system")
    cleanup_leftovers(conn)
    yield conn
    try:
        cleanup_leftovers(conn, owner=os.getpid())
    except libvirt.libvirtError:  # a test restarted libvirtd (they run last): clean up over a new connection
        conn = libvirt.open("qemu:///system")
        cleanup_leftovers(conn, owner=os.getpid())
    conn.close()


@pytest.fixture
def make_vm(libvirt_conn: libvirt.virConnect) -> Iterator[Callable[..., VM]]:
    """`make_vm(disks={"vda": 64 MiB, "vdb": 32 MiB}, *, label="vm", start=True, firmware="bios") -> VM`:
    a throwaway no-OS VM, removed with its files after the test."""
    made: list[VM] = []

    def make_vm(disks: Mapping[str, int] | None = None, *, label: str = "vm", start: bool = True,
                firmware: str = "bios") -> VM:
        vm = create_vm(libvirt_conn, disks, label=label, start=start, firmware=firmware)
        made.append(vm)
        return vm

    yield make_vm
    for vm in made:
        vm.remove()


@pytest.fixture
def daemon() -> Iterator[StorageDaemon]:
    """A private qemu-storage-daemon for the test, stopped after it."""
    with StorageDaemon() as d:
        yield d


@pytest.fixture(scope="session")
def dst_libvirt(second_host: SecondHost) -> Iterator[tuple[str, libvirt.virConnect]]:
    """The second host's own libvirtd (started on first use, in its namespace): (URI, connection)."""
    uri = second_host.start_libvirtd()
    conn = libvirt.open(uri)
    cleanup_leftovers(conn)
    yield uri, conn
    cleanup_leftovers(conn, owner=os.getpid())
    conn.close()


@pytest.fixture(scope="session")
def second_host() -> Iterator[SecondHost]:
    """The destination host (netns + sshd), started once; stopped at the end unless another
    pytest session in this checkout still uses it."""
    with SecondHost().session() as host:
        yield host
