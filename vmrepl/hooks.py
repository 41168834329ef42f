"""User hooks: executables in STATE/hooks/ run around each snapshot.

Each executable file in the directory runs in name order with the environment variables
VMREPL_PHASE (pre-snapshot | post-snapshot), VMREPL_VM, VMREPL_VM_UUID, VMREPL_SNAPSHOT (id),
VMREPL_SNAPSHOT_NAME and, after the snapshot, VMREPL_RESULT (ok | failed). A pre-snapshot hook that
exits non-zero aborts the snapshot; post-snapshot hooks always run, so a hook that froze an
application in the pre phase can thaw it even when the snapshot failed. vmrepl waits for the hook's
own process, not for children it leaves running; its stdout is discarded and the last line of its
stderr names a failure.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from .errors import HookError

HOOK_TIMEOUT_SECONDS = 300


def hooks_dir(state_dir: Path) -> Path:
    return state_dir / "hooks"


def run_hooks(directory: Path, phase: str, env: dict[str, str]) -> None:
    """Run every executable hook in `directory` for `phase`; the first failure raises HookError."""
    if not directory.is_dir():
        return
    for hook in sorted(p for p in directory.iterdir() if p.is_file() and os.access(p, os.X_OK)):
        # stderr into a file, not a pipe: a hook that leaves a child behind (e.g. a session holding a
        # database's read lock until the post hook) would otherwise keep the pipe open until the timeout.
        with tempfile.TemporaryFile("w+", errors="replace") as errors:
            try:
                done = subprocess.run([str(hook), phase], env={**os.environ, **env, "VMREPL_PHASE": phase},
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
                                      timeout=HOOK_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                raise HookError(f"{phase} hook {hook} did not finish in {HOOK_TIMEOUT_SECONDS} s") from None
            except OSError as err:
                raise HookError(f"{phase} hook {hook} could not run: {err.strerror}") from err
            errors.seek(0)
            stderr = errors.read()
        if done.returncode != 0:
            last = (stderr.strip().splitlines() or ["no message"])[-1]
            raise HookError(f"{phase} hook {hook.name} failed (exit {done.returncode}): {last}",
                            hint="fix the hook or remove it from the hooks directory")
