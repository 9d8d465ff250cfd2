"""The champion's patch family (pipeline.monitoring.patches): the fused detector, fitted once per model and cached."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pipeline.monitoring.patches import ChampionPatches, detector_cache_path, reference_scores_path
from tests.pipeline.monitoring.test_heatmaps import world  # noqa: F401 - the fixture: settings, cells, fake backbone


@pytest.fixture()
def champ(world):  # noqa: F811
    """A champion of 12 calibration cells from two production days, with out-of-period residual scores."""
    ref = world.champ.reference.assign(
        captured_at=pd.to_datetime(["2026-01-05T08:00Z"] * 6 + ["2026-01-06T08:00Z"] * 6), line="L1")
    return SimpleNamespace(reference=ref, model_id="m-123", version="7",
                           ref_scores=np.random.default_rng(0).normal(size=12))


def test_the_fused_detector_is_fitted_once_per_model_and_cached(world, champ):  # noqa: F811
    fused = ChampionPatches(world.settings, champ).fused(0.1)
    assert world.calls == [12]  # one backbone pass over the calibration cells
    assert fused.ref_scores.shape == (12,) and np.isfinite(fused.threshold)
    assert detector_cache_path(world.settings, "m-123", ChampionPatches(world.settings, champ).backbone_id).is_file()
    # a new pass: the detector and the reference scores come from the cache, the backbone reads the window only
    again = ChampionPatches(world.settings, champ)
    res = again.predict(world.window, np.zeros(8), 0.1)
    assert world.calls == [12, 8]
    np.testing.assert_allclose(again.fused(0.1).ref_scores, fused.ref_scores)
    assert res.scores.shape == (8,) and (res.is_anomaly == (res.scores > fused.threshold)).all()


def test_reference_scores_of_other_calibration_cells_are_recomputed(world, champ, caplog):  # noqa: F811
    patches = ChampionPatches(world.settings, champ)
    patches.fused(0.1)
    path = reference_scores_path(world.settings, "m-123", patches.backbone_id)
    np.savez(path, image_id=np.array(["x"] * 12), scores=np.zeros(12))
    with caplog.at_level(logging.WARNING, logger="pipeline.monitoring.patches"):
        fused = ChampionPatches(world.settings, champ).fused(0.1)
    assert "other calibration cells" in caplog.text
    assert np.ptp(fused.ref_scores) > 0
    with np.load(path, allow_pickle=False) as z:
        assert list(z["image_id"]) == list(champ.reference["image_id"])


def test_a_champion_without_residual_scores_has_nothing_to_fuse(world, champ):  # noqa: F811
    with pytest.raises(ValueError, match="no residual scoring"):
        ChampionPatches(world.settings, SimpleNamespace(**{**vars(champ), "ref_scores": None})).fused(0.1)


def test_only_the_newest_models_keep_their_caches(world, champ):  # noqa: F811
    import os

    from pipeline.monitoring.patches import KEEP_MODELS, prune_caches

    for k in range(KEEP_MODELS + 1):
        ChampionPatches(world.settings, SimpleNamespace(**{**vars(champ), "model_id": f"m-{k}"})).detector()
        folder = detector_cache_path(world.settings, f"m-{k}", "x").parent
        os.utime(folder, (1_000_000 + k, 1_000_000 + k))  # written in this order
    ChampionPatches(world.settings, SimpleNamespace(**{**vars(champ), "model_id": "m-new"})).detector()
    kept = sorted(p.name for p in detector_cache_path(world.settings, "m-new", "x").parent.parent.iterdir())
    assert kept == ["m-2", "m-3", "m-new"]
    assert prune_caches(world.settings, keep=1) and \
        [p.name for p in detector_cache_path(world.settings, "m-new", "x").parent.parent.iterdir()] == ["m-new"]


def test_a_bundled_patch_family_is_used_without_fitting_or_caching(world, champ):  # noqa: F811
    from pipeline.handoff.bundle import reference_groups
    from pipeline.handoff.patch_family import fit_patch_family

    probe = ChampionPatches(world.settings, champ)
    family = fit_patch_family(probe.reference_patches(), champ.reference["image_id"], probe.backbone_id,
                              groups=reference_groups(champ.reference))
    world.calls.clear()
    bundled = ChampionPatches(world.settings, SimpleNamespace(**vars(champ), patches=family))
    res = bundled.predict(world.window, None, 0.1, residual_weight=0.0)
    assert world.calls == [8]  # the window only: no backbone pass over the calibration cells
    assert not detector_cache_path(world.settings, "m-123", probe.backbone_id).exists()
    assert bundled.detector() is family.detector
    # the same detector and reference scores as the monitor's own fit: the same scores and threshold
    own = probe.fused(0.1, residual_weight=0.0)
    np.testing.assert_allclose(bundled.fused(0.1, residual_weight=0.0).ref_scores, own.ref_scores)
    np.testing.assert_allclose(res.scores, probe.predict(world.window, None, 0.1, residual_weight=0.0).scores)
    assert bundled.fused(0.1, residual_weight=0.0).threshold == pytest.approx(own.threshold)
    other = SimpleNamespace(**{**vars(family), "backbone_id": "another backbone"})
    assert ChampionPatches(world.settings, SimpleNamespace(**vars(champ), patches=other)).bundled() is None
