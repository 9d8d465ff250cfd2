"""Axis descriptions: correlations of latent axes with measured image properties."""

from __future__ import annotations

import pytest

from pipeline.analysis.axes.describe import axis_correlations, describe_axes
from tests.pipeline.analysis.axes.fakes import synthetic_latents


def test_axis_correlations_and_descriptions_name_the_right_property() -> None:
    Z, props = synthetic_latents()
    corr = axis_correlations(Z, props)
    assert set(corr.columns) >= {"axis", "property", "label", "pearson", "spearman", "n"}
    assert len(corr) == 3 * 3
    descs = describe_axes(corr)
    assert [d.axis for d in descs] == [0, 1, 2]
    assert descs[0].property == "mean_intensity" and descs[0].r > 0.9
    assert descs[0].text == f"axis 0: brightness (r = {descs[0].r:.2f})"
    assert descs[1].property == "sharpness" and descs[1].r < -0.9  # monotone, non-linear: Spearman sees it
    assert descs[2].property is None
    assert descs[2].text.startswith("axis 2: no single measured property (best: ")


def test_describe_respects_threshold_and_method() -> None:
    Z, props = synthetic_latents()
    corr = axis_correlations(Z, props)
    assert describe_axes(corr, min_abs_r=1.0)[0].property is None
    pear = describe_axes(corr, method="pearson", axes=[1])
    assert len(pear) == 1 and pear[0].method == "pearson" and abs(pear[0].r) < abs(describe_axes(corr)[1].r)
    with pytest.raises(ValueError, match="method"):
        describe_axes(corr, method="kendall")


def test_axis_correlations_checks_rows_and_constant_columns() -> None:
    Z, props = synthetic_latents(50)
    with pytest.raises(ValueError, match="same"):
        axis_correlations(Z[:-1], props)
    props = props.assign(flat=1.0)
    corr = axis_correlations(Z, props)
    assert (corr.loc[corr["property"] == "flat", ["pearson", "spearman"]] == 0).all().all()
