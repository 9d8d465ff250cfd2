"""The exploratory day re-centring of bench_flag_rate (pure function)."""

from __future__ import annotations

import numpy as np

from benchmarks.bench_flag_rate import recentred_flags


def test_a_day_shifted_as_a_whole_is_flagged_as_the_unshifted_day_and_one_sided_leaves_low_days_alone():
    rng = np.random.default_rng(0)
    ref = rng.normal(0.0, 1.0, 500)
    base = rng.normal(0.0, 1.0, 200)
    scores = np.concatenate([base, base + 1.5, base - 1.5])
    days = np.repeat([0, 1, 2], 200)
    thr = float(np.quantile(ref, 0.95))
    two = recentred_flags(scores, days, ref, thr, one_sided=False)
    one = recentred_flags(scores, days, ref, thr, one_sided=True)
    assert (two[200:400] == two[:200]).all() and (two[400:] == two[:200]).all()  # every day judged alike
    assert (one[200:400] == one[:200]).all()  # a high day is shifted down ...
    assert (one[400:] == (base - 1.5 > thr)).all() and one[400:].sum() < one[:200].sum()  # ... a low day is not
    assert (scores[200:400] > thr).mean() > 0.3 > two[200:400].mean()  # without it the high day floods the flags
