"""Directories are made durably: each new one fsynced into its parent, so a file renamed into it survives
a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmrepl import state


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The directories fsynced, in order."""
    calls: list[Path] = []
    real = state.fsync_dir
    monkeypatch.setattr(state, "fsync_dir", lambda path: (calls.append(Path(path)), real(path)))
    return calls


def test_each_new_directory_is_fsynced_into_its_parent(tmp_path: Path, synced: list[Path]) -> None:
    made = state.make_dir_durably(tmp_path / "a" / "b" / "c")
    assert made == tmp_path / "a" / "b" / "c" and made.is_dir()
    assert synced == [tmp_path, tmp_path / "a", tmp_path / "a" / "b"]


def test_an_existing_directory_costs_no_fsync(tmp_path: Path, synced: list[Path]) -> None:
    (tmp_path / "a").mkdir()
    assert state.make_dir_durably(tmp_path / "a") == tmp_path / "a"
    assert state.make_dir_durably(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert synced == [tmp_path / "a"]


def test_the_state_dir_and_its_locks_are_made_durably(tmp_path: Path, synced: list[Path]) -> None:
    root = state.resolve_state_dir(str(tmp_path / "state"))
    with state.vm_lock(root, "6a1c1a55-2f7e-4c1b-9d7e-0f1e2d3c4b5a"):
        pass
    assert synced == [tmp_path, root]
