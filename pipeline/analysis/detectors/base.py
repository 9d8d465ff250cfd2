"""The per-image anomaly-detector protocol shared by every linewatch detector.

The protocol is small and sklearn-shaped (after alibi-detect's new outlier API and pyod's ``BaseDetector``):

* hyperparameters are set in ``__init__`` only; :meth:`BaseDetector.get_params` returns them;
* ``fit(Z_ref)`` learns the reference (normal) distribution and returns ``self``; fitted state ends in ``_``;
* ``score(Z)`` returns one float per row, **higher = more anomalous**;
* ``infer_threshold(Z_val, fpr=0.01)`` sets ``threshold_`` from scores on *normal* validation data (a calibration
  split the model did not train on) so that the false-alarm rate on normal data is at most ``fpr``, and reports the
  threshold with its uncertainty (``threshold_ci_``, ``fpr_ci_``);
* ``predict(Z)`` returns a :class:`DetectionResult`;
* any of ``score`` / ``infer_threshold`` / ``predict`` before ``fit`` raises :class:`NotFittedError`.

**Threshold.** With ``n`` validation scores sorted ascending, ``threshold_`` is the order statistic
``s_(k)``, ``k = ceil((n + 1)(1 - fpr))`` (the conformal (1 - fpr) quantile), and an image is anomalous when its score
is *strictly greater*. If validation and new normal images are exchangeable, the false-alarm rate is then at most
``fpr`` (Vovk et al. 2005), whatever the score distribution. This needs ``n >= 1/fpr - 1`` validation images
(99 at 1 %); fewer raise a ``ValueError``.

**Uncertainty.** The threshold is a sample quantile, so two reports come with it:

* ``threshold_ci_``: a distribution-free 95 % confidence interval for the true (1 - fpr) quantile of normal scores,
  the order statistics ``(s_(l), s_(u))`` whose ranks come from the Binomial(n, 1 - fpr) distribution;
* ``fpr_ci_``: the 95 % interval of the false-alarm rate that the chosen threshold actually has on new normal
  data; for the k-th order statistic that rate is Beta(n - k + 1, k) distributed, so at n = 200 and 1 % it spans
  roughly 0.1 % to 2.8 %. Collect more calibration images to narrow it.

``fpr_empirical_`` is the share of validation scores above the threshold (at most ``fpr`` by construction).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy import stats

from pipeline.common.schemas import as_latent_matrix

__all__ = [
    "BaseDetector",
    "DetectionResult",
    "Detector",
    "NotFittedError",
    "as_latent_matrix",
    "conformal_threshold",
]

CI_LEVEL = 0.95
"""Confidence level of ``threshold_ci_`` and ``fpr_ci_``."""


class NotFittedError(RuntimeError):
    """Raised when a detector is used before ``fit`` (or before ``infer_threshold`` for ``predict``)."""


@dataclass(frozen=True)
class DetectionResult:
    """What :meth:`BaseDetector.predict` returns.

    Attributes:
        scores: float array (N,), higher = more anomalous.
        is_anomaly: bool array (N,), ``scores > threshold``.
        threshold: the decision threshold on ``scores``.
        threshold_ci: ``(low, high)`` 95 % confidence interval of the threshold (see module docstring).
        fpr_target: the false-alarm rate the threshold was set for.
        fpr_ci: ``(low, high)`` 95 % interval of the false-alarm rate the threshold really has on normal data.
        p_values: float array (N,), conformal p-values ``(1 + #{validation scores >= s}) / (n_val + 1)``;
            small = unusual. Valid p-values for "this image is normal" under exchangeability.
        meta: ``{"name", "version", "params", "n_ref", "n_val"}``.
    """

    scores: np.ndarray
    is_anomaly: np.ndarray
    threshold: float
    threshold_ci: tuple[float, float]
    fpr_target: float
    fpr_ci: tuple[float, float]
    p_values: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_anomalies(self) -> int:
        """Number of rows flagged as anomalous."""
        return int(np.count_nonzero(self.is_anomaly))


@runtime_checkable
class Detector(Protocol):
    """Structural type of a linewatch per-image detector (see module docstring)."""

    def fit(self, X: Any) -> Detector:  # noqa: D102
        ...

    def score(self, X: Any) -> np.ndarray:  # noqa: D102
        ...

    def infer_threshold(self, X: Any, fpr: float = 0.01) -> Detector:  # noqa: D102
        ...

    def predict(self, X: Any) -> DetectionResult:  # noqa: D102
        ...

    def get_params(self) -> dict[str, Any]:  # noqa: D102
        ...


def conformal_threshold(
    val_scores: np.ndarray, fpr: float, level: float = CI_LEVEL
) -> tuple[float, tuple[float, float], tuple[float, float], float]:
    """Threshold at a target false-alarm rate from normal validation scores, with its uncertainty.

    Args:
        val_scores: float array (n,) of scores on normal data not used for fitting.
        fpr: target false-alarm rate in (0, 1).
        level: confidence level of the two intervals.

    Returns:
        ``(threshold, threshold_ci, fpr_ci, fpr_empirical)`` as described in the module docstring.

    Raises:
        ValueError: ``fpr`` outside (0, 1), or fewer than ``ceil(1/fpr) - 1`` scores.
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    s = np.sort(np.asarray(val_scores, dtype=np.float64).ravel())
    n = s.size
    k = math.ceil((n + 1) * (1.0 - fpr))  # 1-based rank of the threshold order statistic
    if k > n:
        need = math.ceil(1.0 / fpr) - 1
        raise ValueError(
            f"{n} validation scores cannot set a threshold at fpr={fpr}: at least {need} normal images are "
            "needed; add calibration images or raise fpr"
        )
    threshold = float(s[k - 1])
    # distribution-free CI of the (1 - fpr) quantile: ranks from Binomial(n, 1 - fpr)
    a = (1.0 - level) / 2.0
    lo_rank = int(stats.binom.ppf(a, n, 1.0 - fpr))  # s_(lo_rank) with 1-based rank lo_rank
    hi_rank = int(stats.binom.ppf(1.0 - a, n, 1.0 - fpr)) + 1
    lo = float(s[max(lo_rank, 1) - 1])
    hi = float(s[min(hi_rank, n) - 1]) if hi_rank <= n else math.inf
    # true exceedance probability of the k-th order statistic ~ Beta(n - k + 1, k)
    fpr_ci = (float(stats.beta.ppf(a, n - k + 1, k)), float(stats.beta.ppf(1.0 - a, n - k + 1, k)))
    fpr_emp = float(np.mean(s > threshold))
    return threshold, (lo, hi), fpr_ci, fpr_emp


class BaseDetector(abc.ABC):
    """Base class of the latent-space detectors: validation, thresholding and ``predict`` live here.

    Subclasses implement ``_fit(Z)`` and ``_score(Z)`` on validated float64 matrices and list their hyperparameters
    in ``_param_names``. They may override ``_validate`` for other inputs (images: see ``DiffusionResidual``).
    """

    name: str = "BaseDetector"
    version: str = "1"
    input_kind: str = "latent"
    """``"latent"`` (matrices of z) or ``"image"`` (image tensors)."""
    _param_names: tuple[str, ...] = ()
    _min_fit_samples: int = 2

    # ---- to implement --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _fit(self, Z: np.ndarray) -> None:
        """Learn the reference distribution from validated data; set fitted attributes."""

    @abc.abstractmethod
    def _score(self, Z: np.ndarray) -> np.ndarray:
        """Scores of validated data, higher = more anomalous, shape (N,)."""

    # ---- validation ----------------------------------------------------------------------------------------
    def _validate(self, X: Any, name: str) -> np.ndarray:
        return as_latent_matrix(X, name)

    def _check_fitted(self) -> None:
        if not getattr(self, "is_fitted_", False):
            raise NotFittedError(f"{self.name} has not been fit: call fit(Z_ref) first")

    def _check_dim(self, Z: np.ndarray, name: str) -> None:
        if Z.shape[1:] != self.n_features_in_:
            raise ValueError(
                f"{name} has feature shape {Z.shape[1:]} but {self.name} was fit on {self.n_features_in_}; "
                "were the reference and these latents encoded by different models?"
            )

    # ---- protocol ------------------------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Hyperparameters given to ``__init__``."""
        return {k: getattr(self, k) for k in self._param_names}

    def fit(self, X: Any) -> BaseDetector:
        """Fit the detector on reference (normal) data.

        Args:
            X: reference latents (N, d) (or images for image detectors).

        Returns:
            self.

        Raises:
            ValueError: invalid input or too few rows.
        """
        Z = self._validate(X, "Z_ref")
        if Z.shape[0] < self._min_fit_samples:
            raise ValueError(
                f"{self.name} needs at least {self._min_fit_samples} reference samples, got {Z.shape[0]}"
            )
        self.n_features_in_ = tuple(Z.shape[1:])
        self.n_ref_ = int(Z.shape[0])
        self._fit(Z)
        self.is_fitted_ = True
        # a new fit invalidates any previous threshold
        for attr in ("threshold_", "threshold_ci_", "fpr_ci_", "fpr_", "fpr_empirical_", "val_scores_"):
            self.__dict__.pop(attr, None)
        return self

    def score(self, X: Any) -> np.ndarray:
        """Anomaly scores, higher = more anomalous.

        Args:
            X: latents (N, d) with the fitted d (or images for image detectors).

        Returns:
            float64 array (N,).

        Raises:
            NotFittedError: before ``fit``.
            ValueError: invalid input or feature-dimension mismatch.
        """
        self._check_fitted()
        Z = self._validate(X, "Z")
        self._check_dim(Z, "Z")
        return np.asarray(self._score(Z), dtype=np.float64).reshape(-1)

    def infer_threshold(self, X: Any, fpr: float = 0.01) -> BaseDetector:
        """Set ``threshold_`` so that at most ``fpr`` of normal data is flagged.

        Args:
            X: normal validation data (a calibration split, not the data given to ``fit``).
            fpr: target false-alarm rate.

        Returns:
            self, with ``threshold_``, ``threshold_ci_``, ``fpr_``, ``fpr_ci_``, ``fpr_empirical_`` set.

        Raises:
            NotFittedError: before ``fit``.
            ValueError: invalid input, or too few rows for ``fpr``.
        """
        self._set_threshold(self.score(X), fpr)
        return self

    def set_threshold_from_scores(self, scores: Any, fpr: float = 0.01) -> BaseDetector:
        """Like :meth:`infer_threshold`, from normal scores computed out of sample elsewhere (e.g. cross-fitted).

        Raises:
            NotFittedError: before ``fit``.
            ValueError: too few scores for ``fpr``.
        """
        self._check_fitted()
        self._set_threshold(np.asarray(scores, dtype=np.float64), fpr)
        return self

    def predict(self, X: Any) -> DetectionResult:
        """Score and flag data.

        Args:
            X: latents (N, d) (or images for image detectors).

        Returns:
            :class:`DetectionResult`.

        Raises:
            NotFittedError: before ``fit`` or before ``infer_threshold``.
        """
        return self._result(self.score(X))

    # ---- helpers shared with Ensemble ----------------------------------------------------------------------
    def _set_threshold(self, val_scores: np.ndarray, fpr: float) -> None:
        thr, thr_ci, fpr_ci, fpr_emp = conformal_threshold(val_scores, fpr)
        self.threshold_, self.threshold_ci_, self.fpr_ci_, self.fpr_empirical_ = thr, thr_ci, fpr_ci, fpr_emp
        self.fpr_ = float(fpr)
        self.val_scores_ = np.sort(np.asarray(val_scores, dtype=np.float64).ravel())

    def _result(self, scores: np.ndarray) -> DetectionResult:
        self._check_fitted()
        if not hasattr(self, "threshold_"):
            raise NotFittedError(f"{self.name} has no threshold: call infer_threshold(Z_val, fpr) first")
        n_val = self.val_scores_.size
        n_ge = n_val - np.searchsorted(self.val_scores_, scores, side="left")
        return DetectionResult(
            scores=scores,
            is_anomaly=scores > self.threshold_,
            threshold=self.threshold_,
            threshold_ci=self.threshold_ci_,
            fpr_target=self.fpr_,
            fpr_ci=self.fpr_ci_,
            p_values=(1.0 + n_ge) / (n_val + 1.0),
            meta={
                "name": self.name,
                "version": self.version,
                "params": self.get_params(),
                "n_ref": self.n_ref_,
                "n_val": int(n_val),
            },
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"
