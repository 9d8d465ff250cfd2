"""Product mix as context, not drift: conditioning a window's tests on the product type of each image.

A line makes several products (on the simulated ELPV line: mono- and polycrystalline cells) and the share of each
swings from day to day with the production plan. Mono and poly cells look very different (brightness, texture,
chamfered corners), so a window that is 90 % mono compared with a reference that is 40 % mono differs on every
latent axis and several image channels although nothing is wrong. The drift tests therefore compare like with like:
the reference is **re-weighted to the window's product shares** (each reference image of product ``s`` weighs
``share_window(s) / n_reference(s)``), so the window's mono cells meet the reference's mono cells and its poly cells
the reference's poly cells, in the window's proportions. The mix itself is a separate, informational signal
(:class:`MixSignal`): it is reported with every verdict and named only when it explains the verdict, i.e. when the
window holds a product the reference has (almost) none of: those cells cannot be compared with their own kind, so
they are not tested (``pipeline.analysis.drift.DriftResult.n_untested``) rather than called drift, which would keep the
product out of the next training and never let the model learn it.

Pure functions on label arrays; :class:`pipeline.analysis.drift.DriftDetector` uses them when it was fitted with
``ref_strata`` and is given ``cur_strata``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["MIN_STRATUM", "MIX_CHANGE", "MixSignal", "labels", "matched_rows", "mix_signal", "reference_weights", "shares"]

MIN_STRATUM = 10
"""Fewest reference images of a product for its window cells to be compared with their own kind; cells of a product
with fewer are not tested, and the mix is then named in the verdict."""
MIX_CHANGE = 0.15
"""Smallest change of a product's share that can explain a verdict of tests that did not condition on the product."""


def labels(values: Any) -> np.ndarray:
    """Product labels as strings (missing labels become ``"unknown"``)."""
    return pd.Series(values, dtype=object).fillna("unknown").astype(str).to_numpy()


def shares(values: Any) -> dict[str, float]:
    """Share of each product among ``values`` (labels), largest first."""
    s = pd.Series(labels(values)).value_counts(normalize=True)
    return {str(k): float(v) for k, v in s.items()}


def _supported(ref: np.ndarray, cur: np.ndarray, min_stratum: int) -> tuple[dict[str, float], float]:
    """The window's shares of products the reference supports, and the window share of those it does not."""
    ref_counts = pd.Series(ref).value_counts()
    cur_shares = shares(cur)
    ok = {k: v for k, v in cur_shares.items() if ref_counts.get(k, 0) >= min_stratum}
    return ok, 1.0 - float(sum(ok.values()))


def reference_weights(ref_strata: Any, cur_strata: Any, min_stratum: int = MIN_STRATUM) -> np.ndarray:
    """Weights (summing to 1) of the reference images that give the reference the window's product shares.

    A reference image of product ``s`` weighs ``share_window(s) / n_reference(s)``. Window cells of a product the
    reference holds fewer than ``min_stratum`` images of are compared with the whole reference: their share is
    spread evenly over every reference image.

    Args:
        ref_strata: product label of every reference image.
        cur_strata: product label of every window image.
        min_stratum: fewest reference images of a product to condition on it.

    Returns:
        float array (n_ref,), non-negative, summing to 1.
    """
    ref, cur = labels(ref_strata), labels(cur_strata)
    if ref.size == 0 or cur.size == 0:
        raise ValueError("reference_weights needs non-empty reference and window labels")
    ok, rest = _supported(ref, cur, min_stratum)
    w = np.full(ref.size, rest / ref.size)
    for product, share in ok.items():
        rows = ref == product
        w[rows] += share / rows.sum()
    return w / w.sum()


def matched_rows(ref_strata: Any, cur_strata: Any, rng: np.random.Generator,
                 min_stratum: int = MIN_STRATUM) -> np.ndarray:
    """Reference rows forming the largest subsample with the window's product shares (sorted row positions).

    For tests that take an unweighted sample (the i.i.d. null's KS, MMD permutations, Mann-Whitney): the subsample
    holds every product in the window's proportions (products the reference does not support are left to the
    whole-reference remainder, drawn from all rows).
    """
    ref, cur = labels(ref_strata), labels(cur_strata)
    ok, rest = _supported(ref, cur, min_stratum)
    counts = pd.Series(ref).value_counts()
    # the largest total size m such that every supported product's quota fits into its reference images
    limits = [counts[p] / s for p, s in ok.items() if s > 0]
    m = int(min(limits + ([ref.size] if rest > 0 else []))) if limits else ref.size
    picked: list[np.ndarray] = []
    for product, share in ok.items():
        rows = np.flatnonzero(ref == product)
        k = min(rows.size, int(round(share * m)))
        picked.append(rng.choice(rows, size=k, replace=False))
    if rest > 0:
        left = np.setdiff1d(np.arange(ref.size), np.concatenate(picked) if picked else np.empty(0, int))
        picked.append(rng.choice(left, size=min(left.size, int(round(rest * m))), replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.arange(ref.size)


@dataclass(frozen=True)
class MixSignal:
    """The window's product mix against the reference's: context for a verdict, never a drift test by itself.

    Attributes:
        window: product -> share in the window.
        reference: product -> share in the reference.
        change: largest absolute change of a product's share.
        unsupported: products of the window the reference holds fewer than ``MIN_STRATUM`` images of, with their
            window share; their cells were compared with the whole reference.
        conditioned: the tests compared each product with its own kind.
    """

    window: Mapping[str, float]
    reference: Mapping[str, float]
    change: float
    unsupported: Mapping[str, float] = field(default_factory=dict)
    conditioned: bool = True

    @property
    def explains(self) -> bool:
        """The mix can explain a verdict.

        True when some window cells could not be compared with their own product, or when the tests did not
        condition on the product and a share moved by ``MIX_CHANGE`` or more.
        """
        return bool(self.unsupported) or (not self.conditioned and self.change >= MIX_CHANGE - 1e-9)

    def text(self) -> str:
        """``"product mix: mono 90% (reference 40%), poly 10% (reference 60%)"`` (products by window share)."""
        keys = sorted(set(self.window) | set(self.reference), key=lambda k: (-self.window.get(k, 0.0), k))
        parts = [f"{k} {self.window.get(k, 0.0):.0%} (reference {self.reference.get(k, 0.0):.0%})" for k in keys]
        return "product mix: " + ", ".join(parts)

    def note(self) -> str:
        """The phrase an alert carries when the mix explains the verdict, else ``""``."""
        if not self.explains:
            return ""
        if not self.unsupported:
            return f"{self.text()} (the tests did not compare each product with its own kind)"
        new = ", ".join(f"{k} ({v:.0%} of the window)" for k, v in self.unsupported.items())
        return (f"{self.text()}; the reference has (almost) no {new}: those cells were not tested (the next "
                "nightly retrain learns them)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"window": dict(self.window), "reference": dict(self.reference), "change": self.change,
                "unsupported": dict(self.unsupported), "conditioned": self.conditioned, "explains": self.explains}


def mix_signal(ref_strata: Any, cur_strata: Any, min_stratum: int = MIN_STRATUM, conditioned: bool = True
               ) -> MixSignal:
    """The window's product mix against the reference's (see :class:`MixSignal`)."""
    ref, cur = labels(ref_strata), labels(cur_strata)
    r, w = shares(ref), shares(cur)
    change = max(abs(w.get(k, 0.0) - r.get(k, 0.0)) for k in set(r) | set(w))
    counts = pd.Series(ref).value_counts()
    unsupported = {k: v for k, v in w.items() if counts.get(k, 0) < min_stratum} if conditioned else {}
    return MixSignal(window=w, reference=r, change=float(change), unsupported=unsupported, conditioned=conditioned)
