"""Drift report pictures: the per-axis shifts, the image-level families beside them, the axis over time."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.monitoring.report import drift_report


def _result(detected: bool, fired: tuple[str, ...], with_image_level: bool) -> SimpleNamespace:
    per_axis = pd.DataFrame({"axis": [0, 1, 2], "effect_size": [0.1, -0.3, 0.2], "ks_stat": [0.1, 0.2, 0.15],
                             "significant": [False, False, False]})
    extra = {}
    if with_image_level:
        extra = {"per_channel": pd.DataFrame({"channel": ["detail_ratio", "noise_level"], "effect_size": [2.7, 0.1],
                                              "significant": [True, False]}),
                 "score_stat": 0.64, "score_p": 0.003, "score_tail": 0.23, "score_tail_expected": 0.1}
    return SimpleNamespace(detected=detected, fired=fired, per_axis=per_axis, top_axis=1, n_cur=100, null="lot",
                           thresholds={"max_ks": 0.3}, **extra)


@pytest.mark.parametrize("image_level", [True, False])
def test_report_draws_axes_image_level_families_and_history(tmp_path, image_level):
    img = tmp_path / "cell.png"
    Image.fromarray(np.full((30, 30), 128, np.uint8)).save(img)
    res = _result(True, ("quality", "scores") if image_level else ("axes",), image_level)
    history = [("2026-01-10", _result(False, (), image_level)), ("2026-01-11", res)]
    out = drift_report(res, history, axis=None, description="image quality: fine-detail ratio moved by +2.7 σ",
                       example_images=[img, tmp_path / "missing.png"], out_path=tmp_path / "r" / "report.png",
                       title="line L1, 2026-01-11")
    with Image.open(out) as im:
        assert im.size[0] > 600 and im.size[1] > 400


def test_report_needs_a_per_axis_table(tmp_path):
    with pytest.raises(ValueError, match="per_axis"):
        drift_report(SimpleNamespace(), [], axis=None, out_path=tmp_path / "x.png")


def test_report_embeds_the_moved_axis_card(tmp_path):
    """The card of the moved axis is a last row of the picture: taller, and its pixels are in it."""
    res = _result(True, ("axes",), False)
    card = tmp_path / "axis_01.png"
    strip = np.zeros((60, 400, 3), np.uint8)
    strip[:, :, 0] = np.linspace(0, 255, 400, dtype=np.uint8)  # a red ramp no other panel draws
    Image.fromarray(strip).save(card)
    plain = drift_report(res, [("2026-01-11", res)], axis=1, out_path=tmp_path / "plain.png")
    with_card = drift_report(res, [("2026-01-11", res)], axis=1, out_path=tmp_path / "card.png", axis_card=card)
    with Image.open(plain) as a, Image.open(with_card) as b:
        assert b.size[1] > a.size[1] + 150
        pixels = np.asarray(b.convert("RGB"))[a.size[1] - 50:]
        ramp = (pixels[..., 0] > 200) & (pixels[..., 1] < 30) & (pixels[..., 2] < 30)
        assert ramp.sum() > 500  # the card's bright red end is drawn in the added row
    missing = drift_report(res, [("2026-01-11", res)], axis=1, out_path=tmp_path / "m.png",
                           axis_card=tmp_path / "nope.png")
    with Image.open(missing) as m, Image.open(plain) as a:
        assert m.size == a.size
