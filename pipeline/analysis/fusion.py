"""One per-image anomaly score from several scoring families (patch map, diffusion residual), fitted on calibration data.

Each family scores an image on its own scale: the patch detector a whitened distance (positive, right-skewed), the
conditional residual a z-score among the image's z-neighbours (any sign). :class:`ScoreFusion` puts them on one scale
with transforms learnt from *normal calibration scores only* and averages them:

* ``log`` columns (positive scores) are log-transformed first (a floor keeps them finite);
* every column is then standardised by its calibration mean and standard deviation;
* the fused score is the weighted mean of the standardised columns (higher = more anomalous).

No anomalous image is needed. The threshold is then the same conformal order statistic as every linewatch detector
(:func:`pipeline.analysis.detectors.base.conformal_threshold`), set on calibration images the fusion was *not* fitted on,
so the false-alarm guarantee holds as today. :func:`calibrate_fusion` does the bookkeeping like
:func:`pipeline.handoff.bundle.detector_calibration`: fit on one third, threshold on the second, measure the false-alarm
rate on the last; the returned fusion is refitted on one half and thresholded on the other.

Calibration scores of each family must themselves be out-of-sample (the patch detector fitted on other images; the
conditional residual's leave-one-out ``reference_scores_``).

:func:`fused_calibration` is the monitor's recipe (a :class:`FusedDetector`): the calibration cells' patch scores are
cross-fitted over production periods (``pipeline.analysis.thresholds.group_folds``), like the residual family's
``calibration_scores``, so both families judge every calibration cell as a cell of a new lot; the threshold is the
lot-aware one of the residual detector (``grouped_threshold``) on the fused out-of-period scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.analysis.detectors.base import BaseDetector
from pipeline.common.schemas import as_latent_matrix

__all__ = ["FAMILIES", "PATCH_FOLDS", "FusedDetector", "FusionCalibration", "ScoreFusion", "calibrate_fusion",
           "fuse_families", "fused_calibration", "patch_reference_scores"]

PATCH_FOLDS = 5
"""At most this many cross-fitting folds for the patch family (each fit costs seconds whatever the cells: 64
per-position covariances of the patch map); every fold is still scored by a fit on other periods only."""
FAMILIES = ("patch", "residual")
"""The families of :class:`FusedDetector`: the patch map's score (log-transformed) and the residual family's."""

_LOG_FLOOR = 1e-12


class ScoreFusion(BaseDetector):
    """Weighted mean of per-family standardised (optionally log) scores.

    Input: a score matrix (N, m), one column per family, each higher = more anomalous.

    Args:
        names: family names, one per column (for reports).
        log: per column, whether to log-transform it before standardising (for positive scores).
        weights: non-negative weights, one per column (normalised to sum 1); default equal.
    """

    name = "ScoreFusion"
    version = "1"
    input_kind = "scores"
    _param_names = ("names", "log", "weights")
    _min_fit_samples = 3

    def __init__(self, names: Sequence[str], log: Sequence[bool] | None = None,
                 weights: Sequence[float] | None = None) -> None:
        m = len(names)
        if m == 0:
            raise ValueError("ScoreFusion needs at least one score family")
        self.names = tuple(str(n) for n in names)
        self.log = tuple(bool(v) for v in (log if log is not None else (False,) * m))
        w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
        if len(self.log) != m or w.shape != (m,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"log and weights must have one entry per family ({m}), weights >= 0 with a positive sum")
        self.weights = tuple(float(v) for v in w / w.sum())

    def _transform(self, S: np.ndarray) -> np.ndarray:
        T = S.copy()
        for c, use_log in enumerate(self.log):
            if use_log:
                T[:, c] = np.log(np.maximum(S[:, c], _LOG_FLOOR))
        return T

    def _fit(self, S: np.ndarray) -> None:
        T = self._transform(S)
        self.center_ = T.mean(axis=0)
        sd = T.std(axis=0, ddof=1)
        self.scale_ = np.where(sd > 1e-12, sd, 1.0)

    def standardised(self, X: Any) -> np.ndarray:
        """Per-family standardised scores (N, m): each family's contribution on the common scale."""
        self._check_fitted()
        S = self._validate(X, "scores")
        self._check_dim(S, "scores")
        return (self._transform(S) - self.center_) / self.scale_

    def _score(self, S: np.ndarray) -> np.ndarray:
        return ((self._transform(S) - self.center_) / self.scale_) @ np.asarray(self.weights)

    def _validate(self, X: Any, name: str) -> np.ndarray:
        S = as_latent_matrix(X, name)
        if S.shape[1] != len(self.names):
            raise ValueError(f"{name} has {S.shape[1]} score columns, expected {len(self.names)} ({self.names})")
        return S


@dataclass(frozen=True)
class FusionCalibration:
    """What :func:`calibrate_fusion` returns.

    Attributes:
        fusion: the fused detector, fitted on one half of the calibration scores and thresholded on the other.
        fpr_target: the false-alarm rate the threshold was set for.
        fpr_heldout: false-alarm rate measured on the held-out third (fit on the first, threshold on the second).
        n_heldout: images in the held-out third.
    """

    fusion: ScoreFusion
    fpr_target: float
    fpr_heldout: float
    n_heldout: int


def _threshold(det: ScoreFusion, S: np.ndarray, fpr: float) -> None:
    """Threshold at ``fpr``, or at the smallest rate ``S`` allows (small demo runs), recorded in ``det.fpr_``."""
    try:
        det.infer_threshold(S, fpr=fpr)
    except ValueError:
        det.infer_threshold(S, fpr=min(0.5, 1.0 / (len(S) - 1)))


def calibrate_fusion(scores: Any, names: Sequence[str], fpr: float, *, log: Sequence[bool] | None = None,
                     weights: Sequence[float] | None = None, seed: int = 0) -> FusionCalibration:
    """Fit and threshold a :class:`ScoreFusion` on normal calibration scores, and measure its false-alarm rate.

    Args:
        scores: out-of-sample scores (N, m) of the calibration images, one column per family.
        names: family names.
        fpr: target false-alarm rate.
        log: per family, log-transform before standardising.
        weights: per family weights.
        seed: split seed.

    Returns:
        :class:`FusionCalibration`.

    Raises:
        ValueError: fewer than 9 calibration images.
    """
    S = as_latent_matrix(scores, "scores")
    if len(S) < 9:
        raise ValueError(f"fusion calibration needs >= 9 calibration images, got {len(S)}")
    idx = np.random.default_rng(seed).permutation(len(S))
    a, b, c = np.array_split(idx, 3)
    probe = ScoreFusion(names, log, weights).fit(S[a])
    _threshold(probe, S[b], fpr)
    fpr_held = float((probe.score(S[c]) > probe.threshold_).mean())
    half = len(idx) // 2
    full = ScoreFusion(names, log, weights).fit(S[idx[:half]])
    _threshold(full, S[idx[half:]], fpr)
    return FusionCalibration(fusion=full, fpr_target=float(fpr), fpr_heldout=fpr_held, n_heldout=len(c))


@dataclass(frozen=True)
class FusedDetector:
    """The per-image detector with the patch family: one fused score of the patch map and the residual family.

    Attributes:
        patch: the patch detector fitted on every calibration cell (``PatchDetector``).
        fusion: the :class:`ScoreFusion` of ``FAMILIES``, thresholded lot-aware.
        ref_scores: out-of-period fused scores of the calibration cells (what the threshold was set on).
        fpr_heldout: mean over folds of the false-flag rate each fold's cells see at the threshold set on the others.
    """

    patch: Any
    fusion: ScoreFusion
    ref_scores: np.ndarray
    fpr_heldout: float

    @property
    def threshold(self) -> float:
        """The decision threshold on the fused score."""
        return float(self.fusion.threshold_)

    @property
    def residual_weight(self) -> float:
        """The residual family's weight against the patch family's (0: the patch family alone)."""
        w = self.fusion.weights
        return float(w[1] / w[0]) if w[0] > 0 else float("inf")

    def family_scores(self, patches: Any, residual_scores: Any = None) -> np.ndarray:
        """The score matrix (N, 2) of ``FAMILIES``: patch scores of the patch maps, and the given residual scores.

        ``residual_scores`` may be None (read as zeros) when the residual family's weight is 0.
        """
        n = len(patches) if residual_scores is None else np.asarray(residual_scores).size
        r = _residual_column(residual_scores, n, self.residual_weight)
        p = self.patch.score(patches) if len(r) else np.empty(0)
        return np.column_stack([p, r])

    def predict(self, patches: Any, residual_scores: Any = None) -> Any:
        """Fused scores and flags (``DetectionResult``) of cells: their patch maps and residual-family scores."""
        return self.fusion.predict(self.family_scores(patches, residual_scores))


def patch_reference_scores(patches: Any, *, groups: Any = None, flag: Any = None, seed: int = 0,
                           patch_detector: Callable[[], Any] | None = None) -> np.ndarray:
    """Out-of-period patch scores of the calibration cells (each fold of periods scored by a fit on the others).

    Args:
        patches: the calibration cells' backbone patch maps (N, C, h, w).
        groups: production period per cell, or None (two seeded random halves).
        flag: ``pipeline.analysis.thresholds.FlagConfig`` (its ``max_folds``, capped at :data:`PATCH_FOLDS`).
        seed: seed of the random halves.
        patch_detector: makes an unfitted patch detector (default: the Gaussian ``PatchDetector``).
    """
    from pipeline.analysis.detectors.patch import PatchDetector
    from pipeline.analysis.thresholds import FlagConfig, cross_fit_scores

    make = patch_detector or PatchDetector
    P = np.asarray(patches)
    return cross_fit_scores(lambda fit, rows: make().fit(P[fit]).score(P[rows]), len(P), groups=groups,
                            max_folds=min(PATCH_FOLDS, (flag or FlagConfig()).max_folds), seed=seed)


def fuse_families(patch: Any, patch_scores: Any, residual_scores: Any, fpr_target: float, *, groups: Any = None,
                  flag: Any = None, residual_weight: float = 1.0) -> FusedDetector:
    """The fused detector from a fitted patch detector and both families' out-of-period calibration scores.

    The fusion is fitted on the calibration scores, and thresholded on them with the residual detector's lot-aware
    rule (``pipeline.analysis.thresholds.grouped_threshold``; with no production groups, the conformal threshold).
    ``residual_weight`` is the residual family's weight against the patch family's 1 (0: the patch family alone;
    its residual scores may then be None).

    Raises:
        ValueError: fewer than 9 calibration cells, score arrays of different lengths, a negative weight, or no
            residual scores with a positive weight.
    """
    from pipeline.analysis.thresholds import FlagConfig, grouped_threshold, heldout_rate

    flag = flag or FlagConfig()
    p = np.asarray(patch_scores, dtype=np.float64).ravel()
    r = _residual_column(residual_scores, len(p), residual_weight)
    if len(p) != len(r) or len(r) < 9:
        raise ValueError(f"fused calibration needs >= 9 cells with one residual score each, got {len(p)} patch "
                         f"scores and {len(r)} residual scores")
    S = np.column_stack([p, r])
    fusion = ScoreFusion(FAMILIES, log=(True, False), weights=(1.0, float(residual_weight))).fit(S)
    fused = fusion.score(S)
    grouped = groups is not None and np.unique(groups).size >= 2
    g = np.asarray(groups) if grouped else np.zeros(len(r), int)
    rate, keep = grouped_threshold(fused, g, fpr_target, flag)
    held = heldout_rate(fused, g, fpr_target, flag) if grouped else float("nan")
    try:
        fusion.set_threshold_from_scores(fused[keep], rate)
    except ValueError:  # too few cells for that rate (small demo runs)
        fusion.set_threshold_from_scores(fused[keep], min(0.5, 1.0 / max(int(keep.sum()) - 1, 1)))
    return FusedDetector(patch, fusion, fused, held)


def _residual_column(residual_scores: Any, n: int, weight: float) -> np.ndarray:
    """The residual family's score column: the scores, or zeros when its weight is 0 and there are none."""
    if weight < 0:
        raise ValueError(f"residual_weight must be >= 0, got {weight}")
    if residual_scores is None:
        if weight > 0:
            raise ValueError("residual scores are needed when the residual family has a positive weight")
        return np.zeros(n)
    return np.asarray(residual_scores, dtype=np.float64).ravel()


def fused_calibration(patches: Any, residual_scores: Any, fpr_target: float, *, groups: Any = None,
                      flag: Any = None, seed: int = 0, patch_detector: Callable[[], Any] | None = None,
                      residual_weight: float = 1.0) -> FusedDetector:
    """Fit and threshold the fused per-image detector on normal calibration cells.

    Args:
        patches: the calibration cells' backbone patch maps (N, C, h, w).
        residual_scores: their out-of-sample residual-family scores (``pipeline.handoff.bundle.calibration_scores``,
            cross-fitted with the same ``groups``).
        fpr_target: the false-flag rate.
        groups: production period per cell (the lot-aware threshold), or None (random halves, conformal threshold).
        flag: ``pipeline.analysis.thresholds.FlagConfig`` (folds, fence, confidence).
        seed: seed of the random halves.
        patch_detector: makes an unfitted patch detector (default: the Gaussian ``PatchDetector``).
        residual_weight: the residual family's weight against the patch family's 1 (0: the patch family alone).

    Returns:
        :class:`FusedDetector` (its patch detector fitted on every calibration cell).

    Raises:
        ValueError: fewer than 9 calibration cells, or patches and scores of different lengths.
    """
    from pipeline.analysis.detectors.patch import PatchDetector

    P = np.asarray(patches)
    r = _residual_column(residual_scores, len(P), residual_weight)
    if len(P) != r.size or r.size < 9:
        raise ValueError(f"fused calibration needs >= 9 cells with one residual score each, got {len(P)} patch maps "
                         f"and {r.size} scores")
    make = patch_detector or PatchDetector
    p_oos = patch_reference_scores(P, groups=groups, flag=flag, seed=seed, patch_detector=make)
    return fuse_families(make().fit(P), p_oos, r, fpr_target, groups=groups, flag=flag,
                         residual_weight=residual_weight)
