"""What one window's drift test works with and returns: :class:`DriftResult` and the test's working records."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["DriftResult"]


@dataclass(frozen=True)
class DriftResult:
    """Outcome of :meth:`DriftDetector.test` on one window.

    Attributes:
        detected: the window is flagged (some family fired at ``family_alpha``).
        fired: names of the families that fired, from ``("axes", "mmd", "scores", "quality")``.
        family_p: p-value of each family tested (under the null in force).
        family_alpha: level each family is tested at (``alpha / number of families``).
        mmd_stat: unbiased MMD^2 of the window against the reference.
        mmd_p: its p-value (permutation under the i.i.d. null, lot-bootstrap under the lot null).
        score_stat: AUC of window vs reference anomaly scores (None without scores).
        score_p: the score family's one-sided p-value, AUC and tail share combined (None without scores).
        per_axis: one row per axis, sorted by ``rank``: ``axis, ks_stat, p_value, p_adjusted, effect_size, psi,
            psi_band, significant, rank``. ``p_value``/``p_adjusted`` are the i.i.d. KS values; under the lot null
            ``significant`` means ``ks_stat`` exceeds the lot-null threshold of the max KS statistic.
        top_axis: the axis that moved most (largest |effect| among significant axes, else overall).
        top_share: share of the total |effect| carried by ``top_axis`` (1.0 = one axis explains the shift).
        n_ref: reference size.
        n_cur: window size.
        null: ``"iid"`` or ``"lot"``.
        thresholds: the decision thresholds used (levels, lot-null quantiles, the expected null PSI).
        quality_stat: largest |median shift| of the image-quality channels, in robust reference sd (1.4826 MAD;
            None without them).
        quality_p: p-value of the quality family (Mann-Whitney tests, Bonferroni over channels, under the i.i.d. null;
            lot bootstrap of the largest |shift| under the lot null; None without channels).
        per_channel: one row per quality channel, significant first then by |effect|: ``channel, ks_stat, p_value,
            effect_size, significant`` (``effect_size``: median shift in robust sd; ``p_value``: Mann-Whitney; None without
            channels).
        score_tail: share of the window's cells above the reference's ``1 - score_tail`` score quantile (None
            without scores); ``score_tail_expected`` is that share on the reference (``score_tail``, e.g. 0.10).
        mix: the window's product mix against the reference's (:class:`pipeline.analysis.strata.MixSignal`; None without
            ``cur_strata``): context, not a test. Its ``explains`` says whether it can explain the verdict.
        n_untested: window images of a product the reference does not know, left out of the test (all of them,
            ``n_cur`` = 0 and nothing fired, when fewer than ``min_window`` known cells were left).
        meta: detector name, version, params, model id.
    """

    detected: bool
    fired: tuple[str, ...]
    family_p: dict[str, float]
    family_alpha: float
    mmd_stat: float
    mmd_p: float
    score_stat: float | None
    score_p: float | None
    per_axis: pd.DataFrame
    top_axis: int
    top_share: float
    n_ref: int
    n_cur: int
    null: str
    thresholds: dict[str, float]
    quality_stat: float | None = None
    quality_p: float | None = None
    per_channel: pd.DataFrame | None = None
    score_tail: float | None = None
    score_tail_expected: float | None = None
    mix: Any = None
    n_untested: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def top_channel(self) -> str | None:
        """The image-quality channel that moved most when the quality family fired, else None."""
        if self.per_channel is None or "quality" not in self.fired:
            return None
        return str(self.per_channel.iloc[0]["channel"])

    def summary(self) -> str:
        """One line for logs and alerts."""
        head = "drift" if self.detected else "no drift"
        fams = ", ".join(f"{k} p={v:.3g}" for k, v in self.family_p.items())
        row = self.per_axis.iloc[0]
        return (
            f"{head} ({self.null} null, n={self.n_cur}; {fams}); top axis z_{self.top_axis}: "
            f"effect {row['effect_size']:+.2f} sd, KS {row['ks_stat']:.2f}, PSI {row['psi']:.2f} "
            f"({row['psi_band']}), {self.top_share:.0%} of the total shift"
        ) + (
            ""
            if self.top_channel is None
            else f"; image quality: {self.top_channel} {self.per_channel.iloc[0]['effect_size']:+.2f} sd"
        )

@dataclass
class _WindowData:
    """A validated window: latents, scores, quality channels, and how the reference is matched to its mix."""

    Z: np.ndarray
    scores: np.ndarray | None
    quality: np.ndarray | None
    n: int
    weights: np.ndarray | None
    """Reference weights giving the reference the window's product mix (None: unconditioned, uniform)."""
    mix: Any = None
    """The window's :class:`pipeline.analysis.strata.MixSignal` (None without ``cur_strata``)."""
    cal_shares: dict[str, float] | None = None
    """Product shares the lot null is calibrated at (None: the reference's own)."""
    strata: np.ndarray | None = None
    """Product label of every window image (None without ``cur_strata``)."""
    n_untested: int = 0
    """Window images of products the reference does not know, left out of the test."""
    comparable: bool = True
    """False when too few cells of known products are left to test."""


@dataclass
class _FamilyStats:
    """Statistics of one window's test as they are worked out, step by step."""

    family_p: dict[str, float]
    thresholds: dict[str, float]
    ks: np.ndarray = field(default_factory=lambda: np.empty(0))
    p: np.ndarray = field(default_factory=lambda: np.empty(0))
    p_adj: np.ndarray = field(default_factory=lambda: np.empty(0))
    eff: np.ndarray = field(default_factory=lambda: np.empty(0))
    psis: np.ndarray = field(default_factory=lambda: np.empty(0))
    significant: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))
    ref_rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=int))
    mmd_stat: float = math.nan
    mmd_p: float = math.nan
    score_stat: float | None = None
    score_p: float | None = None
    tail_share: float | None = None
    q_ks: np.ndarray | None = None
    q_pv: np.ndarray | None = None
    q_eff: np.ndarray | None = None
    q_sig: np.ndarray | None = None
    q_reportable: np.ndarray | None = None
    quality_stat: float | None = None
    quality_p: float | None = None
