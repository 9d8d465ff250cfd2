"""Axis alignment across model versions: keep axis numbers comparable when a model is retrained.

:func:`align_axes` matches the latents of one fixed probe set under both models by the Hungarian algorithm on
|correlation| (a permutation and a sign per axis) and reports the quality of the match (:class:`Alignment`);
:func:`apply_alignment` re-numbers the new model's latents in the previous model's order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import optimize

from pipeline.analysis.axes.describe import _json_float
from pipeline.common.schemas import as_latent_matrix
from pipeline.latent.quality import corr_matrix

__all__ = ["Alignment", "align_axes", "apply_alignment"]


@dataclass(frozen=True)
class Alignment:
    """How a new model's axes map onto the previous model's numbering.

    Attributes:
        permutation: for each previous axis k, the matched new axis (-1 when unmatched; only when the new model has
            fewer axes).
        signs: +1 / -1 per previous axis (new axis multiplied by it matches the previous one; 1 when unmatched).
        correlations: |correlation| of each matched pair, per previous axis (NaN when unmatched).
        mean_abs_corr: mean of ``correlations`` over matched pairs.
        min_abs_corr: the weakest matched pair.
        n_weak: matched pairs with |r| below ``weak``.
        weak: the threshold used for ``n_weak``.
        unmatched: ``{"prev": [...], "new": [...]}`` axes without a partner (when dimensions differ).
        n_probe: number of probe images.
    """

    permutation: tuple[int, ...]
    signs: tuple[int, ...]
    correlations: tuple[float, ...]
    mean_abs_corr: float
    min_abs_corr: float
    n_weak: int
    weak: float
    unmatched: dict[str, list[int]]
    n_probe: int

    @property
    def text(self) -> str:
        """One line on the quality of the match."""
        n = sum(p >= 0 for p in self.permutation)
        s = (
            f"{n} axes matched on {self.n_probe} probe images: mean |r| = {self.mean_abs_corr:.2f}, "
            f"min |r| = {self.min_abs_corr:.2f}, {self.n_weak} with |r| < {self.weak:g}"
        )
        if self.unmatched["prev"] or self.unmatched["new"]:
            s += f"; unmatched previous {self.unmatched['prev']}, new {self.unmatched['new']}"
        return s

    def new_to_prev(self) -> dict[int, int]:
        """``{new axis: previous axis}`` for matched pairs."""
        return {p: k for k, p in enumerate(self.permutation) if p >= 0}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (with ``text``)."""
        d = asdict(self)
        d["correlations"] = [_json_float(c) for c in self.correlations]
        d["mean_abs_corr"] = _json_float(self.mean_abs_corr)
        d["min_abs_corr"] = _json_float(self.min_abs_corr)
        d["text"] = self.text
        return d


def align_axes(Z_prev: Any, Z_new: Any, *, weak: float = 0.5) -> Alignment:
    """Match a new model's latent axes to the previous model's on the same probe images.

    The Pearson correlation of every previous axis with every new axis is computed over the probe images, and the
    Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) picks the permutation maximising the total
    |correlation|; each pair's sign is the sign of its correlation.

    Args:
        Z_prev: latents of the probe images under the previous model (N, d_prev).
        Z_new: latents of the same probe images, same order, under the new model (N, d_new).
        weak: |r| below which a matched pair is counted as weak.

    Returns:
        :class:`Alignment` (see :func:`apply_alignment`).

    Raises:
        ValueError: when the probe sets differ in size or have fewer than 3 images.
    """
    A = as_latent_matrix(Z_prev, "Z_prev")
    B = as_latent_matrix(Z_new, "Z_new")
    if len(A) != len(B):
        raise ValueError(
            f"Z_prev has {len(A)} rows and Z_new {len(B)}: encode the same fixed probe images with both models"
        )
    if len(A) < 3:
        raise ValueError(f"need at least 3 probe images, got {len(A)}")
    C = corr_matrix(A, B)  # (d_prev, d_new)
    rows, cols = optimize.linear_sum_assignment(-np.abs(C))
    d_prev, d_new = C.shape
    perm = np.full(d_prev, -1, dtype=int)
    signs = np.ones(d_prev, dtype=int)
    corr = np.full(d_prev, np.nan)
    for r, c in zip(rows, cols, strict=True):
        perm[r] = c
        signs[r] = 1 if C[r, c] >= 0 else -1
        corr[r] = abs(C[r, c])
    matched = corr[perm >= 0]
    return Alignment(
        permutation=tuple(int(p) for p in perm),
        signs=tuple(int(s) for s in signs),
        correlations=tuple(float(c) for c in corr),
        mean_abs_corr=float(matched.mean()) if matched.size else float("nan"),
        min_abs_corr=float(matched.min()) if matched.size else float("nan"),
        n_weak=int((matched < weak).sum()),
        weak=float(weak),
        unmatched={
            "prev": [int(k) for k in np.flatnonzero(perm < 0)],
            "new": sorted(set(range(d_new)) - {int(c) for c in cols}),
        },
        n_probe=len(A),
    )


def apply_alignment(Z_new: Any, alignment: Alignment, *, keep_unmatched: bool = True) -> np.ndarray:
    """Re-number (and re-sign) a new model's latents in the previous model's axis order.

    Args:
        Z_new: latents under the new model (N, d_new).
        alignment: from :func:`align_axes`.
        keep_unmatched: append the new axes without a partner (in increasing order) after the ``d_prev`` columns.

    Returns:
        (N, d_prev [+ unmatched]) array: column k is ``signs[k] * Z_new[:, permutation[k]]`` (NaN for a previous
        axis without partner).
    """
    B = as_latent_matrix(Z_new, "Z_new")
    d_new = len(alignment.permutation) - len(alignment.unmatched["prev"]) + len(alignment.unmatched["new"])
    if B.shape[1] != d_new:
        raise ValueError(f"Z_new has {B.shape[1]} axes but the alignment was computed for {d_new}")
    out = np.full((len(B), len(alignment.permutation)), np.nan)
    for k, (p, s) in enumerate(zip(alignment.permutation, alignment.signs, strict=True)):
        if p >= 0:
            out[:, k] = s * B[:, p]
    if keep_unmatched and alignment.unmatched["new"]:
        out = np.concatenate([out, B[:, alignment.unmatched["new"]]], axis=1)
    return out
