"""Two-sample statistics of the drift tests: per-axis KS, multiple testing, effect size, PSI, MMD, anomaly scores.

Pure functions on arrays. The public ones test or describe a window against the reference:

* :func:`ks_per_axis` (two-sample Kolmogorov-Smirnov on every latent axis), corrected by :func:`bh_adjust`
  (Benjamini-Hochberg) or :func:`bonferroni`;
* :func:`effect_size` (signed mean shift in reference sd), :func:`median_shift` and :func:`robust_scale` (the
  image-quality channels' level shift), :func:`psi` and :func:`psi_band` (population stability
  index and its conventional bands);
* :func:`median_heuristic`, :func:`mmd2_unbiased` and :func:`mmd_permutation_test` (multivariate: unbiased MMD^2 with
  a Gaussian RBF kernel);
* :func:`score_distribution_test` (AUC, Mann-Whitney) and :func:`score_tail_test` (share above the reference's upper
  tail, Fisher's exact test) on anomaly scores.

The private ``_weighted_*`` variants compare a sample with a *weighted* reference (weights summing to 1): the lot null
(:mod:`pipeline.analysis.drift.lotnull`) and the product-mix conditioning of :class:`pipeline.analysis.drift.DriftDetector`
use them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats

from pipeline.common.schemas import as_latent_matrix

__all__ = [
    "PSI_MODERATE",
    "PSI_SIGNIFICANT",
    "bh_adjust",
    "bonferroni",
    "effect_size",
    "ks_per_axis",
    "median_heuristic",
    "mmd2_unbiased",
    "mmd_permutation_test",
    "psi",
    "psi_band",
    "score_distribution_test",
    "score_tail_test",
]

PSI_MODERATE = 0.1
PSI_SIGNIFICANT = 0.25


def _pair(ref: Any, cur: Any) -> tuple[np.ndarray, np.ndarray]:
    ref = as_latent_matrix(ref, "ref")
    cur = as_latent_matrix(cur, "cur")
    if ref.shape[1] != cur.shape[1]:
        raise ValueError(
            f"ref has {ref.shape[1]} axes but cur has {cur.shape[1]}; encode both with the same model"
        )
    return ref, cur


def ks_per_axis(ref: Any, cur: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two-sample Kolmogorov-Smirnov test on every axis.

    Args:
        ref: reference (n_ref, d).
        cur: current window (n_cur, d).

    Returns:
        ``(stat, p)``, each float array (d,); two-sided, exact for small samples (scipy ``ks_2samp``).
    """
    ref, cur = _pair(ref, cur)
    res = stats.ks_2samp(ref, cur, axis=0)
    return np.atleast_1d(np.asarray(res.statistic, dtype=np.float64)), np.atleast_1d(
        np.asarray(res.pvalue, dtype=np.float64)
    )


def _check_p(p: Any) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"p-values must be a non-empty 1-D array, got shape {p.shape}")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("p-values must lie in [0, 1] (NaN is not allowed)")
    return p


def bh_adjust(p: Any) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (step-up, monotone, clipped at 1).

    An axis is significant at FDR q when its adjusted p-value is <= q; the smallest adjusted p-value is Simes'
    global p-value.

    Args:
        p: raw p-values (m,).

    Returns:
        adjusted p-values (m,), in the input order.
    """
    p = _check_p(p)
    m = p.size
    order = np.argsort(p)
    ranked = p[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    return out


def bonferroni(p: Any) -> np.ndarray:
    """Bonferroni adjusted p-values ``min(m * p, 1)`` (valid under any dependence)."""
    p = _check_p(p)
    return np.minimum(p * p.size, 1.0)


def effect_size(ref: Any, cur: Any) -> np.ndarray:
    """Signed shift of the mean per axis in reference standard deviations: ``(mean_cur - mean_ref) / std_ref``.

    A constant reference axis gets its standard deviation floored at 1e-12 (a huge effect if the mean moved).
    """
    ref, cur = _pair(ref, cur)
    sd = np.maximum(ref.std(axis=0, ddof=1), 1e-12)
    return (cur.mean(axis=0) - ref.mean(axis=0)) / sd


def robust_scale(x: Any) -> np.ndarray:
    """Robust standard deviation per column: ``1.4826 * MAD`` (the sd for normal data), the sd where the MAD is 0.

    A few cells on which a measurement fails (e.g. a rotation read at +-40 degrees on a cell without a clear busbar
    grid) inflate the sd many times over; they leave the MAD alone. Floored at 1e-12.
    """
    x = np.asarray(x, dtype=np.float64)
    mad = 1.4826 * np.median(np.abs(x - np.median(x, axis=0)), axis=0)
    sd = x.std(axis=0, ddof=1) if x.shape[0] > 1 else np.zeros(x.shape[1])
    return np.maximum(np.where(mad > 0, mad, sd), 1e-12)


def weighted_median(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Median per column of ``x`` (n, k); with ``weights`` (n,), the lower weighted median (a value of ``x``)."""
    if weights is None:
        return np.median(x, axis=0)
    return np.array([_weighted_quantile(x[:, j], weights, 0.5) for j in range(x.shape[1])])


def median_shift(ref: np.ndarray, cur: np.ndarray, scale: np.ndarray, ref_weights: np.ndarray | None = None
                 ) -> np.ndarray:
    """Signed shift of the median per column, in units of ``scale``: ``(median_cur - median_ref) / scale``.

    The level shift a fault of the whole window makes (every cell blurred, noisier, rotated) moves the median as it
    moves the mean, while a minority of cells with outlying values (a lot on which a measurement fails) does not.
    ``ref_weights`` re-weight the reference rows (e.g. to the window's product mix).
    """
    return (np.median(cur, axis=0) - weighted_median(ref, ref_weights)) / scale


def _psi_edges(ref: np.ndarray, bins: int) -> list[np.ndarray]:
    qs = np.linspace(0, 1, bins + 1)[1:-1]
    return [np.unique(np.quantile(ref[:, j], qs)) for j in range(ref.shape[1])]


def _psi_from_edges(ref: np.ndarray, cur: np.ndarray, edges: list[np.ndarray], eps: float,
                    ref_weights: np.ndarray | None = None) -> np.ndarray:
    out = np.empty(ref.shape[1])
    for j, e in enumerate(edges):
        nb = e.size + 1
        bins = np.searchsorted(e, ref[:, j], side="right")
        pr = np.bincount(bins, minlength=nb) / ref.shape[0] if ref_weights is None else \
            np.bincount(bins, weights=ref_weights, minlength=nb) / ref_weights.sum()
        pc = np.bincount(np.searchsorted(e, cur[:, j], side="right"), minlength=nb) / cur.shape[0]
        pr, pc = np.maximum(pr, eps), np.maximum(pc, eps)
        out[j] = float(np.sum((pc - pr) * np.log(pc / pr)))
    return out


def psi(ref: Any, cur: Any, bins: int = 10, eps: float = 1e-4) -> np.ndarray:
    """Population stability index per axis.

    ``PSI = sum_b (p_cur,b - p_ref,b) * ln(p_cur,b / p_ref,b)`` over ``bins`` bins at the reference quantiles
    (equal reference mass per bin); empty-bin proportions are floored at ``eps``.

    PSI is descriptive: on small windows its sampling noise is large (about ``(bins - 1) * (1/n_cur + 1/n_ref)`` on
    unshifted data, 0.19 at n_cur = 50 with 10 bins), so it is reported with its band but not used to decide drift.

    Args:
        ref: reference (n_ref, d).
        cur: current window (n_cur, d).
        bins: number of quantile bins (fewer when the reference has ties).
        eps: floor of empty-bin proportions.

    Returns:
        float array (d,).
    """
    ref, cur = _pair(ref, cur)
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    return _psi_from_edges(ref, cur, _psi_edges(ref, bins), eps)


def psi_band(value: float) -> str:
    """Conventional PSI band: ``"stable"`` (< 0.1), ``"moderate"`` (0.1 to 0.25), ``"significant"`` (> 0.25)."""
    if not math.isfinite(value):
        raise ValueError(f"PSI must be finite, got {value}")
    if value < PSI_MODERATE:
        return "stable"
    if value <= PSI_SIGNIFICANT:
        return "moderate"
    return "significant"


def _sq_dists(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    d2 = (X * X).sum(1)[:, None] + (Y * Y).sum(1)[None, :] - 2.0 * (X @ Y.T)
    return np.maximum(d2, 0.0)


def median_heuristic(X: np.ndarray, max_points: int = 1000, rng: Any = None) -> float:
    """Median pairwise Euclidean distance of the rows of X (on at most ``max_points`` random rows); 1.0 if zero."""
    X = np.asarray(X, dtype=np.float64)
    if X.shape[0] > max_points:
        X = X[np.random.default_rng(rng).choice(X.shape[0], max_points, replace=False)]
    d2 = _sq_dists(X, X)[np.triu_indices(X.shape[0], k=1)]
    med = float(np.sqrt(np.median(d2))) if d2.size else 0.0
    return med if med > 0 else 1.0


def mmd2_unbiased(X: np.ndarray, Y: np.ndarray, sigma: float) -> float:
    """Unbiased MMD^2 between samples X (m, d) and Y (n, d), kernel ``exp(-||x - y||^2 / (2 sigma^2))``."""
    m, n = X.shape[0], Y.shape[0]
    g = -1.0 / (2.0 * sigma * sigma)
    kxx = np.exp(_sq_dists(X, X) * g)
    kyy = np.exp(_sq_dists(Y, Y) * g)
    kxy = np.exp(_sq_dists(X, Y) * g)
    return float((kxx.sum() - m) / (m * (m - 1)) + (kyy.sum() - n) / (n * (n - 1)) - 2.0 * kxy.mean())


def mmd_permutation_test(
    ref: Any,
    cur: Any,
    n_permutations: int = 200,
    sigma: float | None = None,
    rng: Any = None,
    max_ref: int = 500,
) -> tuple[float, float]:
    """Multivariate two-sample test: unbiased MMD^2 (Gaussian RBF) with a permutation p-value.

    The pooled kernel matrix is computed once and all permutations are evaluated with one matrix product. The
    reference is randomly subsampled to ``max_ref`` rows (a random subsample keeps the test exact and bounds the
    cost at O((max_ref + n_cur)^2 * n_permutations)).

    Args:
        ref: reference (n_ref, d).
        cur: current window (n_cur, d); at least 2 rows.
        n_permutations: number of random label permutations.
        sigma: kernel bandwidth; None = median heuristic on the pooled sample (label-invariant, so the test stays
            exact).
        rng: seed or ``np.random.Generator``.
        max_ref: reference subsample size.

    Returns:
        ``(mmd2, p)``, ``p = (1 + #{perm >= observed}) / (1 + n_permutations)``.
    """
    ref, cur = _pair(ref, cur)
    if ref.shape[0] < 2 or cur.shape[0] < 2:
        raise ValueError("the MMD test needs at least 2 rows in ref and in cur")
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    rng = np.random.default_rng(rng)
    if ref.shape[0] > max_ref:
        ref = ref[rng.choice(ref.shape[0], max_ref, replace=False)]
    m, n = ref.shape[0], cur.shape[0]
    pooled = np.vstack([ref, cur])
    N = m + n
    d2 = _sq_dists(pooled, pooled)
    if sigma is None:
        tri = d2[np.triu_indices(N, k=1)]
        sigma = float(np.sqrt(np.median(tri))) or 1.0
    K = np.exp(d2 * (-1.0 / (2.0 * sigma * sigma)))
    row = K.sum(axis=1)
    total = row.sum()
    # label matrix: row 0 is the observed split, rows 1.. random permutations; A[p, i] = 1 if i is in "ref"
    A = np.zeros((n_permutations + 1, N))
    A[0, :m] = 1.0
    picks = np.argsort(rng.random((n_permutations, N)), axis=1)[:, :m]
    np.put_along_axis(A[1:], picks, 1.0, axis=1)
    KA = K @ A.T  # (N, P+1)
    sxx = np.einsum("pi,ip->p", A, KA)  # includes the m diagonal ones
    sx_all = A @ row
    sxy = sx_all - sxx
    syy = total - sxx - 2.0 * sxy
    mmd2 = (sxx - m) / (m * (m - 1)) + (syy - n) / (n * (n - 1)) - 2.0 * sxy / (m * n)
    obs = float(mmd2[0])
    p = (1.0 + np.count_nonzero(mmd2[1:] >= obs - 1e-12)) / (1.0 + n_permutations)
    return obs, float(p)


def _score_pair(ref_scores: Any, cur_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(ref_scores, dtype=np.float64).ravel()
    c = np.asarray(cur_scores, dtype=np.float64).ravel()
    if r.size == 0 or c.size == 0:
        raise ValueError("score test needs non-empty ref_scores and cur_scores")
    if not (np.isfinite(r).all() and np.isfinite(c).all()):
        raise ValueError("anomaly scores contain NaN or inf")
    return r, c


def score_distribution_test(ref_scores: Any, cur_scores: Any) -> tuple[float, float]:
    """One-sided test "are the current anomaly scores larger than the reference ones?" (Mann-Whitney U).

    Returns:
        ``(auc, p)``: ``auc = P(score_cur > score_ref) + 0.5 P(tie)`` (0.5 = no shift) and the one-sided p-value.
    """
    r, c = _score_pair(ref_scores, cur_scores)
    res = stats.mannwhitneyu(c, r, alternative="greater")
    return float(res.statistic) / (c.size * r.size), float(res.pvalue)


def score_tail_test(ref_scores: Any, cur_scores: Any, tail: float = 0.1) -> tuple[float, float]:
    """One-sided test "is a larger share of the current cells in the reference's upper ``tail``?" (Fisher exact).

    The cut is the reference's ``1 - tail`` quantile; the window's count above it is compared with the reference's
    (a 2 x 2 table), so the cut's own estimation error is accounted for.

    Returns:
        ``(share, p)``: the share of current scores above the cut and the one-sided p-value.
    """
    if not 0.0 < tail < 1.0:
        raise ValueError(f"tail must be in (0, 1), got {tail}")
    r, c = _score_pair(ref_scores, cur_scores)
    cut = float(np.quantile(r, 1.0 - tail))
    k_c, k_r = int(np.count_nonzero(c > cut)), int(np.count_nonzero(r > cut))
    p = stats.fisher_exact([[k_c, c.size - k_c], [k_r, r.size - k_r]], alternative="greater").pvalue
    return k_c / c.size, float(p)


def _weighted_quantile(x: np.ndarray, w: np.ndarray, q: float) -> float:
    order = np.argsort(x, kind="stable")
    cw = np.cumsum(w[order])
    return float(x[order][min(int(np.searchsorted(cw, q * cw[-1], side="left")), x.size - 1)])


def _auc(cur: np.ndarray, ref: np.ndarray) -> float:
    ranks = stats.rankdata(np.concatenate([cur, ref]))
    m = cur.size
    return float((ranks[:m].sum() - m * (m + 1) / 2.0) / (m * ref.size))


def _weighted_ks(win: np.ndarray, rest: np.ndarray, w: np.ndarray) -> np.ndarray:
    """KS distance per column between a sample and a weighted sample (weights ``w`` sum to 1)."""
    out = np.empty(win.shape[1])
    n = win.shape[0]
    for j in range(win.shape[1]):
        o = np.argsort(rest[:, j], kind="stable")
        xs, cw = rest[o, j], np.cumsum(w[o])
        pts = np.concatenate([xs, win[:, j]])
        f_rest = np.r_[0.0, cw][np.searchsorted(xs, pts, side="right")]
        f_win = np.searchsorted(np.sort(win[:, j]), pts, side="right") / n
        out[j] = float(np.max(np.abs(f_rest - f_win)))
    return out


def _max_weighted_ks(win: np.ndarray, rest: np.ndarray, w: np.ndarray) -> float:
    """Largest KS distance over columns between a sample and a weighted sample (weights ``w`` sum to 1)."""
    return float(_weighted_ks(win, rest, w).max())


def _weighted_mmd2(R: np.ndarray, w: np.ndarray, X: np.ndarray, sigma: float) -> float:
    """MMD^2 between a weighted sample R (weights sum to 1, diagonal left out) and X (unbiased within X)."""
    g = 1.0 / (2.0 * sigma**2)
    Krr = np.exp(-g * _sq_dists(R, R))
    np.fill_diagonal(Krr, 0.0)
    rr = float(w @ Krr @ w) / max(1e-12, 1.0 - float(np.sum(w**2)))
    m = X.shape[0]
    Kxx = np.exp(-g * _sq_dists(X, X))
    xx = (Kxx.sum() - np.trace(Kxx)) / (m * (m - 1))
    rx = float(w @ np.exp(-g * _sq_dists(R, X)).mean(axis=1))
    return float(rr + xx - 2.0 * rx)


def _weighted_auc(cur: np.ndarray, rest: np.ndarray, w: np.ndarray) -> float:
    """P(cur > rest) + 0.5 P(tie) with the rest weighted by ``w`` (summing to 1)."""
    o = np.argsort(rest, kind="stable")
    xs, cw = rest[o], np.r_[0.0, np.cumsum(w[o])]
    below = cw[np.searchsorted(xs, cur, side="left")]
    at_or_below = cw[np.searchsorted(xs, cur, side="right")]
    return float(np.mean(0.5 * (below + at_or_below)))

