"""Content-addressed store: keyed by sha256, idempotent, atomic."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.catalog.store import ContentStore, sha256_bytes


def test_put_layout_and_idempotence(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    data = b"\x89PNG fake bytes"
    sha = hashlib.sha256(data).hexdigest()
    obj = store.put(data, "PNG")
    assert obj.sha256 == sha and obj.written
    assert obj.relpath == f"{sha[:2]}/{sha[2:4]}/{sha}.png"
    assert obj.path.read_bytes() == data and store.exists(sha, "png")
    again = store.put(data, ".png", sha256=sha)
    assert not again.written and again.path == obj.path
    assert store.read(obj.relpath) == data and store.verify(obj.relpath)
    assert store.size_bytes() == (1, len(data))


def test_verify_detects_damage_and_missing(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    obj = store.put(b"abc", "bmp")
    obj.path.chmod(0o644)
    obj.path.write_bytes(b"abd")
    assert not store.verify(obj.relpath)
    assert not store.verify("00/00/" + "0" * 64 + ".png")


def test_temporary_files_are_not_counted(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    obj = store.put(b"xyz", "tif")
    (obj.path.parent / ".tmp-leftover").write_bytes(b"partial")
    assert store.size_bytes() == (1, 3)


def test_bad_keys_raise(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    with pytest.raises(ValueError, match="sha256"):
        store.relpath("ABC", "png")
    with pytest.raises(ValueError, match="extension"):
        store.relpath(sha256_bytes(b"x"), "../png")


def test_objects_are_read_only(tmp_path: Path) -> None:
    obj = ContentStore(tmp_path / "store").put(b"data", "png")
    assert obj.path.stat().st_mode & 0o222 == 0


def test_put_repairs_a_damaged_object_of_the_same_size(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    obj = store.put(b"good bytes", "png")
    obj.path.chmod(0o644)
    obj.path.write_bytes(b"bad! bytes")  # same size, wrong content
    again = store.put(b"good bytes", "png")
    assert again.written and again.repaired
    assert obj.path.read_bytes() == b"good bytes" and store.verify(obj.relpath)
    assert obj.path.stat().st_mode & 0o222 == 0
    assert not store.put(b"good bytes", "png").repaired

