"""The test bed: a second SSH "host" in a network namespace (`host`), throwaway no-OS VMs under
libvirt (`vm`) and the demo (`demo`). Used by tests/conftest.py, scripts/demo and by hand.

Everything it creates lives under RUN_DIR (`run/` in the checkout, gitignored) in directories of
mode 0755, so that the libvirt-qemu user can reach VM images there.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / "run"
VMREPL = ROOT / ".venv" / "bin" / "vmrepl"


def public_dir(path: Path) -> Path:
    """Create `path` and its missing parents with mode 0755 (umask-proof) and return it."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        p.mkdir(exist_ok=True)
        p.chmod(0o755)
    return path


def run(argv: Sequence[str | os.PathLike], *, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command capturing text output; on failure raise with its stderr in the message."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def pid_alive(pid: int) -> bool:
    """True while the process runs; a zombie counts as gone (nothing here may reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds; raise AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting until {what}")
        time.sleep(0.05)
