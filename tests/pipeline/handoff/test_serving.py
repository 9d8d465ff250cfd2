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
