"""The drift result: its fields, its summary line, and a test's reproducibility."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.drift import DriftDetector, DriftResult
from tests.pipeline.analysis.drift.synthetic import D


def test_result_fields_and_reproducibility(ref):
    det = DriftDetector(n_permutations=49).fit(ref, model_id="m1")
    x = np.random.default_rng(30).normal(size=(40, D))
    r = det.test(x, model_id="m1")
    assert isinstance(r, DriftResult)
    assert list(r.per_axis.columns) == [
        "axis",
        "ks_stat",
        "p_value",
        "p_adjusted",
        "effect_size",
        "psi",
        "psi_band",
        "significant",
        "rank",
    ]
    assert sorted(r.per_axis["axis"]) == list(range(D)) and list(r.per_axis["rank"]) == list(range(1, D + 1))
    assert r.n_ref == 600 and r.n_cur == 40 and r.null == "iid" and r.meta["model_id"] == "m1"
    assert "top axis z_" in r.summary()
    assert det.test(x).mmd_p == r.mmd_p  # reproducible
    df = pd.DataFrame(x, columns=[f"z_{i}" for i in range(D)]).assign(image_id="a")
    assert det.test(df).mmd_stat == pytest.approx(r.mmd_stat)
