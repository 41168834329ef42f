"""Replication planning: which snapshots to send, in what order, each against which base, and where
each one lands in the destination's sequence. Pure logic, no I/O; docs/PLANNING.md states the rules.

Age order: `(clone depth of the snapshot's VM, generation, created_ns, id)`. Within one VM the
generation decides, so a skewed wall clock cannot reorder snapshots; created_ns only breaks equal
generations (two hosts that both took snapshots after a failover), the id makes the order total.
Across a clone the ancestry decides: the VM a clone was made from sorts before the clone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass

from .errors import NotFoundError, StateError, UsageError
from .units import human_bytes

Age = tuple[int, int, int, str]

_CATALOG_HINT = "the source catalog is inconsistent; check `vmrepl list VM`"


@dataclass(frozen=True)
class SourceSnapshot:
    """One snapshot of the source's lineage (for a clone, also the snapshots it descends from)."""

    id: str
    parent: str | None
    created_ns: int
    generation: int
    on_source: bool = True  # its data is still on the source, so it can be sent
    tracked: bool = True  # the source can still tell what changed from it to its descendants
    vm: str = ""  # VM uuid; only the ancestors of a clone differ from the VM being planned
    name: str = ""


@dataclass(frozen=True)
class HeldSnapshot:
    """A snapshot the destination holds of this VM (or a clone's origin snapshot, if in the lineage)."""

    id: str
    created_ns: int
    generation: int
    name: str = ""
    parent: str | None = None  # as the destination recorded it: links the walk past snapshots the source lacks


@dataclass(frozen=True)
class Step:
    """Send `snapshot` as a delta from `base` (None: full sparse send) between `after` and `before`
    in the destination's sequence (None: no such neighbour). `skip`: wanted but already held."""

    snapshot: str
    base: str | None
    after: str | None
    before: str | None
    reason: str
    skip: bool = False

    @property
    def position(self) -> str:
        """'append' (nothing younger held), 'insert' (the `before` layer gets rebased) or 'skip'."""
        if self.skip:
            return "skip"
        return "insert" if self.before is not None else "append"


def plan(lineage: Sequence[SourceSnapshot], held: Sequence[HeldSnapshot], *,
         want: Sequence[str] | None = None, latest_first: bool = False,
         pruned: Set[str] = frozenset()) -> list[Step]:
    """The steps that bring the destination from `held` to holding `want` (default: every snapshot of
    the planned VM that is on the source, not held and not `pruned` on the destination), oldest
    first, or with `latest_first` the newest first and then the rest oldest first. Skip steps
    (wanted ids already held) come first."""
    tree = _Lineage(lineage, {h.id: h.parent for h in held})
    holdings = {h.id: tree.held_age(h) for h in held}
    labels = {h.id: h.name or h.id for h in held} | {s.id: s.name or s.id for s in lineage}
    skips: list[Step] = []
    if want is None:
        todo = [s for s in lineage if s.on_source and s.id not in holdings and s.id not in pruned and tree.is_planned(s)]
    else:
        todo = []
        for ref in dict.fromkeys(want):
            snap = tree.snaps.get(ref)
            if snap is None:
                raise NotFoundError(f"no snapshot {ref!r} in this VM's lineage on the source",
                                    hint="see `vmrepl list VM` for snapshot ids")
            if ref in holdings:
                skips.append(Step(ref, None, None, None, "already held by the destination", skip=True))
            elif not snap.on_source:
                raise NotFoundError(f"snapshot {labels[ref]} was deleted on the source",
                                    hint="pick one that `vmrepl list VM` shows")
            elif not tree.is_planned(snap):
                raise UsageError(f"snapshot {labels[ref]} belongs to VM {snap.vm}, which this VM was cloned from",
                                 hint="replicate that VM to send it")
            else:
                todo.append(snap)
    todo.sort(key=tree.age)
    if latest_first and todo:
        todo.insert(0, todo.pop())
    steps = skips
    for snap in todo:
        steps.append(_step(tree, snap, holdings, labels))
        holdings[snap.id] = tree.age(snap)
    return steps


def _step(tree: _Lineage, snap: SourceSnapshot, holdings: dict[str, Age], labels: dict[str, str]) -> Step:
    # Ancestors come nearest first, which is youngest first (_Lineage checks every parent is older).
    notes: list[str] = []
    base: SourceSnapshot | None = None
    for ancestor in tree.ancestors(snap):
        if ancestor not in holdings:
            continue
        known = tree.snaps.get(ancestor)
        if known is None:
            notes.append(f"{labels[ancestor]} unknown to the source, which cannot diff from it")
        elif tree.age(known) >= tree.age(snap):  # reached through a destination's inconsistent parent
            break
        elif not known.tracked:
            lost = "its change tracking is lost on the source" if known.on_source else \
                "deleted on the source and no longer tracked"
            notes.append(f"{labels[ancestor]} {lost}")
        else:
            base = known
            break
    if base is None:
        why = "no shared ancestor the source can diff from" if notes else "no shared ancestor"
        head = f"full sparse send: {why}"
    else:
        details = ["youngest shared ancestor"]
        if base.vm != snap.vm:
            details.append("from the VM this one was cloned from")
        if not base.on_source:
            details.append("deleted on the source but still tracked")
        parent = next((a for a in tree.ancestors(snap) if a in tree.snaps and tree.snaps[a].on_source), None)
        if parent is not None and tree.age(tree.snaps[parent]) < tree.age(base):
            details.append(f"younger than {labels[parent]}, its parent on the source: smaller delta")
        head = f"base {labels[base.id]} ({'; '.join(details)})"
    age = tree.age(snap)
    after = max((h for h in holdings if holdings[h] < age), key=holdings.__getitem__, default=None)
    before = min((h for h in holdings if holdings[h] > age), key=holdings.__getitem__, default=None)
    if before is not None:
        where = f"after {labels[after]}, " if after is not None else "at the start, "
        place = f"inserted {where}before {labels[before]} ({labels[before]} is rebased onto it)"
    elif after is not None:
        place = f"appended after {labels[after]}"
    else:
        place = "first on the destination"
    return Step(snap.id, base.id if base else None, after, before, "; ".join([head, *notes, place]))


class _Lineage:
    """The source lineage indexed by id, with each VM's clone depth; rejects an inconsistent one."""

    def __init__(self, lineage: Sequence[SourceSnapshot], held_parents: Mapping[str, str | None]) -> None:
        self.held_parents = held_parents  # each held snapshot's parent, as the destination recorded it
        self.snaps: dict[str, SourceSnapshot] = {}
        for snap in lineage:
            if snap.id in self.snaps:
                raise StateError(f"snapshot {snap.id} appears twice in the lineage", hint=_CATALOG_HINT)
            self.snaps[snap.id] = snap
        depth = self._clone_depths()
        self.rank: dict[str, int] = {}
        for snap in lineage:
            self.rank[snap.vm] = max(self.rank.get(snap.vm, 0), depth[snap.id])
        self.planned_rank = max(self.rank.values(), default=0)
        planned = sorted(vm for vm, rank in self.rank.items() if rank == self.planned_rank)
        if len(planned) > 1:
            raise StateError(f"the lineage mixes unrelated VMs {', '.join(planned)}", hint=_CATALOG_HINT)
        for snap in lineage:
            parent = self.snaps.get(snap.parent or "")
            if parent is not None and self.age(parent) >= self.age(snap):
                raise StateError(f"snapshot {snap.id} is not younger than its parent {parent.id}",
                                 hint=_CATALOG_HINT)

    def _clone_depths(self) -> dict[str, int]:
        """Per snapshot, how many clone boundaries (VM changes) lie between it and its root."""
        depth: dict[str, int] = {}
        for start in self.snaps.values():
            path: dict[str, SourceSnapshot] = {}
            node: SourceSnapshot | None = start
            while node is not None and node.id not in depth:
                if node.id in path:
                    raise StateError(f"snapshot {node.id} is its own ancestor", hint=_CATALOG_HINT)
                path[node.id] = node
                node = self.snaps.get(node.parent or "")
            for node in reversed(path.values()):
                parent = self.snaps.get(node.parent or "")
                depth[node.id] = 0 if parent is None else depth[parent.id] + (parent.vm != node.vm)
        return depth

    def age(self, snap: SourceSnapshot) -> Age:
        return (self.rank[snap.vm], snap.generation, snap.created_ns, snap.id)

    def held_age(self, held: HeldSnapshot) -> Age:
        """The source's record decides; one it no longer has is taken as the planned VM's."""
        if held.id in self.snaps:
            return self.age(self.snaps[held.id])
        return (self.planned_rank, held.generation, held.created_ns, held.id)

    def is_planned(self, snap: SourceSnapshot) -> bool:
        """True for the VM being planned, False for the VMs it was cloned from."""
        return self.rank[snap.vm] == self.planned_rank

    def ancestors(self, snap: SourceSnapshot) -> Iterator[str]:
        """Ids of the ancestors, nearest first; past one the source does not know, the walk follows the
        parent the destination recorded for it, and ends where neither knows more."""
        parent, seen = snap.parent, {snap.id}
        while parent is not None and parent not in seen:
            seen.add(parent)
            yield parent
            known = self.snaps.get(parent)
            parent = known.parent if known is not None else self.held_parents.get(parent)


def render(steps: Sequence[Step], names: Mapping[str, str] | None = None,
           sizes: Mapping[str, tuple[int, bool]] | None = None) -> str:
    """The plan as `vmrepl replicate --dry-run` prints it; `names` shows snapshots by name, not id;
    `sizes` adds each step's changed bytes (and whether change tracking could tell, see `as_json`)."""
    if not steps:
        return "nothing to send: the destination holds every snapshot"
    label = (lambda sid: names.get(sid, sid)) if names else (lambda sid: sid)
    lines = []
    for n, step in enumerate(steps, 1):
        if step.skip:
            lines.append(f"{n}. skip {label(step.snapshot)}: {step.reason}")
            continue
        source = f"delta from {label(step.base)}" if step.base else "full"
        size = ""
        if sizes and step.snapshot in sizes:
            changed, tracked = sizes[step.snapshot]
            size = f": {'' if tracked else 'at most '}{human_bytes(changed)} changed"
        lines.append(f"{n}. send {label(step.snapshot)} ({source}, {step.position}){size}")
        lines.append(f"   {step.reason}")
    return "\n".join(lines)


def as_json(step: Step, size: tuple[int, bool] | None = None) -> dict:
    """One step as JSON; with `size`, `bytes_changed` as `replicate` will count it and `tracked`: false
    when change tracking cannot tell (bytes_changed is then all the data the snapshot holds, and the
    send compares digests with the destination to send only the blocks that differ)."""
    out = {"id": step.snapshot, "base": step.base, "position": step.position,
           "after": step.after, "before": step.before, "reason": step.reason}
    if size is not None:
        out["bytes_changed"], out["tracked"] = size
    return out
