"""vmrepl.extents checked against a byte-by-byte model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vmrepl.extents import Extent, clip, split, total_length, union

extent = st.builds(Extent, st.integers(0, 200), st.integers(0, 50), st.booleans())
extent_lists = st.lists(st.lists(extent, max_size=8), max_size=4)


def model(lists: list[list[Extent]]) -> dict[int, bool]:
    """byte -> reads zero, by the rule: zero only if every covering extent is zero."""
    out: dict[int, bool] = {}
    for extents in lists:
        for e in extents:
            for b in range(e.offset, e.end):
                out[b] = out.get(b, True) and e.zero
    return out


def as_bytes(extents: list[Extent]) -> dict[int, bool]:
    return {b: e.zero for e in extents for b in range(e.offset, e.end)}


@given(extent_lists)
def test_union_matches_the_model_and_is_coalesced(lists: list[list[Extent]]) -> None:
    result = union(*lists)
    assert as_bytes(result) == model(lists)
    for a, b in zip(result, result[1:]):
        assert a.end < b.offset or (a.end == b.offset and a.zero != b.zero)
    assert all(e.length > 0 for e in result)


@given(st.lists(extent, max_size=8), st.integers(0, 250))
def test_clip(extents: list[Extent], size: int) -> None:
    merged = union(extents)
    assert as_bytes(clip(merged, size)) == {b: z for b, z in as_bytes(merged).items() if b < size}


@given(st.lists(extent, max_size=8), st.integers(1, 30))
def test_split(extents: list[Extent], piece: int) -> None:
    merged = union(extents)
    pieces = list(split(merged, piece))
    assert all(0 < p.length <= piece for p in pieces)
    assert as_bytes(pieces) == as_bytes(merged) and union(pieces) == merged


def test_total_length() -> None:
    extents = [Extent(0, 10), Extent(20, 5, True)]
    assert (total_length(extents), total_length(extents, zero=True), total_length(extents, zero=False)) == (15, 5, 10)
