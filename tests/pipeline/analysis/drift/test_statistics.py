"""The two-sample statistics of the drift tests: KS, multiple testing, effect size, PSI, MMD, score tests."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pipeline.analysis.drift import DriftDetector
from pipeline.analysis.drift.statistics import (
    bh_adjust,
    bonferroni,
    effect_size,
    ks_per_axis,
    median_shift,
    mmd_permutation_test,
    psi,
    psi_band,
    robust_scale,
    score_distribution_test,
    score_tail_test,
    weighted_median,
)
from tests.pipeline.analysis.drift.synthetic import D


def test_ks_per_axis_matches_scipy(ref):
    cur = np.random.default_rng(2).normal(size=(80, D)) + [0, 0, 1, 0, 0, 0]
    stat, p = ks_per_axis(ref, cur)
    assert stat.shape == p.shape == (D,)
    for j in range(D):
        r = stats.ks_2samp(ref[:, j], cur[:, j])
        assert stat[j] == pytest.approx(r.statistic) and p[j] == pytest.approx(r.pvalue)
    assert np.argmin(p) == 2


def test_bh_and_bonferroni_known_values():
    p = np.array([0.01, 0.04, 0.03, 0.02, 0.05])
    np.testing.assert_allclose(bh_adjust(p), [0.05] * 5)
    np.testing.assert_allclose(bonferroni(p), [0.05, 0.2, 0.15, 0.1, 0.25])
    p2 = np.array([0.001, 0.2, 0.012, 0.9])
    np.testing.assert_allclose(bh_adjust(p2), [0.004, 0.26666667, 0.024, 0.9])
    rng = np.random.default_rng(0)
    q = rng.uniform(size=50) ** 3
    assert (bh_adjust(q) <= bonferroni(q) + 1e-15).all()  # BH is never more conservative
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bh_adjust([0.1, np.nan])


def test_effect_size_signed_in_reference_sd():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20000, 2)) * [1.0, 4.0]
    cur = rng.normal(size=(20000, 2)) * [1.0, 4.0] + [-0.5, 2.0]
    np.testing.assert_allclose(effect_size(ref, cur), [-0.5, 0.5], atol=0.03)


def test_robust_scale_ignores_failed_reads_and_falls_back_to_the_sd():
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 0.2, size=(2000, 2))
    x[:100, 0] = rng.choice([-40.0, 40.0], 100)  # 5 % failed reads, as a rotation measured on a cell without a grid
    s = robust_scale(x)
    assert s[0] == pytest.approx(0.2, rel=0.1) and x[:, 0].std() > 5.0
    assert s[1] == pytest.approx(0.2, rel=0.1)
    # a column whose MAD is 0 (most values equal) gets its sd
    y = np.zeros((100, 1))
    y[:10] = 1.0
    assert robust_scale(y)[0] == pytest.approx(y.std(ddof=1))


def test_weighted_median_follows_the_weights():
    x = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [5.0, 50.0]])
    np.testing.assert_allclose(weighted_median(x), [3.0, 30.0])
    np.testing.assert_allclose(weighted_median(x, np.full(5, 0.2)), [3.0, 30.0])
    np.testing.assert_allclose(weighted_median(x, np.array([0.0, 0.0, 0.1, 0.1, 0.8])), [5.0, 50.0])


def test_median_shift_sees_a_level_shift_not_a_minority_of_outliers():
    rng = np.random.default_rng(2)
    ref = rng.normal(0.0, 0.2, size=(1000, 1))
    scale = robust_scale(ref)
    cur = rng.normal(0.0, 0.2, size=(100, 1))
    cur_failed = cur.copy()
    cur_failed[:12, 0] = -40.0  # 12 % failed reads: the mean moves by 24 sd, the median by about 0.3 sd
    assert abs(median_shift(ref, cur_failed, scale)[0]) < 0.5
    assert abs(effect_size(ref, cur_failed)[0]) > 10.0
    # every cell rotated by 0.4 degrees: 2 sd, as with the mean
    assert median_shift(ref, cur + 0.4, scale)[0] == pytest.approx(2.0, abs=0.4)


def test_psi_and_bands():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(5000, 2))
    same = rng.normal(size=(5000, 2))
    shifted = rng.normal(size=(5000, 2)) + [0.0, 1.0]
    assert psi(ref, same).max() < 0.01
    v = psi(ref, shifted)
    assert v[0] < 0.01 and v[1] > 0.5
    assert [psi_band(x) for x in (0.0, 0.099, 0.1, 0.25, 0.26, 3.0)] == [
        "stable",
        "stable",
        "moderate",
        "moderate",
        "significant",
        "significant",
    ]
    with pytest.raises(ValueError):
        psi_band(float("nan"))
    # an empty bin in the window is smoothed, not infinite
    assert np.isfinite(psi(ref, np.full((50, 2), 10.0))).all()


def test_mmd_p_values_uniform_under_null():
    rng = np.random.default_rng(0)
    ps = []
    for _ in range(100):
        a, b = rng.normal(size=(150, 3)), rng.normal(size=(40, 3))
        ps.append(mmd_permutation_test(a, b, n_permutations=99, rng=rng)[1])
    ps = np.array(ps)
    assert stats.kstest(ps, "uniform").pvalue > 0.01
    assert np.mean(ps <= 0.05) <= 0.12
    assert ps.min() >= 1 / 100  # the +1 correction


def test_mmd_detects_variance_change_and_matches_direct_formula():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 3)), rng.normal(size=(60, 3)) * 2.0  # same mean: KS on means would struggle
    stat, p = mmd_permutation_test(a, b, n_permutations=199, sigma=1.5, rng=0)
    assert p <= 0.01
    from pipeline.analysis.drift.statistics import mmd2_unbiased

    assert stat == pytest.approx(mmd2_unbiased(a, b, 1.5))


def test_score_distribution_test_is_one_sided():
    rng = np.random.default_rng(0)
    r = rng.normal(size=500)
    auc_hi, p_hi = score_distribution_test(r, rng.normal(size=60) + 0.8)
    auc_lo, p_lo = score_distribution_test(r, rng.normal(size=60) - 0.8)
    assert auc_hi > 0.65 and p_hi < 1e-4
    assert auc_lo < 0.35 and p_lo > 0.9  # lower scores are not an anomaly-score drift


def test_score_tail_test_sees_a_minority_turning_bad():
    rng = np.random.default_rng(6)
    r = rng.normal(size=2000)
    share, p = score_tail_test(r, np.r_[rng.normal(size=75), rng.normal(3.0, 1.0, size=25)], tail=0.1)
    assert 0.25 < share < 0.45 and p < 1e-6  # 25 % of cells from a bad population: about 32 % above the cut
    share_lo, p_lo = score_tail_test(r, rng.normal(size=100) - 0.8)
    assert share_lo < 0.1 and p_lo > 0.9  # fewer cells in the tail is not a drift towards anomalies
    for bad, msg in ((dict(tail=0.0), "tail"), (dict(tail=1.0), "tail")):
        with pytest.raises(ValueError, match=msg):
            score_tail_test(r, r[:50], **bad)
    with pytest.raises(ValueError, match="NaN"):
        score_tail_test(r, np.r_[r[:49], np.nan])
    with pytest.raises(ValueError, match="score_tail"):
        DriftDetector(score_tail=0.7)


def test_weighted_statistics_reduce_to_the_unweighted_ones():
    from pipeline.analysis.drift.statistics import (
        _auc,
        _max_weighted_ks,
        _weighted_auc,
        _weighted_mmd2,
        mmd2_unbiased,
    )

    rng = np.random.default_rng(41)
    R, X = rng.normal(size=(120, 3)), rng.normal(size=(40, 3)) + 0.3
    w = np.full(120, 1 / 120)
    ks = max(stats.ks_2samp(R[:, j], X[:, j]).statistic for j in range(3))
    assert _max_weighted_ks(X, R, w) == pytest.approx(ks)
    assert _weighted_auc(X[:, 0], R[:, 0], w) == pytest.approx(_auc(X[:, 0], R[:, 0]))
    assert _weighted_mmd2(R, w, X, 1.3) == pytest.approx(mmd2_unbiased(R, X, 1.3))
    # weights restore a mixture: a reference half like X, half shifted; weighting X's half up shrinks the distances
    R2 = np.vstack([rng.normal(size=(60, 3)) + 0.3, rng.normal(size=(60, 3)) + 2.0])
    w2 = np.r_[np.full(60, 0.9 / 60), np.full(60, 0.1 / 60)]
    assert _weighted_mmd2(R2, w2, X, 1.3) < 0.5 * _weighted_mmd2(R2, w, X, 1.3)
    assert _max_weighted_ks(X, R2, w2) < _max_weighted_ks(X, R2, w) - 0.1
    assert abs(_weighted_auc(X[:, 0], R2[:, 0], w2) - 0.5) < abs(_weighted_auc(X[:, 0], R2[:, 0], w) - 0.5)
