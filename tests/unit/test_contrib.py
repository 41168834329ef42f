"""contrib/systemd: each unit's command line is one that vmrepl's parser accepts, and the timers fire
the services they are named after."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from testbed import ROOT, VMREPL

UNITS = ROOT / "contrib" / "systemd"
# what the units' environment files would give (the values of the examples in their comments)
ENVIRONMENT = {"KEEP": "last=24,daily=30,weekly=8", "VMREPL_TO": "repl@backup1",
               "VMREPL_ARGS": "--identity /etc/vmrepl/id_ed25519 --known-hosts /etc/vmrepl/known_hosts"}


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def command(exec_start: str) -> list[str]:
    """ExecStart as the service runs it for instance web1, through `sh -c` where the unit uses one."""
    words = shlex.split(exec_start.replace("%i", "web1").replace("${KEEP}", ENVIRONMENT["KEEP"]))
    if words[:2] == ["/bin/sh", "-c"]:
        script = words[2]
        for name, value in ENVIRONMENT.items():
            script = script.replace(f'"${name}"', shlex.quote(value)).replace(f"${name}", value)
        words = shlex.split(script.removeprefix("exec "))
    return words


@pytest.mark.parametrize("service", sorted(UNITS.glob("*.service")), ids=lambda p: p.name)
def test_each_service_runs_a_command_line_vmrepl_accepts(service: Path, run_vmrepl) -> None:
    argv = command(unit(service)["Service"]["ExecStart"])
    assert argv[0] == "/usr/local/bin/vmrepl"
    assert run_vmrepl(*argv[1:], "--help").stdout.startswith(f"Usage: vmrepl {argv[1]} ")  # unknown options fail


@pytest.mark.parametrize("timer", sorted(UNITS.glob("*.timer")), ids=lambda p: p.name)
def test_each_timer_has_its_service(timer: Path) -> None:
    assert (UNITS / timer.name.replace(".timer", ".service")).is_file()
    assert unit(timer)["Timer"].get("Persistent") == "true"  # a run missed while the host was down happens at boot
