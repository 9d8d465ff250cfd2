"""Per-window drift tests of latents against a reference, with an i.i.d. null and a lot-aware null.

A *window* is a batch of images (a count of consecutive images, a shift, a day; see :func:`windows`). Its latents z
are compared with the reference latents (a calibration split of normal images encoded by the same model) by three
families of tests:

* **per axis**: two-sample Kolmogorov-Smirnov on every latent axis, corrected for multiplicity with
  Benjamini-Hochberg (default) or Bonferroni. Reported with the signed effect size in reference standard deviations
  and the population stability index (PSI, with the conventional bands) of each axis;
* **multivariate**: the unbiased MMD^2 with a Gaussian RBF kernel (median-heuristic bandwidth) and a permutation test;
* **anomaly scores** (when given): "are there more unusual cells?", two one-sided statistics combined by their
  smaller p-value (Bonferroni under the i.i.d. null, the joint bootstrap under the lot null): the AUC
  ``P(score_cur > score_ref)`` (Mann-Whitney), which sees a shift of the whole score distribution, and the *tail
  share*, the share of window cells above the reference's ``1 - score_tail`` quantile (Fisher's exact test), which
  sees a minority of cells turning bad. The tail share is what a quality engineer reads ("23 % of today's cells score
  above the reference's 90th percentile, 10 % expected"). Under the lot null, where a whole lot scoring a little
  higher is normal, it finds a minority of bad cells far more often than the AUC (synthetic lots:
  ``tests/pipeline/analysis/test_drift.py``; ELPV lot windows: ``benchmarks/results/bench_drift_faults.md``); the AUC
  is the stronger one for a shift of every cell and on i.i.d. windows;
* **image quality** (when given): per-channel mean shift (in reference sd; Welch t-test under the i.i.d. null) of
  full-resolution image-quality measurements (fine detail, noise level, rotation from :mod:`pipeline.latent.properties`),
  Bonferroni over channels. A mean shift, not KS: the faults these channels watch move a property's level, while
  whole lots differ in the *shape* of e.g. the rotation distribution (all cells of one module share it), which KS
  would count as drift. A latent computed at
  32-64 px cannot see a 1 px blur or 3 % sensor noise on a 300 px image (downsampling averages them away); these
  channels can, and the result names the channel that moved.

**Combination rule.** With k families present (2 to 4), each family is tested at ``alpha / k`` and the window is
flagged when any family fires (Bonferroni across families), so the false-alarm rate on unshifted windows is at most
``alpha`` under the null in force. The per-axis family's p-value is the smallest corrected p-value: with BH this is
Simes' global test (valid for independent or positively dependent axes), with Bonferroni it is valid under any
dependence.

**Nulls.** ``null="iid"`` assumes the window is an i.i.d. sample of the reference distribution: p-values come from the
KS distribution, the MMD permutations and Mann-Whitney. Images on a line are not i.i.d.: cells of one lot (a module)
resemble each other, so a window of consecutive images differs from the reference by lot-to-lot variation that
every i.i.d. two-sample test flags. ``null="lot"`` calibrates instead on windows of *consecutive reference images*
(a moving-block bootstrap over the reference in its original order): for the window size n it draws
``n_calibration`` windows made of contiguous blocks (of ``lot_block`` images; default one block of n), computes the
family statistics (max KS over axes, MMD^2 with the reference bandwidth, score AUC and tail share, max quality
shift) of each against the rest of the
reference (leave-window-out, with a guard band of one block on each side, or the whole lots the window touches when
``ref_lots`` is given, so a window is never compared with the other half of its own lot), and takes empirical
p-values ``(1 + #{boot >= obs}) / (B + 1)``. A window is then compared with how much whole lots normally differ.
With ``ref_strata`` (e.g. the product type) each calibration window takes every stratum's share of the reference as
consecutive images of that stratum and is compared with the rest re-weighted to the reference's shares, so a
calibration window looks like a monitored window of the usual product mix, not like one product's run.
Calibrations are cached per window size. The lot null is only as precise as the reference holds independent
windows (about n_ref / n): calibrated on average, but the false-alarm rate one line sees with its one reference
varies around alpha (see ``benchmarks/results/bench_drift_calibration.md``).

Pure functions (:func:`ks_per_axis`, :func:`bh_adjust`, :func:`bonferroni`, :func:`effect_size`, :func:`psi`,
:func:`psi_band`, :func:`mmd_permutation_test`, :func:`score_distribution_test`) hold the statistics;
:class:`DriftDetector` follows the detector shape (``fit(reference)``, then ``test(window)`` -> :class:`DriftResult`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from tqdm.auto import tqdm

from pipeline.analysis.detectors.base import NotFittedError
from pipeline.analysis.windows import DEFAULT_SHIFTS, Window, windows  # noqa: F401 - re-exported
from pipeline.common.schemas import as_latent_matrix

__all__ = [
    "DriftDetector",
    "DriftResult",
    "Window",
    "bh_adjust",
    "bonferroni",
    "effect_size",
    "even_subsample",
    "ks_per_axis",
    "median_heuristic",
    "mmd2_unbiased",
    "mmd_permutation_test",
    "psi",
    "psi_band",
    "score_distribution_test",
    "score_tail_test",
    "windows",
]

log = logging.getLogger(__name__)

PSI_MODERATE = 0.1
PSI_SIGNIFICANT = 0.25


# ------------------------------------------------------------------------------------------------------------
# pure statistics
# ------------------------------------------------------------------------------------------------------------
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


def _as_channels(X: Any, n: int, what: str) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """(n, k) float matrix and channel names of per-image channels (None passes through)."""
    if X is None:
        return None, ()
    if isinstance(X, pd.DataFrame):
        names = tuple(str(c) for c in X.columns)
        M = X.to_numpy(dtype=np.float64)
    else:
        M = np.asarray(X, dtype=np.float64)
        if M.ndim == 1:
            M = M[:, None]
        names = tuple(f"q_{i}" for i in range(M.shape[1] if M.ndim == 2 else 0))
    if M.ndim != 2 or M.shape[0] != n or M.shape[1] == 0:
        raise ValueError(f"{what} must have shape ({n}, k) with k >= 1, got {M.shape}")
    if not np.isfinite(M).all():
        raise ValueError(f"{what} contain NaN or inf")
    return M, names


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



# ------------------------------------------------------------------------------------------------------------
# detector
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DriftResult:
    """Outcome of :meth:`DriftDetector.test` on one window.

    Attributes:
        detected: the window is flagged (some family fired at ``family_alpha``).
        fired: names of the families that fired, from ``("axes", "mmd", "scores", "quality")``.
        family_p: p-value of each family tested (under the null in force).
        family_alpha: level each family is tested at (``alpha / number of families``).
        mmd_stat: unbiased MMD^2 of the window against the reference.
        mmd_p: its p-value (permutation under the i.i.d. null, lot-bootstrap under the lot null).
        score_stat: AUC of window vs reference anomaly scores (None without scores).
        score_p: the score family's one-sided p-value, AUC and tail share combined (None without scores).
        per_axis: one row per axis, sorted by ``rank``: ``axis, ks_stat, p_value, p_adjusted, effect_size, psi,
            psi_band, significant, rank``. ``p_value``/``p_adjusted`` are the i.i.d. KS values; under the lot null
            ``significant`` means ``ks_stat`` exceeds the lot-null threshold of the max KS statistic.
        top_axis: the axis that moved most (largest |effect| among significant axes, else overall).
        top_share: share of the total |effect| carried by ``top_axis`` (1.0 = one axis explains the shift).
        n_ref: reference size.
        n_cur: window size.
        null: ``"iid"`` or ``"lot"``.
        thresholds: the decision thresholds used (levels, lot-null quantiles, the expected null PSI).
        quality_stat: largest |mean shift| of the image-quality channels, in reference sd (None without them).
        quality_p: p-value of the quality family (Welch t-tests, Bonferroni over channels, under the i.i.d. null;
            lot bootstrap of the largest |shift| under the lot null; None without channels).
        per_channel: one row per quality channel, significant first then by |effect|: ``channel, ks_stat, p_value,
            effect_size, significant`` (``p_value``: Welch t-test; None without channels).
        score_tail: share of the window's cells above the reference's ``1 - score_tail`` score quantile (None
            without scores); ``score_tail_expected`` is that share on the reference (``score_tail``, e.g. 0.10).
        mix: the window's product mix against the reference's (:class:`pipeline.analysis.strata.MixSignal`; None without
            ``cur_strata``): context, not a test. Its ``explains`` says whether it can explain the verdict.
        n_untested: window images of a product the reference does not know, left out of the test (all of them,
            ``n_cur`` = 0 and nothing fired, when fewer than ``min_window`` known cells were left).
        meta: detector name, version, params, model id.
    """

    detected: bool
    fired: tuple[str, ...]
    family_p: dict[str, float]
    family_alpha: float
    mmd_stat: float
    mmd_p: float
    score_stat: float | None
    score_p: float | None
    per_axis: pd.DataFrame
    top_axis: int
    top_share: float
    n_ref: int
    n_cur: int
    null: str
    thresholds: dict[str, float]
    quality_stat: float | None = None
    quality_p: float | None = None
    per_channel: pd.DataFrame | None = None
    score_tail: float | None = None
    score_tail_expected: float | None = None
    mix: Any = None
    n_untested: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def top_channel(self) -> str | None:
        """The image-quality channel that moved most when the quality family fired, else None."""
        if self.per_channel is None or "quality" not in self.fired:
            return None
        return str(self.per_channel.iloc[0]["channel"])

    def summary(self) -> str:
        """One line for logs and alerts."""
        head = "drift" if self.detected else "no drift"
        fams = ", ".join(f"{k} p={v:.3g}" for k, v in self.family_p.items())
        row = self.per_axis.iloc[0]
        return (
            f"{head} ({self.null} null, n={self.n_cur}; {fams}); top axis z_{self.top_axis}: "
            f"effect {row['effect_size']:+.2f} sd, KS {row['ks_stat']:.2f}, PSI {row['psi']:.2f} "
            f"({row['psi_band']}), {self.top_share:.0%} of the total shift"
        ) + (
            ""
            if self.top_channel is None
            else f"; image quality: {self.top_channel} {self.per_channel.iloc[0]['effect_size']:+.2f} sd"
        )


def _too_small(n: int, min_window: int, alpha: float) -> str:
    return (
        f"window has {n} images; at least {min_window} are needed for a drift test at alpha={alpha:g}; "
        "widen the window (per day instead of per shift)"
    )


def _both_or_neither(ref: Any, cur: Any, what: str, fit_arg: str, test_arg: str) -> None:
    """A family is tested only when the reference and the window both carry its data."""
    if (cur is None) != (ref is None):
        raise ValueError(
            f"{what} must be given for both the reference (fit {fit_arg}) and the window (test {test_arg}), "
            "or for neither"
        )


def _check_ref_scores(ref_scores: Any, n: int) -> np.ndarray | None:
    """``ref_scores`` as n finite floats (None stays None)."""
    if ref_scores is None:
        return None
    scores = np.asarray(ref_scores, dtype=np.float64).ravel()
    if scores.size != n:
        raise ValueError(f"ref_scores has {scores.size} values for {n} reference images")
    if not np.isfinite(scores).all():
        raise ValueError("ref_scores contain NaN or inf")
    return scores


def _check_ref_strata(ref_strata: Any, n: int) -> np.ndarray | None:
    """``ref_strata`` as n labels without missing values (None stays None)."""
    if ref_strata is None:
        return None
    strata = np.asarray(ref_strata)
    if strata.shape[0] != n:
        raise ValueError(f"ref_strata has {strata.shape[0]} values for {n} reference images")
    if pd.isna(strata).any():
        raise ValueError("ref_strata contain missing values; label every reference image (e.g. 'unknown')")
    return strata


def _reference_order(ref_order: Any, n: int) -> np.ndarray:
    """The stable sort order of the n reference images by the key ``ref_order``."""
    key = np.asarray(ref_order)
    if key.shape[0] != n:
        raise ValueError(f"ref_order has {key.shape[0]} values for {n} reference images")
    return np.argsort(key, kind="stable")


class DriftDetector:
    """Drift tests of windows of latents against a reference (see module docstring).

    Args:
        alpha: overall false-alarm rate per window (split over the test families).
        correction: multiplicity correction over axes under the i.i.d. null, ``"bh"`` or ``"bonferroni"``.
        n_permutations: permutations of the MMD test (i.i.d. null).
        min_window: smallest window accepted by ``test``.
        null: ``"iid"`` or ``"lot"``.
        lot_block: block length (images) of the lot-null bootstrap; None = each calibration window is one run of
            consecutive reference images (matches windows of consecutive images). Set it to the lot size when a
            window mixes several non-adjacent lots.
        n_calibration: bootstrap windows per window size for the lot null (>= k/alpha, default 500).
        mmd_max_ref: reference subsample size for the MMD statistic.
        psi_bins: bins of the PSI.
        score_tail: upper tail of the reference's anomaly scores whose share the score family watches (0.10: the
            share of cells above the reference's 90th percentile).
        random_state: seed; every ``test`` call is reproducible given its inputs.
        progress: show a progress bar while calibrating the lot null.
    """

    name = "DriftDetector"
    version = "1"

    def __init__(
        self,
        alpha: float = 0.05,
        correction: str = "bh",
        n_permutations: int = 200,
        min_window: int = 30,
        null: str = "iid",
        lot_block: int | None = None,
        n_calibration: int = 500,
        mmd_max_ref: int = 500,
        psi_bins: int = 10,
        score_tail: float = 0.1,
        random_state: int = 0,
        progress: bool = False,
    ) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if correction not in ("bh", "bonferroni"):
            raise ValueError(f"correction must be 'bh' or 'bonferroni', got {correction!r}")
        if null not in ("iid", "lot"):
            raise ValueError(f"null must be 'iid' or 'lot', got {null!r}")
        if min_window < 2:
            raise ValueError(f"min_window must be >= 2, got {min_window}")
        if lot_block is not None and lot_block < 1:
            raise ValueError(f"lot_block must be >= 1 or None, got {lot_block}")
        if null == "lot" and (n_calibration + 1) * alpha / 3.0 < 1.0:
            raise ValueError(
                f"n_calibration={n_calibration} cannot resolve p-values at alpha/3={alpha / 3:.3g}; "
                f"use at least {math.ceil(3.0 / alpha)}"
            )
        if n_permutations < 1:
            raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
        if not 0.0 < score_tail <= 0.5:
            raise ValueError(f"score_tail must be in (0, 0.5], got {score_tail}")
        self.alpha = float(alpha)
        self.correction = correction
        self.n_permutations = int(n_permutations)
        self.min_window = int(min_window)
        self.null = null
        self.lot_block = lot_block
        self.n_calibration = int(n_calibration)
        self.mmd_max_ref = int(mmd_max_ref)
        self.psi_bins = int(psi_bins)
        self.score_tail = float(score_tail)
        self.random_state = int(random_state)
        self.progress = progress

    def get_params(self) -> dict[str, Any]:
        """Hyperparameters given to ``__init__``."""
        keys = (
            "alpha correction n_permutations min_window null lot_block n_calibration mmd_max_ref psi_bins "
            "score_tail random_state"
        ).split()
        return {k: getattr(self, k) for k in keys}

    def __repr__(self) -> str:
        return "DriftDetector(" + ", ".join(f"{k}={v!r}" for k, v in self.get_params().items()) + ")"

    def min_reference(self) -> int:
        """Fewest reference images :meth:`fit` accepts with these settings (the retrain's floor and gate use it)."""
        return 2 * self.min_window

    # ---- fit -----------------------------------------------------------------------------------------------
    def fit(
        self, Z_ref: Any, ref_scores: Any = None, model_id: str | None = None, ref_order: Any = None,
        ref_lots: Any = None, ref_strata: Any = None, ref_quality: Any = None, ref_streams: Any = None,
        ref_periods: Any = None,
    ) -> DriftDetector:
        """Store the reference.

        Args:
            Z_ref: reference latents (n_ref, d) of normal images (a DataFrame with ``z_*`` columns works too).
            ref_scores: optional anomaly scores (n_ref,) of the same images; enables the score family.
            model_id: id of the model that encoded ``Z_ref``; ``test`` refuses windows from another model.
            ref_order: optional sort key (n_ref,) giving the production order of the reference (capture time, file
                order); the lot null draws consecutive images in this order. Default: row order.
            ref_lots: optional lot label (n_ref,) of each reference image. When given, lot-null calibration
                windows (and blocks) start at lot boundaries: use it when monitoring windows are cut on lot
                boundaries (a window = whole lots), which differ from the reference more than windows that start
                mid-lot.
            ref_strata: optional stratum label (n_ref,) of each reference image, e.g. the product type. When
                given, every lot-null calibration window takes from each stratum its share of the reference
                (largest-remainder rounding), as consecutive images *of that stratum*, and is compared with the rest
                of the reference re-weighted to the same shares. Without it, a calibration window of consecutive
                images is mostly one product, so the lot null measures product-mix swings and is far too wide for
                windows that mix products like the reference does.
            ref_quality: optional image-quality channels (n_ref, k) of the same images (a DataFrame keeps its column
                names, e.g. ``sharpness``, ``noise_level`` from :mod:`pipeline.latent.properties` at full resolution);
                enables the ``quality`` family: per-channel two-sample KS, which sees fine-scale faults (blur,
                sensor noise) that a latent computed at a few dozen pixels cannot.
            ref_streams: optional production stream (the line) of each reference image, with ``ref_periods``.
            ref_periods: optional production period (e.g. the plant day's ordinal) of each reference image. With
                both, the lot null calibrates on **production blocks** (:mod:`pipeline.analysis.blocks`): a calibration
                window is one (stream, period) of the reference resampled to the window's size, so it has the lots of
                one real line-day, and windows of any size are tested whole. Give them when a monitored window is one
                line's production over one period and the reference is a sample of many such periods (the
                monitor's calibration snapshot); with fewer than ``pipeline.analysis.blocks.MIN_BLOCKS`` usable blocks the
                runs of consecutive images are used.

        Returns:
            self.
        """
        Z = as_latent_matrix(Z_ref, "Z_ref")
        n = Z.shape[0]
        if n < self.min_reference():
            raise ValueError(
                f"reference has {n} images; at least {self.min_reference()} (2 x min_window) are needed"
            )
        scores = _check_ref_scores(ref_scores, n)
        quality, q_names = _as_channels(ref_quality, n, "ref_quality")
        strata = _check_ref_strata(ref_strata, n)
        if ref_order is not None:
            order = _reference_order(ref_order, n)
            Z = Z[order]
            scores = None if scores is None else scores[order]
            quality = None if quality is None else quality[order]
        else:
            order = np.arange(n)
        self._fit_lots(ref_lots, order, n)
        self._fit_strata(strata, order, n)
        self._fit_blocks(ref_streams, ref_periods, order, n)
        self._fit_reference(Z, scores, quality, q_names, model_id)
        return self

    def _fit_lots(self, ref_lots: Any, order: np.ndarray, n: int) -> None:
        """Lot starts and lot ids of the reference in production order (None without ``ref_lots``)."""
        self._lot_starts = None
        self._lot_ids = None
        if ref_lots is not None:
            lots = np.asarray(ref_lots)
            if lots.shape[0] != n:
                raise ValueError(f"ref_lots has {lots.shape[0]} values for {n} reference images")
            lots = lots[order]
            self._lot_starts = np.r_[0, np.flatnonzero(lots[1:] != lots[:-1]) + 1]
            self._lot_ids = np.cumsum(np.r_[0, lots[1:] != lots[:-1]])  # runs of equal labels, in order

    def _fit_strata(self, strata: np.ndarray | None, order: np.ndarray, n: int) -> None:
        """The reference's streams of rows per stratum and their shares (one stream of all rows without strata)."""
        if strata is None:
            self._streams = [(np.arange(n), 1.0)]
            self.strata_ = None
            self.ref_strata_ = None
        else:
            strata = np.asarray(strata, dtype=str)[order]
            labels, inv = np.unique(strata, return_inverse=True)
            self._streams = [(np.flatnonzero(inv == i), float(np.mean(inv == i))) for i in range(labels.size)]
            self.strata_ = {str(lab): share for lab, (_, share) in zip(labels, self._streams, strict=True)}
            self.ref_strata_ = strata

    def _fit_blocks(self, ref_streams: Any, ref_periods: Any, order: np.ndarray, n: int) -> None:
        """The reference's production blocks (None without streams and periods, or with too few blocks)."""
        self._blocks = None
        if (ref_streams is None) != (ref_periods is None):
            raise ValueError("give ref_streams and ref_periods together (the production block of each image)")
        if ref_streams is not None:
            from pipeline.analysis.blocks import ProductionBlocks

            for name, v in (("ref_streams", ref_streams), ("ref_periods", ref_periods)):
                if np.asarray(v).shape[0] != n:
                    raise ValueError(f"{name} has {np.asarray(v).shape[0]} values for {n} reference images")
            blocks = ProductionBlocks.from_labels(np.asarray(ref_streams)[order], np.asarray(ref_periods)[order])
            self._blocks = blocks if blocks.usable else None
            if self._blocks is None:
                log.warning("only %d production blocks in the reference: the lot null calibrates on runs of "
                            "consecutive images instead", len(blocks.rows))

    def _fit_reference(self, Z: np.ndarray, scores: np.ndarray | None, quality: np.ndarray | None,
                       q_names: Any, model_id: str | None) -> None:
        """Stores the ordered reference and what is computed from it once (PSI edges, MMD bandwidth)."""
        self.ref_ = Z
        self.ref_scores_ = scores
        self.ref_quality_ = quality
        self.quality_names_ = q_names
        self._q_sd = None if quality is None else np.maximum(quality.std(axis=0), 1e-12)
        self.model_id_ = model_id
        self.n_ref_, self.n_features_in_ = Z.shape
        self.psi_edges_ = _psi_edges(Z, self.psi_bins)
        self.sigma_ref_ = median_heuristic(Z, rng=self.random_state)
        self._calibrations: dict[Any, dict[str, np.ndarray]] = {}
        self.is_fitted_ = True

    @property
    def max_window(self) -> int | None:
        """Largest window the lot null calibrates honestly: a third of the reference (None: any size).

        Any size under the i.i.d. null and with production blocks (``ref_streams`` / ``ref_periods``).

        A lot-null calibration window is compared with the rest of the reference *minus a guard band* around it
        (:meth:`_block_indices`), so that it is compared with other lots and not with the rest of its own lot. Up to
        a third of the reference, the window, a guard band and a comparison set as large as the window all fit. A
        larger window leaves no room for the guard: the calibration windows are then compared with their own lots'
        neighbours, look more alike than new lots do, and the null is too narrow (measured in ``make demo``: a
        110-image reference of 5 days, day windows subsampled to half the reference, flagged a healthy day at
        quality p = 0.002; subsampled to a third, p = 0.34). Windows above ``max_window`` should be subsampled
        evenly (:func:`even_subsample`) before :meth:`test`, as the monitor does. It is never below ``min_window``
        (a reference under three minimum windows gets a narrower guard band).
        """
        self._check_fitted()
        if self.null == "iid" or self._blocks is not None:  # production blocks calibrate any window size
            return None
        return max(self.n_ref_ // 3, self.min_window)

    def rows_to_test(self, n: int) -> np.ndarray:
        """Positions of a window of ``n`` images to give :meth:`test`.

        All of them under the i.i.d. null; under the lot null, evenly subsampled to :attr:`max_window` when larger.
        """
        return np.arange(n) if self.max_window is None else even_subsample(n, self.max_window)

    def _check_fitted(self) -> None:
        if not getattr(self, "is_fitted_", False):
            raise NotFittedError("DriftDetector has not been fit: call fit(Z_ref) first")

    # ---- lot null ------------------------------------------------------------------------------------------
    def _shares(self, shares: dict[str, float] | None) -> list[float]:
        """Share of each stratum (stream order) in a calibration window: ``shares``, else the reference's."""
        if shares is None or self.strata_ is None:
            return [share for _, share in self._streams]
        raw = np.array([max(0.0, float(shares.get(lab, 0.0))) for lab in self.strata_])
        return (raw / raw.sum()).tolist() if raw.sum() > 0 else [share for _, share in self._streams]

    def _allocation(self, n: int, shares: dict[str, float] | None = None) -> list[int]:
        """Images per stratum in a calibration window of ``n`` (``shares``, else the reference's mix)."""
        raw = np.array([share * n for share in self._shares(shares)])
        k = np.floor(raw).astype(int)
        for i in np.argsort(-(raw - k), kind="stable")[: n - int(k.sum())]:
            k[i] += 1
        return k.tolist()

    def _block_indices(self, n: int, rng: np.random.Generator, shares: dict[str, float] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of one calibration window, and the rows to leave out of "the rest" for it.

        Per stratum (one stream of all rows without ``ref_strata``), the window takes its share as blocks of
        consecutive rows of that stratum. Left out of the rest are the window itself plus a guard band of one block
        length on each side of every block (or, with ``ref_lots``, every lot the window touches): a window that
        starts or ends inside a lot must not be compared with the other part of that same lot, which would make the
        calibration windows look more alike than new lots do.
        """
        N = self.n_ref_
        excl = np.zeros(N, dtype=bool)
        parts = []
        alloc = self._allocation(n, shares)
        for (rows, _), k in zip(self._streams, alloc, strict=True):
            if k == 0:
                continue
            n_s = rows.size
            L = k if self.lot_block is None else min(self.lot_block, k)
            n_blocks = math.ceil(k / L)
            cand = None
            if self._lot_ids is not None:
                ids = self._lot_ids[rows]
                first = np.r_[0, np.flatnonzero(ids[1:] != ids[:-1]) + 1]  # lot starts within this stratum
                cand = first[first <= n_s - L]
            if cand is not None and cand.size:
                starts = rng.choice(cand, size=n_blocks)
            else:
                starts = rng.integers(0, n_s - L + 1, size=n_blocks)
            pos = (starts[:, None] + np.arange(L)[None, :]).ravel()[:k]
            parts.append(rows[pos])
            if self._lot_ids is None:
                guard = max(0, min(L, (n_s - 2 * k) // (2 * n_blocks)))  # leave at least k rows of the stratum
                for s0 in starts:
                    excl[rows[max(0, s0 - guard) : s0 + L + guard]] = True
        idx = np.concatenate(parts)
        if self._lot_ids is not None:
            excl = np.isin(self._lot_ids, np.unique(self._lot_ids[idx]))
        excl[idx] = True
        short = any(
            k > 0 and int((~excl[rows]).sum()) < max(2, k // 2)
            for (rows, _), k in zip(self._streams, alloc, strict=True)
        )
        if N - int(excl.sum()) < n or short:  # lots larger than the reference allows: leave out the window alone
            excl[:] = False
            excl[idx] = True
        return idx, excl

    def _rest_weights(self, keep: np.ndarray, shares: dict[str, float] | None = None) -> np.ndarray:
        """Weights (summing to 1) of the kept reference rows that give them the calibration window's shares."""
        w = np.zeros(keep.size)
        for (rows, _), share in zip(self._streams, self._shares(shares), strict=True):
            kept = rows[keep[rows]]
            if kept.size:
                w[kept] = share / kept.size
        w = w[keep]
        return w / w.sum()

    def _block_weights(self, idx: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Weights of the kept rows giving them the product mix of a production-block window.

        The calibration window is compared with its own kinds, as a tested window is (uniform without strata).
        """
        from pipeline.analysis import strata as S

        rest = np.flatnonzero(keep)
        if self.ref_strata_ is None:
            return np.full(rest.size, 1.0 / rest.size)
        return S.reference_weights(self.ref_strata_[rest], self.ref_strata_[idx])

    def _window_stats_vs_rest(
        self, idx: np.ndarray, excl: np.ndarray, rng: np.random.Generator, shares: dict[str, float] | None = None,
        weights: np.ndarray | None = None,
    ) -> tuple[float, float, float, float, float]:
        """Family statistics of rows ``idx`` (repeats allowed) against the re-weighted rest.

        Max KS (axes), MMD^2, score AUC, max |mean shift| in sd (quality) and the score tail share. ``weights`` (of
        the kept rows) replace the stratum re-weighting to ``shares``.
        """
        keep = ~excl
        rest_idx = np.flatnonzero(keep)
        w = self._rest_weights(keep, shares) if weights is None else weights
        ks = _max_weighted_ks(self.ref_[idx], self.ref_[rest_idx], w)
        repeats = np.unique(idx).size < idx.size
        if repeats or rest_idx.size > self.mmd_max_ref:  # a weighted subsample keeps the stratum shares
            from pipeline.analysis.blocks import mmd2_multiset

            pos = np.flatnonzero(w > 0)
            sub = rng.choice(pos, min(self.mmd_max_ref, pos.size), replace=False, p=w[pos] / w[pos].sum())
            mmd = mmd2_multiset(self.ref_[rest_idx[sub]], self.ref_[idx], idx, self.sigma_ref_) if repeats else \
                mmd2_unbiased(self.ref_[rest_idx[sub]], self.ref_[idx], self.sigma_ref_)
        else:
            mmd = _weighted_mmd2(self.ref_[rest_idx], w, self.ref_[idx], self.sigma_ref_)
        auc = tail = math.nan
        if self.ref_scores_ is not None:
            auc = _weighted_auc(self.ref_scores_[idx], self.ref_scores_[rest_idx], w)
            cut = _weighted_quantile(self.ref_scores_[rest_idx], w, 1.0 - self.score_tail)
            tail = float(np.mean(self.ref_scores_[idx] > cut))
        qstat = math.nan
        if self.ref_quality_ is not None:
            shift = self.ref_quality_[idx].mean(axis=0) - w @ self.ref_quality_[rest_idx]
            qstat = float(np.max(np.abs(shift) / self._q_sd))
        return ks, mmd, auc, qstat, tail

    def calibrate(self, n: int, shares: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """Lot-null bootstrap distributions of the family statistics for windows of ``n`` images (cached).

        With ``shares`` (product -> share, with ``ref_strata``), calibration windows have that product mix and are
        compared with the rest re-weighted to it (the mix of a window tested with ``cur_strata``); default: the
        reference's own mix.

        Returns:
            ``{"axes": max-KS (B,), "mmd": MMD^2 (B,), "scores": AUC (B,), "quality": max |shift| (B,),
            "scores_tail": tail share (B,), "scores_minp": the smaller of the two score p-values (B,)}``, each sorted
            ascending (NaNs for a family without reference data). ``scores_minp`` is computed per bootstrap window
            (each against the other windows), so the score family's combined p-value keeps the AUC and the tail
            share's dependence.
        """
        self._check_fitted()
        if self._blocks is not None:
            return self._calibrate_blocks(n)
        key: Any = n if shares is None or self.strata_ is None else (n, tuple(np.round(self._shares(shares), 4)))
        if key in self._calibrations:
            return self._calibrations[key]
        if self.n_ref_ < 2 * n:
            raise ValueError(
                f"the lot null needs a reference at least twice the window: reference {self.n_ref_}, window {n}; "
                "use a larger reference or smaller windows"
            )
        rng = np.random.default_rng([self.random_state, n])
        out = np.empty((self.n_calibration, 5))
        it = range(self.n_calibration)
        for b in tqdm(it, desc=f"lot null n={n}", disable=not self.progress, leave=False):
            idx, excl = self._block_indices(n, rng, shares)
            out[b] = self._window_stats_vs_rest(idx, excl, rng, shares)
        self._calibrations[key] = self._calibration_table(out)
        return self._calibrations[key]

    def _calibrate_blocks(self, n: int) -> dict[str, np.ndarray]:
        """:meth:`calibrate` on production blocks (``pipeline.analysis.blocks``): any window size, any product mix."""
        from pipeline.analysis.blocks import draw_block_window

        key = ("blocks", n)
        if key not in self._calibrations:
            rng = np.random.default_rng([self.random_state, n, 1])
            out = np.empty((self.n_calibration, 5))
            it = range(self.n_calibration)
            for b in tqdm(it, desc=f"lot null n={n} (blocks)", disable=not self.progress, leave=False):
                idx, excl = draw_block_window(self._blocks, self.n_ref_, n, rng)
                out[b] = self._window_stats_vs_rest(idx, excl, rng, weights=self._block_weights(idx, ~excl))
            self._calibrations[key] = self._calibration_table(out)
        return self._calibrations[key]

    def _calibration_table(self, out: np.ndarray) -> dict[str, np.ndarray]:
        cal = {k: np.sort(out[:, i]) for i, k in enumerate(("axes", "mmd", "scores", "quality", "scores_tail"))}
        cal["scores_minp"] = np.sort(np.minimum(self._self_p(out[:, 2]), self._self_p(out[:, 4])))
        return cal

    @staticmethod
    def _boot_threshold(boot: np.ndarray, level: float) -> float:
        """Largest bootstrap value a statistic must exceed for its empirical p-value to be <= level."""
        # the most bootstrap values allowed at or above the statistic (1e-9: float-safe at level * (B + 1) integer)
        k_max = math.floor(level * (boot.size + 1) - 1 + 1e-9)
        return float(boot[boot.size - k_max - 1])

    @staticmethod
    def _self_p(values: np.ndarray) -> np.ndarray:
        """Empirical upper-tail p-value of each bootstrap value against the other ones: ``(#{others >= v} + 1) / B``."""
        s = np.sort(values)
        n_ge = values.size - np.searchsorted(s, values - 1e-12, side="left")  # counts itself
        return n_ge / values.size

    @staticmethod
    def _boot_p(boot: np.ndarray, obs: float) -> float:
        n_ge = boot.size - np.searchsorted(boot, obs - 1e-12, side="left")
        return float((1.0 + n_ge) / (1.0 + boot.size))

    # ---- test ----------------------------------------------------------------------------------------------
    def test(
        self, Z_cur: Any, cur_scores: Any = None, model_id: str | None = None, cur_quality: Any = None,
        cur_strata: Any = None,
    ) -> DriftResult:
        """Test one window against the reference.

        Args:
            Z_cur: window latents (n_cur, d).
            cur_scores: anomaly scores (n_cur,) of the window; required iff ``ref_scores`` were given to ``fit``.
            model_id: id of the model that encoded ``Z_cur``; must equal the reference's when both are known.
            cur_quality: image-quality channels (n_cur, k) of the window; required iff ``ref_quality`` was given,
                with the same channels.
            cur_strata: product label (n_cur,) of every window image. With ``ref_strata`` given to ``fit``, every
                family compares the window with the reference **re-weighted to the window's product shares**
                (:mod:`pipeline.analysis.strata`): each product with its own kind, so a swing of the product mix is not
                drift; the lot null is calibrated at the window's mix. The mix itself is reported in
                ``DriftResult.mix``.

        Returns:
            :class:`DriftResult`.

        Raises:
            NotFittedError: before ``fit``.
            ValueError: too-small window, NaNs, model-id or dimension mismatch, scores given on one side only.
        """
        win = self._window(Z_cur, cur_scores, model_id, cur_quality, cur_strata)
        families = ["axes", "mmd"] + (["scores"] if win.scores is not None else []) + (
            ["quality"] if win.quality is not None else []
        )
        if not win.comparable:
            return self._not_comparable(win, families)
        fam_alpha = self.alpha / len(families)
        if self.null == "lot" and (self.n_calibration + 1) * fam_alpha < 1.0:
            raise ValueError(
                f"n_calibration={self.n_calibration} cannot resolve p-values at alpha/{len(families)}="
                f"{fam_alpha:.3g}; use at least {math.ceil(1.0 / fam_alpha)}"
            )
        # seeded by the window's content: reproducible for a given window, but a fresh reference subsample and
        # permutation set for each window, so the false-alarm rate over many windows does not hinge on one
        # particular MMD reference subsample
        rng = np.random.default_rng([self.random_state, win.n, zlib.crc32(win.Z.tobytes())])
        stats_ = _FamilyStats(family_p={}, thresholds={
            "alpha": self.alpha, "family_alpha": fam_alpha,
            "psi_null_expected": (len(self.psi_edges_[0])) * (1.0 / win.n + 1.0 / self.n_ref_),
        })
        self._describe(win, stats_, rng)
        if self.null == "iid":
            self._iid_families(win, stats_, fam_alpha, rng)
        else:
            self._lot_families(win, stats_, fam_alpha, rng)
        return self._result(win, stats_, families, fam_alpha)

    def _window(self, Z_cur: Any, cur_scores: Any, model_id: str | None, cur_quality: Any, cur_strata: Any
                ) -> _WindowData:
        """Validate a window and work out the reference weights that match its product mix."""
        self._check_fitted()
        if model_id is not None and self.model_id_ is not None and model_id != self.model_id_:
            raise ValueError(
                f"reference was encoded by model {self.model_id_!r} but the window by model {model_id!r}; "
                "latents of different models are not comparable: re-encode the reference or the window"
            )
        Z = as_latent_matrix(Z_cur, "Z_cur")
        n = Z.shape[0]
        if n < self.min_window:
            raise ValueError(_too_small(n, self.min_window, self.alpha))
        if Z.shape[1] != self.n_features_in_:
            raise ValueError(
                f"window has {Z.shape[1]} latent axes but the reference has {self.n_features_in_}; "
                "were they encoded by different models?"
            )
        _both_or_neither(self.ref_scores_, cur_scores, "anomaly scores", "ref_scores", "cur_scores")
        scores = None
        if cur_scores is not None:
            scores = np.asarray(cur_scores, dtype=np.float64).ravel()
            if scores.size != n:
                raise ValueError(f"cur_scores has {scores.size} values for {n} window images")
            if not np.isfinite(scores).all():
                raise ValueError("cur_scores contain NaN or inf")
        _both_or_neither(self.ref_quality_, cur_quality, "image-quality channels", "ref_quality", "cur_quality")
        quality = None
        if cur_quality is not None:
            quality, names = _as_channels(cur_quality, n, "cur_quality")
            if quality.shape[1] != self.ref_quality_.shape[1] or (
                isinstance(cur_quality, pd.DataFrame) and list(names) != list(self.quality_names_)
            ):
                raise ValueError(
                    f"window quality channels {list(names)} do not match the reference's {list(self.quality_names_)}"
                )
        win = _WindowData(Z, scores, quality, n, *self._mix_weights(cur_strata, n))
        return self._supported_part(win)

    def _supported_part(self, win: _WindowData) -> _WindowData:
        """The window's cells of products the reference knows; cells of another product are not tested.

        A product the reference holds (almost) no images of cannot be compared with its own kind: testing it against
        the other products would call every such day drift, keep it out of the next training, and so never let the
        model learn it. Its cells are left out of the test (``DriftResult.n_untested``) and the mix names them; with
        fewer than ``min_window`` cells left the window is not comparable (:meth:`_not_comparable`).
        """
        from pipeline.analysis import strata as S

        if win.mix is None or not win.mix.unsupported:
            return win
        keep = ~np.isin(win.strata, list(win.mix.unsupported))
        if keep.sum() < self.min_window:
            return dataclasses.replace(win, n_untested=win.n, comparable=False)
        sub = dataclasses.replace(
            win, Z=win.Z[keep], n=int(keep.sum()), strata=win.strata[keep], n_untested=int((~keep).sum()),
            scores=None if win.scores is None else win.scores[keep],
            quality=None if win.quality is None else win.quality[keep])
        w = S.reference_weights(self.ref_strata_, sub.strata)
        cal = {lab: round(float(w[self.ref_strata_ == lab].sum()) * 20) / 20 for lab in self.strata_}
        return dataclasses.replace(sub, weights=w, cal_shares=cal)

    def _not_comparable(self, win: _WindowData, families: list[str]) -> DriftResult:
        """The result for a window with too few cells of known products to test: no drift, nothing fired."""
        d = self.n_features_in_
        table = pd.DataFrame({
            "axis": np.arange(d), "ks_stat": 0.0, "p_value": 1.0, "p_adjusted": 1.0, "effect_size": 0.0, "psi": 0.0,
            "psi_band": "stable", "significant": False, "rank": np.arange(1, d + 1)})
        return DriftResult(
            detected=False, fired=(), family_p=dict.fromkeys(families, 1.0), family_alpha=self.alpha / len(families),
            mmd_stat=0.0, mmd_p=1.0, score_stat=None, score_p=None, per_axis=table, top_axis=0, top_share=0.0,
            n_ref=self.n_ref_, n_cur=0, null=self.null, thresholds={"alpha": self.alpha}, mix=win.mix,
            n_untested=win.n_untested,
            meta={"name": self.name, "version": self.version, "params": self.get_params(), "model_id": self.model_id_,
                  "comparable": False},
        )

    def _mix_weights(self, cur_strata: Any, n: int
                     ) -> tuple[np.ndarray | None, Any, dict[str, float] | None, np.ndarray | None]:
        """(reference weights for the window's mix or None, the mix signal, calibration shares, window labels)."""
        from pipeline.analysis import strata as S

        if cur_strata is None:
            return None, None, None, None
        cur = S.labels(cur_strata)
        if cur.size != n:
            raise ValueError(f"cur_strata has {cur.size} values for {n} window images")
        if self.ref_strata_ is None:  # the reference's products are unknown: nothing to condition on or compare
            return None, None, None, cur
        w = S.reference_weights(self.ref_strata_, cur)
        # the lot null's calibration mix: the weights' share of each product (rounded: calibrations are cached)
        cal = {lab: round(float(w[self.ref_strata_ == lab].sum()) * 20) / 20 for lab in self.strata_}
        return w, S.mix_signal(self.ref_strata_, cur), cal, cur

    def _matched_reference(self, win: _WindowData, rng: np.random.Generator) -> np.ndarray:
        """Reference rows with the window's product mix (all rows when the window is not conditioned)."""
        from pipeline.analysis import strata as S

        if win.weights is None:
            return np.arange(self.n_ref_)
        return S.matched_rows(self.ref_strata_, win.strata, rng)

    def _describe(self, win: _WindowData, st: _FamilyStats, rng: np.random.Generator) -> None:
        """Per-axis KS (i.i.d. p-values), effect sizes and PSI, and the quality channels' shifts."""
        ref = self.ref_
        rows = self._matched_reference(win, rng)
        st.ks, st.p = ks_per_axis(ref[rows], win.Z)
        st.p_adj = bh_adjust(st.p) if self.correction == "bh" else bonferroni(st.p)
        w = win.weights
        if w is None:
            st.eff = effect_size(ref, win.Z)
            st.psis = _psi_from_edges(ref, win.Z, self.psi_edges_, 1e-4)
        else:
            st.eff = (win.Z.mean(axis=0) - w @ ref) / np.maximum(ref.std(axis=0, ddof=1), 1e-12)
            st.psis = _psi_from_edges(ref, win.Z, self.psi_edges_, 1e-4, ref_weights=w)
            st.ks = _weighted_ks(win.Z, ref, w)
        st.ref_rows = rows
        if win.quality is not None:
            q_ref = self.ref_quality_
            st.q_ks, _ = ks_per_axis(q_ref[rows], win.quality)
            if w is None:
                st.q_eff = effect_size(q_ref, win.quality)
            else:
                st.q_eff = (win.quality.mean(axis=0) - w @ q_ref) / np.maximum(q_ref.std(axis=0, ddof=1), 1e-12)
            q_pv = stats.ttest_ind(win.quality, q_ref[rows], axis=0, equal_var=False).pvalue
            st.q_pv = np.where(np.isfinite(q_pv), q_pv, 1.0)
            st.quality_stat = float(np.max(np.abs(st.q_eff)))

    def _iid_families(self, win: _WindowData, st: _FamilyStats, fam_alpha: float, rng: np.random.Generator
                      ) -> None:
        """Family p-values under the i.i.d. null (the reference matched to the window's mix)."""
        ref = self.ref_[st.ref_rows]
        st.family_p["axes"] = float(st.p_adj.min())
        st.significant = st.p_adj <= fam_alpha
        st.mmd_stat, st.mmd_p = mmd_permutation_test(
            ref, win.Z, n_permutations=self.n_permutations, rng=rng, max_ref=self.mmd_max_ref
        )
        if win.scores is not None:
            r_scores = self.ref_scores_[st.ref_rows]
            st.score_stat, p_auc = score_distribution_test(r_scores, win.scores)
            st.tail_share, p_tail = score_tail_test(r_scores, win.scores, self.score_tail)
            st.score_p = min(1.0, 2.0 * min(p_auc, p_tail))
        if win.quality is not None:
            q_adj = bonferroni(st.q_pv)
            st.quality_p = float(q_adj.min())
            st.q_sig = q_adj <= fam_alpha
        st.thresholds["p_adjusted"] = fam_alpha

    def _lot_mmd(self, win: _WindowData, rng: np.random.Generator) -> float:
        """MMD^2 of the window against the (mix-weighted) reference, with the reference bandwidth."""
        ref, w = self.ref_, win.weights
        if w is None:
            sub = ref if ref.shape[0] <= self.mmd_max_ref else ref[rng.choice(ref.shape[0], self.mmd_max_ref,
                                                                              replace=False)]
            return mmd2_unbiased(sub, win.Z, self.sigma_ref_)
        if ref.shape[0] > self.mmd_max_ref:
            keep = np.flatnonzero(w > 0)
            sub = rng.choice(keep, min(self.mmd_max_ref, keep.size), replace=False, p=w[keep] / w[keep].sum())
            return mmd2_unbiased(ref[sub], win.Z, self.sigma_ref_)
        return _weighted_mmd2(ref, w, win.Z, self.sigma_ref_)

    def _lot_scores(self, win: _WindowData) -> tuple[float, float]:
        """Score AUC and tail share of the window against the (mix-weighted) reference."""
        if win.weights is None:
            cut = np.quantile(self.ref_scores_, 1.0 - self.score_tail)
            return _auc(win.scores, self.ref_scores_), float(np.mean(win.scores > cut))
        cut = _weighted_quantile(self.ref_scores_, win.weights, 1.0 - self.score_tail)
        return _weighted_auc(win.scores, self.ref_scores_, win.weights), float(np.mean(win.scores > cut))

    def _lot_families(self, win: _WindowData, st: _FamilyStats, fam_alpha: float, rng: np.random.Generator
                      ) -> None:
        """Family p-values under the lot null, calibrated at the window's size and product mix."""
        cal = self.calibrate(win.n, shares=win.cal_shares)
        ks_thr = self._boot_threshold(cal["axes"], fam_alpha)
        st.family_p["axes"] = self._boot_p(cal["axes"], float(st.ks.max()))
        st.significant = st.ks > ks_thr
        st.mmd_stat = self._lot_mmd(win, rng)
        st.mmd_p = self._boot_p(cal["mmd"], st.mmd_stat)
        st.thresholds.update({"max_ks": ks_thr, "mmd2": self._boot_threshold(cal["mmd"], fam_alpha)})
        if win.scores is not None:
            st.score_stat, st.tail_share = self._lot_scores(win)
            min_p = min(self._boot_p(cal["scores"], st.score_stat), self._boot_p(cal["scores_tail"], st.tail_share))
            n_le = int(np.searchsorted(cal["scores_minp"], min_p + 1e-12, side="right"))
            st.score_p = (1.0 + n_le) / (1.0 + cal["scores_minp"].size)
            st.thresholds["score_auc"] = self._boot_threshold(cal["scores"], fam_alpha)
            st.thresholds["score_tail_share"] = self._boot_threshold(cal["scores_tail"], fam_alpha)
        if win.quality is not None:
            q_thr = self._boot_threshold(cal["quality"], fam_alpha)
            st.quality_p = self._boot_p(cal["quality"], st.quality_stat)
            st.q_sig = np.abs(st.q_eff) > q_thr
            st.thresholds["quality_max_shift_sd"] = q_thr

    def _result(self, win: _WindowData, st: _FamilyStats, families: list[str], fam_alpha: float) -> DriftResult:
        """Assemble the :class:`DriftResult` (families fired, ranked axes, channels, mix)."""
        st.family_p["mmd"] = float(st.mmd_p)
        if st.score_p is not None:
            st.family_p["scores"] = float(st.score_p)
        per_channel = None
        if st.quality_p is not None:
            st.family_p["quality"] = float(st.quality_p)
            per_channel = pd.DataFrame(
                {"channel": list(self.quality_names_), "ks_stat": st.q_ks, "p_value": st.q_pv,
                 "effect_size": st.q_eff, "significant": st.q_sig}
            ).assign(_abs=np.abs(st.q_eff)).sort_values(["significant", "_abs"], ascending=False, kind="stable",
                                                        ignore_index=True).drop(columns="_abs")
        fired = tuple(k for k in families if st.family_p[k] <= fam_alpha * (1 + 1e-9))
        # rank: significant axes by |effect| first, then the rest by |effect|
        abs_eff = np.abs(st.eff)
        order = np.lexsort((-abs_eff, ~st.significant))
        rank = np.empty(order.size, dtype=int)
        rank[order] = np.arange(1, order.size + 1)
        table = pd.DataFrame({
            "axis": np.arange(self.n_features_in_), "ks_stat": st.ks, "p_value": st.p, "p_adjusted": st.p_adj,
            "effect_size": st.eff, "psi": st.psis, "psi_band": [psi_band(v) for v in st.psis],
            "significant": st.significant, "rank": rank,
        }).sort_values("rank", kind="stable", ignore_index=True)
        top = int(order[0])
        total = float(abs_eff.sum())
        return DriftResult(
            detected=bool(fired), fired=fired, family_p=st.family_p, family_alpha=fam_alpha,
            mmd_stat=float(st.mmd_stat), mmd_p=float(st.mmd_p), score_stat=st.score_stat, score_p=st.score_p,
            per_axis=table, top_axis=top, top_share=float(abs_eff[top] / total) if total > 0 else 0.0,
            n_ref=self.n_ref_, n_cur=win.n, null=self.null, thresholds=st.thresholds,
            quality_stat=st.quality_stat, quality_p=st.quality_p, per_channel=per_channel,
            score_tail=st.tail_share, score_tail_expected=None if st.tail_share is None else self.score_tail,
            mix=win.mix, n_untested=win.n_untested,
            meta={"name": self.name, "version": self.version, "params": self.get_params(), "model_id": self.model_id_,
                  "calibration_shares": win.cal_shares},
        )


@dataclass
class _WindowData:
    """A validated window: latents, scores, quality channels, and how the reference is matched to its mix."""

    Z: np.ndarray
    scores: np.ndarray | None
    quality: np.ndarray | None
    n: int
    weights: np.ndarray | None
    """Reference weights giving the reference the window's product mix (None: unconditioned, uniform)."""
    mix: Any = None
    """The window's :class:`pipeline.analysis.strata.MixSignal` (None without ``cur_strata``)."""
    cal_shares: dict[str, float] | None = None
    """Product shares the lot null is calibrated at (None: the reference's own)."""
    strata: np.ndarray | None = None
    """Product label of every window image (None without ``cur_strata``)."""
    n_untested: int = 0
    """Window images of products the reference does not know, left out of the test."""
    comparable: bool = True
    """False when too few cells of known products are left to test."""


@dataclass
class _FamilyStats:
    """Statistics of one window's test as they are worked out, step by step."""

    family_p: dict[str, float]
    thresholds: dict[str, float]
    ks: np.ndarray = field(default_factory=lambda: np.empty(0))
    p: np.ndarray = field(default_factory=lambda: np.empty(0))
    p_adj: np.ndarray = field(default_factory=lambda: np.empty(0))
    eff: np.ndarray = field(default_factory=lambda: np.empty(0))
    psis: np.ndarray = field(default_factory=lambda: np.empty(0))
    significant: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))
    ref_rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=int))
    mmd_stat: float = math.nan
    mmd_p: float = math.nan
    score_stat: float | None = None
    score_p: float | None = None
    tail_share: float | None = None
    q_ks: np.ndarray | None = None
    q_pv: np.ndarray | None = None
    q_eff: np.ndarray | None = None
    q_sig: np.ndarray | None = None
    quality_stat: float | None = None
    quality_p: float | None = None


def even_subsample(n: int, k: int) -> np.ndarray:
    """``min(n, k)`` row positions spread evenly over ``0 .. n-1`` (first and last included), in order.

    How a window larger than :attr:`DriftDetector.max_window` is cut down: every part of the window (every lot it
    spans, every hour of the shift) keeps its share.
    """
    if n < 0 or k < 1:
        raise ValueError(f"even_subsample needs n >= 0 and k >= 1, got n={n}, k={k}")
    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))
