"""Byte counts, durations and instants as people read them in text output (JSON keeps plain numbers)."""

from __future__ import annotations

import time

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(count: int) -> str:
    """'0 B', '512 B', '3.6 KiB', '32.0 MiB': powers of 1024, as `qemu-img info` and `virsh` print them."""
    if count < 1024:
        return f"{count} B"
    value, unit = count / 1024, _UNITS[0]
    for bigger in _UNITS[1:]:
        if round(value, 1) < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:,.1f} {unit}"


def local_time(ns: int) -> str:
    """'2026-11-25 16:08:27': nanoseconds since the epoch, in this host's time zone."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def human_duration(seconds: float) -> str:
    """'45s', '17m02s', '3h05m', '2d04h': the two largest units, as a lag is read at a glance."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
