"""The per-image flag threshold holds the configured rate on healthy cells of a line with defective cells."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis.detectors import Mahalanobis
from pipeline.analysis.thresholds import (
    day_offsets,
    day_thresholds,
    healthy_mask,
    medcouple,
    period_threshold,
    robust_units,
    set_flag_threshold,
)


def _line(rng, n, defect_share, sep=8.0):
    """1-D 'latents': healthy cells N(0, 1), defective cells N(sep, 1); Mahalanobis scores ~ squared distance."""
    bad = rng.random(n) < defect_share
    return (rng.normal(size=n) + sep * bad)[:, None], bad


def test_healthy_mask_drops_only_far_out_scores():
    rng = np.random.default_rng(0)
    s = np.r_[rng.normal(size=2000), [15.0, 20.0]]
    keep = healthy_mask(s)
    assert not keep[-2:].any() and keep[:-2].mean() > 0.998
    assert healthy_mask(s, fence=None).all()
    with pytest.raises(ValueError, match="finite"):
        healthy_mask([np.nan, 1.0])


@pytest.mark.parametrize("fence", [3.0, None])
def test_rate_on_healthy_cells_with_five_percent_defective(fence):
    rng = np.random.default_rng(1)
    fit, _ = _line(rng, 400, 0.0)
    det = Mahalanobis().fit(fit)
    cal, _ = _line(rng, 4000, 0.05)  # the calibration snapshot: normal production, defective cells included
    info = set_flag_threshold(det, cal, 0.05, fence=fence)
    new, bad = _line(rng, 40000, 0.05)
    flagged = det.predict(new).is_anomaly
    healthy_rate = flagged[~bad].mean()
    if fence:  # far-out defective cells left out: the configured rate holds on healthy cells
        assert info.n_trimmed > 150 and healthy_rate == pytest.approx(0.05, abs=0.01)
        assert info.flag_rate_all == pytest.approx(0.05 * 0.95 + 0.05, abs=0.015)
    else:  # every defective cell counts against the 5 %: healthy cells see (5 % - 5 % x 1) / 0.95, about none
        assert info.n_trimmed == 0 and healthy_rate < 0.02
    assert flagged[bad].mean() > 0.9


@pytest.mark.parametrize("shape", ["chi2", "lognormal", "t3"])
def test_skewed_or_heavy_tailed_healthy_scores_are_not_trimmed(shape):
    rng = np.random.default_rng(3)
    s = {"chi2": rng.normal(size=5000) ** 2, "lognormal": np.exp(rng.normal(size=5000) * 0.5),
         "t3": rng.standard_t(3, size=5000)}[shape]
    assert healthy_mask(s).mean() > 0.99
    assert medcouple(s) > 0.1 if shape != "t3" else abs(medcouple(s)) < 0.1


def test_a_truncated_snapshot_overflags():
    """Why the snapshot keeps flagged images: without its top 5 % the line sees about twice the rate."""
    rng = np.random.default_rng(2)
    det = Mahalanobis().fit(_line(rng, 400, 0.0)[0])
    cal, _ = _line(rng, 4000, 0.0)
    s = det.score(cal)
    truncated = cal[s <= np.quantile(s, 0.95)]
    set_flag_threshold(det, truncated, 0.05)
    new, _ = _line(rng, 20000, 0.0)
    assert det.predict(new).is_anomaly.mean() == pytest.approx(0.0975, abs=0.012)


def test_cells_of_a_product_the_snapshot_lacks_are_not_judged():
    from pipeline.analysis.thresholds import judged

    ref = ["mono"] * 40 + ["poly"] * 5
    assert judged(ref, ["mono", "poly", "hjt", None]).tolist() == [True, False, False, False]
    assert judged(None, ["mono", "poly"]).all() and judged(ref, None).size == 0


def test_production_groups_are_line_days_or_runs_of_consecutive_captures():
    import datetime as dt

    from pipeline.analysis.thresholds import FlagConfig, production_groups

    t0 = dt.datetime(2026, 3, 2, 6, tzinfo=dt.UTC)
    times = [t0 + dt.timedelta(days=d, minutes=m) for d in range(4) for m in range(6)]
    g = production_groups(times * 2, ["L1"] * 24 + ["L2"] * 24)
    assert np.unique(g).size == 8 and list(g[:7]) == [0] * 6 + [1]  # numbered by line, then first capture
    one_day = production_groups(times[:6], None, FlagConfig(chunks=3))
    assert list(one_day) == [0, 0, 1, 1, 2, 2]  # too few days: runs of consecutive captures
    lopsided = production_groups(times[:6] + times[6::6], None, FlagConfig(chunks=3))
    assert np.bincount(lopsided).max() <= 4  # one day holds most images: runs instead of days
    with pytest.raises(ValueError, match="capture time"):
        production_groups([t0, None])


def test_group_folds_keep_consecutive_groups_together():
    from pipeline.analysis.thresholds import group_folds

    folds = group_folds(np.repeat(np.arange(6), 3), max_folds=3)
    assert [list(f) for f in folds] == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17]]
    with pytest.raises(ValueError, match="2 groups"):
        group_folds([0, 0, 0])


def test_grouped_threshold_margin_grows_with_the_between_group_spread():
    from pipeline.analysis.thresholds import FlagConfig, grouped_threshold

    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(10), 100)
    same = rng.normal(size=1000)
    spread = same + rng.normal(scale=1.0, size=10)[groups]
    assert grouped_threshold(spread, groups, 0.05)[0] == 0.05  # confidence 0.5: the rate itself
    strict = FlagConfig(confidence=0.9)
    a_same, a_spread = grouped_threshold(same, groups, 0.05, strict)[0], grouped_threshold(spread, groups, 0.05, strict)[0]
    assert a_spread < a_same <= 0.05


def test_cross_fit_scores_never_score_a_row_with_its_own_period():
    from pipeline.analysis.thresholds import cross_fit_scores

    groups = np.repeat(np.arange(5), 7)

    def fit_score(fit_rows, rows):
        assert not set(groups[fit_rows]) & set(groups[rows])
        return np.full(len(rows), float(len(fit_rows)))

    out = cross_fit_scores(fit_score, len(groups), groups=groups)
    assert (out == 28).all()
    halves = cross_fit_scores(lambda fit, rows: np.isin(rows, fit).astype(float), 20)
    assert (halves == 0).all()


def test_day_offsets_bring_days_of_new_lots_back_to_the_configured_rate():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=2000)
    thr = float(np.quantile(ref, 0.95))
    scores, days, bad = [], [], []
    for day in range(40):  # each day a new lot that scores higher than every calibration period (0 to 1.2 sd)
        n, lift = 150, rng.uniform(0.0, 1.2)
        defective = rng.random(n) < 0.05
        scores.append(rng.normal(size=n) + lift + 5.0 * defective)
        days += [f"L1|{day}"] * n
        bad.append(defective)
    s, bad = np.concatenate(scores), np.concatenate(bad)
    off = day_offsets(s, days, ref)
    raw_rate, rate = np.mean(s[~bad] > thr), np.mean(s[~bad] - off[~bad] > thr)
    assert raw_rate > 0.15 and 0.035 < rate < 0.07, (raw_rate, rate)
    assert np.mean(s[bad] - off[bad] > thr) > 0.95  # defective cells stay far above their day's quartile


def test_two_sided_offsets_flag_every_day_near_the_configured_rate():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=2000)
    thr = float(np.quantile(ref, 0.95))
    lifts = rng.uniform(-1.0, 1.0, size=40)  # new lots that score lower or higher than the calibration cells
    s = np.concatenate([rng.normal(size=150) + lift for lift in lifts])
    days = np.repeat(np.arange(40), 150)
    per_day = {}
    for name, two in (("one", False), ("both", True)):
        flagged = s - day_offsets(s, days, ref, two_sided=two) > thr
        per_day[name] = np.array([flagged[days == d].mean() for d in range(40)])
    low = lifts < -0.5
    assert per_day["one"][low].mean() < 0.025 and 0.03 < per_day["both"][low].mean() < 0.08  # a low day moved up
    assert 0.035 < per_day["both"].mean() < 0.065 and per_day["one"].mean() < per_day["both"].mean()


def test_day_offsets_move_only_raised_days_of_enough_cells():
    ref = np.arange(100.0)  # lower quartile 24.75
    s = np.r_[np.arange(100.0) + 10.0, np.arange(100.0) - 10.0, np.full(5, 500.0)]
    days = ["up"] * 100 + ["down"] * 100 + ["few"] * 5
    off = day_offsets(s, days, ref, min_cells=30)
    assert np.allclose(off[:100], 10.0) and (off[100:] == 0).all()
    both = day_offsets(s, days, ref, min_cells=30, two_sided=True)
    assert np.allclose(both[:100], 10.0) and np.allclose(both[100:200], -10.0) and (both[200:] == 0).all()
    with pytest.raises(ValueError, match="one day per score"):
        day_offsets(s, days[:-1], ref)
    with pytest.raises(ValueError, match="reference scores"):
        day_offsets(s, days, [])


def _lots(rng, n_days, n, defect_share=0.05, sep=6.0):
    """Line-days of lots unlike each other: each day's healthy scores N(level, spread), defective cells far out."""
    scores, days, bad = [], [], []
    for day in range(n_days):
        level, spread = rng.uniform(-2.0, 2.0), rng.uniform(0.6, 1.5)
        defective = rng.random(n) < defect_share
        scores.append(level + spread * (rng.normal(size=n) + sep * defective))
        days += [f"L1|{day}"] * n
        bad.append(defective)
    return np.concatenate(scores), np.array(days, dtype=object), np.concatenate(bad)


def test_robust_units_put_each_group_on_its_own_median_and_iqr():
    s = np.r_[np.arange(100.0), 10.0 * np.arange(100.0), np.full(40, 3.0), np.arange(5.0)]
    groups = ["a"] * 100 + ["b"] * 100 + ["flat"] * 40 + ["few"] * 5
    units, ok = robust_units(s, groups, min_cells=30)
    assert np.allclose(units[:100], (np.arange(100) - 49.5) / 49.5)  # median 49.5, IQR 49.5
    assert np.allclose(units[100:200], units[:100])  # a ten times wider group in its own units
    assert ok[:200].all() and not ok[200:].any() and np.isnan(units[200:]).all()  # no spread / too few cells
    with pytest.raises(ValueError, match="one group per score"):
        robust_units(s, groups[:-1])


def test_day_thresholds_flag_healthy_cells_of_every_kind_of_day_near_the_configured_rate():
    rng = np.random.default_rng(3)
    ref, ref_days, _ = _lots(rng, 12, 60)  # calibration periods, defective cells included
    unit = period_threshold(ref, ref_days, 0.05)
    s, days, bad = _lots(rng, 40, 150)  # new line-days: other levels and spreads
    thr = float(np.quantile(ref, 0.95))
    judged = s > day_thresholds(s, days, thr, unit)
    per_day = np.array([judged[(days == d) & ~bad].mean() for d in np.unique(days)])
    plain = np.array([(s > thr)[(days == d) & ~bad].mean() for d in np.unique(days)])
    assert 0.03 < judged[~bad].mean() < 0.065, judged[~bad].mean()
    assert plain.min() < 0.005 and plain.max() > 0.15  # against the calibration cells alone, the day sets the rate
    near = lambda rates: np.mean((rates > 0.01) & (rates < 0.1))  # noqa: E731
    assert near(per_day) >= 0.85 and near(plain) <= 0.5, (near(per_day), near(plain))  # own day: most days near it
    assert judged[bad].mean() > 0.9  # defective cells stay far above their day's spread
    before = s - day_offsets(s, days, ref) > thr  # the lower-quartile offset: lower, narrower days see almost none
    assert before[~bad].mean() < 0.035


def test_day_thresholds_keep_the_threshold_for_small_days_and_without_a_period_threshold():
    s = np.r_[np.arange(100.0), np.full(5, 500.0)]
    days = ["big"] * 100 + ["few"] * 5
    out = day_thresholds(s, days, 7.0, 1.0, min_cells=30)
    assert np.allclose(out[:100], 49.5 + 49.5) and (out[100:] == 7.0).all()
    assert (day_thresholds(s, days, 7.0, None) == 7.0).all()
    with pytest.raises(ValueError, match="one day per score"):
        day_thresholds(s, days[:-1], 7.0, 1.0)


def test_day_thresholds_take_the_day_s_spread_from_its_basis_cells_only():
    rng = np.random.default_rng(0)
    new, own = rng.normal(size=100), rng.normal(size=60) - 4.0  # the snapshot's own cells score far lower
    s, days = np.r_[new, own], ["d"] * 160
    basis = np.r_[np.ones(100, dtype=bool), np.zeros(60, dtype=bool)]
    q1, med, q3 = np.quantile(new, [0.25, 0.5, 0.75])
    out = day_thresholds(s, days, 9.0, 1.2, basis=basis)
    assert np.allclose(out, med + 1.2 * (q3 - q1))  # every cell judged by the new cells' median and spread
    assert (day_thresholds(s, days, 9.0, 1.2) > out + 0.5).all()  # with the own cells the spread is inflated
    few = np.r_[np.ones(20, dtype=bool), np.zeros(140, dtype=bool)]  # fewer basis cells than min_cells
    assert (day_thresholds(s, days, 9.0, 1.2, basis=few) == 9.0).all()


def test_period_threshold_needs_enough_cells_in_periods_of_enough_cells():
    rng = np.random.default_rng(0)
    assert period_threshold(rng.normal(size=10), ["a"] * 10, 0.05) is None  # one period, too small
    assert period_threshold(rng.normal(size=30), ["a"] * 30, 0.01) is None  # too few cells for 1 %
    u = period_threshold(rng.normal(size=4000), np.repeat(np.arange(40), 100), 0.05)
    assert abs(u - 1.645 / 1.349) < 0.1  # the normal's 95th percentile in IQR units


def test_period_fence_leaves_out_defective_cells_a_production_snapshot_holds():
    """Calibration periods of production, 6 % of them defective cells 6 sd up: the period fence takes most of those
    out, so the healthy cells of new days are flagged near the configured 5 %; the far-out fence alone keeps most of
    them and the rate on healthy cells falls far short. On a line without defective cells both give about 5 %."""
    from pipeline.analysis.thresholds import PERIOD_FENCE, TRIM_FENCE

    rng = np.random.default_rng(3)

    def line(periods, share):
        s = rng.normal(size=periods * 30)
        bad = rng.random(s.size) < share
        s[bad] = 6.0 + 0.2 * rng.normal(size=bad.sum())
        return s, np.repeat(np.arange(periods), 30), bad

    def healthy_rate(share, fence):
        ref, periods, _ = line(40, share)
        new, days, bad = line(200, share)
        unit = period_threshold(ref, periods, 0.05, fence=fence)
        thr = day_thresholds(new, days, np.inf, unit)
        return float((new[~bad] > thr[~bad]).mean())

    assert 0.035 <= healthy_rate(0.06, PERIOD_FENCE) <= 0.065
    assert healthy_rate(0.06, TRIM_FENCE) < 0.03
    assert 0.035 <= healthy_rate(0.0, PERIOD_FENCE) <= 0.065 and 0.035 <= healthy_rate(0.0, TRIM_FENCE) <= 0.065
