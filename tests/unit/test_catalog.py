"""The catalog keeps what it is given across reopening and refuses a schema newer than it knows."""

from __future__ import annotations

import sqlite3

import pytest

from vmrepl.catalog import MIGRATIONS, SCHEMA_VERSION, Catalog, Layer, Snapshot
from vmrepl.errors import StateError

VM_UUID = "5a1c3e0e-5b8e-4a5e-9d64-7d1f0e3b2a10"


def snapshot(sid: str, parent: str | None, generation: int) -> Snapshot:
    return Snapshot(
        id=sid, vm_uuid=VM_UUID, vm_name="web", name=f"snap-{generation}", parent=parent,
        created_ns=1_700_000_000_000_000_000 + generation, generation=generation, origin="local",
        disks=(Layer("vda", f"/images/web-{generation}.vda.qcow2", 8 << 30),
               Layer("vdb", f"/images/web-{generation}.vdb.qcow2", 1 << 30)),
        definition="<domain/>",
    )


def test_catalog_round_trips_snapshots_layers_and_targets(tmp_path):
    first, second = snapshot("id-1", None, 1), snapshot("id-2", "id-1", 2)
    with Catalog(tmp_path) as catalog:
        catalog.add_snapshot(second)
        catalog.add_snapshot(first)
        catalog.record_target(VM_UUID, "root@dst", anchor="id-1", result="ok", run_ns=42)

    with Catalog(tmp_path) as catalog:
        assert catalog.snapshots(VM_UUID) == [first, second]
        assert catalog.snapshot(VM_UUID, "snap-2").disk("vdb") == second.disks[1]
        assert catalog.vm_uuid("web") == VM_UUID
        [target] = catalog.targets(VM_UUID)
        assert (target.host, target.anchor, target.last_result, target.last_run_ns) == ("root@dst", "id-1", "ok", 42)
        assert catalog.next_generation(VM_UUID) == 3
        assert catalog.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert catalog.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def newer_catalog(state_dir) -> None:
    Catalog(state_dir).db.close()
    db = sqlite3.connect(state_dir / Catalog.FILENAME)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()


def test_catalog_refuses_a_newer_schema(tmp_path):
    newer_catalog(tmp_path)
    with pytest.raises(StateError, match="newer than this vmrepl knows"):
        Catalog(tmp_path)


def test_cli_refuses_a_newer_catalog_in_one_line(src_state, run_vmrepl):
    newer_catalog(src_state)
    result = run_vmrepl("status", check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"schema version {SCHEMA_VERSION + 1}" in result.stderr and "upgrade vmrepl" in result.stderr


def test_version_5_marks_received_layers_as_holding_only_their_changes(tmp_path):
    """A catalog written by a vmrepl of schema 4 keeps its rows; received layers become 'clusters'."""
    db = sqlite3.connect(tmp_path / Catalog.FILENAME)
    for script in MIGRATIONS[:4]:
        db.executescript(script)
    db.execute("PRAGMA user_version = 4")
    db.execute("INSERT INTO vms VALUES (?, 'web')", (VM_UUID,))
    for sid, origin, tracking in [("id-1", "received", "bitmap"), ("id-2", "local", "bitmap"),
                                  ("id-3", "local", "allocation")]:
        db.execute("INSERT INTO snapshots(id, vm_uuid, name, created_ns, generation, origin) VALUES (?, ?, ?, 1, 1, ?)",
                   (sid, VM_UUID, sid, origin))
        db.execute("INSERT INTO layers VALUES (?, 'vda', ?, 1024, ?)", (sid, f"/images/{sid}.qcow2", tracking))
    db.commit()
    db.close()

    with Catalog(tmp_path) as catalog:
        assert [catalog.layer_tracking(f"/images/{sid}.qcow2") for sid in ["id-1", "id-2", "id-3"]] == \
            ["clusters", "bitmap", "allocation"]
        assert catalog.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert catalog.db.execute("PRAGMA foreign_key_check").fetchall() == []
        with pytest.raises(sqlite3.IntegrityError):  # the constraint still holds after the rebuild
            catalog.db.execute("UPDATE layers SET tracking = 'guess'")
