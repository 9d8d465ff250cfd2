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


def test_the_fired_test_is_red_even_when_only_mmd_fired(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    from pipeline.monitoring.report import _families_panel

    res = _result(True, ("mmd",), False)  # 3 grey axis bars, nothing significant
    res.family_p, res.thresholds = {"axes": 0.3, "mmd": 0.001}, {"family_alpha": 0.005, "max_ks": 0.3}
    fig, ax = plt.subplots()
    _families_panel(ax, res)
    colors = {t.get_text(): mcolors.to_hex(p.get_facecolor()) for t, p in zip(ax.get_yticklabels(), ax.patches,
                                                                                strict=True)}
    plt.close(fig)
    assert colors == {"per-axis KS": mcolors.to_hex("tab:gray"), "MMD (all axes)": mcolors.to_hex("tab:red")}
    img = tmp_path / "cell.png"
    Image.fromarray(np.full((30, 30), 128, np.uint8)).save(img)
    out = drift_report(res, [("2026-01-11", res)], axis=None, example_images=[img], example_labels=["SN-0042"],
                       out_path=tmp_path / "mmd.png", summary="Line L1, 2026-01-11: only MMD fired.")
    assert out.exists()


def test_plain_summary_says_what_fired_and_names_serials():
    from pipeline.monitoring.causes import window_causes
    from pipeline.monitoring.report import plain_summary

    res = _result(True, ("quality", "scores"), True)
    res.family_p = {"axes": 0.4, "mmd": 0.5, "quality": 1e-4, "scores": 0.003}
    text = plain_summary(line="L1", window_id="2026-01-11", model_version="3", n_images=160, n_tested=40,
                         n_anomalous=21, detected=True, causes=window_causes(res), serials=["SN-1", "SN-2"],
                         events=[{"kind": "opened", "alert": {"cause": "scores"}}],
                         mix="; product mix changed: mono 90% (reference 40%)")
    assert text.startswith("Line L1, 2026-01-11, model v3: 160 cells (40 tested for drift).")
    assert "Image quality changed" in text and "defect rate up" in text and "anomaly scores up" in text
    assert "most unusual: SN-1, SN-2" in text and "Alert opened (scores)" in text and "mono 90%" in text
    quiet = plain_summary(line="L1", window_id="d", model_version="3", n_images=10, n_tested=10, n_anomalous=0,
                          detected=False)
    assert "No drift" in quiet and "0 cells flagged" in quiet


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


def test_report_shows_the_heatmaps_of_the_top_flagged_cells_as_a_row(tmp_path):
    """Heatmap overlays (pipeline.monitoring.heatmaps) are a row of their own; missing files are skipped."""
    res = _result(True, ("scores",), True)
    heat = []
    for i in range(2):
        pic = np.zeros((120, 240, 3), np.uint8)
        pic[:, :, 2] = 255  # a blue block no other panel draws
        heat.append(tmp_path / f"0{i + 1}_SN-{i}.png")
        Image.fromarray(pic).save(heat[-1])
    plain = drift_report(res, [("2026-01-11", res)], axis=None, out_path=tmp_path / "plain.png")
    with_heat = drift_report(res, [("2026-01-11", res)], axis=None, out_path=tmp_path / "heat.png",
                             heatmaps=[*heat, tmp_path / "gone.png"])
    with Image.open(plain) as a, Image.open(with_heat) as b:
        assert b.size[1] > a.size[1] + 100
        pixels = np.asarray(b.convert("RGB"))
        blue = (pixels[..., 2] > 200) & (pixels[..., 0] < 30) & (pixels[..., 1] < 30)
        assert blue.sum() > 2000
