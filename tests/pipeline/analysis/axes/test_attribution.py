"""Attribution of a drift result to latent axes, and the texts of the image-level families and the product mix."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.axes.attribution import (
    LATENT_FAMILIES,
    attribute,
    image_level_text,
    mix_text,
    scores_text,
)
from pipeline.analysis.axes.describe import AxisDescription
from tests.pipeline.analysis.axes.fakes import FakeDrift, drift_table


def test_attribution_on_a_synthetic_one_axis_shift() -> None:
    """Real drift test on latents where only axis 3 moves: attribution names axis 3 with most of the drift."""
    from pipeline.analysis.drift import DriftDetector

    rng = np.random.default_rng(0)
    Z_ref = rng.standard_normal((600, 8))
    Z_cur = rng.standard_normal((150, 8))
    Z_cur[:, 3] -= 1.8
    det = DriftDetector(n_permutations=50, random_state=0).fit(Z_ref)
    res = det.test(Z_cur)
    descs = {
        3: AxisDescription(
            3,
            "mean_intensity",
            "brightness",
            0.94,
            "mean_intensity",
            None,
            "spearman",
            "axis 3: brightness (r = 0.94)",
        )
    }
    att = attribute(res, cards=descs)
    assert att.detected and att.top_axis == 3
    assert att.axes[0].axis == 3 and att.axes[0].effect < -1.3
    assert att.top_share > 0.5
    assert all(abs(a.effect) <= abs(att.axes[0].effect) for a in att.axes)
    assert att.text.startswith("axis 3 (brightness, r = 0.94) moved by \u22121.")
    assert "of the drift" in att.text
    json.dumps(att.to_dict())  # JSON-safe


def test_attribution_ranks_significant_axes_by_abs_effect() -> None:
    res = FakeDrift(True, drift_table([0.1, 0.9, -2.0, 3.0, 0.05], [False, True, True, False, False]))
    att = attribute(res)
    assert [a.axis for a in att.axes] == [2, 1]  # axis 3 is large but not significant
    assert att.top_share == pytest.approx(2.0 / 6.05)
    assert "also axis 1 (+0.9 σ)" in att.text
    assert attribute(res, max_axes=1).axes[0].axis == 2


def test_attribution_without_significant_axis() -> None:
    res = FakeDrift(True, drift_table([0.2, -0.4], [False, False]), fired=("mmd",))
    att = attribute(res)
    assert att.axes == () and att.top_axis is None and att.top_share == 0.0
    assert "mmd" in att.text and "largest shift: axis 1" in att.text
    quiet = attribute(FakeDrift(False, drift_table([0.0, 0.1], [False, False]), fired=()))
    assert not quiet.detected and quiet.text.startswith("no drift")


def test_attribution_rejects_a_bad_result() -> None:
    with pytest.raises(ValueError, match="per_axis"):
        attribute(object())
    with pytest.raises(ValueError, match="columns"):
        attribute(pd.DataFrame({"axis": [0]}))


def test_image_level_families_are_described_in_words() -> None:
    from types import SimpleNamespace

    table = pd.DataFrame({"axis": [0, 1], "effect_size": [0.2, -0.1], "significant": [False, False]})
    channels = pd.DataFrame({"channel": ["detail_ratio", "noise_level"], "effect_size": [2.7, 0.1],
                             "significant": [True, False]})
    res = SimpleNamespace(detected=True, per_axis=table, fired=("quality", "scores"), per_channel=channels,
                          score_stat=0.64, score_p=0.003)
    assert scores_text(res) == ("anomaly scores up: a window cell outscores a reference cell 64% of the time "
                                  "(p = 0.003)")
    both = image_level_text(res, prefix="; ")
    assert both.startswith("; image quality: ") and "fine-detail ratio moved by +2.7" in both
    assert both.endswith("(p = 0.003)")
    text = attribute(res).text
    assert "no single axis is significant" in text and "anomaly scores up" in text
    only_axes = SimpleNamespace(**{**vars(res), "fired": ("axes",)})
    assert scores_text(only_axes) == "" and image_level_text(only_axes) == ""
    assert set(LATENT_FAMILIES) == {"axes", "mmd"}
    tail = SimpleNamespace(**{**vars(res), "score_tail": 0.23, "score_tail_expected": 0.1})
    assert scores_text(tail) == ("anomaly scores up: 23% of the window's cells above the reference's 90th "
                                   "percentile (10% expected); a window cell outscores a reference cell 64% of the "
                                   "time (p = 0.003)")


def test_mix_text_names_a_product_mix_change_only() -> None:
    ref = ["mono"] * 40 + ["poly"] * 60
    assert mix_text(ref, ["mono"] * 90 + ["poly"] * 10) == (
        "product mix changed: mono 90% (reference 40%), poly 10% (reference 60%)")
    assert mix_text(ref, ["mono"] * 45 + ["poly"] * 55) == ""  # within MIX_CHANGE: not mentioned
    assert mix_text(ref, ["mono"] * 45 + ["poly"] * 55, min_change=0.05).startswith("product mix changed")
    # a product the reference never saw, and missing labels, are named too
    text = mix_text(ref, ["mono"] * 40 + ["poly"] * 40 + [None] * 20, prefix="; ")
    assert text == "; product mix changed: mono 40% (reference 40%), poly 40% (reference 60%), unknown 20% (reference 0%)"
    assert mix_text([], ["mono"]) == "" and mix_text(ref, []) == ""


def test_mix_text_escapes_hostile_product_labels() -> None:
    """Issue 14, item 10: MES text from an old catalog never reaches alert text as it is."""
    from tests.pipeline.catalog.hostile import HOSTILE_MES_FIELDS

    for label in HOSTILE_MES_FIELDS.values():
        text = mix_text(["mono"] * 100, [label] * 100)
        assert text.startswith("product mix changed: ")
        assert text.isprintable() and "\n" not in text and ", =" not in text and ": =" not in text
        assert len(text) < 200
