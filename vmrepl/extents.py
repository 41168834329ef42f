"""Byte ranges of a virtual disk, and the few operations vmrepl does on lists of them.

An `Extent` is a half-open range `[offset, offset + length)` of the guest-visible disk; `zero` says the
range reads as zeros (so it can be sent as a marker instead of data). Lists returned by the helpers
here are sorted, non-overlapping and coalesced.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MAX_PIECE = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    zero: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


def union(*lists: Iterable[Extent]) -> list[Extent]:
    """Every byte covered by any input, sorted and coalesced (also for one list that overlaps itself).

    A byte is `zero` only if every extent covering it is zero: data wins over zero because reading a range that is in fact zero costs only time, while calling
    data zero would lose it.
    """
    # Sweep over the boundaries, counting how many extents (and how many data extents) cover each piece.
    events: list[tuple[int, int, int]] = []
    for extents in lists:
        for e in extents:
            if e.length > 0:
                data = 0 if e.zero else 1
                events.append((e.offset, 1, data))
                events.append((e.end, -1, -data))
    events.sort()
    out: list[Extent] = []
    covering = data_covering = 0
    for i, (pos, d_cover, d_data) in enumerate(events):
        covering += d_cover
        data_covering += d_data
        if i + 1 == len(events) or events[i + 1][0] == pos:
            continue  # apply every event at one position before emitting the piece after it
        nxt = events[i + 1][0]
        if covering:
            _append(out, Extent(pos, nxt - pos, data_covering == 0))
    return out


def clip(extents: Iterable[Extent], size: int) -> list[Extent]:
    """The parts of `extents` below `size` (a disk that shrank, or a bitmap granule past the end)."""
    out: list[Extent] = []
    for e in extents:
        if e.offset < size and e.length > 0:
            out.append(Extent(e.offset, min(e.end, size) - e.offset, e.zero))
    return out


def split(extents: Iterable[Extent], max_length: int = MAX_PIECE) -> Iterator[Extent]:
    """Each extent cut into pieces of at most `max_length` bytes, in order."""
    for e in extents:
        pos = e.offset
        while pos < e.end:
            n = min(max_length, e.end - pos)
            yield Extent(pos, n, e.zero)
            pos += n


def total_length(extents: Iterable[Extent], *, zero: bool | None = None) -> int:
    """Bytes covered; only zero (or only data) extents when `zero` is given."""
    return sum(e.length for e in extents if zero is None or e.zero == zero)


def _append(out: list[Extent], e: Extent) -> None:
    if out and out[-1].end == e.offset and out[-1].zero == e.zero:
        out[-1] = Extent(out[-1].offset, out[-1].length + e.length, e.zero)
    else:
        out.append(e)
