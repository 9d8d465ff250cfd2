"""pipeline.latent.quality on synthetic codes: probes, the disentanglement indicator, latent health."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.latent.quality import (
    DEFAULT_PROPERTIES,
    ProbeResult,
    disentanglement_indicator,
    latent_health,
    linear_probe,
)


def test_probe_separates_separable_classes(rng: np.random.Generator) -> None:
    """Two well-separated Gaussian blobs: accuracy and AUROC close to 1."""
    Z = np.vstack([rng.normal(-3, 1, (60, 4)), rng.normal(3, 1, (60, 4))])
    y = np.r_[np.zeros(60), np.ones(60)].astype(int)
    res = linear_probe(Z, y)
    assert isinstance(res, ProbeResult)
    assert res.auroc_mean > 0.99 and res.accuracy_mean > 0.97
    assert res.n_splits == 5 and res.n == 120 and len(res.fold_auroc) == 5


def test_probe_on_random_labels_is_chance(rng: np.random.Generator) -> None:
    """Labels independent of z: AUROC about 0.5."""
    Z = rng.normal(size=(400, 6))
    y = rng.integers(0, 2, 400)
    res = linear_probe(Z, y, seed=1)
    assert 0.4 < res.auroc_mean < 0.6
    assert 0.4 < res.accuracy_mean < 0.6


def test_probe_string_labels_multiclass_and_groups(rng: np.random.Generator) -> None:
    """String labels, three classes (one-vs-rest AUROC) and lot-grouped folds all work."""
    centers = {"a": -4.0, "b": 0.0, "c": 4.0}
    y = np.repeat(list(centers), 40)
    Z = np.array([[centers[c] + rng.normal(), rng.normal()] for c in y])
    assert linear_probe(Z, y).auroc_mean > 0.95
    groups = np.tile(np.arange(10), 12)
    res = linear_probe(Z, y, groups=groups)
    assert res.auroc_mean > 0.95 and res.classes == ("a", "b", "c")


def test_probe_lowers_folds_for_small_classes(rng: np.random.Generator) -> None:
    """The smallest class has 3 members: 3 folds instead of 5."""
    Z = rng.normal(size=(20, 3))
    y = np.r_[np.zeros(17), np.ones(3)]
    assert linear_probe(Z, y).n_splits == 3


@pytest.mark.parametrize(
    ("y", "match"),
    [(np.zeros(10), "single class"), (np.r_[np.zeros(9), 1], "fewer than 2"), (np.zeros(3), "one label per row")],
)
def test_probe_rejects_bad_labels(y: np.ndarray, match: str) -> None:
    """Unusable labels raise an actionable ValueError."""
    with pytest.raises(ValueError, match=match):
        linear_probe(np.random.default_rng(0).normal(size=(10, 2)), y)


def _props(rng: np.random.Generator, n: int = 300) -> pd.DataFrame:
    return pd.DataFrame({p: rng.normal(size=n) for p in DEFAULT_PROPERTIES})


def test_disentanglement_high_when_one_axis_per_property(rng: np.random.Generator) -> None:
    """Each property carried by its own axis (plus noise axes): every gap large, the right best axis."""
    props = _props(rng)
    P = props.to_numpy()
    Z = np.column_stack([P + 0.1 * rng.normal(size=P.shape), rng.normal(size=(len(P), 4))])
    res = disentanglement_indicator(Z, props)
    assert res.per_property["best_axis"].tolist() == [0, 1, 2, 3]
    assert (res.per_property["gap"] > 0.8).all()
    assert res.total > 3.2
    assert set(res.to_dict()) == {"total", "per_property"}


def test_disentanglement_low_when_mixed(rng: np.random.Generator) -> None:
    """Every axis is a rotation mixing all properties: small gaps, a low total."""
    props = _props(rng)
    P = props.to_numpy()
    Q, _ = np.linalg.qr(rng.normal(size=(4, 4)) + 2.0)  # a dense rotation
    H = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2.0  # Hadamard: fully mixed
    Z = P @ H
    mixed = disentanglement_indicator(Z, props)
    clean = disentanglement_indicator(P, props)
    assert mixed.total < 0.5 < 3.5 < clean.total
    assert disentanglement_indicator(P @ Q, props).total < clean.total


def test_disentanglement_validates_input(rng: np.random.Generator) -> None:
    """Row mismatch, missing property and constant axes."""
    props = _props(rng, 20)
    with pytest.raises(ValueError, match="rows"):
        disentanglement_indicator(rng.normal(size=(19, 3)), props)
    with pytest.raises(ValueError, match="not in props_df"):
        disentanglement_indicator(rng.normal(size=(20, 3)), props, properties=("rotation_deg",))
    res = disentanglement_indicator(np.zeros((20, 3)), props)  # constant axes correlate 0, no NaN
    assert res.total == 0.0


def test_latent_health_prior_vs_collapsed(rng: np.random.Generator) -> None:
    """N(0, I) codes: all axes active, MMD near 0; a collapsed code: few active axes, larger MMD."""
    good = latent_health(rng.normal(size=(300, 8)))
    Zc = rng.normal(size=(300, 8))
    Zc[:, 2:] *= 0.01
    bad = latent_health(Zc)
    assert good["active_axes"] == 8 and good["active_share"] == 1.0
    assert bad["active_axes"] == 2 and len(bad["axis_std"]) == 8
    assert good["mmd_to_prior"] < 0.005 < bad["mmd_to_prior"]
    with pytest.raises(ValueError, match="at least 2"):
        latent_health(np.zeros((1, 3)))
