"""Retention grids (`vmrepl prune --keep last=24,hourly=48,daily=30`): pure logic, no I/O.

`last=N` keeps the N newest snapshots; `hourly|daily|weekly|monthly=N` keeps, for each of the N most
recent such periods that have snapshots, the newest snapshot of that period (UTC), as sanoid and zrepl do.
What any rule keeps is kept; the rest may go.
"""

from __future__ import annotations

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


def parse_keep(spec: str) -> dict[str, int]:
    rules: dict[str, int] = {}
    for part in spec.split(","):
        key, _, value = part.strip().partition("=")
        if key not in ("last", *PERIODS) or not value.isdigit():
            raise UsageError(f"invalid retention rule {part.strip()!r}",
                             hint="use e.g. last=24,hourly=48,daily=30,weekly=8,monthly=12")
        rules[key] = int(value)
    return rules


def to_keep(snapshots: Sequence[Snapshot], rules: dict[str, int]) -> set[str]:
    """The ids the rules keep, of snapshots given oldest first."""
    newest_first = list(reversed(snapshots))
    keep = {s.id for s in newest_first[: rules.get("last", 0)]}
    for period, bucket in PERIODS.items():
        wanted, seen = rules.get(period, 0), set()
        for snap in newest_first:
            key = bucket(time.gmtime(snap.created_ns / 1e9))
            if key not in seen and len(seen) < wanted:
                seen.add(key)
                keep.add(snap.id)
    return keep
