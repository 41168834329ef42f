"""The catalog: one SQLite database (WAL) per host with VMs, snapshots, their disk layers and
replication targets.

A snapshot row and its layer rows are written in one transaction, after the files they name are
durable; so a row never names a file that is not there. The schema version is SQLite's
`user_version`; `MIGRATIONS[i]` takes a catalog from version i to i + 1.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import NotFoundError, StateError

MIGRATIONS: list[str] = [
    """
    CREATE TABLE vms (
        uuid        TEXT PRIMARY KEY,
        name        TEXT NOT NULL
    );
    CREATE INDEX vms_name ON vms(name);
    CREATE TABLE snapshots (
        id          TEXT PRIMARY KEY,
        vm_uuid     TEXT NOT NULL REFERENCES vms(uuid),
        name        TEXT NOT NULL,
        parent      TEXT,
        created_ns  INTEGER NOT NULL,
        generation  INTEGER NOT NULL,
        origin      TEXT NOT NULL CHECK (origin IN ('local', 'received')),
        definition  TEXT NOT NULL DEFAULT '',
        UNIQUE (vm_uuid, name)
    );
    CREATE INDEX snapshots_age ON snapshots(vm_uuid, generation, created_ns);
    CREATE TABLE layers (
        snapshot_id  TEXT NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
        target       TEXT NOT NULL,
        image        TEXT NOT NULL,
        virtual_size INTEGER NOT NULL,
        tracking     TEXT NOT NULL DEFAULT 'bitmap' CHECK (tracking IN ('bitmap', 'allocation')),
        PRIMARY KEY (snapshot_id, target)
    );
    CREATE TABLE targets (
        vm_uuid      TEXT NOT NULL REFERENCES vms(uuid),
        host         TEXT NOT NULL,
        anchor       TEXT REFERENCES snapshots(id),
        last_result  TEXT NOT NULL DEFAULT '',
        last_run_ns  INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (vm_uuid, host)
    );
    """,
    # A snapshot pruned on this host but still held elsewhere stays as a row with held = 0 (a "ghost"):
    # its layers then name where it stood in the chain (the layer below it, '' below the bottom), so that
    # a delta from it, a superset of the true one, can still be computed.
    """
    ALTER TABLE snapshots ADD COLUMN held INTEGER NOT NULL DEFAULT 1;
    """,
    # An active image whose `vmrepl` bitmap was started afresh (the old one was missing or broken) misses
    # the writes made before: recorded before the bitmap is replaced, dropped when the image is frozen
    # into a snapshot (whose layer row then says 'allocation'). Until then nothing trusts its bitmap.
    """
    CREATE TABLE untracked_images (
        image       TEXT PRIMARY KEY
    );
    """,
    # A prune on the source merges the next younger snapshot's layer (`top`) into the pruned one's
    # (`base`), disk by disk; the row, written with the pruned snapshot turning into a ghost before any
    # layer changes, lets a later run finish a merge that a crash interrupted (source/prune.py).
    """
    CREATE TABLE merges (
        gone_id     TEXT NOT NULL REFERENCES snapshots(id),
        younger_id  TEXT NOT NULL REFERENCES snapshots(id),
        target      TEXT NOT NULL,
        base        TEXT NOT NULL,
        top         TEXT NOT NULL,
        recorded    INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (gone_id, target)
    );
    """,
    # A third kind of layer: 'clusters', a file that holds exactly its snapshot's changes against the
    # layer below (a received layer, or one that a source prune merged a younger layer into). Its own
    # clusters are then the right way to read its changes, not a fallback for a lost bitmap. SQLite
    # cannot change a CHECK constraint in place: the table is rebuilt (nothing references it).
    """
    CREATE TABLE layers_v5 (
        snapshot_id  TEXT NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
        target       TEXT NOT NULL,
        image        TEXT NOT NULL,
        virtual_size INTEGER NOT NULL,
        tracking     TEXT NOT NULL DEFAULT 'bitmap' CHECK (tracking IN ('bitmap', 'allocation', 'clusters')),
        PRIMARY KEY (snapshot_id, target)
    );
    INSERT INTO layers_v5 SELECT l.snapshot_id, l.target, l.image, l.virtual_size,
        CASE WHEN s.origin = 'received' THEN 'clusters' ELSE l.tracking END
        FROM layers l JOIN snapshots s ON s.id = l.snapshot_id;
    DROP TABLE layers;
    ALTER TABLE layers_v5 RENAME TO layers;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class Layer:
    """One disk of a snapshot: `image` reads (through its backing chain) as that disk then."""

    target: str
    image: str
    virtual_size: int
    # 'bitmap': the file's `vmrepl` bitmap holds every write made while it was the active layer;
    # 'allocation': it may not (tracking was lost or rebuilt), so its allocation map stands in;
    # 'clusters': the file holds exactly its changes against the layer below (see MIGRATIONS[4]).
    tracking: str = "bitmap"


@dataclass(frozen=True)
class Snapshot:
    id: str
    vm_uuid: str
    vm_name: str
    name: str
    parent: str | None
    created_ns: int
    generation: int
    origin: str
    disks: tuple[Layer, ...] = field(default=())
    definition: str = ""
    held: bool = True  # False: pruned here, kept only as a delta base position (see MIGRATIONS[1])

    def disk(self, target: str) -> Layer:
        for layer in self.disks:
            if layer.target == target:
                return layer
        raise NotFoundError(f"snapshot {self.name} has no disk {target!r}",
                            hint=f"its disks are {', '.join(d.target for d in self.disks) or 'none'}")

    def as_json(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "vm": self.vm_name,
            "vm_uuid": self.vm_uuid,
            "parent": self.parent,
            "created_ns": self.created_ns,
            "generation": self.generation,
            "disks": [{"target": d.target, "image": d.image, "virtual_size": d.virtual_size} for d in self.disks],
        }


@dataclass(frozen=True)
class Merge:
    """One disk of a source prune in progress: `top` (the younger snapshot's layer) merges into `base`."""

    gone_id: str
    younger_id: str
    target: str
    base: str
    top: str
    recorded: bool = False  # the catalog already names `base` for the younger snapshot


@dataclass(frozen=True)
class Target:
    vm_uuid: str
    host: str
    anchor: str | None
    last_result: str
    last_run_ns: int


class Catalog:
    """Access to STATE/catalog.sqlite; use as a context manager."""

    FILENAME = "catalog.sqlite"

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / self.FILENAME
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as err:
            raise StateError(f"cannot open catalog {self.path}: {err}",
                             hint="check the state dir, or restore the catalog from a copy") from err

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StateError(
                f"catalog {self.path} has schema version {version}, newer than this vmrepl knows ({SCHEMA_VERSION})",
                hint="upgrade vmrepl",
            )
        for target in range(version, SCHEMA_VERSION):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(MIGRATIONS[target]):
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version={target + 1}")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    # --- VMs -------------------------------------------------------------------------------

    def upsert_vm(self, uuid: str, name: str) -> None:
        self.db.execute(
            "INSERT INTO vms(uuid, name) VALUES (?, ?) ON CONFLICT(uuid) DO UPDATE SET name = excluded.name",
            (uuid, name),
        )

    def vm_uuid(self, name_or_uuid: str) -> str | None:
        row = self.db.execute(
            "SELECT uuid FROM vms WHERE uuid = ? OR name = ? ORDER BY uuid = ? DESC LIMIT 1",
            (name_or_uuid, name_or_uuid, name_or_uuid),
        ).fetchone()
        return row[0] if row else None

    def vms(self) -> list[tuple[str, str]]:
        return list(self.db.execute("SELECT uuid, name FROM vms ORDER BY name"))

    # --- snapshots ---------------------------------------------------------------------------

    def add_snapshot(self, snap: Snapshot) -> None:
        """Record a snapshot and its layers in one transaction (the files must already be durable)."""
        with self.transaction():
            self.upsert_vm(snap.vm_uuid, snap.vm_name)
            # A snapshot pruned here and now sent again replaces its ghost.
            self.db.execute("DELETE FROM layers WHERE snapshot_id IN (SELECT id FROM snapshots WHERE id = ? AND NOT held)",
                            (snap.id,))
            self.db.execute("DELETE FROM snapshots WHERE id = ? AND NOT held", (snap.id,))
            self.db.execute(
                "INSERT INTO snapshots(id, vm_uuid, name, parent, created_ns, generation, origin, definition)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (snap.id, snap.vm_uuid, snap.name, snap.parent, snap.created_ns, snap.generation, snap.origin,
                 snap.definition),
            )
            self.db.executemany(
                "INSERT INTO layers(snapshot_id, target, image, virtual_size, tracking) VALUES (?, ?, ?, ?, ?)",
                [(snap.id, d.target, d.image, d.virtual_size, d.tracking) for d in snap.disks],
            )
            self.db.executemany("DELETE FROM untracked_images WHERE image = ?", [(d.image,) for d in snap.disks])

    def mark_untracked(self, image: str) -> None:
        """Record, durably, that the active image's bitmap is about to start afresh (see MIGRATIONS[2])."""
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO untracked_images(image) VALUES (?)", (image,))

    def is_untracked(self, image: str) -> bool:
        return self.db.execute("SELECT 1 FROM untracked_images WHERE image = ?", (image,)).fetchone() is not None

    def ghost_ids(self, vm_uuid: str, *, since_generation: int = 0) -> list[str]:
        """Ids of the VM's snapshots pruned here, of generation `since_generation` or younger (one query:
        the receiver lists them in every hello)."""
        return [r[0] for r in self.db.execute(
            "SELECT id FROM snapshots WHERE vm_uuid = ? AND NOT held AND generation >= ? ORDER BY generation, created_ns",
            (vm_uuid, since_generation))]

    def snapshots(self, vm_uuid: str, *, ghosts: bool = False) -> list[Snapshot]:
        """The VM's snapshots held here (with `ghosts`, pruned ones too), oldest first (by generation,
        then creation time)."""
        rows = self.db.execute(
            "SELECT s.id FROM snapshots s WHERE s.vm_uuid = ? AND (s.held OR ?) ORDER BY s.generation, s.created_ns",
            (vm_uuid, ghosts),
        ).fetchall()
        return [self._load(r[0]) for r in rows]

    def snapshot(self, vm_uuid: str, ref: str) -> Snapshot:
        """A snapshot of the VM by id, unique id prefix, or name."""
        rows = self.db.execute(
            "SELECT id FROM snapshots WHERE vm_uuid = ? AND held AND (id = ? OR name = ? OR id LIKE ? || '%')"
            " ORDER BY id = ? DESC, name = ? DESC",
            (vm_uuid, ref, ref, ref.replace("%", "").replace("_", ""), ref, ref),
        ).fetchall()
        if not rows:
            raise NotFoundError(f"no snapshot {ref!r} of this VM here", hint="see `vmrepl list VM`")
        return self._load(rows[0][0])

    def find_snapshot(self, snapshot_id: str) -> Snapshot | None:
        row = self.db.execute("SELECT id FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
        return self._load(row[0]) if row else None

    def next_generation(self, vm_uuid: str) -> int:
        row = self.db.execute("SELECT MAX(generation) FROM snapshots WHERE vm_uuid = ?", (vm_uuid,)).fetchone()
        return (row[0] or 0) + 1

    def begin_merge(self, gone: Snapshot, younger: Snapshot, below: dict[str, str]) -> None:
        """Before a prune on the source changes any layer: `gone` becomes a ghost standing on the `below`
        images ('' where its layer is the bottom of its chain: then everything in the chain is newer),
        as do the ghosts that stood on its layers, and the merge of `younger`'s layers into them is
        recorded as pending. From here on `gone` is not visible, so its layers may change."""
        ghosts = "snapshot_id IN (SELECT id FROM snapshots WHERE NOT held)"
        with self.transaction():
            for layer in gone.disks:
                self.db.execute(f"UPDATE layers SET image = ? WHERE image = ? AND {ghosts}", (below[layer.target], layer.image))
            self.db.execute("UPDATE snapshots SET held = 0 WHERE id = ?", (gone.id,))
            self.db.execute("DELETE FROM layers WHERE snapshot_id = ?", (gone.id,))
            self.db.executemany("INSERT INTO layers(snapshot_id, target, image, virtual_size, tracking)"
                                " VALUES (?, ?, ?, ?, 'allocation')",
                                [(gone.id, d.target, below[d.target], d.virtual_size) for d in gone.disks])
            self.db.executemany("INSERT INTO merges(gone_id, younger_id, target, base, top) VALUES (?, ?, ?, ?, ?)",
                                [(gone.id, younger.id, d.target, d.image, younger.disk(d.target).image)
                                 for d in gone.disks])

    def pending_merges(self, vm_uuid: str) -> list[Merge]:
        rows = self.db.execute("SELECT m.gone_id, m.younger_id, m.target, m.base, m.top, m.recorded FROM merges m"
                               " JOIN snapshots s ON s.id = m.gone_id WHERE s.vm_uuid = ? ORDER BY s.generation, m.target",
                               (vm_uuid,))
        return [Merge(*row[:5], recorded=bool(row[5])) for row in rows]

    def record_merge(self, merges: list[Merge]) -> None:
        """Once the top layers are merged into the base layers: the younger snapshot owns the base
        images (their own clusters say what changed, not their bitmaps), and ghosts that stood on a top
        layer stand on its base."""
        ghosts = "snapshot_id IN (SELECT id FROM snapshots WHERE NOT held)"
        with self.transaction():
            for m in merges:
                self.db.execute("UPDATE layers SET image = ?, tracking = 'clusters' WHERE snapshot_id = ? AND target = ?",
                                (m.base, m.younger_id, m.target))
                self.db.execute(f"UPDATE layers SET image = ? WHERE image = ? AND {ghosts}", (m.base, m.top))
                self.db.execute("UPDATE merges SET recorded = 1 WHERE gone_id = ? AND target = ?", (m.gone_id, m.target))

    def end_merge(self, gone_id: str) -> None:
        """The top layers' files are gone: nothing is left to do for this prune."""
        with self.transaction():
            self.db.execute("DELETE FROM merges WHERE gone_id = ?", (gone_id,))

    def forget(self, gone: Snapshot) -> None:
        """Record that a received snapshot was pruned here: a ghost without layers, which tells senders
        not to send it again."""
        with self.transaction():
            self.db.execute("UPDATE snapshots SET held = 0 WHERE id = ?", (gone.id,))
            self.db.execute("DELETE FROM layers WHERE snapshot_id = ?", (gone.id,))

    def _load(self, snapshot_id: str) -> Snapshot:
        row = self.db.execute(
            "SELECT s.id, s.vm_uuid, v.name, s.name, s.parent, s.created_ns, s.generation, s.origin, s.definition,"
            " s.held"
            " FROM snapshots s JOIN vms v ON v.uuid = s.vm_uuid WHERE s.id = ?",
            (snapshot_id,),
        ).fetchone()
        disks = tuple(
            Layer(*r)
            for r in self.db.execute(
                "SELECT target, image, virtual_size, tracking FROM layers WHERE snapshot_id = ? ORDER BY target", (snapshot_id,)
            )
        )
        return Snapshot(*row[:8], disks=disks, definition=row[8], held=bool(row[9]))

    def snapshot_by_image(self, image: str) -> Snapshot | None:
        """The snapshot one of whose disks is this image file (a frozen layer, or a received layer)."""
        row = self.db.execute("SELECT l.snapshot_id FROM layers l JOIN snapshots s ON s.id = l.snapshot_id"
                              " WHERE l.image = ? AND s.held", (image,)).fetchone()
        return self._load(row[0]) if row else None

    def layer_tracking(self, image: str) -> str | None:
        """How a catalogued layer file's changes are read (`Layer.tracking`); None if not catalogued."""
        row = self.db.execute("SELECT l.tracking FROM layers l JOIN snapshots s ON s.id = l.snapshot_id"
                              " WHERE l.image = ? AND s.held", (image,)).fetchone()
        return row[0] if row else None

    # --- targets -------------------------------------------------------------------------------

    def targets(self, vm_uuid: str | None = None) -> list[Target]:
        if vm_uuid is None:
            rows = self.db.execute("SELECT vm_uuid, host, anchor, last_result, last_run_ns FROM targets")
        else:
            rows = self.db.execute(
                "SELECT vm_uuid, host, anchor, last_result, last_run_ns FROM targets WHERE vm_uuid = ?", (vm_uuid,)
            )
        return [Target(*r) for r in rows]

    def record_target(self, vm_uuid: str, host: str, *, anchor: str | None, result: str, run_ns: int) -> None:
        self.db.execute(
            "INSERT INTO targets(vm_uuid, host, anchor, last_result, last_run_ns) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(vm_uuid, host) DO UPDATE SET anchor = COALESCE(excluded.anchor, anchor),"
            " last_result = excluded.last_result, last_run_ns = excluded.last_run_ns",
            (vm_uuid, host, anchor, result, run_ns),
        )

    def anchors(self, vm_uuid: str) -> set[str]:
        return {r[0] for r in self.db.execute(
            "SELECT anchor FROM targets WHERE vm_uuid = ? AND anchor IS NOT NULL", (vm_uuid,))}

    # --- helpers -------------------------------------------------------------------------------

    def transaction(self) -> _Transaction:
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _statements(script: str) -> Iterator[str]:
    for part in script.split(";"):
        if part.strip():
            yield part
