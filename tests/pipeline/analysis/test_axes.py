"""Attribution, axis descriptions, axis cards and cross-model axis alignment."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis import axes as A


@dataclass(frozen=True)
class FakeDrift:
    detected: bool
    per_axis: pd.DataFrame
    fired: tuple[str, ...] = ("axes",)
    meta: dict = field(default_factory=dict)


def _table(effects: list[float], significant: list[bool]) -> pd.DataFrame:
    d = len(effects)
    return pd.DataFrame(
        {
            "axis": np.arange(d),
            "ks_stat": np.abs(effects) / 4,
            "p_value": np.where(significant, 1e-8, 0.5),
            "p_adjusted": np.where(significant, 1e-7, 0.9),
            "effect_size": effects,
            "psi": np.abs(effects) / 10,
            "psi_band": "stable",
            "significant": significant,
            "rank": np.arange(d),
        }
    )


# ------------------------------------------------------------------------------------------------ attribution


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
        3: A.AxisDescription(
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
    att = A.attribute(res, cards=descs)
    assert att.detected and att.top_axis == 3
    assert att.axes[0].axis == 3 and att.axes[0].effect < -1.3
    assert att.top_share > 0.5
    assert all(abs(a.effect) <= abs(att.axes[0].effect) for a in att.axes)
    assert att.text.startswith("axis 3 (brightness, r = 0.94) moved by \u22121.")
    assert "of the drift" in att.text
    json.dumps(att.to_dict())  # JSON-safe


def test_attribution_ranks_significant_axes_by_abs_effect() -> None:
    res = FakeDrift(True, _table([0.1, 0.9, -2.0, 3.0, 0.05], [False, True, True, False, False]))
    att = A.attribute(res)
    assert [a.axis for a in att.axes] == [2, 1]  # axis 3 is large but not significant
    assert att.top_share == pytest.approx(2.0 / 6.05)
    assert "also axis 1 (+0.9 σ)" in att.text
    assert A.attribute(res, max_axes=1).axes[0].axis == 2


def test_attribution_without_significant_axis() -> None:
    res = FakeDrift(True, _table([0.2, -0.4], [False, False]), fired=("mmd",))
    att = A.attribute(res)
    assert att.axes == () and att.top_axis is None and att.top_share == 0.0
    assert "mmd" in att.text and "largest shift: axis 1" in att.text
    quiet = A.attribute(FakeDrift(False, _table([0.0, 0.1], [False, False]), fired=()))
    assert not quiet.detected and quiet.text.startswith("no drift")


def test_attribution_rejects_a_bad_result() -> None:
    with pytest.raises(ValueError, match="per_axis"):
        A.attribute(object())
    with pytest.raises(ValueError, match="columns"):
        A.attribute(pd.DataFrame({"axis": [0]}))


# ------------------------------------------------------------------------------------------------ descriptions


def _synthetic_latents(n: int = 400, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Latents built from known properties: axis 0 <- brightness, axis 1 <- -sharpness, axis 2 <- noise only."""
    rng = np.random.default_rng(seed)
    props = pd.DataFrame(
        {
            "mean_intensity": rng.uniform(0.3, 0.7, n),
            "sharpness": rng.gamma(2.0, 1.0, n),
            "rotation_deg": rng.normal(0, 1, n),
        }
    )
    Z = np.column_stack(
        [
            (props["mean_intensity"] - 0.5) * 10 + 0.1 * rng.standard_normal(n),
            -np.log(props["sharpness"]) + 0.2 * rng.standard_normal(n),
            rng.standard_normal(n),
        ]
    )
    return Z, props


def test_axis_correlations_and_descriptions_name_the_right_property() -> None:
    Z, props = _synthetic_latents()
    corr = A.axis_correlations(Z, props)
    assert set(corr.columns) >= {"axis", "property", "label", "pearson", "spearman", "n"}
    assert len(corr) == 3 * 3
    descs = A.describe_axes(corr)
    assert [d.axis for d in descs] == [0, 1, 2]
    assert descs[0].property == "mean_intensity" and descs[0].r > 0.9
    assert descs[0].text == f"axis 0: brightness (r = {descs[0].r:.2f})"
    assert descs[1].property == "sharpness" and descs[1].r < -0.9  # monotone, non-linear: Spearman sees it
    assert descs[2].property is None
    assert descs[2].text.startswith("axis 2: no single measured property (best: ")


def test_describe_respects_threshold_and_method() -> None:
    Z, props = _synthetic_latents()
    corr = A.axis_correlations(Z, props)
    assert A.describe_axes(corr, min_abs_r=1.0)[0].property is None
    pear = A.describe_axes(corr, method="pearson", axes=[1])
    assert len(pear) == 1 and pear[0].method == "pearson" and abs(pear[0].r) < abs(A.describe_axes(corr)[1].r)
    with pytest.raises(ValueError, match="method"):
        A.describe_axes(corr, method="kendall")


def test_axis_correlations_checks_rows_and_constant_columns() -> None:
    Z, props = _synthetic_latents(50)
    with pytest.raises(ValueError, match="same"):
        A.axis_correlations(Z[:-1], props)
    props = props.assign(flat=1.0)
    corr = A.axis_correlations(Z, props)
    assert (corr.loc[corr["property"] == "flat", ["pearson", "spearman"]] == 0).all().all()


# ------------------------------------------------------------------------------------------------ alignment


def test_align_axes_recovers_permutation_and_sign() -> None:
    rng = np.random.default_rng(1)
    Z_prev = rng.standard_normal((300, 6))
    perm = np.array([3, 0, 5, 1, 4, 2])  # new axis j holds previous axis perm[j]
    sign = np.array([1, -1, 1, 1, -1, 1])
    Z_new = Z_prev[:, perm] * sign + 0.05 * rng.standard_normal((300, 6))
    al = A.align_axes(Z_prev, Z_new)
    for j in range(6):
        k = perm[j]
        assert al.permutation[k] == j and al.signs[k] == sign[j]
    assert al.mean_abs_corr > 0.99 and al.min_abs_corr > 0.98 and al.n_weak == 0
    np.testing.assert_allclose(A.apply_alignment(Z_new, al), Z_prev, atol=0.25)
    assert al.new_to_prev() == {j: int(perm[j]) for j in range(6)}
    assert "mean |r| = 1.00" in al.text or "mean |r| = 0.99" in al.text
    json.dumps(al.to_dict())


def test_align_axes_reports_poor_quality_for_unrelated_latents() -> None:
    rng = np.random.default_rng(2)
    al = A.align_axes(rng.standard_normal((300, 6)), rng.standard_normal((300, 6)))
    assert al.mean_abs_corr < 0.2 and al.n_weak == 6


def test_align_axes_with_different_dimensions() -> None:
    rng = np.random.default_rng(3)
    Z_prev = rng.standard_normal((200, 4))
    Z_new = np.column_stack(
        [rng.standard_normal(200), -Z_prev[:, 2], Z_prev[:, 0], Z_prev[:, 1], Z_prev[:, 3]]
    )
    al = A.align_axes(Z_prev, Z_new)
    assert al.unmatched == {"prev": [], "new": [0]}
    assert al.permutation == (2, 3, 1, 4) and al.signs == (1, 1, -1, 1)
    out = A.apply_alignment(Z_new, al)
    assert out.shape == (200, 5)
    np.testing.assert_allclose(out[:, :4], Z_prev)
    assert A.apply_alignment(Z_new, al, keep_unmatched=False).shape == (200, 4)
    with pytest.raises(ValueError, match="same fixed probe"):
        A.align_axes(Z_prev[:10], Z_new)


# ------------------------------------------------------------------------------------------------ axis cards


def test_axis_cards_write_png_and_json(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from PIL import Image

    from models import InfoDiffusion, get_preset, to_model_input
    from pipeline.latent.properties import measure

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    # 24 synthetic cells with a brightness ramp (no ELPV needed for file/shape checks)
    base = np.full((24, 64, 64), 120.0)
    base[:, 20:26] = 50.0
    imgs = np.clip(base * np.linspace(0.6, 1.6, 24)[:, None, None] + rng.normal(0, 3, base.shape), 0, 255)
    imgs = imgs.astype(np.uint8)
    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = InfoDiffusion(preset.model)
    X = to_model_input(imgs, preset.preprocess)
    Z = model.encode(X).numpy()
    props = measure(imgs, properties=["mean_intensity", "contrast", "sharpness"])
    cards = A.axis_cards(
        model, X, Z, props, tmp_path, axes=[0, 2], n_images=2, steps=3, model_id="m-test", progress=False
    )
    assert [c.axis for c in cards] == [0, 2]
    for c in cards:
        assert c.png_path == tmp_path / f"axis_{c.axis:02d}.png" and c.png_path.exists()
        with Image.open(c.png_path) as im:
            assert im.size[0] > 200 and im.size[1] > 100
        card = json.loads(c.json_path.read_text())
        assert card["axis"] == c.axis and card["model_id"] == "m-test"
        assert card["description"].startswith(f"axis {c.axis}: ")
        assert set(card["correlations"]) == {"mean_intensity", "contrast", "sharpness"}
        assert len(card["values"]) == 5 and card["values"] == sorted(card["values"])
        np.testing.assert_allclose(card["values"][2], np.median(Z[:, c.axis]), rtol=1e-6)
        assert c.strip.shape == (2, 5, 1, 16, 16)
        assert np.all(np.abs(c.strip) <= 1.0)
    overview = json.loads((tmp_path / "axes.json").read_text())
    assert [e["axis"] for e in overview["axes"]] == [0, 2] and overview["model_id"] == "m-test"
    # cards feed attribution
    att = A.attribute(FakeDrift(True, _table([0.0, 0.0, 1.5], [False, False, True])), cards=cards)
    assert att.axes[0].description == cards[1].description.text
    with pytest.raises(ValueError, match="out of range"):
        A.axis_cards(model, X, Z, props, tmp_path, axes=[99], progress=False)


def test_axis_cards_span_the_reference_sd_and_are_group_readable(tmp_path) -> None:
    """span_sd: columns at mean + k sd (k from -3 to +3), whatever the quantiles; files 0644 (mkstemp makes 0600)."""
    import stat

    torch = pytest.importorskip("torch")
    from models import InfoDiffusion, get_preset, to_model_input

    imgs = np.clip(np.random.default_rng(1).normal(120, 30, (12, 32, 32)), 0, 255).astype(np.uint8)
    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = InfoDiffusion(preset.model)
    X = to_model_input(imgs, preset.preprocess)
    Z = model.encode(X).detach().numpy()
    props = pd.DataFrame({"mean_intensity": imgs.mean(axis=(1, 2))})
    (card,) = A.axis_cards(model, X, Z, props, tmp_path, axes=[1], n_images=1, steps=2, span_sd=3.0,
                           progress=False)
    doc = json.loads(card.json_path.read_text())
    col = Z[:, 1].astype(np.float64)
    np.testing.assert_allclose(doc["values"], col.mean() + np.array([-3, -1.5, 0, 1.5, 3]) * col.std(), rtol=1e-5)
    assert doc["span_sd"] == 3.0 and doc["quantiles"][0] == 0.0 and doc["quantiles"][-1] == 1.0
    for f in (card.png_path, card.json_path, tmp_path / "axes.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    # a latent narrower than the N(0, I) prior: sd_floor=1 spans at least +-3 prior units
    assert col.std() < 1
    (wide,) = A.axis_cards(model, X, Z, props, tmp_path / "wide", axes=[1], n_images=1, steps=2, span_sd=3.0,
                           sd_floor=1.0, progress=False)
    np.testing.assert_allclose(wide.values, col.mean() + np.array([-3, -1.5, 0, 1.5, 3]), rtol=1e-5)
    assert json.loads(wide.json_path.read_text())["reference_sd"] == pytest.approx(col.std(), rel=1e-5)
    with pytest.raises(ValueError, match="span_sd"):
        A.axis_cards(model, X, Z, props, tmp_path, axes=[1], span_sd=0.0, progress=False)


def test_image_level_families_are_described_in_words() -> None:
    from types import SimpleNamespace

    table = pd.DataFrame({"axis": [0, 1], "effect_size": [0.2, -0.1], "significant": [False, False]})
    channels = pd.DataFrame({"channel": ["detail_ratio", "noise_level"], "effect_size": [2.7, 0.1],
                             "significant": [True, False]})
    res = SimpleNamespace(detected=True, per_axis=table, fired=("quality", "scores"), per_channel=channels,
                          score_stat=0.64, score_p=0.003)
    assert A.scores_text(res) == ("anomaly scores up: a window cell outscores a reference cell 64% of the time "
                                  "(p = 0.003)")
    both = A.image_level_text(res, prefix="; ")
    assert both.startswith("; image quality: ") and "fine-detail ratio moved by +2.7" in both
    assert both.endswith("(p = 0.003)")
    text = A.attribute(res).text
    assert "no single axis is significant" in text and "anomaly scores up" in text
    only_axes = SimpleNamespace(**{**vars(res), "fired": ("axes",)})
    assert A.scores_text(only_axes) == "" and A.image_level_text(only_axes) == ""
    assert set(A.LATENT_FAMILIES) == {"axes", "mmd"}
    tail = SimpleNamespace(**{**vars(res), "score_tail": 0.23, "score_tail_expected": 0.1})
    assert A.scores_text(tail) == ("anomaly scores up: 23% of the window's cells above the reference's 90th "
                                   "percentile (10% expected); a window cell outscores a reference cell 64% of the "
                                   "time (p = 0.003)")


def test_mix_text_names_a_product_mix_change_only() -> None:
    ref = ["mono"] * 40 + ["poly"] * 60
    assert A.mix_text(ref, ["mono"] * 90 + ["poly"] * 10) == (
        "product mix changed: mono 90% (reference 40%), poly 10% (reference 60%)")
    assert A.mix_text(ref, ["mono"] * 45 + ["poly"] * 55) == ""  # within MIX_CHANGE: not mentioned
    assert A.mix_text(ref, ["mono"] * 45 + ["poly"] * 55, min_change=0.05).startswith("product mix changed")
    # a product the reference never saw, and missing labels, are named too
    text = A.mix_text(ref, ["mono"] * 40 + ["poly"] * 40 + [None] * 20, prefix="; ")
    assert text == "; product mix changed: mono 40% (reference 40%), poly 40% (reference 60%), unknown 20% (reference 0%)"
    assert A.mix_text([], ["mono"]) == "" and A.mix_text(ref, []) == ""


def test_mix_text_escapes_hostile_product_labels() -> None:
    """Issue 14, item 10: MES text from an old catalog never reaches alert text as it is."""
    from tests.pipeline.catalog.hostile import HOSTILE_MES_FIELDS

    for label in HOSTILE_MES_FIELDS.values():
        text = A.mix_text(["mono"] * 100, [label] * 100)
        assert text.startswith("product mix changed: ")
        assert text.isprintable() and "\n" not in text and ", =" not in text and ": =" not in text
        assert len(text) < 200
