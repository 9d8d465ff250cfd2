"""pipeline.analysis.spc_stats: statistic labels and shifts in their reported units."""

from __future__ import annotations

import math

import pytest

from pipeline.analysis.spc_stats import Shift, report_value, stat_label


def test_each_unit_reports_its_way() -> None:
    assert report_value("mean_intensity", -0.05, 0.5, 0.01) == (pytest.approx(-10.0), "%")
    assert math.isnan(report_value("mean_intensity", -0.05, 0.0, 0.01)[0])
    assert report_value("dark_fraction", 0.021, 0.1, 0.01) == (pytest.approx(2.1), "pp")
    assert report_value("z_3", 0.5, 0.0, 0.25) == (pytest.approx(2.0), "sd")
    assert report_value("rotation_deg", 1.95, 0.0, 1.0) == (1.95, "deg")


def test_labels_and_texts() -> None:
    assert stat_label("z_7").label == "latent z_07" and stat_label("noise_level").label == "noise level"
    assert stat_label("something_else").unit == "sd"
    assert Shift("mean_intensity", "brightness", -0.05, -3.0, -10.0, "%").text == "brightness -10 %"
    assert Shift("rotation_deg", "rotation", 1.95, 2.5, 1.95, "deg").text == "rotation +1.95 deg"
