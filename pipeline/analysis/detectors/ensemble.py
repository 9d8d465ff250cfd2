"""A normalised ensemble of detectors.

Raw scores of different detectors live on different scales (a chi-square-like Mahalanobis distance, a kNN distance,
an isolation depth, a pixel residual). Each member's score is therefore standardised against that member's own
score distribution on reference data, and the standardised scores are averaged (optionally weighted):

* ``standardise="robust_z"`` (default): ``(s - median) / IQR`` of the member's reference scores;
* ``standardise="ecdf"``: ``-log(1 - F(s))`` with F the member's empirical reference CDF (a "surprise" in nats;
  F is smoothed to ``rank / (n + 1)`` and scores beyond the reference maximum are extrapolated linearly in the
  robust-z scale, so the ensemble still ranks far outliers).

Two ways to use it:

* latent members only: ``Ensemble([Mahalanobis(), KNNDistance()]).fit(Z_ref)``, then ``infer_threshold(Z_val)`` and
  ``predict(Z)`` like any detector;
* mixed inputs (e.g. a latent detector and the image-space ``DiffusionResidual``): compute each member's scores
  yourself as columns of a matrix (N, n_members) and use ``fit_scores`` / ``infer_threshold_from_matrix`` /
  ``score_from_matrix`` / ``predict_from_matrix``. Members can then be names only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.analysis.detectors.base import BaseDetector, DetectionResult, NotFittedError
from pipeline.common.schemas import as_latent_matrix

__all__ = ["Ensemble"]


class Ensemble(BaseDetector):
    """Mean of per-member standardised scores.

    Args:
        detectors: member detectors (unfitted latent detectors for ``fit``), or member names for the
            score-matrix interface.
        weights: non-negative weights, one per member (normalised to sum 1); default equal.
        standardise: ``"robust_z"`` or ``"ecdf"`` (see module docstring).
    """

    name = "Ensemble"
    version = "1"
    _param_names = ("detectors", "weights", "standardise")

    def __init__(
        self,
        detectors: Sequence[BaseDetector | str],
        weights: Sequence[float] | None = None,
        standardise: str = "robust_z",
    ) -> None:
        if len(detectors) == 0:
            raise ValueError("an Ensemble needs at least one member")
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (len(detectors),) or (w < 0).any() or w.sum() <= 0:
                raise ValueError(
                    f"weights must be {len(detectors)} non-negative numbers with a positive sum, got {weights}"
                )
        if standardise not in ("robust_z", "ecdf"):
            raise ValueError(f"standardise must be 'robust_z' or 'ecdf', got {standardise!r}")
        self.detectors = list(detectors)
        self.weights = None if weights is None else list(weights)
        self.standardise = standardise

    @property
    def member_names(self) -> list[str]:
        """Names of the members, in column order."""
        return [d if isinstance(d, str) else d.name for d in self.detectors]

    # ---- standardisation -----------------------------------------------------------------------------------
    def _fit_standardiser(self, ref_matrix: np.ndarray) -> None:
        self.ref_sorted_ = np.sort(ref_matrix, axis=0)
        self.median_ = np.median(ref_matrix, axis=0)
        q75, q25 = np.percentile(ref_matrix, [75, 25], axis=0)
        spread = np.abs(self.median_) * 1e-9 + 1e-12
        self.iqr_ = np.maximum(q75 - q25, spread)
        w = (
            np.ones(ref_matrix.shape[1])
            if self.weights is None
            else np.asarray(self.weights, dtype=np.float64)
        )
        self.weights_ = w / w.sum()

    def _standardise(self, M: np.ndarray) -> np.ndarray:
        rz = (M - self.median_) / self.iqr_
        if self.standardise == "robust_z":
            return rz
        n = self.ref_sorted_.shape[0]
        out = np.empty_like(M)
        for j in range(M.shape[1]):
            rank = np.searchsorted(self.ref_sorted_[:, j], M[:, j], side="right")
            F = np.clip(rank / (n + 1.0), 0.0, n / (n + 1.0))
            surprise = -np.log1p(-F)
            # beyond the reference maximum: continue linearly in robust-z units so far outliers keep ranking
            top_rz = (self.ref_sorted_[-1, j] - self.median_[j]) / self.iqr_[j]
            out[:, j] = surprise + np.maximum(rz[:, j] - top_rz, 0.0)
        return out

    def _combine(self, M: np.ndarray) -> np.ndarray:
        return self._standardise(M) @ self.weights_

    def _check_matrix(self, M: Any, name: str) -> np.ndarray:
        M = as_latent_matrix(M, name)
        if M.shape[1] != len(self.detectors):
            raise ValueError(
                f"{name} has {M.shape[1]} score columns but the ensemble has {len(self.detectors)} members "
                f"({self.member_names})"
            )
        return M

    # ---- latent interface (BaseDetector hooks) -------------------------------------------------------------
    def _latent_members(self) -> list[BaseDetector]:
        members = []
        for d in self.detectors:
            if isinstance(d, str) or getattr(d, "input_kind", "latent") != "latent":
                raise ValueError(
                    f"fit(Z) needs latent detectors as members, got {d!r}; for image detectors or precomputed "
                    "scores use fit_scores(ref_score_matrix)"
                )
            members.append(d)
        return members

    def _fit(self, Z: np.ndarray) -> None:
        cols = []
        for det in self._latent_members():
            det.fit(Z)
            ref = getattr(det, "reference_scores_", None)  # leave-one-out scores where a member has them
            cols.append(det.score(Z) if ref is None else ref)
        self._fit_standardiser(np.column_stack(cols))

    def _member_matrix(self, Z: np.ndarray) -> np.ndarray:
        return np.column_stack([det.score(Z) for det in self._latent_members()])

    def _score(self, Z: np.ndarray) -> np.ndarray:
        return self._combine(self._member_matrix(Z))

    def member_scores(self, Z: Any) -> np.ndarray:
        """Raw member scores (N, n_members) of latents (latent members only)."""
        self._check_fitted()
        Zv = self._validate(Z, "Z")
        self._check_dim(Zv, "Z")
        return self._member_matrix(Zv)

    # ---- score-matrix interface ----------------------------------------------------------------------------
    def fit_scores(self, ref_score_matrix: Any) -> Ensemble:
        """Fit the standardisation from reference scores, one column per member (members are not refit).

        Args:
            ref_score_matrix: (N, n_members) member scores on normal reference data.

        Returns:
            self.
        """
        M = self._check_matrix(ref_score_matrix, "ref_score_matrix")
        self.n_features_in_ = (M.shape[1],)
        self.n_ref_ = int(M.shape[0])
        self._fit_standardiser(M)
        self.is_fitted_ = True
        self._matrix_mode = True
        for attr in ("threshold_", "threshold_ci_", "fpr_ci_", "fpr_", "fpr_empirical_", "val_scores_"):
            self.__dict__.pop(attr, None)
        return self

    def score_from_matrix(self, score_matrix: Any) -> np.ndarray:
        """Combined score (N,) from member score columns (N, n_members)."""
        if not getattr(self, "is_fitted_", False):
            raise NotFittedError(f"{self.name} has not been fit: call fit(Z_ref) or fit_scores(M_ref) first")
        return self._combine(self._check_matrix(score_matrix, "score_matrix"))

    def infer_threshold_from_matrix(self, val_score_matrix: Any, fpr: float = 0.01) -> Ensemble:
        """``infer_threshold`` from member score columns on normal validation data."""
        self._set_threshold(self.score_from_matrix(val_score_matrix), fpr)
        return self

    def predict_from_matrix(self, score_matrix: Any) -> DetectionResult:
        """``predict`` from member score columns."""
        return self._result(self.score_from_matrix(score_matrix))

    def get_params(self) -> dict[str, Any]:
        """Hyperparameters (members given by name and parameters)."""
        return {
            "detectors": [
                d if isinstance(d, str) else {"name": d.name, "params": d.get_params()}
                for d in self.detectors
            ],
            "weights": self.weights,
            "standardise": self.standardise,
        }
