"""A residual score judged against images *like this one*: the diffusion residual standardised by z-neighbours.

The diffusion residual (:mod:`pipeline.analysis.detectors.diffusion`) says how much of an image the model could not restore.
How large a residual is normal depends on the kind of cell: on ELPV, poly-crystalline cells (grain texture) leave
residuals several times larger than mono cells, so one global threshold flags every poly cell before any defective
mono cell: a globally standardised residual separates defects well within one cell type and poorly over both types
together, and judging it among z-neighbours recovers much of the difference (figures in BENCHMARKS.md,
``benchmarks/bench_anomaly.py``).

z knows the kind of cell (a linear probe on z tells mono from poly at 0.94-0.97 accuracy), so it is the natural
context: for each image, find its ``k`` nearest reference images in standardised z and ask how unusual its log
residual is *among them*::

    score = mean_t (log r_t - mean_{j in kNN(z)} log r_{j,t}) / sd_{j in kNN(z)} log r_{j,t}

This needs no product label, follows any factor z encodes (type, brightness, module), and stays a pure function of
(z, residuals), so the monitor can cache residuals per image and rebuild the detector from the model bundle.

Input: a matrix ``[Z | R]`` of ``d`` latent columns followed by ``n_residuals`` residual columns (positive, e.g.
``DiffusionResidual.residuals`` at each t*), or a DataFrame with ``z_0..z_{d-1}`` and ``r_0..r_{m-1}`` columns.
The reference's own scores (``reference_scores_``) are leave-one-out: each reference image is judged against its
neighbours without itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.neighbors import NearestNeighbors

from pipeline.analysis.detectors.base import BaseDetector
from pipeline.common.schemas import as_latent_matrix, residual_columns

__all__ = ["ConditionalResidual", "residual_columns", "stack_latents_residuals"]

_LOG_FLOOR = 1e-12


def stack_latents_residuals(Z: Any, R: Any) -> np.ndarray:
    """``[Z | R]``: the input matrix of :class:`ConditionalResidual` from latents (N, d) and residuals (N, m)."""
    Z = as_latent_matrix(Z, "Z")
    R = np.asarray(R, dtype=np.float64)
    if R.ndim == 1:
        R = R[:, None]
    if R.ndim != 2 or R.shape[0] != Z.shape[0]:
        raise ValueError(f"residuals must be (N, m) with N = {Z.shape[0]} rows like Z, got shape {R.shape}")
    return np.column_stack([Z, R])


class ConditionalResidual(BaseDetector):
    """Log residual standardised against the ``k`` nearest reference images in z.

    Args:
        n_residuals: how many trailing columns of the input are residuals (one per t*).
        k: neighbours in z that define "normal for an image like this" (at least 3; capped at n_ref - 1).
        sd_floor: the neighbours' sd is floored at this share of the reference's overall sd of the log residual,
            so a tight neighbourhood cannot turn a small difference into a huge score.
    """

    name = "ConditionalResidual"
    version = "1"
    input_kind = "latent+residual"
    _param_names = ("n_residuals", "k", "sd_floor")
    _min_fit_samples = 4

    def __init__(self, n_residuals: int = 2, k: int = 25, sd_floor: float = 0.1) -> None:
        if int(n_residuals) < 1:
            raise ValueError(f"n_residuals must be >= 1, got {n_residuals}")
        if int(k) < 3:
            raise ValueError(f"k must be >= 3, got {k}")
        if not 0.0 < float(sd_floor) < 1.0:
            raise ValueError(f"sd_floor must be in (0, 1), got {sd_floor}")
        self.n_residuals = int(n_residuals)
        self.k = int(k)
        self.sd_floor = float(sd_floor)

    # ---- validation ----------------------------------------------------------------------------------------
    def _validate(self, X: Any, name: str) -> np.ndarray:
        if hasattr(X, "columns"):
            rcols = [c for c in X.columns if isinstance(c, str) and c.startswith("r_") and c[2:].isdigit()]
            if len(rcols) != self.n_residuals:
                raise ValueError(
                    f"{name} has {len(rcols)} residual columns r_*, expected {self.n_residuals}"
                )
            X = stack_latents_residuals(as_latent_matrix(X, name), X[sorted(rcols, key=lambda c: int(c[2:]))])
        arr = as_latent_matrix(X, name)
        if arr.shape[1] <= self.n_residuals:
            raise ValueError(
                f"{name} has {arr.shape[1]} columns; expected latents followed by {self.n_residuals} residual columns"
            )
        if (arr[:, -self.n_residuals:] < 0).any():
            raise ValueError(f"{name}: residual columns must be >= 0 (mean squared or absolute residuals)")
        return arr

    def _split(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        Z = X[:, : -self.n_residuals]
        L = np.log(np.maximum(X[:, -self.n_residuals:], _LOG_FLOOR))
        return (Z - self.z_mean_) / self.z_scale_, L

    # ---- protocol hooks ------------------------------------------------------------------------------------
    def _fit(self, X: np.ndarray) -> None:
        Z = X[:, : -self.n_residuals]
        self.z_mean_ = Z.mean(axis=0)
        self.z_scale_ = np.where(Z.std(axis=0) > 1e-12, Z.std(axis=0), 1.0)
        Zs, L = self._split(X)
        self.k_ = min(self.k, Zs.shape[0] - 1)
        self.ref_log_residuals_ = L
        self.sd_min_ = self.sd_floor * np.maximum(L.std(axis=0), 1e-12)
        self.nn_ = NearestNeighbors(n_neighbors=self.k_ + 1).fit(Zs)
        # leave-one-out reference scores: the query itself is (one of) its own nearest neighbours
        ind = self.nn_.kneighbors(Zs, return_distance=False)
        self_rows = np.arange(Zs.shape[0])[:, None]
        keep = ind != self_rows
        ind = np.array([row[k][: self.k_] for row, k in zip(ind, keep, strict=True)])
        self.reference_scores_ = self._standardise(L, ind)

    def _standardise(self, L: np.ndarray, ind: np.ndarray) -> np.ndarray:
        nb = self.ref_log_residuals_[ind]  # (N, k, m)
        sd = np.maximum(nb.std(axis=1, ddof=1), self.sd_min_)
        return ((L - nb.mean(axis=1)) / sd).mean(axis=1)

    def _score(self, X: np.ndarray) -> np.ndarray:
        Zs, L = self._split(X)
        ind = self.nn_.kneighbors(Zs, n_neighbors=self.k_, return_distance=False)
        return self._standardise(L, ind)
