from __future__ import annotations

import calendar
import dataclasses

import pytest

from vmrepl.catalog import Snapshot
from vmrepl.errors import UsageError
from vmrepl.retention import parse_keep, to_keep


def snap(name: str, when: str) -> Snapshot:
    ns = calendar.timegm(__import__("time").strptime(when, "%Y-%m-%d %H:%M")) * 10**9
    return Snapshot(id=name, vm_uuid="u", vm_name="vm", name=name, parent=None, created_ns=ns, generation=0,
                    origin="local")


SNAPS = [snap("a", "2026-11-01 10:00"), snap("b", "2026-11-01 10:30"), snap("c", "2026-11-01 11:10"),
         snap("d", "2026-11-02 09:00"), snap("e", "2026-11-02 09:20"), snap("f", "2026-11-03 08:00")]


@pytest.mark.parametrize("spec, kept", [
    ("last=2", {"e", "f"}),
    ("hourly=3", {"f", "e", "c"}),          # newest of each of the 3 newest hours that have snapshots
    ("daily=2", {"f", "e"}),
    ("daily=5", {"f", "e", "c"}),
    ("last=1,daily=3", {"f", "e", "c"}),
    ("monthly=1", {"f"}),
    ("last=0", set()),
])
def test_grid(spec, kept):
    assert to_keep(SNAPS, parse_keep(spec)) == kept


@pytest.mark.parametrize("spec", ["", "last", "yearly=1", "last=-1", "daily=x", "last=2;daily=3",
                                  "last=\u00b2", "last=\u0663", "last=" + "9" * 5000, "daily=30,daily=7"])
def test_bad_spec_is_a_usage_error(spec):
    with pytest.raises(UsageError) as err:
        parse_keep(spec)
    assert "\n" not in str(err.value) and err.value.hint


def test_one_nanosecond_before_midnight_is_that_day():
    """Seconds as a float round 23:59:59.999999999 up into the next day, whose snapshot then took its place."""
    midnight = snap("a", "2026-11-02 00:00")
    a = dataclasses.replace(midnight, created_ns=midnight.created_ns - 1)
    assert to_keep([a, snap("b", "2026-11-02 12:00")], parse_keep("daily=2")) == {"a", "b"}
