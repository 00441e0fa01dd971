"""qembed.files: atomic writes and owned output folders."""

from __future__ import annotations

import pytest

from qembed.errors import QembedError
from qembed.files import (
    MARKER,
    atomic_open,
    atomic_write_json,
    claim_output_dir,
    is_owned,
    remove_owned_dir,
)


def test_atomic_write_replaces_and_failed_write_keeps_old(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"step": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write('{"step": 2')
            raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "step": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary file left


def test_claim_output_dir_refuses_a_users_folder_and_accepts_its_own(tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with pytest.raises(QembedError, match="--output .*not empty"):
        claim_output_dir(users, "eval")
    assert not (users / MARKER).exists()
    assert not remove_owned_dir(users)  # no marker: never removed
    assert (users / "notes.txt").read_text() == "mine"

    ours = claim_output_dir(tmp_path / "new", "eval")
    (ours / "report.md").write_text("x")
    assert claim_output_dir(ours, "eval") == ours  # the same verb comes back to its own folder
    with pytest.raises(QembedError):
        claim_output_dir(ours, "adapt")  # another verb's output is not adapt's
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "state.json").write_text("{}")
    claim_output_dir(legacy, "adapt", also_ours=("state.json",))
    assert is_owned(legacy, "adapt")
    assert remove_owned_dir(ours, "eval") and not ours.exists()
