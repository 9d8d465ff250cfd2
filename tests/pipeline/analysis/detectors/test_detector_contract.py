"""Contract tests run over every latent-space detector, plus detector-specific checks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.analysis.detectors import (
    DetectionResult,
    Detector,
    Ensemble,
    IsolationForestDetector,
    KNNDistance,
    Mahalanobis,
    NotFittedError,
    conformal_threshold,
)

D = 6


def _make(name: str):
    return {
        "mahalanobis_lw": lambda: Mahalanobis(),
        "mahalanobis_oas": lambda: Mahalanobis(shrinkage="oas"),
        "mahalanobis_fixed": lambda: Mahalanobis(shrinkage=0.1),
        "knn_mean": lambda: KNNDistance(k=5),
        "knn_kth": lambda: KNNDistance(k=3, aggregate="kth"),
        "iforest": lambda: IsolationForestDetector(n_estimators=100, random_state=0),
        "ensemble_rz": lambda: Ensemble([Mahalanobis(), KNNDistance(k=5)]),
        "ensemble_ecdf": lambda: Ensemble(
            [Mahalanobis(), IsolationForestDetector(n_estimators=50)], weights=[2, 1], standardise="ecdf"
        ),
    }[name]()


DETECTORS = [
    "mahalanobis_lw",
    "mahalanobis_oas",
    "mahalanobis_fixed",
    "knn_mean",
    "knn_kth",
    "iforest",
    "ensemble_rz",
    "ensemble_ecdf",
]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    # correlated Gaussian latents, as an encoder would give
    A = rng.normal(size=(D, D)) / math.sqrt(D) + np.eye(D)
    sample = lambda n: rng.normal(size=(n, D)) @ A.T  # noqa: E731
    return {"ref": sample(600), "val": sample(1000), "fresh": sample(4000), "A": A, "sample": sample}


@pytest.fixture(scope="module", params=DETECTORS)
def fitted(request, data):
    det = _make(request.param).fit(data["ref"]).infer_threshold(data["val"], fpr=0.05)
    return det


@pytest.mark.parametrize("name", DETECTORS)
class TestUnfitted:
    def test_not_fitted_errors(self, name, data):
        det = _make(name)
        with pytest.raises(NotFittedError, match=r"has not been fit: call fit"):
            det.score(data["val"])
        with pytest.raises(NotFittedError):
            det.infer_threshold(data["val"])
        with pytest.raises(NotFittedError):
            det.predict(data["val"])

    def test_predict_before_threshold(self, name, data):
        det = _make(name).fit(data["ref"])
        with pytest.raises(NotFittedError, match="infer_threshold"):
            det.predict(data["val"])

    def test_fit_rejects_bad_input(self, name, data):
        Z = data["ref"].copy()
        Z[3, 2] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            _make(name).fit(Z)
        with pytest.raises(ValueError, match="2-D"):
            _make(name).fit(data["ref"][:, 0])
        with pytest.raises(ValueError):
            _make(name).fit(data["ref"][:1])

    def test_protocol_and_params(self, name):
        det = _make(name)
        assert isinstance(det, Detector)
        params = det.get_params()
        assert isinstance(params, dict) and params
        if not isinstance(det, Ensemble):
            assert type(det)(**params).get_params() == params

    def test_fit_is_deterministic(self, name, data):
        a = _make(name).fit(data["ref"]).score(data["val"][:50])
        b = _make(name).fit(data["ref"]).score(data["val"][:50])
        np.testing.assert_array_equal(a, b)


class TestFitted:
    def test_shapes_and_attributes(self, fitted, data):
        assert fitted.is_fitted_ and fitted.n_features_in_ == (D,) and fitted.n_ref_ == 600
        s = fitted.score(data["val"][:37])
        assert s.shape == (37,) and s.dtype == np.float64 and np.isfinite(s).all()
        res = fitted.predict(data["val"][:37])
        assert isinstance(res, DetectionResult)
        assert res.scores.shape == res.is_anomaly.shape == res.p_values.shape == (37,)
        np.testing.assert_array_equal(res.is_anomaly, res.scores > res.threshold)
        assert ((res.p_values > 0) & (res.p_values <= 1)).all()
        assert res.meta["name"] == fitted.name and "version" in res.meta
        assert res.fpr_target == 0.05

    def test_threshold_uncertainty_reported(self, fitted):
        lo, hi = fitted.threshold_ci_
        assert lo <= fitted.threshold_ <= hi
        flo, fhi = fitted.fpr_ci_
        assert 0 < flo < 0.05 < fhi < 0.1
        assert fitted.fpr_empirical_ <= 0.05

    def test_score_validation(self, fitted, data):
        Z = data["val"][:10].copy()
        Z[0, 0] = np.inf
        with pytest.raises(ValueError, match="NaN or inf"):
            fitted.score(Z)
        with pytest.raises(ValueError, match="feature shape"):
            fitted.score(np.zeros((5, D + 1)))

    def test_far_outliers_score_higher(self, fitted, data):
        far = np.full((5, D), 8.0) * np.array([1, -1, 1, -1, 1, -1])
        s_far = fitted.score(far)
        s_norm = fitted.score(data["val"])
        assert s_far.min() > np.quantile(s_norm, 0.99)
        assert fitted.predict(far).is_anomaly.all()

    def test_fpr_on_fresh_normal_data(self, fitted, data):
        res = fitted.predict(data["fresh"])
        fpr = res.is_anomaly.mean()
        # binomial noise of 4000 test images (sd 0.0034) plus the threshold's own uncertainty (fpr_ci)
        tol = 3 * math.sqrt(0.05 * 0.95 / 4000)
        assert res.fpr_ci[0] - tol <= fpr <= res.fpr_ci[1] + tol
        assert abs(fpr - 0.05) < 0.025

    def test_auroc_on_synthetic_shift(self, fitted, data):
        rng = np.random.default_rng(1)
        normal = data["fresh"][:500]
        shifted = (rng.normal(size=(500, D)) * 1.5 + 1.0) @ data["A"].T
        s = np.r_[fitted.score(normal), fitted.score(shifted)]
        y = np.r_[np.zeros(500), np.ones(500)]
        assert roc_auc_score(y, s) > 0.8

    def test_dataframe_latents_table(self, fitted, data):
        df = pd.DataFrame(data["val"][:20], columns=[f"z_{i}" for i in range(D)]).assign(image_id="x")
        df = df[["image_id", *reversed(df.columns[:-1])]]  # column order must not matter
        np.testing.assert_allclose(fitted.score(df), fitted.score(data["val"][:20]))


# ---- detector-specific ---------------------------------------------------------------------------------------
def test_conformal_threshold_needs_enough_data():
    with pytest.raises(ValueError, match="at least 99 normal images"):
        conformal_threshold(np.arange(50.0), fpr=0.01)
    thr, ci, fci, emp = conformal_threshold(np.arange(1, 100.0), fpr=0.01)
    assert thr == 99.0 and emp == 0.0 and ci[1] == math.inf


def test_conformal_threshold_ranks():
    s = np.arange(1, 1000.0)  # n = 999, k = ceil(1000 * 0.95) = 950
    thr, (lo, hi), (flo, fhi), emp = conformal_threshold(s, fpr=0.05)
    assert thr == 950.0 and emp == pytest.approx(49 / 999)
    assert lo < 950 < hi and 930 < lo and hi < 970
    assert flo < 0.05 < fhi


def test_threshold_invalid_fpr(data):
    det = Mahalanobis().fit(data["ref"])
    with pytest.raises(ValueError, match="fpr"):
        det.infer_threshold(data["val"], fpr=1.5)


def test_refit_clears_threshold(data):
    det = Mahalanobis().fit(data["ref"]).infer_threshold(data["val"])
    det.fit(data["ref"][:300])
    with pytest.raises(NotFittedError):
        det.predict(data["val"])


def test_mahalanobis_is_chi2_like(data):
    det = Mahalanobis().fit(data["ref"])
    assert det.score(data["fresh"]).mean() == pytest.approx(D, rel=0.1)


def test_knn_excludes_self_matches(data):
    det = KNNDistance(k=1).fit(data["ref"])
    s_ref = det.score(data["ref"])
    np.testing.assert_array_equal(s_ref, det.reference_scores_)
    assert (s_ref > 0).all()  # a naive query would return distance 0 to itself
    # in-sample leave-one-out scores look like scores of fresh data
    assert np.median(s_ref) == pytest.approx(np.median(det.score(data["fresh"])), rel=0.2)


def test_knn_duplicates_in_reference():
    Z = np.repeat(np.random.default_rng(0).normal(size=(20, 3)), 2, axis=0)
    det = KNNDistance(k=1).fit(Z)
    np.testing.assert_allclose(det.reference_scores_, 0.0)  # each point has its twin


def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="shrinkage"):
        Mahalanobis(shrinkage="bogus")
    with pytest.raises(ValueError, match="shrinkage"):
        Mahalanobis(shrinkage=2.0)
    with pytest.raises(ValueError, match="k must"):
        KNNDistance(k=0)
    with pytest.raises(ValueError, match="aggregate"):
        KNNDistance(aggregate="max")
    with pytest.raises(ValueError, match="weights"):
        Ensemble([Mahalanobis(), KNNDistance()], weights=[1.0])
    with pytest.raises(ValueError, match="standardise"):
        Ensemble([Mahalanobis()], standardise="zscore")


def test_ensemble_score_matrix_interface(data):
    rng = np.random.default_rng(3)
    # two members on very different scales; one informative, one noise
    ref = np.column_stack([rng.normal(size=500) * 1000, rng.exponential(size=500)])
    val = np.column_stack([rng.normal(size=500) * 1000, rng.exponential(size=500)])
    ens = Ensemble(["latent", "diffusion"]).fit_scores(ref).infer_threshold_from_matrix(val, fpr=0.05)
    res = ens.predict_from_matrix(val)
    assert res.scores.shape == (500,) and res.is_anomaly.mean() <= 0.05
    # the robust standardisation makes both columns count: a large value in the small-scale column is flagged
    assert ens.predict_from_matrix(np.array([[0.0, 20.0]])).is_anomaly[0]
    with pytest.raises(ValueError, match="2 members"):
        ens.score_from_matrix(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="latent detectors"):
        Ensemble(["latent", "diffusion"]).fit(data["ref"])
    with pytest.raises(NotFittedError):
        Ensemble(["a"]).score_from_matrix(np.zeros((2, 1)))


def test_ensemble_member_scores(data):
    ens = Ensemble([Mahalanobis(), KNNDistance()]).fit(data["ref"])
    M = ens.member_scores(data["val"][:10])
    assert M.shape == (10, 2)
    np.testing.assert_allclose(ens.score(data["val"][:10]), ens.score_from_matrix(M))
