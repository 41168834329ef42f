"""Retention grids (`vmrepl prune --keep last=24,hourly=48,daily=30`): pure logic, no I/O.

`last=N` keeps the N newest snapshots; `hourly|daily|weekly|monthly=N` keeps, for each of the N most
recent such periods that have snapshots, the newest snapshot of that period, counted in UTC (ISO weeks):
restic's `forget --keep-*` rule, though restic and Proxmox count in local time. Periods without snapshots
do not count. What any rule keeps is kept (restic's union: `last` does not use up periods, as it does in
Proxmox); the rest may go. All counts 0 (`last=0`) keeps only what must stay (the newest, anchors).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence

from .catalog import Snapshot
from .errors import UsageError

PERIODS: dict[str, Callable[[time.struct_time], tuple]] = {
    "hourly": lambda t: (t.tm_year, t.tm_yday, t.tm_hour),
    "daily": lambda t: (t.tm_year, t.tm_yday),
    "weekly": lambda t: tuple(int(x) for x in time.strftime("%G %V", t).split()),
    "monthly": lambda t: (t.tm_year, t.tm_mon),
}
_COUNT = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() takes '²', which int() refuses


def parse_keep(spec: str) -> dict[str, int]:
    rules: dict[str, int] = {}
    for part in spec.split(","):
        key, _, value = part.strip().partition("=")
        if key not in ("last", *PERIODS) or not _COUNT.fullmatch(value):
            raise UsageError(f"invalid retention rule {part.strip()!r}",
                             hint="use e.g. last=24,hourly=48,daily=30,weekly=8,monthly=12")
        if key in rules:  # a site default followed by an override would cut retention unnoticed
            raise UsageError(f"retention rule {key!r} given twice in {spec!r}",
                             hint="give each of last, hourly, daily, weekly, monthly at most once")
        rules[key] = int(value)
    return rules


def to_keep(snapshots: Sequence[Snapshot], rules: dict[str, int]) -> set[str]:
    """The ids the rules keep, of snapshots given oldest first."""
    newest_first = list(reversed(snapshots))
    keep = {s.id for s in newest_first[: rules.get("last", 0)]}
    for period, bucket in PERIODS.items():
        wanted, seen = rules.get(period, 0), set()
        for snap in newest_first:
            key = bucket(time.gmtime(snap.created_ns // 10**9))  # not / 1e9: rounds 23:59:59.9999999 up
            if key not in seen and len(seen) < wanted:
                seen.add(key)
                keep.add(snap.id)
    return keep
