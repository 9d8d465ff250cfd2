"""Latent-quality metrics of a semantic code z: linear probes, a disentanglement indicator, latent health.

Pure functions over numpy arrays (no model, no I/O), shared by ``linewatch sweep`` (:mod:`pipeline.training.sweep`), the
notebooks and the latent-quality benchmark:

* :func:`linear_probe`: the InfoDiffusion paper's latent-quality protocol. K-fold stratified cross-validation of a
  logistic regression on **standardised** codes (``StandardScaler`` fit on the train folds only); per-fold accuracy
  and AUROC, reported as mean and standard deviation over the folds. Optional ``groups`` keep all images of a group
  (a lot) in one fold.
* :func:`disentanglement_indicator`: a TAD-like indicator. For every measurable image property
  (:mod:`pipeline.latent.properties`) the axis with the largest |Pearson r| and the gap to the second largest; the total
  is the sum of the gaps. High when each property lives in one axis, low when it is spread over several.
* :func:`latent_health`: collapse indicators. Per-axis standard deviation, how many axes are active (std above a
  floor) and the squared MMD between the codes and as many N(0, I) samples, with the training loss's kernel
  (``models.mmd``): the quantity the prior regulariser lambda pushes down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.common.schemas import as_latent_matrix

__all__ = [
    "DEFAULT_PROPERTIES",
    "DisentanglementResult",
    "ProbeResult",
    "disentanglement_indicator",
    "latent_health",
    "linear_probe",
    "mmd_to_prior",
]

DEFAULT_PROPERTIES: tuple[str, ...] = ("mean_intensity", "contrast", "sharpness", "dark_fraction")
"""Properties of the disentanglement indicator (those of ``benchmarks/bench_latent_quality.py``)."""

DEFAULT_STD_FLOOR = 0.05
"""An axis is *active* when its standard deviation exceeds this (as ``retrain.GateConfig.axis_std_floor``)."""


# ------------------------------------------------------------------------------------------------ probes



def corr_matrix(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of A (n, p) with every column of B (n, q); constant columns give 0."""
    A = A - A.mean(axis=0)
    B = B - B.mean(axis=0)
    na = np.sqrt((A * A).sum(axis=0))
    nb = np.sqrt((B * B).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        C = (A.T @ B) / np.outer(na, nb)
    C[~np.isfinite(C)] = 0.0
    return np.clip(C, -1.0, 1.0)


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of a cross-validated linear probe.

    Attributes:
        accuracy_mean: mean test-fold accuracy.
        accuracy_std: standard deviation of the test-fold accuracies.
        auroc_mean: mean test-fold AUROC (one-vs-rest macro average with more than two classes).
        auroc_std: standard deviation of the test-fold AUROCs.
        n: number of samples.
        n_splits: folds actually used (fewer than asked when the smallest class is smaller).
        classes: the class labels, sorted.
        fold_accuracy: per-fold accuracies.
        fold_auroc: per-fold AUROCs.
    """

    accuracy_mean: float
    accuracy_std: float
    auroc_mean: float
    auroc_std: float
    n: int
    n_splits: int
    classes: tuple[Any, ...] = ()
    fold_accuracy: tuple[float, ...] = field(default=(), repr=False)
    fold_auroc: tuple[float, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The four summary numbers plus ``n`` and ``n_splits`` (JSON-safe)."""
        return {
            "accuracy_mean": self.accuracy_mean,
            "accuracy_std": self.accuracy_std,
            "auroc_mean": self.auroc_mean,
            "auroc_std": self.auroc_std,
            "n": self.n,
            "n_splits": self.n_splits,
        }


def linear_probe(
    Z: Any,
    y: Any,
    n_splits: int = 5,
    seed: int = 0,
    *,
    groups: Any = None,
    max_iter: int = 5000,
) -> ProbeResult:
    """Cross-validated logistic-regression probe on standardised codes (the paper's latent-quality protocol).

    Each fold fits ``StandardScaler`` + ``LogisticRegression`` on the training folds and scores the held-out fold.
    When the smallest class has fewer than ``n_splits`` members the number of folds is lowered to that size.

    Args:
        Z: codes (N, d) (array, or a latents DataFrame with ``z_*`` columns).
        y: labels (N,), two or more classes (strings, ints or bools).
        n_splits: folds (stratified, shuffled with ``seed``).
        seed: shuffling seed of the folds.
        groups: optional group label (N,) per sample (e.g. the lot); folds then never split a group
            (``StratifiedGroupKFold``).
        max_iter: iterations of the logistic-regression solver.

    Returns:
        :class:`ProbeResult`.

    Raises:
        ValueError: mismatched lengths, a single class, or a class with fewer than 2 samples.
    """
    X = as_latent_matrix(Z, "Z")
    labels = np.asarray(y)
    classes = _check_probe_labels(labels, X.shape[0], n_splits)
    accs, aucs = [], []
    for tr, te in _probe_folds(X, labels, n_splits, seed, groups):
        if len(np.unique(labels[tr])) < len(classes):
            continue  # a grouped fold that lost a class cannot be fit consistently
        acc, auc = _probe_fold(X, labels, tr, te, n_classes=len(classes), max_iter=max_iter)
        accs.append(acc)
        aucs.append(auc)
    if not accs:
        raise ValueError("no usable fold: every training fold lost a class (too few groups per class)")
    acc, auc = np.asarray(accs), np.asarray(aucs)
    return ProbeResult(
        accuracy_mean=float(acc.mean()),
        accuracy_std=float(acc.std()),
        auroc_mean=float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan"),
        auroc_std=float(np.nanstd(auc)) if np.isfinite(auc).any() else float("nan"),
        n=int(X.shape[0]),
        n_splits=len(accs),
        classes=tuple(classes.tolist()),
        fold_accuracy=tuple(accs),
        fold_auroc=tuple(aucs),
    )


def _check_probe_labels(labels: np.ndarray, n: int, n_splits: int) -> np.ndarray:
    """The classes of ``labels`` after checking the probe can be run on them."""
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"y must be 1-D with one label per row of Z ({n}), got shape {labels.shape}")
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"y has a single class {classes.tolist()}; a probe needs at least two classes")
    if counts.min() < 2:
        rare = classes[counts < 2].tolist()
        raise ValueError(f"classes {rare} have fewer than 2 samples; drop them or collect more labelled images")
    return classes


def _probe_folds(X: np.ndarray, labels: np.ndarray, n_splits: int, seed: int, groups: Any) -> Any:
    """Stratified folds (grouped when ``groups`` is given), at most as many as the smallest class has members."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    k = int(min(n_splits, np.unique(labels, return_counts=True)[1].min()))
    if groups is None:
        return StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X, labels)
    g = np.asarray(groups)
    if g.shape[0] != X.shape[0]:
        raise ValueError(f"groups has {g.shape[0]} values for {X.shape[0]} rows of Z")
    k = min(k, len(np.unique(g)))
    if k < 2:
        raise ValueError("groups: need at least 2 distinct groups for a grouped probe")
    return StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(X, labels, g)


def _probe_fold(X: np.ndarray, labels: np.ndarray, tr: np.ndarray, te: np.ndarray, *, n_classes: int,
                max_iter: int) -> tuple[float, float]:
    """Fit scaler + logistic regression on ``tr``; accuracy and AUROC (NaN with one class present) on ``te``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    clf.fit(X[tr], labels[tr])
    proba = clf.predict_proba(X[te])
    acc = float(accuracy_score(labels[te], clf.classes_[np.argmax(proba, axis=1)]))
    if len(np.unique(labels[te])) < 2:
        return acc, float("nan")
    if n_classes == 2:
        return acc, float(roc_auc_score(labels[te] == clf.classes_[1], proba[:, 1]))
    return acc, float(roc_auc_score(labels[te], proba, multi_class="ovr", labels=clf.classes_))


# ------------------------------------------------------------------------------------------------ disentanglement


@dataclass(frozen=True)
class DisentanglementResult:
    """The TAD-like disentanglement indicator.

    Attributes:
        per_property: one row per property: ``property, best_axis, abs_r_best, abs_r_second, gap, second_axis``.
        total: sum of the gaps over the properties (0 .. number of properties; higher = more disentangled).
    """

    per_property: pd.DataFrame
    total: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: ``{"total": ..., "per_property": [{...}, ...]}``."""
        return {"total": self.total, "per_property": self.per_property.to_dict(orient="records")}




def disentanglement_indicator(
    Z: Any, props_df: pd.DataFrame, properties: Sequence[str] = DEFAULT_PROPERTIES
) -> DisentanglementResult:
    """Per property: the best single axis by |Pearson r|, the gap to the second best; total = sum of gaps.

    Args:
        Z: codes (N, d) (array or latents DataFrame).
        props_df: properties of the same N images, same order (:func:`pipeline.latent.properties.measure`).
        properties: which columns of ``props_df`` to use.

    Returns:
        :class:`DisentanglementResult`.

    Raises:
        ValueError: row counts differ, a property column is missing or non-finite, or fewer than 3 images.
    """
    X = as_latent_matrix(Z, "Z")
    if not isinstance(props_df, pd.DataFrame):
        raise ValueError("props_df must be a DataFrame of image properties (pipeline.latent.properties.measure)")
    if len(props_df) != len(X):
        raise ValueError(f"Z has {len(X)} rows but props_df has {len(props_df)}; measure the same images")
    if len(X) < 3:
        raise ValueError(f"need at least 3 images to correlate, got {len(X)}")
    names = list(properties)
    missing = [p for p in names if p not in props_df.columns]
    if missing or not names:
        raise ValueError(
            f"properties {missing or names} not in props_df columns {list(props_df.columns)}; "
            "measure them with pipeline.latent.properties.measure(images, properties)"
        )
    P = props_df[names].to_numpy(dtype=np.float64)
    if not np.isfinite(P).all():
        raise ValueError("props_df contains NaN or infinite values")
    C = np.abs(corr_matrix(X, P))  # (d, q)
    rows = []
    for j, name in enumerate(names):
        order = np.argsort(-C[:, j], kind="stable")
        best = float(C[order[0], j])
        second = float(C[order[1], j]) if len(order) > 1 else 0.0
        rows.append(
            {
                "property": name,
                "best_axis": int(order[0]),
                "abs_r_best": best,
                "abs_r_second": second,
                "gap": best - second,
                "second_axis": int(order[1]) if len(order) > 1 else -1,
            }
        )
    table = pd.DataFrame(rows, columns=["property", "best_axis", "abs_r_best", "abs_r_second", "gap", "second_axis"])
    return DisentanglementResult(per_property=table, total=float(table["gap"].sum()))


# ------------------------------------------------------------------------------------------------ health


def mmd_to_prior(Z: Any, seed: int = 0, max_n: int = 512) -> float:
    """Biased squared MMD between codes (N >= 2, d) and as many N(0, I) samples, with the training loss's kernel.

    At most ``max_n`` codes (a seeded subsample) enter: the MMD is O(N^2). 0 means indistinguishable from the prior.
    """
    import torch

    from models import mmd

    X = as_latent_matrix(Z, "Z")
    if len(X) < 2:
        raise ValueError(f"mmd_to_prior needs at least 2 codes, got {len(X)}")
    rng = np.random.default_rng(seed)
    sub = X[rng.choice(len(X), max_n, replace=False)] if len(X) > max_n else X
    prior = rng.standard_normal(sub.shape)
    with torch.no_grad():
        return float(mmd(torch.as_tensor(sub, dtype=torch.float32), torch.as_tensor(prior, dtype=torch.float32)))


def latent_health(Z: Any, *, std_floor: float = DEFAULT_STD_FLOOR, seed: int = 0, max_n: int = 512) -> dict[str, Any]:
    """Collapse indicators of a set of codes (the one latent-collapse metric of the sweep and the retrain's gate).

    Args:
        Z: codes (N >= 2, d).
        std_floor: an axis is active when its standard deviation exceeds this.
        seed: seed of the prior sample (and of the subsample when N > ``max_n``).
        max_n: at most this many codes enter the MMD (see :func:`mmd_to_prior`).

    Returns:
        ``{"axis_std": [d floats], "active_axes": int, "active_share": float, "axis_std_min": float,
        "axis_std_median": float, "mmd_to_prior": float}``.
    """
    X = as_latent_matrix(Z, "Z")
    if len(X) < 2:
        raise ValueError(f"latent_health needs at least 2 codes, got {len(X)}")
    if std_floor < 0:
        raise ValueError(f"std_floor must be >= 0, got {std_floor}")
    std = X.std(axis=0)
    active = int((std > std_floor).sum())
    return {
        "axis_std": [float(s) for s in std],
        "active_axes": active,
        "active_share": active / X.shape[1],
        "axis_std_min": float(std.min()),
        "axis_std_median": float(np.median(std)),
        "mmd_to_prior": mmd_to_prior(X, seed=seed, max_n=max_n),
    }
