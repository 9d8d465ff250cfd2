"""Production blocks: the lot null calibrated on the reference's own line-days, so whole days are tested."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.blocks import (
    ProductionBlocks,
    blocks_shortfall,
    draw_block_window,
    mmd2_multiset,
    reference_blocks,
)
from pipeline.analysis.drift import DriftDetector, mmd2_unbiased

D = 4


def _line_days(rng, n_days, per_day, lines=2, day_sd=0.6, shift=None):
    """Latents of line-days: each line-day has its own offset (its lots), cells vary around it."""
    Z, line, day = [], [], []
    for d in range(n_days):
        for k in range(lines):
            z = rng.normal(size=(per_day, D)) + rng.normal(size=D) * day_sd
            Z.append(z if shift is None else z + shift)
            line += [f"L{k + 1}"] * per_day
            day += [d] * per_day
    return np.vstack(Z), np.array(line), np.array(day)


def test_blocks_and_their_guard_bands():
    streams = np.array(["L1"] * 30 + ["L2"] * 30)
    periods = np.r_[np.repeat([0, 1, 2], 10), np.repeat([0, 1, 2], 10)]
    b = ProductionBlocks.from_labels(streams, periods, min_block=5)
    assert len(b.rows) == 6 and b.usable
    i = b.labels.index(("L1", 1))
    assert set(b.guard[i]) == set(range(30))  # L1 days 0-2: its day and the neighbours, not L2
    idx, excl = draw_block_window(b, 60, 40, np.random.default_rng(0))
    assert idx.size == 40 and np.unique(idx).size <= 10 and excl[idx].all()
    assert not ProductionBlocks.from_labels(streams, periods, min_block=11).usable
    with pytest.raises(ValueError, match="differ"):
        ProductionBlocks.from_labels(streams, periods[:5])


def test_a_reference_of_too_few_line_days_is_said_to_be_too_young():
    streams = np.array(["L1"] * 40 + ["L2"] * 5)
    periods = np.r_[np.repeat([0, 1, 2], [10, 10, 20]), np.zeros(5, dtype=int)]  # L2's 5 images are no block
    why = blocks_shortfall(streams, periods)
    assert why is not None and "holds 3 line-periods of at least 8 images" in why and "needs 4" in why
    assert blocks_shortfall(streams, periods, min_blocks=3) is None
    assert blocks_shortfall(streams, periods, min_blocks=0) is None  # the check turned off
    assert blocks_shortfall(None, None) is None  # no labels: nothing to check


def test_mmd_of_a_resampled_window_does_not_count_repeats():
    rng = np.random.default_rng(1)
    R, src = rng.normal(size=(300, D)), rng.normal(size=(40, D))
    pick = rng.integers(0, 40, size=160)
    naive = mmd2_unbiased(R, src[pick], 2.0)
    fair = mmd2_multiset(R, src[pick], pick, 2.0)
    assert fair < naive and abs(fair - mmd2_unbiased(R, src, 2.0)) < 0.02


def test_reference_blocks_by_plant_day_and_shift():
    ref = pd.DataFrame({"line": ["L1", "L1", "L2"], "captured_at": pd.to_datetime(
        ["2026-01-05T23:30:00Z", "2026-01-06T00:30:00Z", "2026-01-06T05:00:00Z"])})
    s, p = reference_blocks(ref, "Europe/Berlin", "day")
    assert list(s) == ["L1", "L1", "L2"] and len(set(p)) == 1  # all on 6 January, Berlin time
    _, ps = reference_blocks(ref, "Europe/Berlin", "shift")
    assert ps[0] == ps[1] != ps[2]  # the night shift of the 5th, then the early shift of the 6th
    assert reference_blocks(ref, "UTC", "count") == (None, None)


def test_block_null_holds_its_rate_on_whole_days_where_runs_of_a_thinned_reference_do_not():
    """A reference that holds a quarter of each of 14 line-days: runs of it span many days, a real day does not."""
    rng = np.random.default_rng(2)
    Z, line, day = _line_days(rng, 7, 160)
    keep = rng.random(len(Z)) < 0.25  # the hash hold-out
    order = np.argsort(day[keep] * 10 + rng.random(keep.sum()), kind="stable")  # the two lines interleaved in time
    ref, rl, rd = Z[keep][order], line[keep][order], day[keep][order]
    blocks = DriftDetector(alpha=0.05, null="lot", n_calibration=200).fit(ref, ref_streams=rl, ref_periods=rd)
    runs = DriftDetector(alpha=0.05, null="lot", n_calibration=200).fit(ref)
    assert blocks.max_window is None and runs.max_window == len(ref) // 3
    days = [_line_days(rng, 1, 160, lines=1)[0] for _ in range(24)]
    fa_blocks = np.mean([blocks.test(w).detected for w in days])
    fa_runs = np.mean([runs.test(w[runs.rows_to_test(len(w))]).detected for w in days])
    assert fa_blocks <= 0.15 and fa_runs >= 0.4
    shifted = [_line_days(rng, 1, 160, lines=1, shift=np.r_[3.0, 0, 0, 0])[0] for _ in range(8)]
    assert np.mean([blocks.test(w).detected for w in shifted]) >= 0.75
