"""Axis cards: traversal strips and their JSON, written readable by the group."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.axes.attribution import attribute
from pipeline.analysis.axes.cards import axis_cards
from tests.pipeline.analysis.axes.fakes import FakeDrift, drift_table


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
    cards = axis_cards(
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
    att = attribute(FakeDrift(True, drift_table([0.0, 0.0, 1.5], [False, False, True])), cards=cards)
    assert att.axes[0].description == cards[1].description.text
    with pytest.raises(ValueError, match="out of range"):
        axis_cards(model, X, Z, props, tmp_path, axes=[99], progress=False)


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
    (card,) = axis_cards(model, X, Z, props, tmp_path, axes=[1], n_images=1, steps=2, span_sd=3.0,
                           progress=False)
    doc = json.loads(card.json_path.read_text())
    col = Z[:, 1].astype(np.float64)
    np.testing.assert_allclose(doc["values"], col.mean() + np.array([-3, -1.5, 0, 1.5, 3]) * col.std(), rtol=1e-5)
    assert doc["span_sd"] == 3.0 and doc["quantiles"][0] == 0.0 and doc["quantiles"][-1] == 1.0
    for f in (card.png_path, card.json_path, tmp_path / "axes.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    # a latent narrower than the N(0, I) prior: sd_floor=1 spans at least +-3 prior units
    assert col.std() < 1
    (wide,) = axis_cards(model, X, Z, props, tmp_path / "wide", axes=[1], n_images=1, steps=2, span_sd=3.0,
                           sd_floor=1.0, progress=False)
    np.testing.assert_allclose(wide.values, col.mean() + np.array([-3, -1.5, 0, 1.5, 3]), rtol=1e-5)
    assert json.loads(wide.json_path.read_text())["reference_sd"] == pytest.approx(col.std(), rel=1e-5)
    with pytest.raises(ValueError, match="span_sd"):
        axis_cards(model, X, Z, props, tmp_path, axes=[1], span_sd=0.0, progress=False)
