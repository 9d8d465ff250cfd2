"""Latent-space outlier detectors: Mahalanobis, kNN distance, IsolationForest (sklearn adapters).

All three follow the :mod:`pipeline.analysis.detectors.base` protocol: ``fit(Z_ref)`` on latents of normal images the
model did not train on, ``score(Z)`` higher = more anomalous, ``infer_threshold(Z_val, fpr)``, ``predict(Z)``.

* :class:`Mahalanobis`: squared Mahalanobis distance to a Gaussian with a *shrinkage* covariance (Ledoit-Wolf, OAS or
  a fixed shrinkage), which stays well conditioned when the latent dimension is not small against the reference size.
  Best when normal latents are roughly elliptical (the InfoDiffusion prior pushes z towards N(0, I)).
* :class:`KNNDistance`: mean (or k-th) distance to the k nearest reference latents; no distributional assumption,
  finds small clusters of unusual images that a global Gaussian misses.
* :class:`IsolationForestDetector`: ``-IsolationForest.score_samples``; robust to irrelevant axes, coarse in the tail.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import OAS, LedoitWolf, ShrunkCovariance
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import NearestNeighbors

from pipeline.analysis.detectors.base import BaseDetector

__all__ = ["IsolationForestDetector", "KNNDistance", "Mahalanobis"]


class Mahalanobis(BaseDetector):
    """Squared Mahalanobis distance to the reference mean under a shrinkage covariance.

    Score: ``(z - mu)^T Sigma^{-1} (z - mu)``; under a Gaussian reference it is about chi-square with d degrees of
    freedom, so a score far above d is unusual.

    Args:
        shrinkage: ``"ledoit_wolf"`` (default), ``"oas"``, or a float in [0, 1] (fixed shrinkage towards
            a scaled identity, ``sklearn.covariance.ShrunkCovariance``).
    """

    name = "Mahalanobis"
    version = "1"
    _param_names = ("shrinkage",)

    def __init__(self, shrinkage: str | float = "ledoit_wolf") -> None:
        if isinstance(shrinkage, str):
            if shrinkage not in ("ledoit_wolf", "oas"):
                raise ValueError(
                    f"shrinkage must be 'ledoit_wolf', 'oas' or a float in [0, 1], got {shrinkage!r}"
                )
        elif not 0.0 <= float(shrinkage) <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        self.shrinkage = shrinkage

    def _fit(self, Z: np.ndarray) -> None:
        if self.shrinkage == "ledoit_wolf":
            est = LedoitWolf()
        elif self.shrinkage == "oas":
            est = OAS()
        else:
            est = ShrunkCovariance(shrinkage=float(self.shrinkage))
        est.fit(Z)
        self.location_ = est.location_
        self.covariance_ = est.covariance_
        self.precision_ = est.precision_
        self.shrinkage_ = float(getattr(est, "shrinkage_", self.shrinkage))

    def _score(self, Z: np.ndarray) -> np.ndarray:
        D = Z - self.location_
        return np.einsum("ij,jk,ik->i", D, self.precision_, D)


class KNNDistance(BaseDetector):
    """Distance to the k nearest reference latents.

    When scoring the very matrix given to ``fit``, each point's own match is excluded (leave-one-out), so reference
    scores are not biased towards zero; ``reference_scores_`` holds these leave-one-out scores.

    Args:
        k: number of neighbours.
        metric: any metric of ``sklearn.neighbors.NearestNeighbors`` (default Euclidean).
        aggregate: ``"mean"`` (mean distance to the k neighbours, default; smoother) or ``"kth"`` (distance to the
            k-th neighbour).
    """

    name = "KNNDistance"
    version = "1"
    _param_names = ("k", "metric", "aggregate")

    def __init__(self, k: int = 5, metric: str = "euclidean", aggregate: str = "mean") -> None:
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if aggregate not in ("mean", "kth"):
            raise ValueError(f"aggregate must be 'mean' or 'kth', got {aggregate!r}")
        self.k = int(k)
        self.metric = metric
        self.aggregate = aggregate
        self._min_fit_samples = self.k + 1

    def _agg(self, dist: np.ndarray) -> np.ndarray:
        return dist.mean(axis=1) if self.aggregate == "mean" else dist[:, -1]

    def _fit(self, Z: np.ndarray) -> None:
        self.nn_ = NearestNeighbors(n_neighbors=self.k + 1, metric=self.metric).fit(Z)
        self._Z_fit = Z
        dist, idx = self.nn_.kneighbors(Z, n_neighbors=self.k + 1)
        self.reference_scores_ = self._agg(self._drop_self(dist, idx))

    def _drop_self(self, dist: np.ndarray, idx: np.ndarray) -> np.ndarray:
        # remove each row's own index (not merely the first column: exact duplicates may be ordered either way)
        own = idx == np.arange(idx.shape[0])[:, None]
        no_self = ~own
        no_self[~own.any(axis=1), -1] = False  # rows whose own index was not returned: drop the farthest
        return dist[no_self].reshape(dist.shape[0], self.k)

    def _score(self, Z: np.ndarray) -> np.ndarray:
        if Z.shape == self._Z_fit.shape and np.array_equal(Z, self._Z_fit):
            return self.reference_scores_.copy()
        dist, _ = self.nn_.kneighbors(Z, n_neighbors=self.k)
        return self._agg(dist)


class IsolationForestDetector(BaseDetector):
    """IsolationForest on z; score = ``-score_samples`` (higher = shorter isolation path = more anomalous).

    Args:
        n_estimators: number of trees.
        max_samples: sub-sample size per tree (sklearn semantics, default "auto" = min(256, n)).
        random_state: seed of the forest.
    """

    name = "IsolationForest"
    version = "1"
    _param_names = ("n_estimators", "max_samples", "random_state")

    def __init__(
        self, n_estimators: int = 200, max_samples: int | float | str = "auto", random_state: int = 0
    ) -> None:
        if int(n_estimators) < 1:
            raise ValueError(f"n_estimators must be >= 1, got {n_estimators}")
        self.n_estimators = int(n_estimators)
        self.max_samples = max_samples
        self.random_state = random_state

    def _fit(self, Z: np.ndarray) -> None:
        self.forest_ = IsolationForest(
            n_estimators=self.n_estimators,
            max_samples=self.max_samples,
            random_state=self.random_state,
            n_jobs=1,
        ).fit(Z)

    def _score(self, Z: np.ndarray) -> np.ndarray:
        return -self.forest_.score_samples(Z)
