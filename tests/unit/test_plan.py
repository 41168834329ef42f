"""The planner: base choice, order and position, table-driven, plus a property test."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmrepl.errors import NotFoundError, StateError, UsageError
from vmrepl.plan import HeldSnapshot, SourceSnapshot, Step, as_json, plan, render


def src(id: str, gen: int, parent: str | None = None, *, t: int | None = None, on: bool = True,
        tracked: bool = True, vm: str = "") -> SourceSnapshot:
    return SourceSnapshot(id, parent, gen * 1000 if t is None else t, gen, on, tracked, vm)


def chain(*specs: tuple) -> list[SourceSnapshot]:
    """(id, gen, extra kwargs...) each the parent of the next; kwargs as a dict in spec[2]."""
    out: list[SourceSnapshot] = []
    for spec in specs:
        out.append(src(spec[0], spec[1], out[-1].id if out else None, **(spec[2] if len(spec) > 2 else {})))
    return out


def holding(lineage: list[SourceSnapshot], *ids: str) -> list[HeldSnapshot]:
    by_id = {s.id: s for s in lineage}
    return [HeldSnapshot(i, by_id[i].created_ns, by_id[i].generation) for i in ids]


def triples(steps: list[Step]) -> list[tuple]:
    return [(s.snapshot, s.base, s.after, s.before) for s in steps]


# Every age order of S, its parent P on the source, and a destination snapshot D, with or without
# P also held. The lineage lists ids in chain order; "-" marks a snapshot deleted but tracked.
ORDERS = [
    # D < P < S: D is an older ancestor; P wins once held.
    ("D<P<S", ["D", "P", "S"], {}, ["D"], ("S", "D", "D", None)),
    ("D<P<S, P held", ["D", "P", "S"], {}, ["D", "P"], ("S", "P", "P", None)),
    # P < D < S: D is an ancestor younger than P (deleted on the source, still tracked): smaller delta.
    ("P<D<S", ["P", "D", "S"], {"D": {"on": False}}, ["D"], ("S", "D", "D", None)),
    ("P<D<S, P held", ["P", "D", "S"], {"D": {"on": False}}, ["P", "D"], ("S", "D", "D", None)),
    # P < S < D: D is younger than S: S is inserted before it.
    ("P<S<D", ["P", "S", "D"], {}, ["D"], ("S", None, None, "D")),
    ("P<S<D, P held", ["P", "S", "D"], {}, ["P", "D"], ("S", "P", "P", "D")),
]


@pytest.mark.parametrize("label, ids, extra, held, expected", ORDERS, ids=[o[0] for o in ORDERS])
def test_every_order_of_s_parent_and_destination(label: str, ids: list[str], extra: dict, held: list[str],
                                                 expected: tuple) -> None:
    lineage = chain(*[(i, n + 1, extra.get(i, {})) for n, i in enumerate(ids)])
    steps = plan(lineage, holding(lineage, *held), want=["S"])
    assert triples(steps) == [expected]
    assert steps[0].position == ("insert" if expected[3] else "append")


CASES = [
    # name, lineage, held, kwargs, expected (snapshot, base, after, before) per step, reason fragments
    ("none held: full sparse sends, then deltas",
     chain(("g1", 1), ("g2", 2)), [], {},
     [("g1", None, None, None), ("g2", "g1", "g1", None)],
     ["full sparse send: no shared ancestor; first on the destination", "base g1"]),
    ("only the parent held: append with the parent as base",
     chain(("g1", 1), ("g2", 2)), ["g1"], {},
     [("g2", "g1", "g1", None)], ["base g1 (youngest shared ancestor); appended after g1"]),
    ("younger held: insertion between its neighbours",
     chain(("g1", 1), ("g2", 2), ("g3", 3)), ["g1", "g3"], {},
     [("g2", "g1", "g1", "g3")], ["inserted after g1, before g3 (g3 is rebased onto it)"]),
    ("held ancestor younger than the parent on the source wins",
     chain(("g6", 6), ("g7", 7, {"on": False}), ("g9", 9)), ["g6", "g7"], {},
     [("g9", "g7", "g7", None)],
     ["base g7 (youngest shared ancestor; deleted on the source but still tracked; younger than g6, its parent"
      " on the source: smaller delta); appended after g7"]),
    ("untracked held ancestor skipped with the reason",
     chain(("g7", 7), ("g8", 8, {"on": False, "tracked": False}), ("g9", 9)), ["g7", "g8"], {},
     [("g9", "g7", "g8", None)],
     ["base g7 (youngest shared ancestor); g8 deleted on the source and no longer tracked; appended after g8"]),
    ("untracked held ancestor still on the source",
     chain(("g1", 1), ("g2", 2, {"tracked": False}), ("g3", 3)), ["g1", "g2"], {},
     [("g3", "g1", "g2", None)], ["g2 its change tracking is lost on the source"]),
    ("only untracked held ancestors: full send that says why",
     chain(("g1", 1, {"tracked": False}), ("g2", 2)), ["g1"], {},
     [("g2", None, "g1", None)], ["full sparse send: no shared ancestor the source can diff from"]),
    ("an untracked snapshot sent earlier is no base for the next",
     chain(("g1", 1, {"tracked": False}), ("g2", 2)), [], {},
     [("g1", None, None, None), ("g2", None, "g1", None)], ["", "g1 its change tracking is lost"]),
    ("skewed clock: created_ns falls while generation grows; generation decides",
     chain(("g1", 1, {"t": 3000}), ("g2", 2, {"t": 2000}), ("g3", 3, {"t": 1000})), ["g3"], {},
     [("g1", None, None, "g3"), ("g2", "g1", "g1", "g3")], ["full sparse send: no shared ancestor; inserted at the start, before g3 (g3 is rebased onto it)",
      "inserted after g1, before g3"]),
    ("skewed clock, append after the older generation",
     chain(("g1", 1, {"t": 5000}), ("g2", 2, {"t": 10})), ["g1"], {},
     [("g2", "g1", "g1", None)], []),
    ("latest_first: newest first, then backfill oldest first as insertions",
     chain(("g1", 1), ("g2", 2), ("g3", 3), ("g4", 4)), ["g1"], {"latest_first": True},
     [("g4", "g1", "g1", None), ("g2", "g1", "g1", "g4"), ("g3", "g2", "g2", "g4")],
     ["appended after g1", "before g4 (g4 is rebased onto it)", "base g2"]),
    ("latest_first with nothing held",
     chain(("g1", 1), ("g2", 2), ("g3", 3)), [], {"latest_first": True},
     [("g3", None, None, None), ("g1", None, None, "g3"), ("g2", "g1", "g1", "g3")], []),
    ("want an older snapshot after younger ones arrived",
     chain(("g1", 1), ("g2", 2), ("g3", 3), ("g4", 4)), ["g1", "g4"], {"want": ["g3"]},
     [("g3", "g1", "g1", "g4")], []),
    ("deleted snapshots are not sent; the branch continues from a held one",
     chain(("g1", 1), ("g2", 2, {"on": False}), ("g3", 3)), ["g1"], {},
     [("g3", "g1", "g1", None)], []),
]


@pytest.mark.parametrize("name, lineage, held, kwargs, expected, fragments", CASES, ids=[c[0] for c in CASES])
def test_plan_table(name: str, lineage: list[SourceSnapshot], held: list[str], kwargs: dict,
                    expected: list[tuple], fragments: list[str]) -> None:
    steps = plan(lineage, holding(lineage, *held), **kwargs)
    assert triples(steps) == expected
    for step, fragment in zip(steps, fragments or [""] * len(steps), strict=True):
        assert fragment in step.reason


def test_held_snapshot_unknown_to_the_source_orders_by_its_age_but_is_no_base() -> None:
    # g2 is gone from the source's catalog; the destination still has it (with an equal generation
    # to g3's sibling: created_ns breaks the tie).
    lineage = [src("g1", 1), src("g3", 3, "g1", t=3000)]
    held = [HeldSnapshot("g1", 1000, 1), HeldSnapshot("g2", 2000, 2), HeldSnapshot("x3", 3500, 3)]
    steps = plan(lineage, held)
    assert triples(steps) == [("g3", "g1", "g2", "x3")]


def test_ancestor_unknown_to_the_source_is_skipped() -> None:
    lineage = [src("g3", 3, "g2")]  # g2 was pruned from the source catalog
    steps = plan(lineage, [HeldSnapshot("g2", 2000, 2)])
    assert triples(steps) == [("g3", None, "g2", None)]
    assert "g2 unknown to the source" in steps[0].reason


def test_clone_sends_a_delta_on_its_origin_snapshot() -> None:
    # VM b was cloned from a's a7; its generations restart at 1 and its clock runs behind a's, yet
    # every snapshot of b is younger than a7 (ancestry decides across a clone).
    origin = [src("a6", 6, vm="a"), src("a7", 7, "a6", vm="a")]
    clone = [src("b1", 1, "a7", t=1, vm="b"), src("b2", 2, "b1", t=2, vm="b")]
    held = [HeldSnapshot("a7", 7000, 7)]
    steps = plan(origin + clone, held)
    assert triples(steps) == [("b1", "a7", "a7", None), ("b2", "b1", "b1", None)]
    assert "from the VM this one was cloned from" in steps[0].reason
    with pytest.raises(UsageError):
        plan(origin + clone, held, want=["a6"])


def test_clone_without_its_origin_on_the_destination_is_a_full_send() -> None:
    lineage = [src("a7", 7, vm="a"), src("b1", 1, "a7", vm="b")]
    assert triples(plan(lineage, [])) == [("b1", None, None, None)]


def test_want_unknown_id() -> None:
    with pytest.raises(NotFoundError, match="nope"):
        plan(chain(("g1", 1)), [], want=["nope"])


def test_want_deleted_on_source() -> None:
    lineage = chain(("g1", 1, {"on": False}), ("g2", 2))
    with pytest.raises(NotFoundError, match="deleted on the source"):
        plan(lineage, [], want=["g1"])


def test_want_already_held_is_a_skip_step() -> None:
    lineage = chain(("g1", 1), ("g2", 2))
    steps = plan(lineage, holding(lineage, "g1"), want=["g1", "g2", "g1"])
    assert [(s.snapshot, s.position) for s in steps] == [("g1", "skip"), ("g2", "append")]
    assert steps[0].reason == "already held by the destination"


def test_snapshots_pruned_on_the_destination_are_sent_again_only_by_name() -> None:
    lineage = chain(("g1", 1), ("g2", 2), ("g3", 3), ("g4", 4))
    held = holding(lineage, "g1", "g3")  # g2 was pruned there
    assert triples(plan(lineage, held, pruned={"g2"})) == [("g4", "g3", "g3", None)]
    assert triples(plan(lineage, held, want=["g2"], pruned={"g2"})) == [("g2", "g1", "g1", "g3")]
    assert triples(plan(lineage, held)) == [("g2", "g1", "g1", "g3"), ("g4", "g3", "g3", None)]


def test_nothing_to_send() -> None:
    lineage = chain(("g1", 1))
    assert plan(lineage, holding(lineage, "g1")) == []
    assert render([]) == "nothing to send: the destination holds every snapshot"


@pytest.mark.parametrize("lineage, message", [
    ([src("g1", 1), src("g1", 2)], "twice"),
    ([src("g1", 1, "g2"), src("g2", 2, "g1")], "its own ancestor"),
    ([src("g1", 2), src("g2", 1, "g1")], "not younger than its parent"),
    ([src("a1", 1, vm="a"), src("b1", 1, vm="b")], "unrelated VMs"),
])
def test_inconsistent_lineage(lineage: list[SourceSnapshot], message: str) -> None:
    with pytest.raises(StateError, match=message):
        plan(lineage, [])


def test_render_and_json() -> None:
    lineage = chain(("g1", 1), ("g2", 2), ("g3", 3))
    steps = plan(lineage, holding(lineage, "g1", "g2"), want=["g2", "g3"], latest_first=True)
    assert render(steps).splitlines() == [
        "1. skip g2: already held by the destination",
        "2. send g3 (delta from g2, append)",
        "   base g2 (youngest shared ancestor); appended after g2",
    ]
    assert as_json(steps[1]) == {"id": "g3", "base": "g2", "position": "append", "after": "g2",
                                 "before": None, "reason": steps[1].reason}
    full = plan(lineage, [], want=["g2"])
    assert render(full).splitlines()[0] == "1. send g2 (full, append)"
    assert render(full, sizes={"g2": (12_345_678, True)}).splitlines()[0] == "1. send g2 (full, append): 11.8 MiB changed"
    assert render(steps, sizes={"g3": (2_000_000, False)}).splitlines()[1] == \
        "2. send g3 (delta from g2, append): at most 1.9 MiB changed"
    assert as_json(steps[1], (2_000_000, False)) | {"reason": ""} == {
        "id": "g3", "base": "g2", "position": "append", "after": "g2", "before": None, "reason": "",
        "bytes_changed": 2_000_000, "tracked": False}


# --- property test ----------------------------------------------------------------------------

@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[SourceSnapshot], list[HeldSnapshot], list[str] | None, bool]:
    n = draw(st.integers(1, 12))
    lineage: list[SourceSnapshot] = []
    for i in range(n):
        # A tree (reverts and failovers fork it), generation i + 1, a clock that may go anywhere.
        parent = draw(st.one_of(st.none(), st.sampled_from([s.id for s in lineage]))) if lineage else None
        lineage.append(SourceSnapshot(f"s{i}", parent, draw(st.integers(0, 50)), i + 1,
                                      on_source=draw(st.booleans()), tracked=draw(st.booleans())))
    held_ids = draw(st.lists(st.sampled_from([s.id for s in lineage]), unique=True))
    held = [HeldSnapshot(s.id, s.created_ns, s.generation) for s in lineage if s.id in held_ids]
    # Snapshots the source forgot; generations may equal the lineage's (then created_ns decides).
    for j in range(draw(st.integers(0, 3))):
        held.append(HeldSnapshot(f"x{j}", draw(st.integers(0, 50)), draw(st.integers(1, n + 1))))
    sendable = [s.id for s in lineage if s.on_source]
    want = draw(st.one_of(st.none(), st.lists(st.sampled_from(sendable), unique=True))) if sendable else None
    return lineage, held, want, draw(st.booleans())


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_plan_properties(scenario: tuple) -> None:
    lineage, held, want, latest_first = scenario
    by_id = {s.id: s for s in lineage}
    age = {h.id: (h.generation, h.created_ns, h.id) for h in held}
    age |= {s.id: (s.generation, s.created_ns, s.id) for s in lineage}

    def ancestors(snap: SourceSnapshot) -> list[str]:
        out, parent = [], snap.parent
        while parent is not None:
            out.append(parent)
            parent = by_id[parent].parent
        return out

    steps = plan(lineage, held, want=want, latest_first=latest_first)
    holdings = {h.id for h in held}
    sends = [s for s in steps if not s.skip]
    expected = ({s.id for s in lineage if s.on_source} if want is None else set(want)) - holdings
    assert sorted(s.snapshot for s in sends) == sorted(expected)
    assert {s.snapshot for s in steps if s.skip} == (set() if want is None else set(want) & holdings)
    order = [age[s.snapshot] for s in sends]
    if latest_first and order:
        assert order[0] == max(order)
        order = order[1:]
    assert order == sorted(order)
    for step in sends:
        snap = by_id[step.snapshot]
        usable = [a for a in ancestors(snap) if a in holdings and by_id[a].tracked]
        if step.base is None:
            assert usable == []
        else:
            assert step.base in usable
            assert all(age[a] <= age[step.base] for a in usable)
        older = [h for h in holdings if age[h] < age[snap.id]]
        younger = [h for h in holdings if age[h] > age[snap.id]]
        assert step.after == max(older, key=age.__getitem__, default=None)
        assert step.before == min(younger, key=age.__getitem__, default=None)
        assert step.position == ("insert" if younger else "append")
        holdings.add(snap.id)


def test_worked_example_of_docs_planning() -> None:
    lineage = chain(("g1", 1), ("g2", 2, {"on": False}), ("g3", 3, {"on": False, "tracked": False}),
                    ("g4", 4), ("g5", 5, {"t": 3500}), ("g6", 6))
    steps = plan(lineage, holding(lineage, "g1", "g2", "g3", "g6"))
    assert triples(steps) == [("g4", "g2", "g3", "g6"), ("g5", "g4", "g4", "g6")]
    assert steps[0].reason == (
        "base g2 (youngest shared ancestor; deleted on the source but still tracked; younger than g1, its parent"
        " on the source: smaller delta); g3 deleted on the source and no longer tracked; inserted after g3,"
        " before g6 (g6 is rebased onto it)")
    later = plan(lineage, holding(lineage, "g1"), latest_first=True)
    assert triples(later) == [("g6", "g1", "g1", None), ("g4", "g1", "g1", "g6"), ("g5", "g4", "g4", "g6")]


def test_walk_continues_past_an_ancestor_the_source_lacks() -> None:
    # This source received g3 but never g2 (an interrupted --latest-first backfill, or --snapshot g3);
    # the destination holds g2 and says its parent is g1, which the source has: g1 is the base, not a full send.
    lineage = [src("g1", 1), src("g3", 3, "g2")]
    held = [HeldSnapshot("g1", 1000, 1), HeldSnapshot("g2", 2000, 2, parent="g1")]
    steps = plan(lineage, held)
    assert triples(steps) == [("g3", "g1", "g2", None)]
    assert "g2 unknown to the source" in steps[0].reason
    # A destination that reports a cycle does not hang the walk.
    assert triples(plan([src("g3", 3, "g2")], [HeldSnapshot("g2", 2000, 2, parent="g2")])) == [("g3", None, "g2", None)]
    # nor does one that names a younger snapshot as the parent lead to a younger base
    lineage = [src("g3", 3, "g2"), src("g4", 4, "g3")]
    held = [HeldSnapshot("g2", 2000, 2, parent="g4"), HeldSnapshot("g4", 4000, 4)]
    assert triples(plan(lineage, held, want=["g3"])) == [("g3", None, "g2", "g4")]
