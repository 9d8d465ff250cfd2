"""The backbone feature cache (pipeline.latent.features)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from models.backbone import BACKBONE_ID
from pipeline.latent import features as F

N = 6


@pytest.fixture(scope="module")
def cells() -> np.ndarray:
    from elpv_dataset.utils import load_dataset

    images = load_dataset()[0]
    return np.ascontiguousarray(images[np.linspace(0, len(images) - 1, N).round().astype(int)])


@pytest.fixture()
def catalog(tmp_path: Path, cells: np.ndarray) -> tuple[Path, pd.DataFrame]:
    """A catalog root with the cells as PNGs in a store folder, and their catalog rows."""
    rows = []
    for img in cells:
        data_path = tmp_path / "tmp.png"
        Image.fromarray(img).save(data_path)
        sha = hashlib.sha256(data_path.read_bytes()).hexdigest()
        rel = f"store/{sha[:2]}/{sha}.png"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        data_path.rename(tmp_path / rel)
        rows.append({"image_id": f"img{len(rows)}", "sha256": sha, "store_path": rel})
    return tmp_path, pd.DataFrame(rows)


def test_compute_features_shapes_and_worker_split_agree(cells: np.ndarray) -> None:
    one = F.compute_features(cells, workers=1)
    two = F.compute_features(cells, workers=2)
    assert one.backbone_id == BACKBONE_ID and len(one) == N
    assert one.pooled.shape == (N, 472) and one.pooled.dtype == np.float32
    assert one.patches.shape == (N, 432, 8, 8) and one.patches.dtype == np.float16
    np.testing.assert_allclose(two.pooled, one.pooled, atol=0.05 * np.abs(one.pooled).max())


def test_features_are_computed_once_and_then_read_from_the_store(catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    root, rows = catalog
    first = F.load_or_compute_features(root, rows, workers=1)
    assert len(list(F.feature_dir(root).glob("part-*.parquet"))) == 1

    def no_compute(*args, **kwargs):
        raise AssertionError("features were computed again")

    monkeypatch.setattr(F, "compute_features", no_compute)
    again = F.load_or_compute_features(root, rows.iloc[::-1])  # any order, read back in the order asked
    np.testing.assert_array_equal(again.pooled, first.pooled[::-1])
    np.testing.assert_array_equal(again.patches, first.patches[::-1])
    by_digest = F.load_or_compute_features(root, rows["sha256"].tolist())
    np.testing.assert_array_equal(by_digest.pooled, first.pooled)


def test_only_missing_images_are_computed(catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    root, rows = catalog
    F.load_or_compute_features(root, rows.iloc[:2], workers=1)
    seen = []
    real = F.compute_features

    def counting(images, **kwargs):
        seen.append(len(images))
        return real(images, **kwargs)

    monkeypatch.setattr(F, "compute_features", counting)
    fs = F.load_or_compute_features(root, pd.concat([rows, rows.iloc[:1]]), workers=1)
    assert seen == [N - 2] and len(fs) == N + 1


def test_features_of_another_backbone_are_refused(catalog) -> None:
    root, rows = catalog
    F.load_or_compute_features(root, rows, workers=1)
    part = next(F.feature_dir(root).glob("part-*.parquet"))
    table = pq.read_table(part)
    meta = dict(table.schema.metadata)
    meta[b"linewatch.backbone_id"] = b"efficientnet-lite0@300px-pool4-patch15-000000000000"
    pq.write_table(table.replace_schema_metadata(meta), part)
    with pytest.raises(F.FeatureMismatch, match="300px"):
        F.load_or_compute_features(root, rows)


def test_feature_set_of_another_backbone_is_refused(cells: np.ndarray) -> None:
    fs = F.FeatureSet(np.zeros((2, 472), np.float32), np.zeros((2, 432, 8, 8), np.float16), "other@224px-x")
    with pytest.raises(F.FeatureMismatch, match="other@224px"):
        fs.require(BACKBONE_ID)
    assert fs.require("other@224px-x") is fs


def test_bare_digests_without_stored_features_raise(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="no stored"):
        F.load_or_compute_features(tmp_path, ["0" * 64])


def test_bad_backbone_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a backbone id"):
        F.feature_dir(tmp_path, "lite0")


def test_encode_images_of_a_pretrained_model_reads_backbone_features(cells: np.ndarray) -> None:
    import torch

    from models import InfoDiffusion, get_preset
    from pipeline.latent.encode import encode_images

    preset = get_preset("pretrained")
    model = InfoDiffusion(preset.model)
    fs = F.compute_features(cells, workers=1)
    model.encoder.head.init_from_features(torch.from_numpy(fs.pooled))
    z = encode_images(model, preset.preprocess, list(cells))
    want = model.encode(None, features=torch.from_numpy(fs.pooled)).numpy()
    np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-5)
    assert z.shape == (N, preset.model.latent_dim) and z.std(0).mean() > 0.1  # not collapsed


def test_encode_catalog_of_a_pretrained_model_uses_the_feature_store(catalog, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from models import InfoDiffusion, get_preset, save_checkpoint
    from pipeline.latent.encode import encode_catalog

    root, rows = catalog
    preset = get_preset("pretrained")
    model = InfoDiffusion(preset.model)
    model.encoder.head.init_from_features(torch.from_numpy(F.compute_features(
        np.stack([np.asarray(Image.open(root / p)) for p in rows["store_path"]]), workers=1).pooled))
    save_checkpoint(model, tmp_path / "ckpt", preprocess=preset.preprocess)
    out = encode_catalog(tmp_path / "ckpt", rows, tmp_path / "latents.parquet", root=root, progress=False)
    assert len(out) == N and len(list(F.feature_dir(root).glob("part-*.parquet"))) == 1  # stored once per image
    stored = F.load_or_compute_features(root, rows["sha256"].tolist())
    want = model.eval().encode(None, features=torch.from_numpy(stored.pooled)).numpy()
    np.testing.assert_allclose(out[[f"z_{i}" for i in range(want.shape[1])]].to_numpy(), want, rtol=1e-5, atol=1e-5)
