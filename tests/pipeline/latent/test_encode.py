from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import pipeline.latent.encode as enc
from pipeline.common.images import find_images, sha256_file
from pipeline.common.schemas import latent_matrix, schema_version_of, z_columns
from pipeline.latent.encode import (
    add_scores,
    encode_catalog,
    encode_images,
    encode_paths,
    read_latents,
    resolve_checkpoint,
)


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return resolve_checkpoint(tiny_checkpoint)


def _count_encodes(monkeypatch) -> list[int]:
    """Record the number of files of every ``_encode_files`` call (the list fills as encoding happens)."""
    calls: list[int] = []
    real = enc._encode_files

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        yield from real(*args, **kwargs)

    monkeypatch.setattr(enc, "_encode_files", counting)
    return calls


def _catalog(folder: Path) -> pd.DataFrame:
    paths = find_images(folder)
    return pd.DataFrame(
        {"image_id": [f"id-{p.stem}" for p in paths], "store_path": [p.relative_to(folder).as_posix() for p in paths]}
    )


def test_encode_paths_table(ckpt, image_dir, elpv_small):
    paths = find_images(image_dir)
    df = encode_paths(ckpt, paths, batch_size=7, progress=False)
    d = ckpt.config.latent_dim
    assert list(df.columns) == ["path", "sha256", "model_id", *[f"z_{i}" for i in range(d)]]
    assert len(df) == len(elpv_small.images)
    assert (df["model_id"] == ckpt.meta["model_id"]).all()
    assert df["path"].tolist() == [str(p) for p in paths]
    assert df["sha256"].tolist() == [sha256_file(p) for p in paths]
    assert all(df[c].dtype == np.float32 for c in z_columns(df))
    assert np.isfinite(latent_matrix(df)).all()
    # not a constant map: different cells get different codes
    assert latent_matrix(df).std(axis=0).max() > 1e-4


def test_encode_deterministic_and_batch_invariant(ckpt, tiny_checkpoint, image_dir, elpv_small):
    paths = find_images(image_dir)
    a = encode_paths(ckpt, paths, batch_size=24, progress=False)
    b = encode_paths(tiny_checkpoint, paths, batch_size=5, progress=False, workers=1)  # a path works too
    np.testing.assert_allclose(latent_matrix(a), latent_matrix(b), rtol=1e-4, atol=1e-5)
    z = encode_images(ckpt.model, ckpt.preprocess, list(elpv_small.images), batch_size=10)
    assert z.shape == (len(paths), ckpt.config.latent_dim) and z.dtype == np.float32
    np.testing.assert_allclose(z, latent_matrix(a), rtol=1e-4, atol=1e-5)


def test_encode_errors(ckpt, tmp_path, image_dir):
    with pytest.raises(ValueError, match="no image paths"):
        encode_paths(ckpt, [], progress=False)
    with pytest.raises(ValueError, match="empty batch"):
        encode_images(ckpt.model, ckpt.preprocess, [])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.png"):
        encode_paths(ckpt, [*find_images(image_dir)[:3], bad], progress=False)
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path / "no_such_ckpt")
    with pytest.raises(ValueError, match="Checkpoint"):
        resolve_checkpoint(42)


def test_encode_catalog_resumable(ckpt, image_dir, tmp_path, monkeypatch):
    out = tmp_path / "latents.parquet"
    cat = _catalog(image_dir)
    first = encode_catalog(ckpt, cat, out, batch_size=8, progress=False, root=image_dir)
    d = ckpt.config.latent_dim
    assert list(first.columns) == ["image_id", "model_id", *[f"z_{i}" for i in range(d)]]
    assert len(first) == len(cat) and first["image_id"].is_unique
    assert schema_version_of(pq.read_schema(out)) is not None
    before = out.read_bytes()

    calls = _count_encodes(monkeypatch)
    second = encode_catalog(ckpt, cat, out, batch_size=8, progress=False, root=image_dir)
    assert calls == [] and len(second) == len(cat)
    assert out.read_bytes() == before  # nothing rewritten

    # one new image arrives (also listed twice in the catalog): encoded exactly once and appended
    new = image_dir / "late" / "new.png"
    new.parent.mkdir()
    shutil.copy(find_images(image_dir)[0], new)
    extra = pd.DataFrame({"image_id": ["id-new", "id-new"], "store_path": ["late/new.png", "late/new.png"]})
    third = encode_catalog(ckpt, pd.concat([cat, extra]), out, batch_size=8, progress=False, root=image_dir)
    assert calls == [1]
    assert len(third) == len(cat) + 1
    stored = pd.read_parquet(out)
    assert len(stored) == len(cat) + 1
    # same bytes -> same code as the original cell
    same = stored.set_index("image_id").loc[["id-new", cat["image_id"].iloc[0]], z_columns(stored)].to_numpy()
    np.testing.assert_allclose(same[0], same[1], rtol=1e-4, atol=1e-5)
    pd.testing.assert_frame_equal(stored.iloc[: len(cat)].reset_index(drop=True), first)


def test_encode_catalog_crash_then_resume(ckpt, image_dir, tmp_path, monkeypatch):
    out = tmp_path / "latents.parquet"
    cat = _catalog(image_dir)
    real_read = enc.read_image
    poisoned = str(image_dir / cat["store_path"].iloc[13])

    def flaky(path, **kw):
        if str(path) == poisoned:
            raise ValueError(f"cannot decode image {path!r}: simulated")
        return real_read(path, **kw)

    monkeypatch.setattr(enc, "read_image", flaky)
    with pytest.raises(ValueError, match="simulated"):
        encode_catalog(ckpt, cat, out, batch_size=4, flush_every=4, progress=False, root=image_dir, workers=1)
    partial = pd.read_parquet(out)
    assert 0 < len(partial) <= 13  # the batches before the failure were flushed atomically
    monkeypatch.setattr(enc, "read_image", real_read)
    full = encode_catalog(ckpt, cat, out, batch_size=4, progress=False, root=image_dir)
    assert len(full) == len(cat) and full["image_id"].is_unique
    assert set(full["image_id"]) == set(cat["image_id"])


def test_encode_catalog_keeps_other_models_and_checks_columns(ckpt, image_dir, tmp_path):
    out = tmp_path / "latents.parquet"
    cat = _catalog(image_dir).iloc[:3]
    d = ckpt.config.latent_dim
    other = pd.DataFrame({"image_id": cat["image_id"], "model_id": "other-model"})
    zeros = pd.DataFrame(np.zeros((3, d), np.float32), columns=[f"z_{i}" for i in range(d)])
    other = pd.concat([other.reset_index(drop=True), zeros], axis=1)
    enc.write_parquet_atomic(other, out)
    table = encode_catalog(ckpt, cat, out, progress=False, root=image_dir)
    assert sorted(table["model_id"].value_counts().tolist()) == [3, 3]
    assert len(read_latents(out, model_id=ckpt.meta["model_id"])) == 3
    with pytest.raises(ValueError, match="holds no latents of model"):
        read_latents(out, model_id="nope")
    with pytest.raises(ValueError, match="no column 'store_path'"):
        encode_catalog(ckpt, cat.drop(columns="store_path"), out, progress=False)

    wrong_d = other[["image_id", "model_id", "z_0"]].assign(image_id=["a", "b", "c"])
    wrong = tmp_path / "wrong.parquet"
    enc.write_parquet_atomic(wrong_d, wrong)
    if d != 1:
        with pytest.raises(ValueError, match="-d latents"):
            encode_catalog(ckpt, cat, wrong, progress=False, root=image_dir)


def test_add_scores(ckpt, image_dir, tmp_path):
    table = encode_catalog(ckpt, _catalog(image_dir).iloc[:5], tmp_path / "l.parquet", progress=False, root=image_dir)
    scored = add_scores(table, {"mahalanobis": np.arange(5.0)})
    assert scored["mahalanobis"].tolist() == [0, 1, 2, 3, 4] and "mahalanobis" not in table
    with pytest.raises(ValueError, match="5 rows"):
        add_scores(table, {"s": [1.0, 2.0]})
    with pytest.raises(ValueError, match="clashes"):
        add_scores(table, {"z_0": np.zeros(5)})
    # scored table written back: a later resume keeps the score column and leaves new rows NaN
    enc.write_parquet_atomic(scored, tmp_path / "l.parquet")
    more = encode_catalog(ckpt, _catalog(image_dir).iloc[:7], tmp_path / "l.parquet", progress=False, root=image_dir)
    assert more["mahalanobis"].iloc[:5].tolist() == [0, 1, 2, 3, 4]
    assert more["mahalanobis"].iloc[5:].isna().all()


def test_parallel_parts_then_one_writer_merge(ckpt, image_dir, tmp_path, monkeypatch):
    from pipeline.latent.encode import encode_part, merge_parts, parts_dir, pending_images

    out = tmp_path / "latents.parquet"
    cat = _catalog(image_dir)
    serial = encode_catalog(ckpt, cat, tmp_path / "serial.parquet", batch_size=8, progress=False, root=image_dir)
    # three workers encode disjoint chunks into part files; the table is not touched
    chunks = [cat.iloc[i : i + 10] for i in range(0, len(cat), 10)]
    parts = [encode_part(ckpt, c, out, root=image_dir, batch_size=4) for c in chunks]
    assert not out.exists() and len({p.name for p in parts}) == len(chunks)
    assert all(p.parent == parts_dir(out) for p in parts)
    assert pending_images(ckpt, cat, out).empty  # the parts count as encoded
    assert encode_part(ckpt, chunks[0], out, root=image_dir) == parts[0]  # a retried chunk rewrites its own part
    # the monitor's encode folds the parts in and encodes nothing again
    calls = _count_encodes(monkeypatch)
    merged = encode_catalog(ckpt, cat, out, batch_size=8, progress=False, root=image_dir)
    assert calls == [] and not list(parts_dir(out).glob("*.parquet"))
    assert len(merged) == len(cat) and merged["image_id"].is_unique
    a = merged.set_index("image_id").loc[serial["image_id"], z_columns(serial)].to_numpy()
    np.testing.assert_allclose(a, serial[z_columns(serial)].to_numpy(), rtol=1e-4, atol=1e-5)
    assert merge_parts(out) == 0  # nothing left
    # a part overlapping rows already in the table adds only the new ones
    encode_part(ckpt, cat.iloc[:3], out, root=image_dir)
    assert merge_parts(out) == 0 and len(read_latents(out)) == len(cat)
    with pytest.raises(ValueError, match="empty chunk"):
        encode_part(ckpt, cat.iloc[:0], out, root=image_dir)
