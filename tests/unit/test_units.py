"""Byte counts in text output."""

from __future__ import annotations

import pytest

from vmrepl.units import human_bytes


@pytest.mark.parametrize("count, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (3710, "3.6 KiB"), (32 << 20, "32.0 MiB"),
    ((1 << 20) - 1, "1.0 MiB"),  # rounds up into the next unit, never '1,024.0 KiB'
    (1536 << 30, "1.5 TiB"), (3 << 60, "3,072.0 PiB"),
])
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text
