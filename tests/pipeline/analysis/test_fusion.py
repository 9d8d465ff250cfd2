"""Tests of the fused per-image score: calibration-only fitting and the conformal false-alarm guarantee."""

import numpy as np
import pytest
from scipy import stats

from pipeline.analysis.fusion import ScoreFusion, calibrate_fusion

NAMES = ("patch", "residual")


def _normal_scores(n: int, seed: int) -> np.ndarray:
    """Two families on very different scales: a log-normal distance and a shifted, scaled z-score."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(0, 1, n)  # the families are correlated (both react to the same cell)
    patch = np.exp(2.0 + 0.3 * (0.6 * shared + 0.8 * rng.normal(0, 1, n)))
    residual = 5.0 + 4.0 * (0.6 * shared + 0.8 * rng.normal(0, 1, n))
    return np.column_stack([patch, residual])


@pytest.mark.parametrize("fpr", [0.01, 0.05])
def test_fused_threshold_keeps_false_alarm_rate_on_heldout_normals(fpr):
    """Threshold set on calibration scores; new normal images are flagged at most at ~fpr (binomial bound)."""
    cal = calibrate_fusion(_normal_scores(600, 0), NAMES, fpr, log=(True, False), seed=0)
    fresh = _normal_scores(20_000, 1)
    flagged = int((cal.fusion.score(fresh) > cal.fusion.threshold_).sum())
    # the threshold's true rate is Beta-distributed around <= fpr; it must lie inside the interval the fusion reports
    assert flagged <= stats.binom.ppf(0.999, len(fresh), cal.fusion.fpr_ci_[1])
    assert cal.fusion.fpr_ci_[0] < fpr < cal.fusion.fpr_ci_[1]
    assert cal.fpr_heldout <= 3 * fpr + 0.02
    assert cal.fusion.threshold_ > 0


def test_many_calibrations_are_conservative_on_average():
    """Averaged over calibration draws, the false-alarm rate of the conformal threshold is at most fpr."""
    fpr, rates = 0.05, []
    fresh = _normal_scores(5000, 99)
    for seed in range(30):
        cal = calibrate_fusion(_normal_scores(300, 100 + seed), NAMES, fpr, log=(True, False), seed=seed)
        rates.append(float((cal.fusion.score(fresh) > cal.fusion.threshold_).mean()))
    assert np.mean(rates) <= fpr + 0.005


def test_fusion_ranks_anomalies_seen_by_either_family():
    fus = ScoreFusion(NAMES, log=(True, False)).fit(_normal_scores(400, 2))
    normal = _normal_scores(200, 3)
    only_patch, only_res = normal.copy(), normal.copy()
    only_patch[:, 0] *= 5.0
    only_res[:, 1] += 30.0
    from sklearn.metrics import roc_auc_score
    y = np.r_[np.zeros(200), np.ones(200)]
    for bad in (only_patch, only_res):
        assert roc_auc_score(y, fus.score(np.r_[normal, bad])) > 0.95
    z = fus.standardised(normal)
    assert z.shape == (200, 2) and abs(z.mean()) < 0.3


def test_standardisation_is_fitted_on_calibration_only():
    fus = ScoreFusion(NAMES, log=(True, False)).fit(_normal_scores(500, 4))
    before = fus.score(_normal_scores(10, 5))
    fus.score(_normal_scores(1000, 6) * 10)  # scoring never refits
    np.testing.assert_allclose(fus.score(_normal_scores(10, 5)), before)


def test_validation():
    with pytest.raises(ValueError):
        ScoreFusion(())
    with pytest.raises(ValueError):
        ScoreFusion(NAMES, log=(True,))
    with pytest.raises(ValueError):
        ScoreFusion(NAMES, weights=(1.0, -1.0))
    fus = ScoreFusion(NAMES).fit(_normal_scores(20, 7))
    with pytest.raises(ValueError, match="score columns"):
        fus.score(np.zeros((3, 3)))
    with pytest.raises(ValueError):
        calibrate_fusion(_normal_scores(5, 8), NAMES, 0.05)


def test_small_calibration_falls_back_to_largest_achievable_rate():
    cal = calibrate_fusion(_normal_scores(30, 9), NAMES, 0.01, log=(True, False))
    assert cal.fusion.fpr_ > 0.01
    res = cal.fusion.predict(_normal_scores(5, 10))
    assert res.is_anomaly.shape == (5,)


# --- the monitor's recipe: patch maps cross-fitted by production period, fused with the residual score ---------------
def _cells(n: int, seed: int, lot_shift: float = 0.0, n_lots: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patch maps (n, 8, 3, 3), residual scores and lots of normal cells; each lot has its own small offset."""
    rng = np.random.default_rng(seed)
    lots = np.repeat(np.arange(n_lots), int(np.ceil(n / n_lots)))[:n]
    offset = rng.normal(0, lot_shift, (n_lots, 8, 1, 1))
    P = rng.normal(0, 1, (n, 8, 3, 3)) + offset[lots]
    r = rng.normal(0, 1, n) + 0.5 * rng.normal(0, lot_shift, n_lots)[lots]
    return P.astype(np.float32), r, lots


def test_fused_calibration_keeps_the_rate_on_cells_of_new_lots():
    """Calibrated on 6 lots, the fused threshold flags about fpr of normal cells of 40 new lots, no more."""
    from pipeline.analysis.fusion import fused_calibration

    P, r, lots = _cells(360, 0, lot_shift=0.3)
    det = fused_calibration(P, r, 0.05, groups=lots)
    Pn, rn, _ = _cells(8000, 1, lot_shift=0.3, n_lots=40)
    rate = float(det.predict(Pn, rn).is_anomaly.mean())
    assert 0.02 <= rate <= 0.08, rate
    assert 0.0 <= det.fpr_heldout <= 0.15
    assert det.ref_scores.shape == (360,)


def test_fused_reference_scores_are_out_of_sample():
    """The calibration cells' fused scores are those of unseen cells (cross-fitted), not the lower in-sample ones."""
    from pipeline.analysis.fusion import fused_calibration

    P, r, lots = _cells(240, 2)
    det = fused_calibration(P, r, 0.05, groups=lots)
    Pn, rn, _ = _cells(4000, 3)
    fresh = det.fusion.score(det.family_scores(Pn, rn))
    in_sample = det.fusion.score(det.family_scores(P, r))
    gap_oos = abs(np.median(det.ref_scores) - np.median(fresh))
    assert gap_oos < np.median(fresh) - np.median(in_sample)


def test_a_crack_in_one_patch_is_flagged_whatever_the_residual_says():
    from pipeline.analysis.fusion import fused_calibration

    P, r, lots = _cells(300, 4)
    det = fused_calibration(P, r, 0.05, groups=lots)
    Pn, rn, _ = _cells(200, 5)
    Pn[:100, :, 1, 1] += 6.0  # a strong local defect at one grid position
    res = det.predict(Pn, rn)
    assert res.is_anomaly[:100].mean() > 0.9
    assert res.is_anomaly[100:].mean() < 0.15


def test_fused_calibration_validates_its_input():
    from pipeline.analysis.fusion import fused_calibration

    P, r, _ = _cells(30, 6)
    with pytest.raises(ValueError, match="9 cells"):
        fused_calibration(P[:5], r[:5], 0.05)
    with pytest.raises(ValueError, match="one residual score each"):
        fused_calibration(P, r[:20], 0.05)
    det = fused_calibration(P, r, 0.05)  # no production groups: random halves
    assert np.isnan(det.fpr_heldout) and np.isfinite(det.threshold)
