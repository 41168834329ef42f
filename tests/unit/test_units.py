"""Byte counts in text output."""

from __future__ import annotations

import time

import pytest

from vmrepl.units import human_bytes, human_duration, local_time


@pytest.mark.parametrize("count, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (3710, "3.6 KiB"), (32 << 20, "32.0 MiB"),
    ((1 << 20) - 1, "1.0 MiB"),  # rounds up into the next unit, never '1,024.0 KiB'
    (1536 << 30, "1.5 TiB"), (3 << 60, "3,072.0 PiB"),
])
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text


def test_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert local_time(1_764_086_907_500_000_000) == "2025-11-25 16:08:27"
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.9, "59s"), (60, "1m00s"), (1022.6, "17m02s"),
                                           (3600, "1h00m"), (11_100, "3h05m"), (187_200, "2d04h")])
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text
