"""ConditionalResidual: residuals judged against the reference images nearest in z."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.analysis.detectors import ConditionalResidual, Detector, NotFittedError
from pipeline.analysis.detectors.conditional import stack_latents_residuals
from pipeline.common.schemas import residual_columns


def two_kinds(n: int, seed: int, anomalous: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two kinds of cell, told apart by z: kind 1 leaves 4x the residual of kind 0 (like poly vs mono on ELPV).

    Returns (Z (n, 3), R (n, 2) positive residuals at two t*, kind (n,)). ``anomalous`` raises the residual of
    each cell by x2.7 (log +1), which keeps a defective kind-0 cell below a normal kind-1 cell.
    """
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 2, n)
    Z = rng.normal(size=(n, 3)) * 0.5
    Z[:, 0] += np.where(kind == 1, 2.0, -2.0)
    log_r = np.where(kind == 1, math.log(4.0), 0.0)[:, None] + rng.normal(size=(n, 2)) * 0.3
    if anomalous:
        log_r += 1.0
    return Z, np.exp(log_r) * 1e-3, kind


def X(Z, R):
    return stack_latents_residuals(Z, R)


@pytest.fixture(scope="module")
def fitted():
    Z, R, _ = two_kinds(400, 0)
    Zv, Rv, _ = two_kinds(400, 1)
    return ConditionalResidual(n_residuals=2, k=25).fit(X(Z, R)).infer_threshold(X(Zv, Rv), fpr=0.05)


def test_conditional_beats_one_global_scale():
    Z, R, _ = two_kinds(400, 0)
    Zn, Rn, kn = two_kinds(300, 2)
    Za, Ra, ka = two_kinds(300, 3, anomalous=True)
    y = np.r_[np.zeros(300), np.ones(300)]
    s = ConditionalResidual(k=25).fit(X(Z, R)).score(np.r_[X(Zn, Rn), X(Za, Ra)])
    global_score = np.log(np.r_[Rn, Ra]).mean(axis=1)  # the same residuals on one scale
    assert roc_auc_score(y, s) > 0.95
    assert roc_auc_score(y, global_score) < 0.8
    # the anomalous kind-0 cells are below normal kind-1 cells on the global scale, above them in context
    low_anomalies = (ka == 0)
    assert np.median(global_score[300:][low_anomalies]) < np.median(global_score[:300][kn == 1])
    assert np.median(s[300:][low_anomalies]) > np.quantile(s[:300], 0.95)


def test_false_alarm_rate_on_fresh_normal_data(fitted):
    Zf, Rf, _ = two_kinds(4000, 4)
    res = fitted.predict(X(Zf, Rf))
    tol = 3 * math.sqrt(0.05 * 0.95 / 4000)
    assert res.fpr_ci[0] - tol <= res.is_anomaly.mean() <= res.fpr_ci[1] + tol


def test_reference_scores_are_leave_one_out(fitted):
    # in-sample scores would be shrunk towards 0 (each image inside its own neighbourhood); leave-one-out ones have
    # the spread of fresh normal scores
    Zf, Rf, _ = two_kinds(400, 5)
    fresh = fitted.score(X(Zf, Rf))
    assert fitted.reference_scores_.shape == (400,)
    assert abs(fitted.reference_scores_.std() / fresh.std() - 1.0) < 0.2
    Z, R, _ = two_kinds(400, 0)
    assert fitted.score(X(Z, R)).std() < fitted.reference_scores_.std()


def test_protocol_params_determinism_and_dataframe(fitted):
    assert isinstance(fitted, Detector)
    params = fitted.get_params()
    assert params == {"n_residuals": 2, "k": 25, "sd_floor": 0.1}
    assert ConditionalResidual(**params).get_params() == params
    Zv, Rv, _ = two_kinds(30, 6)
    a = fitted.score(X(Zv, Rv))
    np.testing.assert_array_equal(a, fitted.score(X(Zv, Rv)))
    df = pd.DataFrame(Zv, columns=[f"z_{i}" for i in range(3)])
    df[residual_columns(2)] = Rv
    df = df[["r_1", "z_2", "r_0", "z_0", "z_1"]].assign(image_id="x")  # order must not matter
    np.testing.assert_allclose(fitted.score(df), a)


def test_errors():
    Z, R, _ = two_kinds(50, 0)
    det = ConditionalResidual()
    with pytest.raises(NotFittedError, match="has not been fit"):
        det.score(X(Z, R))
    with pytest.raises(ValueError, match=">= 0"):
        det.fit(X(Z, -R))
    with pytest.raises(ValueError, match="residual columns"):
        det.fit(R)  # only residuals, no latents
    bad = X(Z, R)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        det.fit(bad)
    with pytest.raises(ValueError, match="rows like Z"):
        stack_latents_residuals(Z, R[:10])
    fitted = ConditionalResidual().fit(X(Z, R))
    with pytest.raises(ValueError, match="feature shape"):
        fitted.score(X(Z[:, :2], R))
    with pytest.raises(ValueError, match="residual columns"):
        fitted.score(pd.DataFrame(Z, columns=["z_0", "z_1", "z_2"]).assign(r_0=R[:, 0]))
    for kw in ({"n_residuals": 0}, {"k": 2}, {"sd_floor": 0.0}, {"sd_floor": 1.0}):
        with pytest.raises(ValueError):
            ConditionalResidual(**kw)


def test_small_reference_caps_k():
    Z, R, _ = two_kinds(8, 0)
    det = ConditionalResidual(k=25).fit(X(Z, R))
    assert det.k_ == 7 and np.isfinite(det.reference_scores_).all()


def test_protocol_thresholding_like_every_detector(fitted):
    Z, R, _ = two_kinds(100, 8)
    with pytest.raises(NotFittedError, match="infer_threshold"):
        ConditionalResidual().fit(X(Z, R)).predict(X(Z, R))
    lo, hi = fitted.threshold_ci_
    assert lo <= fitted.threshold_ <= hi
    flo, fhi = fitted.fpr_ci_
    assert 0 < flo < 0.05 < fhi < 0.1 and fitted.fpr_empirical_ <= 0.05
    res = fitted.predict(X(Z, R))
    np.testing.assert_array_equal(res.is_anomaly, res.scores > res.threshold)
    assert ((res.p_values > 0) & (res.p_values <= 1)).all() and res.meta["name"] == "ConditionalResidual"
