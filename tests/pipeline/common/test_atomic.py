"""Tests for pipeline.common.atomic: the old file or the new one, never a partial one; no stray temporary file."""

from __future__ import annotations

import json
import os
import stat

import pandas as pd
import pytest

from pipeline.common import atomic


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "sub" / "state.json"
    atomic.write_json(p, {"a": 1})
    atomic.write_json(p, {"a": 2}, indent=1)
    assert json.loads(p.read_text()) == {"a": 2}
    assert os.listdir(p.parent) == ["state.json"]
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    p = tmp_path / "t.txt"
    atomic.write_text(p, "old")
    with pytest.raises(RuntimeError), atomic.atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["t.txt"]


def test_temporary_is_hidden_beside_the_target_and_mode_is_applied(tmp_path):
    p = tmp_path / "obj"
    with atomic.atomic_path(p, mode=0o444, fsync=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(atomic.TMP_PREFIX) and tmp.name.endswith("-obj")
        tmp.write_bytes(b"x")
    assert stat.S_IMODE(p.stat().st_mode) == 0o444 and p.read_bytes() == b"x"


def test_parquet_round_trip(tmp_path):
    df = pd.DataFrame({"image_id": ["a", "b"], "score": [0.5, 1.5]})
    atomic.write_parquet(tmp_path / "s.parquet", df)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "s.parquet"), df)


def test_replace_dir_publishes_the_new_folder_and_removes_the_old(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "old.txt").write_text("old")
    tmp = tmp_path / ".tmp-bundle"
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    assert atomic.replace_dir(tmp, target) == target
    assert os.listdir(target) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["bundle"]  # neither the temporary nor the old copy is left


def test_replace_dir_without_an_old_folder(tmp_path):
    tmp = tmp_path / ".tmp-x"
    tmp.mkdir()
    atomic.replace_dir(tmp, tmp_path / "x")
    assert sorted(os.listdir(tmp_path)) == ["x"]
