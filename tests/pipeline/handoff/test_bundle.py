"""The per-image detector's calibration holds the configured false-flag rate on lots it has not seen."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.thresholds import FlagConfig
from pipeline.handoff.bundle import calibration_scores, detector_calibration, reference_groups


def _lots(rng, n_lots, per_lot=40, lot_sd=0.5):
    """Cells of whole lots: z near the lot's centre, log residual shifted by the lot (the lot effect of a new lot)."""
    centre = rng.normal(size=(n_lots, 4))
    shift = rng.normal(scale=lot_sd, size=n_lots)
    lot = np.repeat(np.arange(n_lots), per_lot)
    z = centre[lot] + 0.15 * rng.normal(size=(lot.size, 4))
    r = np.exp(-5.0 + shift[lot][:, None] + 0.2 * rng.normal(size=(lot.size, 2)))
    return z, r, lot


def _rate(det, z, r):
    return float(det.predict(np.column_stack([z, r])).is_anomaly.mean())


def _rates(seeds, **kw):
    """Realised false-flag rates on 120 new lots of a detector calibrated on 30 lots, naive and as configured."""
    naive, grouped, est = [], [], []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        z_cal, r_cal, lot = _lots(rng, 30)  # one lot a day: the production groups are the lots
        z_new, r_new, _ = _lots(rng, 120)
        naive.append(_rate(detector_calibration(z_cal, 0.05, seed=0, residuals=r_cal, k=25)[1], z_new, r_new))
        fpr, det = detector_calibration(z_cal, 0.05, residuals=r_cal, k=25, groups=lot, **kw)
        grouped.append(_rate(det, z_new, r_new))
        est.append(fpr)
        assert det.n_ref_ == len(z_cal)  # fitted on every calibration image
    return np.array(naive), np.array(grouped), np.array(est)


def test_grouped_calibration_holds_the_rate_on_new_lots_where_a_random_split_under_covers():
    naive, grouped, est = _rates(range(6))
    assert naive.mean() > 0.15  # lot-mates judge each other: the threshold is far too low for new lots
    assert grouped.mean() == pytest.approx(0.05, abs=0.015)  # each calibration lot judged against the others
    assert est.mean() == pytest.approx(0.05, abs=0.03)  # the fold-wise estimate the gate reads


def test_confidence_adds_a_margin_for_the_between_period_spread():
    plain = _rates(range(3))[1]
    margin = _rates(range(3), flag=FlagConfig(confidence=0.9))[1]
    assert (margin <= plain).all() and margin.mean() < plain.mean()


def test_grouped_calibration_scores_judge_each_period_against_the_others():
    rng = np.random.default_rng(2)
    z, r, lot = _lots(rng, 10)
    z_new, r_new, _ = _lots(rng, 60)
    det = detector_calibration(z, 0.05, residuals=r, groups=lot)[1]
    new = det.score(np.column_stack([z_new, r_new]))
    grouped = calibration_scores(z, r, groups=lot)
    random_halves = calibration_scores(z, r)
    # the grouped reference scores spread like a new lot's; random halves are much narrower
    assert np.std(grouped) == pytest.approx(np.std(new), rel=0.35)
    assert np.std(random_halves) < 0.6 * np.std(new)


def test_reference_groups_from_the_bundle_rows():
    t0 = dt.datetime(2026, 3, 2, 8, tzinfo=dt.UTC)
    times = [t0 + dt.timedelta(days=d, minutes=m) for d in range(3) for m in range(10)]
    ref = pd.DataFrame({"captured_at": times * 2, "line": ["L1"] * 30 + ["L2"] * 30})
    g = reference_groups(ref)
    assert g is not None and np.unique(g).size == 6 and (g[:10] == g[0]).all()
    assert reference_groups(ref.drop(columns="captured_at")) is None
    assert reference_groups(ref.iloc[:10].assign(line="L1"), FlagConfig(chunks=2)) is not None  # one day: runs
