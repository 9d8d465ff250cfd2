"""Product-mix conditioning: reference weights, matched subsamples, the mix signal."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis.strata import MIN_STRATUM, labels, matched_rows, mix_signal, reference_weights, shares


def test_reference_weights_give_the_reference_the_window_mix():
    ref = np.array(["mono"] * 40 + ["poly"] * 60)
    cur = np.array(["mono"] * 9 + ["poly"] * 1)
    w = reference_weights(ref, cur)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    assert w[ref == "mono"].sum() == pytest.approx(0.9) and w[ref == "poly"].sum() == pytest.approx(0.1)
    assert np.allclose(w[ref == "mono"], 0.9 / 40)


def test_an_unsupported_product_is_compared_with_the_whole_reference():
    ref = np.array(["mono"] * 40 + ["poly"] * 60 + ["hjt"] * (MIN_STRATUM - 1))
    cur = np.array(["mono"] * 5 + ["hjt"] * 5)
    w = reference_weights(ref, cur)
    assert w[ref == "mono"].sum() == pytest.approx(0.5 + 0.5 * 40 / ref.size)
    assert np.allclose(w[ref == "poly"], 0.5 / ref.size)
    sig = mix_signal(ref, cur)
    assert sig.explains and sig.unsupported == {"hjt": 0.5} and "hjt" in sig.note()
    assert "mono 50% (reference 37%)" in sig.text()


def test_matched_rows_keep_the_window_proportions_and_are_as_large_as_possible():
    ref = np.array(["mono"] * 40 + ["poly"] * 60)
    rows = matched_rows(ref, np.array(["mono"] * 3 + ["poly"] * 1), np.random.default_rng(0))
    got = ref[rows]
    assert np.sum(got == "mono") == 40 and np.sum(got == "poly") == 13  # mono is the binding product
    assert np.unique(rows).size == rows.size
    assert matched_rows(ref, np.array(["mono", "poly"] * 20), np.random.default_rng(0)).size == 80


def test_mix_signal_is_context_unless_it_explains():
    ref = np.array(["mono"] * 40 + ["poly"] * 60)
    sig = mix_signal(ref, np.array(["mono"] * 10))
    assert sig.change == pytest.approx(0.6) and not sig.explains and sig.note() == ""
    unc = mix_signal(ref, np.array(["mono"] * 10), conditioned=False)
    assert unc.explains and "did not compare" in unc.note()
    assert labels([None, "mono"]).tolist() == ["unknown", "mono"]
    assert shares(["a", "b", "b", "b"]) == {"b": 0.75, "a": 0.25}
