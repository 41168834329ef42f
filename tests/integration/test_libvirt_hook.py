"""The libvirt hook (hooks/qemu, installed by scripts/setup.sh): picked up at a libvirtd restart, it hands
domain start and shutdown to a detached `vmrepl hook-event` without deadlocking libvirtd."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from testbed import ROOT
from testbed.vm import create_vm

HOOK_ENV = Path("/etc/vmrepl/hook.env")
INSTALLED = Path("/etc/libvirt/hooks/qemu.d/vmrepl")


def restart_libvirtd() -> None:
    pid = int(Path("/run/libvirtd.pid").read_text())  # this host's; the second host runs one of its own
    subprocess.run(["kill", str(pid)], check=True)
    for _ in range(100):
        if subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0:
            break
        time.sleep(0.1)
    subprocess.run(["libvirtd", "-d"], check=True)
    for _ in range(100):
        if subprocess.run(["virsh", "-q", "uri"], capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("libvirtd did not come back")


def wait_for(condition, what: str, seconds: float = 40.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def hook_env(text: str) -> Iterator[None]:
    """/etc/vmrepl/hook.env holding `text` for the block (the installed hook reads it), then as it was."""
    assert INSTALLED.read_bytes() == (ROOT / "hooks" / "qemu").read_bytes(), "run scripts/setup.sh"
    saved = HOOK_ENV.read_bytes() if HOOK_ENV.exists() else None
    HOOK_ENV.parent.mkdir(exist_ok=True)
    HOOK_ENV.write_text(text)
    try:
        yield
    finally:
        if saved is None:
            HOOK_ENV.unlink(missing_ok=True)
        else:
            HOOK_ENV.write_bytes(saved)


@pytest.mark.restarts_libvirtd
def test_hook_reacts_to_start_and_shutdown_after_a_libvirtd_restart(work_dir, src_state, run_vmrepl):
    log = work_dir / "hook.log"
    with hook_env(f"VMREPL_STATE_DIR={src_state}\nVMREPL_HOOK_LOG={log}\n"):
        restart_libvirtd()
        conn = libvirt.open("qemu:///system")
        vm = None
        try:
            vm = create_vm(conn, {"vda": 16 << 20}, label="hook")
            first = wait_for(lambda: log.exists() and log.read_text(), "the started hook")
            assert f"{vm.name} started: " in first
            run_vmrepl("snapshot", vm.name, state_dir=src_state)
            (src_state / "snapshot-on-shutdown").write_text(f"{vm.name}\n")
            vm.shutoff()
            held = wait_for(lambda: len(snaps := run_vmrepl("list", vm.name, "--json", state_dir=src_state).json())
                            == 2 and snaps, "the snapshot taken after shutdown")
            assert held[1]["parent"] == held[0]["id"]
            assert f"{vm.name} shut down: snapshot {held[1]['name']}" in log.read_text()
            vm.start()  # libvirtd was not deadlocked by its hook, and tracking is sound after the restart
            wait_for(lambda: f"{vm.name} started: change tracking ok" in log.read_text(), "the second start")
            assert conn.lookupByName(vm.name).isActive()
        finally:
            if vm is not None:
                vm.remove()
            conn.close()


def test_a_broken_hook_env_never_stops_a_domain(work_dir, libvirt_conn):
    """libvirtd refuses to start (prepare, start) or stops (started) a domain whose hook exits non-zero,
    and the hook sits in qemu.d/, so it runs for every domain of the host: whatever /etc/vmrepl/hook.env
    holds, the script exits 0."""
    with hook_env("VMREPL_STATE_DIR=( not shell\n"):
        for operation in ("prepare", "start", "started", "stopped", "release"):
            done = subprocess.run([ROOT / "hooks" / "qemu", "-web1", operation, "begin", "-"], input=b"<domain/>",
                                  capture_output=True, timeout=10)
            assert (operation, done.returncode, done.stdout, done.stderr) == (operation, 0, b"", b"")
        vm = create_vm(libvirt_conn, {"vda": 16 << 20}, label="hookenv")  # started with the hook installed
        try:
            assert vm.is_running()
        finally:
            vm.remove()
