"""fault_vs_lots: the lot-to-lot yardstick for drift faults (synthetic lots, no ELPV)."""

from __future__ import annotations

import numpy as np

from benchmarks import common as C
from benchmarks import fault_vs_lots as F


def _synthetic(rng, n_lots=20, per_lot=30, lot_sd=1.0, fault_shift=None):
    k = len(F.CHANNELS)
    offsets = rng.normal(size=(n_lots, k)) * lot_sd
    clean = np.repeat(offsets, per_lot, axis=0) + 0.1 * rng.normal(size=(n_lots * per_lot, k))
    lots = np.repeat(np.arange(n_lots), per_lot)
    M = {"clean": clean}
    for i, fault in enumerate(C.DRIFT_FAULTS):
        shift = np.zeros(k)
        shift[i] = fault_shift[i]  # fault i moves statistic i by this many lot sd
        M[C.slug(fault)] = clean + shift
    return M, lots


def test_small_fault_hides_in_lot_variation_and_large_one_stands_out():
    rng = np.random.default_rng(0)
    M, lots = _synthetic(rng, fault_shift=[0.3, 8.0, 0.0, -8.0, 0.0])
    rows = {r["fault"]: r for r in F.analyse(M, lots, np.array(["mono"] * len(lots)))}
    small, large, none, neg, _ = (rows[f] for f in C.DRIFT_FAULTS)
    assert large["ideal_detection_top"] == 1.0 and large["share_lots_farther"] == 0.0
    assert neg["ideal_detection_top"] == 1.0  # one-sided in the fault's direction, whichever sign
    assert small["ideal_detection_top"] <= 0.3 and small["share_lots_farther"] >= 0.5
    assert none["mahalanobis"] == 0.0 and none["share_lots_farther"] == 1.0
    assert abs(large["univariate"][F.CHANNELS[1]]) > 4  # in lot sd units
    assert large["top_channel"] == F.CHANNELS[1]


def test_leave_one_lot_out_distances():
    means = np.array([[0.0], [1.0], [2.0], [3.0]])
    z = F._loo_z(means[:, 0])
    assert np.isclose(z[0], (0 - 2.0) / 1.0)  # the other lots: 1, 2, 3 (mean 2, sd 1)
    assert np.isclose(F._loo_z(means[:, 0], 1.0)[0], z[0] + 1.0)  # a shift in units of the other lots' sd
