"""A ``"pretrained"``-encoder preset through the nightly loop: retrain from the feature store, monitor, score."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.config import EncoderConfig
from models.presets import PRESETS, get_preset
from pipeline.training.retrain import retrain, retrain_config
from tests.flows.world import make_world, monitor_params, tiny_retrain_params

PRESET = "tiny-pretrained"


def _tiny_pretrained():
    base = get_preset("tiny")
    return base.__class__(PRESET, base.model.replace(encoder=EncoderConfig(kind="pretrained", head_hidden=32)),
                          base.train, base.preprocess)


@pytest.fixture
def world(tmp_path, monkeypatch):
    """The tiny line, a tiny pretrained-encoder preset, and a count of images the backbone featurised."""
    from pipeline.latent import features

    monkeypatch.setitem(PRESETS, PRESET, _tiny_pretrained)
    seen: list[int] = []
    real = features.compute_features

    def counting(images, **kw):
        seen.append(len(images))
        return real(images, **kw)

    monkeypatch.setattr(features, "compute_features", counting)
    return make_world(tmp_path / "home", monkeypatch), seen


@pytest.mark.slow
def test_nightly_retrain_reads_the_feature_store_and_the_monitor_scores_with_it(world):
    from models.backbone import BACKBONE_ID
    from pipeline.handoff.bundle import load_bundle
    from pipeline.latent.encode import stored_latents
    from pipeline.monitoring.monitor import monitor, monitor_config, residuals_table_path

    settings, seen = world
    v1 = retrain(settings, retrain_config(**tiny_retrain_params(preset=PRESET)))
    assert v1.version == "1" and v1.promoted, v1.gate.reason
    n_images = v1.n_train + v1.n_calibration
    assert sum(seen) == n_images  # every training and calibration image featurised once ...
    assert list((settings.catalog_root / "features" / BACKBONE_ID).glob("*.parquet"))  # ... and stored

    v2 = retrain(settings, retrain_config(**tiny_retrain_params(preset=PRESET, from_scratch=False, steps=10)))
    assert v2.parent_version == "1" and sum(seen) == n_images  # the second night ran no backbone: head + decoder

    # the bundle's calibration codes are the ones the store's features give under the model
    bundle = load_bundle(v1.model_dir)
    np.testing.assert_allclose(stored_latents(bundle.checkpoint.model, settings.catalog_root, bundle.reference),
                               bundle.z_ref, rtol=1e-4, atol=1e-5)

    # the served model computes the same codes and residuals from the full-size images (backbone, then head)
    from pipeline.catalog.tables import resolve_store_path
    from pipeline.common.images import read_images
    from pipeline.handoff.serving import BundleScorer

    rows = bundle.reference.head(3)
    arrays = read_images([resolve_store_path(settings.catalog_root, p) for p in rows["store_path"]], channels=1)
    scorer = BundleScorer(v1.model_dir)
    served = scorer.score_arrays(arrays)
    z_served = served[[c for c in served.columns if c.startswith("z_")]].to_numpy()
    np.testing.assert_allclose(z_served, bundle.z_ref[:3], atol=2e-2)
    np.testing.assert_allclose(scorer._residuals(arrays, z_served), bundle.residuals[:3], rtol=5e-2)
    assert np.isfinite(served["anomaly_score"]).all()

    res = monitor(settings, monitor_config(**monitor_params(scores=True, cards=True)))
    assert res.windows
    residuals = pd.read_parquet(residuals_table_path(settings))
    r_cols = [c for c in residuals.columns if c.startswith("r_")]
    assert len(residuals) >= 3 * 15 and np.isfinite(residuals[r_cols].to_numpy()).all()
