"""The CLI contract every command shares: help, version, JSON output, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest

from vmrepl import __version__
from vmrepl.cli import COMMANDS


def one_line_error(result, exit_code: int = 1) -> str:
    assert result.returncode == exit_code, result.stderr
    assert result.stderr.startswith("vmrepl: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_help_lists_commands(run_vmrepl):
    out = run_vmrepl("--help").stdout
    assert "Usage: vmrepl" in out and "--state-dir" in out
    listed = out.split("Commands:")[1].split()
    for name in COMMANDS:  # each command module is imported only when named: check that each loads
        assert (name in listed) == (name != "hook-event"), name  # hook-event is for the libvirt hook only
        assert run_vmrepl(name, "--help").stdout.startswith(f"Usage: vmrepl {name}"), name


def test_version(run_vmrepl):
    assert run_vmrepl("--version").stdout.strip() == f"vmrepl, version {__version__}"


@pytest.mark.parametrize("args", [("status", "--json"), ("--json", "status")])
def test_status_json_on_an_empty_state_dir(run_vmrepl, args):
    result = run_vmrepl(*args)
    assert json.loads(result.stdout) == {"vms": []}
    assert result.stderr == ""


def test_state_dir_option_overrides_the_environment(run_vmrepl, work_dir, src_state):
    other = work_dir / "other"
    run_vmrepl("status", "--state-dir", other)
    assert (other / "catalog.sqlite").exists() and not (src_state / "catalog.sqlite").exists()


def test_unknown_command_is_a_usage_error(run_vmrepl):
    assert "frobnicate" in one_line_error(run_vmrepl("frobnicate", check=False), exit_code=2)


def test_state_dir_that_is_a_file(run_vmrepl, work_dir):
    path = work_dir / "state"
    path.write_text("")
    assert "not a directory" in one_line_error(run_vmrepl("status", state_dir=path, check=False))


def test_a_message_with_line_breaks_still_is_one_line(run_vmrepl, work_dir):
    path = work_dir / "two\nlines"  # named in the error, as libvirt's and qemu-img's messages may break lines
    path.write_text("")
    assert "two lines" in one_line_error(run_vmrepl("status", state_dir=path, check=False))


def test_metrics_json_is_one_document(run_vmrepl):
    assert run_vmrepl("metrics", "--json").json() == {"metrics": []}
    assert run_vmrepl("metrics").stdout.startswith("# HELP vmrepl_snapshots ")


def test_unreadable_state_dir(run_vmrepl, work_dir):
    path = work_dir / "private"
    path.mkdir(mode=0o700)  # root's; root itself would pass any permission check
    assert str(path) in one_line_error(run_vmrepl("status", state_dir=path, user="nobody", check=False))


def test_debug_shows_the_traceback(run_vmrepl, work_dir):
    path = work_dir / "state"
    path.write_text("")
    assert "Traceback" in run_vmrepl("--debug", "status", state_dir=path, check=False).stderr
