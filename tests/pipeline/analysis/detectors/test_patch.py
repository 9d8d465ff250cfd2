"""Tests of the patch-level detector: shapes, localisation of a synthetic defect, coreset, validation."""

import numpy as np
import pytest

from pipeline.analysis.detectors import NotFittedError
from pipeline.analysis.detectors.patch import PatchDetector, as_patch_array, greedy_coreset


def _normal_maps(n: int, c: int = 6, h: int = 5, w: int = 4, seed: int = 0) -> np.ndarray:
    """Patch maps whose normal statistics differ per position (mean and correlated spread)."""
    structure = np.random.default_rng(1234)  # the same normal statistics for every call
    pos_mean = structure.normal(0, 3, (1, c, h, w))
    mix = structure.normal(0, 1, (c, c))
    rng = np.random.default_rng(seed)
    noise = np.einsum("nchw,cd->ndhw", rng.normal(0, 1, (n, c, h, w)), mix)
    return (pos_mean + noise).astype(np.float32)


@pytest.mark.parametrize("method", ["gaussian", "knn"])
def test_shapes_and_score_is_map_max(method):
    ref, new = _normal_maps(80), _normal_maps(7, seed=1)
    det = PatchDetector(method=method, coreset=50).fit(ref)
    amap = det.anomaly_map(new)
    assert amap.shape == (7, 5, 4)
    s = det.score(new)
    assert s.shape == (7,)
    np.testing.assert_allclose(s, amap.reshape(7, -1).max(axis=1))


@pytest.mark.parametrize("method", ["gaussian", "knn"])
def test_map_localises_a_synthetic_defect(method):
    ref = _normal_maps(120)
    new = _normal_maps(20, seed=2)
    defect = new.copy()
    defect[:, :, 3, 1] += 4.0 * np.linspace(1, -1, new.shape[1])  # a patch pushed off the normal manifold
    det = PatchDetector(method=method, coreset=80).fit(ref)
    amap = det.anomaly_map(defect)
    hot = amap.reshape(len(amap), -1).argmax(axis=1)
    assert (hot == np.ravel_multi_index((3, 1), (5, 4))).mean() >= 0.9
    # and the image score ranks the defective images above the same images without the defect
    from sklearn.metrics import roc_auc_score
    y = np.r_[np.zeros(20), np.ones(20)]
    assert roc_auc_score(y, det.score(np.concatenate([new, defect]))) > 0.95


def test_position_matters():
    """A normal patch of one position moved to another position is anomalous there."""
    ref = _normal_maps(120)
    moved = _normal_maps(10, seed=3)
    moved[:, :, 0, 0] = moved[:, :, 4, 3]
    amap = PatchDetector().fit(ref).anomaly_map(moved)
    assert (amap.reshape(10, -1).argmax(axis=1) == 0).all()


def test_coreset_size_and_bank():
    ref = _normal_maps(60)
    det = PatchDetector(method="knn", radius=1, coreset=37).fit(ref)
    assert det.bank_size_ == 37
    full = PatchDetector(method="knn", radius=0, coreset=None).fit(ref)
    assert full.bank_size_ == 60
    assert PatchDetector().fit(ref).bank_size_ == 0


def test_greedy_coreset_covers_outliers():
    rng = np.random.default_rng(0)
    X = np.r_[rng.normal(0, 0.1, (500, 3)), [[10.0, 10.0, 10.0]]]
    sel = greedy_coreset(X, 5, seed=1)
    assert len(set(sel.tolist())) == 5
    assert 500 in sel  # the far point is always chosen within the first picks
    assert len(greedy_coreset(X, 1000)) == len(X)
    with pytest.raises(ValueError):
        greedy_coreset(X, 0)


def test_validation_and_not_fitted():
    det = PatchDetector()
    with pytest.raises(NotFittedError):
        det.score(_normal_maps(3))
    with pytest.raises(ValueError):
        as_patch_array(np.zeros((3, 4, 5)))
    bad = _normal_maps(3)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError):
        as_patch_array(bad)
    det.fit(_normal_maps(30))
    with pytest.raises(ValueError, match="feature shape"):
        det.score(_normal_maps(3, c=5))
    with pytest.raises(ValueError):
        PatchDetector(method="nope")


def test_threshold_and_predict():
    det = PatchDetector().fit(_normal_maps(100))
    det.infer_threshold(_normal_maps(99, seed=5), fpr=0.05)
    res = det.predict(_normal_maps(10, seed=6))
    assert res.scores.shape == (10,) and res.p_values.shape == (10,)
