"""The per-image flag threshold: the configured false-flag rate on the healthy cells of the running line.

The monitor flags an image when its anomaly score is above a threshold set on *out-of-sample* scores of the
champion's calibration snapshot (images of the line's own recent production that the model did not train on), at
the conformal ``(1 - fpr)`` order statistic (``pipeline.analysis.detectors.base.conformal_threshold``). For the rate to hold
on the line, the snapshot must be the line's normal production as it is:

* it keeps the images an earlier champion flagged (``pipeline.training.retrain.select_training_data`` drops them from
  training only). A snapshot without its top-scoring 5 % sets the threshold at about the 90th percentile of
  production, and the line then sees about twice the configured rate;
* normal production holds defective cells at its usual share (a few percent on a solar line). They score high, so
  a threshold on all of the snapshot's scores flags fewer *healthy* cells than configured: with a share ``pi`` of
  defective cells of which ``r`` score above the threshold, healthy cells see ``(fpr - pi r) / (1 - pi)``, i.e. 4.2 %
  for 5 % configured, 5 % defective cells and a weak score (r = 0.2), and almost none for a score that separates
  them well. Cells whose score is far out, above the skew-adjusted far-out fence of the snapshot's scores
  (:func:`healthy_mask`), are taken for defective cells and left out before the order statistic is taken. Healthy
  cells almost never pass that fence whatever the score's shape (synthetic healthy scores, normal, chi-square,
  log-normal or t with 3 dof: at most 0.5 %), so the rate on healthy cells returns to the configured one as the
  score separates defective cells better (5 % defective cells 8 sd out: 4.1 to 5.0 % instead of 0 to 0.4 %), and
  stays ``(fpr - pi r) / (1 - pi)`` when the score cannot tell them apart (no label can fix that).

The snapshot's out-of-sample scores must also be those of *new lots*: a cell judged by a detector fitted on its own
lot-mates (near it in z, at its lot's residual level) scores lower than a cell of tomorrow's lots. The snapshot is
therefore grouped by production period (:func:`production_groups`), each fold of periods is scored by a detector
fitted on the others (:func:`group_folds`, ``pipeline.handoff.bundle.grouped_calibration``), and the threshold is set
on those scores (:func:`grouped_threshold`, :class:`FlagConfig`).

Even so, whole days of new lots score higher or lower, and spread more or less, than the calibration periods did
(a module the snapshot has no kin of): judged against the calibration cells alone, one day floods the flags and the
next sees none. The monitor therefore judges each cell against its own line-day (Dynamic Part Average Testing,
AEC-Q001): its score in robust units of the day (median and interquartile range, :func:`robust_units`) must pass the
configured rate's order statistic of the calibration cells judged the same way against their own production periods
(:func:`period_threshold`, :func:`day_thresholds`). Defective cells, a few percent of a day, stay far above their
day's spread; a day of fewer cells than the monitor's smallest window keeps the calibration threshold.
:func:`day_offsets` is the one-sided lower-quartile rule the benchmarks compare it with (a day is only moved down,
by its lower quartile's rise).

The rule only reads scores, so it holds for any per-image score (the diffusion residual judged among neighbours in
z, or a later fused one): :func:`set_flag_threshold` works with any detector of the one protocol (``score`` /
``infer_threshold``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["PERIOD_FENCE", "PERIOD_MIN_CELLS", "RECENTRE_Q", "TRIM_FENCE", "FlagCalibration", "FlagConfig", "cross_fit_scores",
           "day_offsets", "day_thresholds", "group_folds", "grouped_threshold", "healthy_mask", "heldout_rate", "judged",
           "medcouple", "period_threshold", "production_groups", "robust_units", "set_flag_threshold"]

TRIM_FENCE = 3.0
"""Multiple of the (skew-adjusted) interquartile range above the third quartile beyond which a calibration score is
taken for a defective cell of normal production (Tukey's far-out fence); None / 0 in :func:`healthy_mask` keeps
every score."""


MIN_TRIM = 40
"""Fewest calibration scores for the fence to be used (quartiles and medcouple of fewer are too rough)."""


def medcouple(x: Any, max_n: int = 2000, seed: int = 0) -> float:
    """The medcouple (Brys, Hubert & Struyf 2004): a robust skewness in [-1, 1], 0 for a symmetric distribution.

    The median of ``((x_i - m) - (m - x_j)) / (x_i - x_j)`` over pairs ``x_i >= m >= x_j`` (m the median; pairs
    tied at the median count 0). O(n^2) memory, so more than ``max_n`` values are subsampled (seeded).
    """
    s = np.sort(np.asarray(x, dtype=np.float64).ravel())
    if s.size > max_n:
        s = np.sort(np.random.default_rng(seed).choice(s, max_n, replace=False))
    m = float(np.median(s))
    up, lo = s[s >= m], s[s <= m]
    den = up[:, None] - lo[None, :]
    num = (up[:, None] - m) - (m - lo[None, :])
    h = np.divide(num, den, out=np.zeros_like(num), where=den != 0)
    return float(np.median(h))


def healthy_mask(scores: Any, fence: float | None = TRIM_FENCE) -> np.ndarray:
    """True for calibration scores at or below the skew-adjusted far-out fence (all True without a fence).

    The fence is ``Q3 + fence x exp(3 MC) x IQR`` for a right-skewed sample (medcouple MC >= 0; ``exp(4 MC)`` for
    MC < 0), the adjusted boxplot of Hubert & Vandervieren (2008) at the far-out multiple: a skewed healthy score
    (a squared distance, a log-normal residual) gets a fence far enough out that its own tail is kept.

    Raises:
        ValueError: empty or non-finite scores.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0 or not np.isfinite(s).all():
        raise ValueError("healthy_mask needs finite, non-empty scores")
    if not fence or s.size < MIN_TRIM:
        return np.ones(s.size, dtype=bool)
    q1, q3 = np.quantile(s, [0.25, 0.75])
    mc = medcouple(s)
    skew = math.exp(3.0 * mc) if mc >= 0 else math.exp(4.0 * mc)
    return s <= q3 + fence * skew * (q3 - q1)


@dataclass(frozen=True)
class FlagCalibration:
    """How a detector's flag threshold was set.

    Attributes:
        threshold: the score above which an image is flagged.
        fpr_target: the configured false-flag rate.
        n_calibration: out-of-sample calibration scores available.
        n_trimmed: those above the far-out fence, left out as defective cells of normal production.
        flag_rate_all: share of all calibration scores above the threshold (what the line's whole production,
            defective cells included, is expected to see flagged).
    """

    threshold: float
    fpr_target: float
    n_calibration: int
    n_trimmed: int
    flag_rate_all: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"threshold": self.threshold, "fpr_target": self.fpr_target, "n_calibration": self.n_calibration,
                "n_trimmed": self.n_trimmed, "flag_rate_all": self.flag_rate_all}


def set_flag_threshold(detector: Any, X_val: Any, fpr: float, fence: float | None = TRIM_FENCE) -> FlagCalibration:
    """Threshold a fitted detector at ``fpr`` on held-out calibration rows, far-out scores left out.

    Args:
        detector: a fitted detector (``score``, ``infer_threshold``); its ``threshold_`` (and confidence intervals)
            are set by its own conformal rule on the kept rows.
        X_val: held-out calibration rows (the detector did not fit on them), in the detector's input format.
        fpr: the configured false-flag rate on healthy cells.
        fence: the far-out fence (``TRIM_FENCE``); None keeps every row.

    Returns:
        What was done. With too few kept rows for ``fpr`` the largest achievable rate is used (small test lines).
    """
    X = np.asarray(X_val)
    scores = np.asarray(detector.score(X), dtype=np.float64)
    keep = healthy_mask(scores, fence)
    try:
        detector.infer_threshold(X[keep], fpr=fpr)
    except ValueError:  # too few rows for that rate
        detector.infer_threshold(X[keep], fpr=min(0.5, 1.0 / max(int(keep.sum()) - 1, 1)))
    thr = float(detector.threshold_)
    return FlagCalibration(threshold=thr, fpr_target=float(fpr), n_calibration=int(scores.size),
                           n_trimmed=int((~keep).sum()), flag_rate_all=float(np.mean(scores > thr)))


RECENTRE_Q = 0.25
"""Quantile of a day's scores that stands for its typical healthy cell in :func:`day_offsets` (its lower quartile:
above a defect share of a few percent, it moves only with the healthy cells)."""


def day_offsets(scores: Any, days: Any, ref_scores: Any, *, quantile: float = RECENTRE_Q, min_cells: int = 30,
                two_sided: bool = False) -> np.ndarray:
    """How far each cell's day scores above the calibration cells: ``max(0, q_day - q_ref)`` per cell (one-sided).

    ``q`` is the ``quantile`` of the day's scores and of ``ref_scores`` (the calibration cells' out-of-sample scores,
    what the threshold was set on). A cell is flagged when ``score - offset`` is above the threshold. Days of fewer
    than ``min_cells`` cells get 0 (their quartile is too rough).

    Args:
        scores: per-image scores (N,).
        days: the production day of each cell (any labels, e.g. line and local date), (N,).
        ref_scores: the calibration cells' out-of-sample scores.
        quantile: the day's and the reference's quantile compared (:data:`RECENTRE_Q`).
        min_cells: fewest cells of a day for it to be moved.
        two_sided: also move a day that scores lower (``q_day - q_ref`` may be negative): every day is then flagged
            against its own lower quartile, at about the configured rate (Dynamic Part Average Testing's limits move
            both ways).

    Raises:
        ValueError: ``scores`` and ``days`` of different lengths, no reference scores, or a quantile outside (0, 1).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    d = pd.Series(np.asarray(days, dtype=object).ravel())
    ref = np.asarray(ref_scores, dtype=np.float64).ravel()
    if len(d) != len(s) or ref.size == 0 or not 0.0 < quantile < 1.0:
        raise ValueError(f"day_offsets needs one day per score and reference scores, and a quantile in (0, 1); got "
                         f"{len(s)} scores, {len(d)} days, {ref.size} reference scores, quantile {quantile}")
    out = np.zeros(len(s))
    q_ref = float(np.quantile(ref, quantile))
    for _, rows in d.groupby(d, sort=False).indices.items():
        if rows.size >= min_cells:
            delta = float(np.quantile(s[rows], quantile)) - q_ref
            out[rows] = delta if two_sided else max(0.0, delta)
    return out


PERIOD_MIN_CELLS = 15
"""Fewest calibration cells of a production period for it to count in :func:`period_threshold` (a nightly's
calibration snapshot holds 15-45 cells of most line-days; the monitored day itself needs the monitor's
``min_window``)."""


def robust_units(scores: Any, groups: Any, *, min_cells: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Each score in robust units of its own group, ``(s - median) / IQR`` of its group's scores.

    Returns:
        ``(units, ok)``: the scores in their group's units (NaN where not defined) and where they are defined: groups
        of at least ``min_cells`` scores whose interquartile range is positive.

    Raises:
        ValueError: scores and groups of different lengths.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    g = np.asarray(groups, dtype=object).ravel()
    if g.size != s.size:
        raise ValueError(f"robust_units needs one group per score, got {s.size} scores and {g.size} groups")
    med, iqr = _group_spread(s, g, np.ones(s.size, dtype=bool), min_cells)
    out = (s - med) / iqr
    return out, np.isfinite(out)


def _group_spread(s: np.ndarray, groups: np.ndarray, basis: np.ndarray, min_cells: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the median and interquartile range of its group's ``basis`` rows.

    NaN for groups of fewer than ``min_cells`` basis rows or with no spread.
    """
    med, iqr = np.full(s.size, np.nan), np.full(s.size, np.nan)
    g = pd.Series(groups)
    for _, rows in g.groupby(g, sort=False).indices.items():
        ref = rows[basis[rows]]
        if ref.size < min_cells:
            continue
        q1, m, q3 = np.quantile(s[ref], [0.25, 0.5, 0.75])
        if q3 > q1:
            med[rows], iqr[rows] = m, q3 - q1
    return med, iqr


PERIOD_FENCE = 2.0
"""Fence of :func:`period_threshold` (skew-adjusted IQRs above the third quartile of the cells' period units).

In period units a defective cell sits closer to the healthy ones than on the raw score (its own period's median and
IQR include it and its lot-mates), so the far-out fence (3) of the calibration threshold keeps most of them and the
configured rate then flags fewer healthy cells than configured. A line without defective cells loses almost none of
its healthy cells to this fence. Measurements with both fences: ``docs/monitoring.md``."""


def period_threshold(ref_scores: Any, ref_periods: Any, fpr: float, *, min_cells: int = PERIOD_MIN_CELLS,
                     fence: float | None = PERIOD_FENCE) -> float | None:
    """The flag threshold in robust units of a production period (the rule of :func:`day_thresholds`).

    Each calibration cell's out-of-period score is put in units of its own period (:func:`robust_units`), those above
    the skew-adjusted fence at ``fence`` IQRs (:func:`healthy_mask`, :data:`PERIOD_FENCE`) are taken for defective
    cells of normal production and left out, and the threshold is the conformal ``(1 - fpr)`` order statistic of
    the rest (``pipeline.analysis.detectors.base.conformal_threshold``). None when the periods of ``min_cells`` cells
    or more hold too few cells for ``fpr``.
    """
    from pipeline.analysis.detectors.base import conformal_threshold

    units, ok = robust_units(ref_scores, ref_periods, min_cells=min_cells)
    if not ok.any():
        return None
    u = units[ok]
    try:
        return float(conformal_threshold(u[healthy_mask(u, fence)], fpr)[0])
    except ValueError:  # too few cells for that rate
        return None


def day_thresholds(scores: Any, days: Any, threshold: float, unit_threshold: float | None, *,
                   min_cells: int = 30, basis: Any = None) -> np.ndarray:
    """Each cell's flag threshold when it is judged against its own line-day (Dynamic Part Average Testing).

    A cell is flagged when its score, in robust units of its day (median and interquartile range of the day's
    scores, :func:`robust_units`), is above ``unit_threshold`` (:func:`period_threshold`: the configured rate of the
    calibration cells judged the same way against their own production periods). That is a threshold of
    ``median_day + IQR_day x unit_threshold`` on the score itself, which this returns per cell. A day of new lots that
    scores higher or lower overall, or spreads more or less, is judged by its own level and spread; days of fewer
    than ``min_cells`` cells (too few for their quartiles), and every day when ``unit_threshold`` is None, keep
    ``threshold``.

    ``basis`` (bool per cell, default all) marks the cells whose scores set their day's median and interquartile
    range; the others are judged by them too. The monitor leaves out the champion's own calibration cells: the patch
    detector was fitted on them, so they score lower than any new cell.

    Raises:
        ValueError: ``scores``, ``days`` or ``basis`` of different lengths.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    d = np.asarray(days, dtype=object).ravel()
    use = np.ones(s.size, dtype=bool) if basis is None else np.asarray(basis, dtype=bool).ravel()
    if d.size != s.size or use.size != s.size:
        raise ValueError(f"day_thresholds needs one day per score, got {s.size} scores, {d.size} days and "
                         f"{use.size} basis flags")
    if unit_threshold is None:
        return np.full(s.size, float(threshold))
    med, iqr = _group_spread(s, d, use, min_cells)
    return np.where(np.isfinite(iqr), med + iqr * float(unit_threshold), float(threshold))


def judged(ref_products: Any, products: Any) -> np.ndarray:
    """True for images of a product the calibration snapshot knows (``pipeline.analysis.strata.MIN_STRATUM`` images or more).

    The threshold's rate holds for the snapshot's population; a cell of a product it has (almost) none of is judged
    against other products' neighbours, so it is not flagged (and stays in the next training, which learns the
    product) until the snapshot holds its kind. Everything is judged when the products are unknown (None).
    """
    from pipeline.analysis.strata import MIN_STRATUM, labels

    if products is None:
        return np.ones(0, dtype=bool)
    if ref_products is None:
        return np.ones(len(products), dtype=bool)
    counts = pd.Series(labels(ref_products)).value_counts()
    return np.array([counts.get(p, 0) >= MIN_STRATUM for p in labels(products)], dtype=bool)


@dataclass(frozen=True)
class FlagConfig:
    """How the flag threshold is calibrated so that it holds on production the detector has not seen.

    The calibration snapshot is grouped by production period (one line's plant day, :func:`production_groups`), and
    each group is scored by a detector fitted on the other groups only (:func:`group_folds`): a cell is never judged
    against its own lot-mates, as a cell of tomorrow's lots is not. The threshold is then set on those scores
    (:func:`grouped_threshold`).

    Attributes:
        min_groups: fewest production groups for the split by period; a snapshot with fewer (one day of one line)
            is cut into ``chunks`` runs of consecutive captures instead.
        chunks: runs of consecutive captures per line when the periods are too few.
        max_folds: cross-fitting folds (groups are dealt to folds in blocks of consecutive periods); each costs one
            detector fit.
        fence: far-out fence of :func:`healthy_mask` (``TRIM_FENCE``); None keeps every score.
        confidence: one-sided confidence that the mean rate over periods is at most the configured one, given the
            between-period spread of the calibration groups' rates (0.5: the rate itself, no margin).
    """

    min_groups: int = 4
    chunks: int = 6
    max_folds: int = 10
    fence: float | None = TRIM_FENCE
    confidence: float = 0.5

    def __post_init__(self) -> None:
        if self.min_groups < 2 or self.chunks < 2 or self.max_folds < 2 or not 0.0 < self.confidence < 1.0:
            raise ValueError(f"FlagConfig needs min_groups, chunks, max_folds >= 2 and confidence in (0, 1), got {self}")


def production_groups(captured_at: Any, lines: Any = None, config: FlagConfig = FlagConfig()) -> np.ndarray:
    """Production group of every calibration image: its line and UTC day, numbered in order of first capture.

    With fewer than ``config.min_groups`` line-days, or one line-day holding more than half of the images (the others
    could not fit a detector for it), each line's images in capture order are cut into ``config.chunks`` runs of
    consecutive captures instead (lots run in consecutive captures, so a run keeps a lot together).

    Raises:
        ValueError: no capture times, or lines of another length.
    """
    ts = pd.to_datetime(pd.Series(np.asarray(captured_at)), utc=True)
    if ts.empty or ts.isna().any():
        raise ValueError("production_groups needs a capture time for every calibration image")
    line = pd.Series([""] * len(ts)) if lines is None else pd.Series(np.asarray(lines, dtype=object)).astype(str)
    if len(line) != len(ts):
        raise ValueError(f"production_groups: {len(ts)} capture times but {len(line)} lines")
    key = line + "|" + ts.dt.strftime("%Y-%m-%d")
    if key.nunique() < config.min_groups or key.value_counts().max() > len(key) / 2:
        rank = ts.groupby(line).rank(method="first") - 1
        size = line.map(line.value_counts())
        key = line + "|" + (rank * config.chunks // size).astype(int).astype(str)
    first = ts.groupby(key).transform("min")
    order = pd.DataFrame({"line": line, "first": first, "key": key}).drop_duplicates("key").sort_values(["line", "first"])
    return key.map({k: i for i, k in enumerate(order["key"])}).to_numpy(np.int64)


def group_folds(groups: Any, max_folds: int = 10) -> list[np.ndarray]:
    """Row indices of each cross-fitting fold: the groups dealt into at most ``max_folds`` blocks of consecutive ids.

    Consecutive groups (one line's consecutive days, :func:`production_groups`) go to the same fold, so a lot that
    runs over midnight is not split between a fold and the data that judges it.
    """
    g = np.asarray(groups)
    ids = np.unique(g)
    n = min(int(max_folds), ids.size)
    if n < 2:
        raise ValueError(f"group_folds needs at least 2 groups, got {ids.size}")
    fold_of = {int(gid): i * n // ids.size for i, gid in enumerate(ids)}
    fold = np.array([fold_of[int(x)] for x in g])
    return [np.flatnonzero(fold == f) for f in range(n)]


def cross_fit_scores(fit_score: Callable[[np.ndarray, np.ndarray], np.ndarray], n: int, *, groups: Any = None,
                     max_folds: int = 10, seed: int = 0) -> np.ndarray:
    """Out-of-sample scores of ``n`` calibration rows: each fold scored by a detector fitted on the other folds.

    Args:
        fit_score: ``fit_score(fit_rows, score_rows)`` fits a detector on ``fit_rows`` and returns the scores of
            ``score_rows`` (index arrays).
        n: rows.
        groups: production period per row (folds of consecutive periods, :func:`group_folds`), or None (two seeded
            random halves).
        max_folds: at most this many folds.
        seed: seed of the random halves.
    """
    if groups is not None and np.unique(groups).size >= 2:
        folds = group_folds(groups, max_folds)
    else:
        folds = np.array_split(np.random.default_rng([seed, 1]).permutation(n), 2)
    out = np.empty(n)
    for rows in folds:
        out[rows] = fit_score(np.setdiff1d(np.arange(n), rows), rows)
    return out


def heldout_rate(scores: Any, groups: Any, fpr: float, config: FlagConfig = FlagConfig()) -> float:
    """Mean over period folds of the false-flag rate a fold's kept scores see at the threshold set on the other folds.

    The threshold is :func:`grouped_threshold`'s conformal order statistic; kept scores are those it keeps. NaN when
    no fold keeps a score.
    """
    from pipeline.analysis.detectors.base import conformal_threshold

    s, g = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(groups).ravel()
    _, keep = grouped_threshold(s, g, fpr, config)
    rates = []
    for rows in group_folds(g, config.max_folds):
        if not keep[rows].any():
            continue
        rest = np.setdiff1d(np.arange(len(s)), rows)
        rate, k = grouped_threshold(s[rest], g[rest], fpr, config)
        try:
            thr = float(conformal_threshold(s[rest][k], rate)[0])
        except ValueError:  # too few scores for that rate
            thr = float(np.max(s[rest][k]))
        rates.append(float((s[rows][keep[rows]] > thr).mean()))
    return float(np.mean(rates)) if rates else float("nan")


def grouped_threshold(scores: Any, groups: Any, fpr: float, config: FlagConfig = FlagConfig()) -> tuple[float, np.ndarray]:
    """The false-flag rate to threshold out-of-group calibration scores at, so the rate holds across periods.

    Scores whose group was left out of the detector's fit (:func:`group_folds`) stand for a new period's cells. Far-out
    scores are left out (:func:`healthy_mask`). The returned rate ``a <= fpr`` is the largest for which the conformal
    threshold of the kept scores at ``a`` (``conformal_threshold``) has an upper confidence bound of the mean rate
    over groups (at ``config.confidence``, from the between-group spread of the groups' own rates) at or below
    ``fpr``; ``confidence = 0.5`` gives ``fpr`` itself.

    Returns:
        (the rate for ``conformal_threshold``, mask of the kept scores).

    Raises:
        ValueError: scores and groups of different lengths, or non-finite scores.
    """
    from scipy import stats

    s = np.asarray(scores, dtype=np.float64).ravel()
    g = np.asarray(groups).ravel()
    if s.size != g.size:
        raise ValueError(f"grouped_threshold: {s.size} scores but {g.size} group labels")
    keep = healthy_mask(s, config.fence)
    sk, gk = s[keep], g[keep]
    z = float(stats.norm.ppf(config.confidence))
    ids, inv = np.unique(gk, return_inverse=True)
    if z <= 0 or ids.size < 2:
        return float(fpr), keep
    n = sk.size
    order = np.sort(sk)
    k0 = math.ceil((n + 1) * (1.0 - fpr))
    for k in range(max(k0, 1), n + 1):
        rates = np.bincount(inv, weights=(sk > order[k - 1]).astype(float), minlength=ids.size) / np.bincount(inv)
        if rates.mean() + z * rates.std(ddof=1) / math.sqrt(ids.size) <= fpr:
            return 1.0 - (k - 0.5) / (n + 1), keep
    return 1.0 - (n - 0.5) / (n + 1), keep
