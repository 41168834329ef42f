"""The state directory: where the catalog, locks and (on a destination) layer chains live.

Layout (docs/FORMAT.md has the details)::

    STATE/catalog.sqlite        the catalog (SQLite, WAL)
    STATE/locks/VM_UUID.lock    one flock per VM: one vmrepl run per VM at a time
    STATE/hooks/                user hooks run around snapshots (pre-snapshot, post-snapshot)
    STATE/vms/VM_UUID/          destination side: domain definitions and one layer chain per disk
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import LockedError, StateError

DEFAULT_STATE_DIR = "/var/lib/vmrepl"


def resolve_state_dir(option: str | None) -> Path:
    """The state dir from the option, else $VMREPL_STATE_DIR, else the default; created if absent."""
    path = Path(option or os.environ.get("VMREPL_STATE_DIR") or DEFAULT_STATE_DIR)
    if path.exists() and not path.is_dir():
        raise StateError(f"state dir {path} is not a directory", hint="pass --state-dir DIR")
    try:
        make_dir_durably(path)
    except OSError as err:
        raise StateError(f"cannot create state dir {path}: {err.strerror}", hint="pass --state-dir DIR") from err
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise StateError(f"state dir {path} is not readable and writable", hint="fix its permissions or pass --state-dir DIR")
    return path.resolve()


@contextlib.contextmanager
def vm_lock(state_dir: Path, vm_uuid: str, *, wait_seconds: float = 0.0, which: str = "this VM") -> Iterator[None]:
    """Hold the VM's lock for the block; a second run on the same VM waits up to `wait_seconds`. `which`
    names the VM in the error."""
    locks = make_dir_durably(state_dir / "locks")
    fd = os.open(locks / f"{vm_uuid}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise LockedError(
                        f"another vmrepl run is working on {which}", hint="wait for it to finish, then retry"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def make_dir_durably(path: Path, mode: int = 0o755) -> Path:
    """Create `path` and its missing parents, each fsynced into its parent: a file renamed into a
    directory whose own entry a crash forgot would be lost with it. Returns `path`."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=mode)
        except FileExistsError:
            pass  # made by a concurrent run meanwhile
        fsync_dir(directory.parent)
    return missing[0] if missing else path


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside `path` durable."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Make a file written by another process (qemu-img, QEMU) durable."""
    _fsync(path, os.O_RDONLY)


def _fsync(path: str | os.PathLike[str], flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename over `path`, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


CRASH_ENV = "VMREPL_CRASH_AT"  # test hook: the name of a step at which the process kills itself


def crash_point(step: str) -> None:
    """`VMREPL_CRASH_AT=STEP` makes the process die by SIGKILL here: a real crash, for the tests."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
