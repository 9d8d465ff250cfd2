"""A patch-level detector on a frozen backbone's spatial feature map: a per-image score and an anomaly map.

Input: patch maps ``(N, C, H, W)`` (e.g. ``FeatureSet.patches`` of :mod:`pipeline.latent.features`: EfficientNet-Lite0
blocks 10 + 15, each 3 x 3-averaged and pooled to the 8 x 8 grid, C = 432). Every grid position ``(i, j)`` of a cell
sees the same part of the cell (busbars, edges, centre), so each position gets its own model of "normal":

* the reference patches at ``(i, j)`` give a mean and a Ledoit-Wolf shrunk covariance; their inverse square root
  whitens the patch (directions along which normal cells vary a lot count little);
* ``method="gaussian"`` (PaDiM): the anomaly value at ``(i, j)`` is the whitened distance to the mean
  (a Mahalanobis distance);
* ``method="knn"`` (position-aware PatchCore): the anomaly value is the mean whitened distance to the ``k`` nearest
  patches of a memory bank that holds the reference patches at positions within ``radius`` grid cells of ``(i, j)``,
  reduced to ``coreset`` rows per position by greedy k-centre selection (:func:`greedy_coreset`).

The per-image score is the largest value of the map (a crack is local). :meth:`PatchDetector.anomaly_map` returns the
whole map, so a figure can show where the cell is unusual (:func:`pipeline.common.figures.save_heatmap_overlays`).

Pure numpy / scikit-learn; no torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.covariance import ledoit_wolf

from pipeline.analysis.detectors.base import BaseDetector

__all__ = ["PatchDetector", "as_patch_array", "detector_arrays", "detector_from_arrays", "greedy_coreset"]

METHODS = ("gaussian", "knn")
_EIG_FLOOR = 1e-8


def as_patch_array(P: Any, name: str = "patches") -> np.ndarray:
    """Validate patch maps and convert them to float32 ``(N, C, H, W)``.

    Raises:
        ValueError: not 4-D, empty, non-numeric, or containing NaN/inf.
    """
    try:
        arr = np.asarray(P, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array (N, C, H, W): {exc}") from exc
    if arr.ndim != 4 or min(arr.shape) == 0:
        raise ValueError(f"{name} must be a non-empty 4-D array (N, C, H, W), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return np.ascontiguousarray(arr)


def greedy_coreset(X: np.ndarray, n: int, *, proj_dim: int = 64, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` rows of ``X`` chosen by greedy k-centre selection (the PatchCore coreset).

    Each step adds the row farthest from the rows chosen so far, so the selection covers the whole set (outlying
    normal patches are kept, dense regions thinned). Distances are measured after a Gaussian random projection to
    ``proj_dim`` dimensions (Johnson-Lindenstrauss), as in PatchCore.

    Args:
        X: float array (M, D).
        n: rows to keep; all rows (in order) when ``n >= M``.
        proj_dim: projection dimension (no projection when ``D <= proj_dim``).
        seed: seed of the projection and the first row.

    Returns:
        int array (min(n, M),) of distinct row indices.
    """
    X = np.asarray(X, dtype=np.float32)
    m = X.shape[0]
    if n >= m:
        return np.arange(m)
    if n < 1:
        raise ValueError(f"coreset size must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    if X.shape[1] > proj_dim:
        X = X @ (rng.standard_normal((X.shape[1], proj_dim)).astype(np.float32) / np.sqrt(proj_dim))
    sel = np.empty(n, dtype=np.int64)
    sel[0] = int(rng.integers(m))
    mind = ((X - X[sel[0]]) ** 2).sum(axis=1)
    for t in range(1, n):
        sel[t] = int(np.argmax(mind))
        np.minimum(mind, ((X - X[sel[t]]) ** 2).sum(axis=1), out=mind)
    return sel


def _whitener(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (C,) and whitening matrix (C, C) of the rows of ``X`` from a Ledoit-Wolf covariance.

    ``sklearn.covariance.ledoit_wolf`` rather than the ``LedoitWolf`` estimator, which would also invert the
    covariance (a second eigendecomposition per grid position) for a precision matrix nothing reads.
    """
    X = X.astype(np.float64)
    location = X.mean(axis=0)
    cov, _ = ledoit_wolf(X - location, assume_centered=True)
    ev, V = np.linalg.eigh(cov)
    W = V / np.sqrt(np.maximum(ev, _EIG_FLOOR * max(float(ev.max()), _EIG_FLOOR)))
    return location.astype(np.float32), W.astype(np.float32)


def _sq_dist_min_k(Q: np.ndarray, B: np.ndarray, k: int) -> np.ndarray:
    """Mean Euclidean distance of each row of ``Q`` to its ``k`` nearest rows of ``B``."""
    d2 = (Q * Q).sum(1)[:, None] + (B * B).sum(1)[None] - 2.0 * Q @ B.T
    np.maximum(d2, 0.0, out=d2)
    if k == 1:
        return np.sqrt(d2.min(axis=1))
    part = np.partition(d2, k - 1, axis=1)[:, :k]
    return np.sqrt(part).mean(axis=1)


class PatchDetector(BaseDetector):
    """Per-position whitened patch memory on a backbone's patch map (see the module docstring).

    Args:
        method: ``"gaussian"`` (whitened distance to the position's mean) or ``"knn"`` (whitened distance to the
            nearest patches of the position's memory bank).
        radius: ``knn`` only: the bank of position ``(i, j)`` holds reference patches of positions within this many
            grid cells (absorbs small misalignment).
        k: ``knn`` only: nearest bank patches averaged.
        coreset: ``knn`` only: bank rows kept per position (greedy k-centre); None keeps all.
        seed: seed of the coreset selection.
    """

    name = "PatchDetector"
    version = "1"
    input_kind = "patches"
    _param_names = ("method", "radius", "k", "coreset", "seed")
    _min_fit_samples = 4

    def __init__(self, method: str = "gaussian", radius: int = 1, k: int = 1, coreset: int | None = 512,
                 seed: int = 0) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if int(radius) < 0 or int(k) < 1 or (coreset is not None and int(coreset) < 1):
            raise ValueError(f"need radius >= 0, k >= 1 and coreset >= 1 (or None), got {radius}, {k}, {coreset}")
        self.method, self.radius, self.k, self.seed = method, int(radius), int(k), int(seed)
        self.coreset = None if coreset is None else int(coreset)

    def _validate(self, X: Any, name: str) -> np.ndarray:
        return as_patch_array(X, name)

    def _fit(self, P: np.ndarray) -> None:
        _, C, H, W = P.shape
        X = np.ascontiguousarray(P.transpose(2, 3, 0, 1))  # (H, W, N, C)
        self.mean_ = np.empty((H, W, C), np.float32)
        self.whiten_ = np.empty((H, W, C, C), np.float32)
        for i in range(H):
            for j in range(W):
                self.mean_[i, j], self.whiten_[i, j] = _whitener(X[i, j])
        self.banks_: list[list[np.ndarray]] = []
        if self.method == "knn":
            self.banks_ = [[self._bank(X, i, j) for j in range(W)] for i in range(H)]

    def _bank(self, X: np.ndarray, i: int, j: int) -> np.ndarray:
        """Whitened memory bank of position ``(i, j)``: reference patches within ``radius``, coreset-reduced."""
        r = self.radius
        near = X[max(0, i - r): i + r + 1, max(0, j - r): j + r + 1].reshape(-1, X.shape[-1])
        B = (near - self.mean_[i, j]) @ self.whiten_[i, j]
        if self.coreset is not None and self.coreset < len(B):
            B = B[greedy_coreset(B, self.coreset, seed=self.seed + i * X.shape[1] + j)]
        return np.ascontiguousarray(B)

    def _map(self, P: np.ndarray) -> np.ndarray:
        N, _, H, W = P.shape
        out = np.empty((N, H, W), np.float64)
        for i in range(H):
            for j in range(W):
                q = (P[:, :, i, j] - self.mean_[i, j]) @ self.whiten_[i, j]
                if self.method == "gaussian":
                    out[:, i, j] = np.sqrt((q.astype(np.float64) ** 2).sum(axis=1))
                else:
                    out[:, i, j] = _sq_dist_min_k(q, self.banks_[i][j], min(self.k, len(self.banks_[i][j])))
        return out

    def _score(self, P: np.ndarray) -> np.ndarray:
        return self._map(P).reshape(len(P), -1).max(axis=1)

    def anomaly_map(self, X: Any) -> np.ndarray:
        """Anomaly value of every grid position, float64 ``(N, H, W)``; the image score is its maximum.

        Raises:
            NotFittedError: before ``fit``.
            ValueError: invalid input or a patch shape other than the fitted one.
        """
        self._check_fitted()
        P = self._validate(X, "patches")
        self._check_dim(P, "patches")
        return self._map(P)

    @property
    def bank_size_(self) -> int:
        """Rows in the memory bank of one position (``knn``); 0 for ``gaussian``."""
        self._check_fitted()
        return len(self.banks_[0][0]) if self.banks_ else 0


def detector_arrays(detector: PatchDetector, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """A fitted Gaussian :class:`PatchDetector` as plain arrays (``mean``, ``whiten`` in ``dtype``, ``shape``, ``n_ref``).

    Raises:
        ValueError: a detector of another method (its memory banks are not plain arrays of fixed shape).
    """
    if detector.method != "gaussian":
        raise ValueError(f"only the gaussian patch detector is stored as arrays, got {detector.method!r}")
    return {"mean": detector.mean_.astype(dtype), "whiten": detector.whiten_.astype(dtype),
            "shape": np.asarray(detector.n_features_in_), "n_ref": np.asarray(detector.n_ref_)}


def detector_from_arrays(arrays: Any) -> PatchDetector:
    """The Gaussian :class:`PatchDetector` of :func:`detector_arrays` (any mapping with its keys, e.g. an ``NpzFile``)."""
    det = PatchDetector(method="gaussian")
    det.mean_, det.whiten_ = np.asarray(arrays["mean"], np.float32), np.asarray(arrays["whiten"], np.float32)
    det.n_features_in_, det.n_ref_ = tuple(int(v) for v in arrays["shape"]), int(arrays["n_ref"])
    det.banks_, det.is_fitted_ = [], True
    return det
