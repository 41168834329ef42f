"""User hooks: executables in STATE/hooks/ run around each snapshot.

Each executable file in the directory runs in name order with the environment variables
VMREPL_PHASE (pre-snapshot | post-snapshot), VMREPL_VM, VMREPL_VM_UUID, VMREPL_SNAPSHOT (id),
VMREPL_SNAPSHOT_NAME and, after the snapshot, VMREPL_RESULT (ok | failed). A pre-snapshot hook that
exits non-zero aborts the snapshot; post-snapshot hooks always run, so a hook that froze an
application in the pre phase can thaw it even when the snapshot failed.
"""

from __future__ import annotations

import os
import subprocess
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
        try:
            done = subprocess.run([str(hook), phase], env={**os.environ, **env, "VMREPL_PHASE": phase},
                                  capture_output=True, text=True, timeout=HOOK_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            raise HookError(f"{phase} hook {hook} did not finish in {HOOK_TIMEOUT_SECONDS} s") from None
        except OSError as err:
            raise HookError(f"{phase} hook {hook} could not run: {err.strerror}") from err
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise HookError(f"{phase} hook {hook.name} failed (exit {done.returncode}): {last}",
                            hint="fix the hook or remove it from the hooks directory")
