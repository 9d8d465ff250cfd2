"""The drift detector: ``fit(reference)``, then ``test(window)`` -> :class:`DriftResult`.

:class:`DriftDetector` validates the reference and the windows, matches the reference to a window's product mix
(:mod:`pipeline.analysis.strata`), computes the per-axis description of the window (KS, effect sizes, PSI, quality
channel shifts; :mod:`pipeline.analysis.drift.statistics`), tests every family under the null in force (i.i.d. here,
the lot null in :class:`pipeline.analysis.drift.lotnull.LotNull`) and assembles the :class:`DriftResult`.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from pipeline.analysis.detectors.base import NotFittedError
from pipeline.analysis.drift.lotnull import LotNull
from pipeline.analysis.drift.result import DriftResult, _FamilyStats, _WindowData
from pipeline.analysis.drift.statistics import (
    _psi_edges,
    _psi_from_edges,
    _weighted_ks,
    bh_adjust,
    bonferroni,
    effect_size,
    ks_per_axis,
    median_heuristic,
    median_shift,
    mmd_permutation_test,
    psi_band,
    robust_scale,
    score_distribution_test,
    score_tail_test,
)
from pipeline.common.schemas import as_latent_matrix

__all__ = ["DriftDetector", "even_subsample", "quality_rules"]


def _as_channels(X: Any, n: int, what: str) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """(n, k) float matrix and channel names of per-image channels (None passes through)."""
    if X is None:
        return None, ()
    if isinstance(X, pd.DataFrame):
        names = tuple(str(c) for c in X.columns)
        M = X.to_numpy(dtype=np.float64)
    else:
        M = np.asarray(X, dtype=np.float64)
        if M.ndim == 1:
            M = M[:, None]
        names = tuple(f"q_{i}" for i in range(M.shape[1] if M.ndim == 2 else 0))
    if M.ndim != 2 or M.shape[0] != n or M.shape[1] == 0:
        raise ValueError(f"{what} must have shape ({n}, k) with k >= 1, got {M.shape}")
    if not np.isfinite(M).all():
        raise ValueError(f"{what} contain NaN or inf")
    return M, names



def quality_rules(floors: Any = None, directions: Any = None) -> tuple[dict[str, float], dict[str, int]]:
    """Checked image-quality floors and directions (:class:`DriftDetector`), each a mapping or (name, value) pairs.

    Raises:
        ValueError: a floor that is not a finite number >= 0, or a direction other than -1, 0 or +1.
    """
    def pairs(rules: Any) -> list[tuple[str, Any]]:
        return [(str(k), v) for k, v in (rules.items() if isinstance(rules, Mapping) else rules or ())]

    bad = [(k, v) for k, v in pairs(floors) if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"quality_floors must map channel names to finite numbers >= 0, got {dict(bad)}")
    bad = [(k, v) for k, v in pairs(directions) if v not in (-1, 0, 1)]
    if bad:
        raise ValueError(f"quality_directions must map channel names to -1, 0 or +1, got {dict(bad)}")
    return {k: float(v) for k, v in pairs(floors)}, {k: int(v) for k, v in pairs(directions)}


def _too_small(n: int, min_window: int, alpha: float) -> str:
    return (
        f"window has {n} images; at least {min_window} are needed for a drift test at alpha={alpha:g}; "
        "widen the window (per day instead of per shift)"
    )


def _both_or_neither(ref: Any, cur: Any, what: str, fit_arg: str, test_arg: str) -> None:
    """A family is tested only when the reference and the window both carry its data."""
    if (cur is None) != (ref is None):
        raise ValueError(
            f"{what} must be given for both the reference (fit {fit_arg}) and the window (test {test_arg}), "
            "or for neither"
        )


def _check_ref_scores(ref_scores: Any, n: int) -> np.ndarray | None:
    """``ref_scores`` as n finite floats (None stays None)."""
    if ref_scores is None:
        return None
    scores = np.asarray(ref_scores, dtype=np.float64).ravel()
    if scores.size != n:
        raise ValueError(f"ref_scores has {scores.size} values for {n} reference images")
    if not np.isfinite(scores).all():
        raise ValueError("ref_scores contain NaN or inf")
    return scores


def _check_ref_strata(ref_strata: Any, n: int) -> np.ndarray | None:
    """``ref_strata`` as n labels without missing values (None stays None)."""
    if ref_strata is None:
        return None
    strata = np.asarray(ref_strata)
    if strata.shape[0] != n:
        raise ValueError(f"ref_strata has {strata.shape[0]} values for {n} reference images")
    if pd.isna(strata).any():
        raise ValueError("ref_strata contain missing values; label every reference image (e.g. 'unknown')")
    return strata


def _reference_order(ref_order: Any, n: int) -> np.ndarray:
    """The stable sort order of the n reference images by the key ``ref_order``."""
    key = np.asarray(ref_order)
    if key.shape[0] != n:
        raise ValueError(f"ref_order has {key.shape[0]} values for {n} reference images")
    return np.argsort(key, kind="stable")


class DriftDetector(LotNull):
    """Drift tests of windows of latents against a reference (see :mod:`pipeline.analysis.drift`).

    Args:
        alpha: overall false-alarm rate per window (split over the test families).
        correction: multiplicity correction over axes under the i.i.d. null, ``"bh"`` or ``"bonferroni"``.
        n_permutations: permutations of the MMD test (i.i.d. null).
        min_window: smallest window accepted by ``test``.
        null: ``"iid"`` or ``"lot"``.
        lot_block: block length (images) of the lot-null bootstrap; None = each calibration window is one run of
            consecutive reference images (matches windows of consecutive images). Set it to the lot size when a
            window mixes several non-adjacent lots.
        n_calibration: bootstrap windows per window size for the lot null (>= k/alpha, default 500).
        mmd_max_ref: reference subsample size for the MMD statistic.
        psi_bins: bins of the PSI.
        score_tail: upper tail of the reference's anomaly scores whose share the score family watches (0.10: the
            share of cells above the reference's 90th percentile).
        quality_floors: smallest change of an image-quality channel's median, in the channel's own unit, that the
            quality family may report (channel name -> floor; channels not named have none). A channel whose median
            moved less is neither significant nor part of the family's statistic, however far outside the
            reference's spread: it separates a change worth an alarm from a healthy lot that sits just outside
            the few line-days a reference holds. The test stays valid (a smaller statistic only raises the p-value).
        quality_directions: the direction each named channel is watched in (+1: only a rise is reported, -1: only a
            fall, 0 or not named: both), for channels a camera or optics fault moves one way only (defocus and sensor
            noise raise the fine-detail ratio and the noise level, a darker border lowers the illumination ratio) while
            healthy lots move them both ways. A move the other way is shown but is not reported, as under a floor.
        random_state: seed; every ``test`` call is reproducible given its inputs.
        progress: show a progress bar while calibrating the lot null.
    """

    name = "DriftDetector"
    version = "1"

    def __init__(
        self,
        alpha: float = 0.05,
        correction: str = "bh",
        n_permutations: int = 200,
        min_window: int = 30,
        null: str = "iid",
        lot_block: int | None = None,
        n_calibration: int = 500,
        mmd_max_ref: int = 500,
        psi_bins: int = 10,
        score_tail: float = 0.1,
        quality_floors: Mapping[str, float] | None = None,
        quality_directions: Mapping[str, int] | None = None,
        random_state: int = 0,
        progress: bool = False,
    ) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if correction not in ("bh", "bonferroni"):
            raise ValueError(f"correction must be 'bh' or 'bonferroni', got {correction!r}")
        if null not in ("iid", "lot"):
            raise ValueError(f"null must be 'iid' or 'lot', got {null!r}")
        if min_window < 2:
            raise ValueError(f"min_window must be >= 2, got {min_window}")
        if lot_block is not None and lot_block < 1:
            raise ValueError(f"lot_block must be >= 1 or None, got {lot_block}")
        if null == "lot" and (n_calibration + 1) * alpha / 3.0 < 1.0:
            raise ValueError(
                f"n_calibration={n_calibration} cannot resolve p-values at alpha/3={alpha / 3:.3g}; "
                f"use at least {math.ceil(3.0 / alpha)}"
            )
        if n_permutations < 1:
            raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
        if not 0.0 < score_tail <= 0.5:
            raise ValueError(f"score_tail must be in (0, 0.5], got {score_tail}")
        floors, directions = quality_rules(quality_floors, quality_directions)
        self.alpha = float(alpha)
        self.correction = correction
        self.n_permutations = int(n_permutations)
        self.min_window = int(min_window)
        self.null = null
        self.lot_block = lot_block
        self.n_calibration = int(n_calibration)
        self.mmd_max_ref = int(mmd_max_ref)
        self.psi_bins = int(psi_bins)
        self.score_tail = float(score_tail)
        self.quality_floors, self.quality_directions = floors, directions
        self.random_state = int(random_state)
        self.progress = progress

    def get_params(self) -> dict[str, Any]:
        """Hyperparameters given to ``__init__``."""
        keys = (
            "alpha correction n_permutations min_window null lot_block n_calibration mmd_max_ref psi_bins "
            "score_tail quality_floors quality_directions random_state"
        ).split()
        return {k: getattr(self, k) for k in keys}

    def __repr__(self) -> str:
        return "DriftDetector(" + ", ".join(f"{k}={v!r}" for k, v in self.get_params().items()) + ")"

    def min_reference(self) -> int:
        """Fewest reference images :meth:`fit` accepts with these settings (the retrain's floor and gate use it)."""
        return 2 * self.min_window

    # ---- fit -----------------------------------------------------------------------------------------------
    def fit(
        self, Z_ref: Any, ref_scores: Any = None, model_id: str | None = None, ref_order: Any = None,
        ref_lots: Any = None, ref_strata: Any = None, ref_quality: Any = None, ref_streams: Any = None,
        ref_periods: Any = None,
    ) -> DriftDetector:
        """Store the reference.

        Args:
            Z_ref: reference latents (n_ref, d) of normal images (a DataFrame with ``z_*`` columns works too).
            ref_scores: optional anomaly scores (n_ref,) of the same images; enables the score family.
            model_id: id of the model that encoded ``Z_ref``; ``test`` refuses windows from another model.
            ref_order: optional sort key (n_ref,) giving the production order of the reference (capture time, file
                order); the lot null draws consecutive images in this order. Default: row order.
            ref_lots: optional lot label (n_ref,) of each reference image. When given, lot-null calibration
                windows (and blocks) start at lot boundaries: use it when monitoring windows are cut on lot
                boundaries (a window = whole lots), which differ from the reference more than windows that start
                mid-lot.
            ref_strata: optional stratum label (n_ref,) of each reference image, e.g. the product type. When
                given, every lot-null calibration window takes from each stratum its share of the reference
                (largest-remainder rounding), as consecutive images *of that stratum*, and is compared with the rest
                of the reference re-weighted to the same shares. Without it, a calibration window of consecutive
                images is mostly one product, so the lot null measures product-mix swings and is far too wide for
                windows that mix products like the reference does.
            ref_quality: optional image-quality channels (n_ref, k) of the same images (a DataFrame keeps its column
                names, e.g. ``sharpness``, ``noise_level`` from :mod:`pipeline.latent.properties` at full resolution);
                enables the ``quality`` family: per-channel two-sample KS, which sees fine-scale faults (blur,
                sensor noise) that a latent computed at a few dozen pixels cannot.
            ref_streams: optional production stream (the line) of each reference image, with ``ref_periods``.
            ref_periods: optional production period (e.g. the plant day's ordinal) of each reference image. With
                both, the lot null calibrates on **production blocks** (:mod:`pipeline.analysis.blocks`): a calibration
                window is one (stream, period) of the reference resampled to the window's size, so it has the lots of
                one real line-day, and windows of any size are tested whole. Give them when a monitored window is one
                line's production over one period and the reference is a sample of many such periods (the
                monitor's calibration snapshot); with fewer than ``pipeline.analysis.blocks.MIN_BLOCKS`` usable blocks the
                runs of consecutive images are used.

        Returns:
            self.
        """
        Z = as_latent_matrix(Z_ref, "Z_ref")
        n = Z.shape[0]
        if n < self.min_reference():
            raise ValueError(
                f"reference has {n} images; at least {self.min_reference()} (2 x min_window) are needed"
            )
        scores = _check_ref_scores(ref_scores, n)
        quality, q_names = _as_channels(ref_quality, n, "ref_quality")
        strata = _check_ref_strata(ref_strata, n)
        if ref_order is not None:
            order = _reference_order(ref_order, n)
            Z = Z[order]
            scores = None if scores is None else scores[order]
            quality = None if quality is None else quality[order]
        else:
            order = np.arange(n)
        self._fit_lots(ref_lots, order, n)
        self._fit_strata(strata, order, n)
        self._fit_blocks(ref_streams, ref_periods, order, n)
        self._fit_reference(Z, scores, quality, q_names, model_id)
        return self

    def _fit_strata(self, strata: np.ndarray | None, order: np.ndarray, n: int) -> None:
        """The reference's streams of rows per stratum and their shares (one stream of all rows without strata)."""
        if strata is None:
            self._streams = [(np.arange(n), 1.0)]
            self.strata_ = None
            self.ref_strata_ = None
        else:
            strata = np.asarray(strata, dtype=str)[order]
            labels, inv = np.unique(strata, return_inverse=True)
            self._streams = [(np.flatnonzero(inv == i), float(np.mean(inv == i))) for i in range(labels.size)]
            self.strata_ = {str(lab): share for lab, (_, share) in zip(labels, self._streams, strict=True)}
            self.ref_strata_ = strata

    def _fit_reference(self, Z: np.ndarray, scores: np.ndarray | None, quality: np.ndarray | None,
                       q_names: Any, model_id: str | None) -> None:
        """Stores the ordered reference and what is computed from it once (PSI edges, MMD bandwidth)."""
        self.ref_ = Z
        self.ref_scores_ = scores
        self.ref_quality_ = quality
        self.quality_names_ = q_names
        self._q_scale = None if quality is None else robust_scale(quality)
        self._q_floors = np.array([self.quality_floors.get(name, 0.0) for name in q_names])
        self._q_dirs = np.array([self.quality_directions.get(name, 0) for name in q_names])
        self.model_id_ = model_id
        self.n_ref_, self.n_features_in_ = Z.shape
        self.psi_edges_ = _psi_edges(Z, self.psi_bins)
        self.sigma_ref_ = median_heuristic(Z, rng=self.random_state)
        self._calibrations: dict[Any, dict[str, np.ndarray]] = {}
        self.is_fitted_ = True

    @property
    def max_window(self) -> int | None:
        """Largest window the lot null calibrates honestly: a third of the reference (None: any size).

        Any size under the i.i.d. null and with production blocks (``ref_streams`` / ``ref_periods``).

        A lot-null calibration window is compared with the rest of the reference *minus a guard band* around it
        (:meth:`_block_indices`), so that it is compared with other lots and not with the rest of its own lot. Up to
        a third of the reference, the window, a guard band and a comparison set as large as the window all fit. A
        larger window leaves no room for the guard: the calibration windows are then compared with their own lots'
        neighbours, look more alike than new lots do, and the null is too narrow (measured in ``make demo``: a
        110-image reference of 5 days, day windows subsampled to half the reference, flagged a healthy day at
        quality p = 0.002; subsampled to a third, p = 0.34). Windows above ``max_window`` should be subsampled
        evenly (:func:`even_subsample`) before :meth:`test`, as the monitor does. It is never below ``min_window``
        (a reference under three minimum windows gets a narrower guard band).
        """
        self._check_fitted()
        if self.null == "iid" or self._blocks is not None:  # production blocks calibrate any window size
            return None
        return max(self.n_ref_ // 3, self.min_window)

    def rows_to_test(self, n: int) -> np.ndarray:
        """Positions of a window of ``n`` images to give :meth:`test`.

        All of them under the i.i.d. null; under the lot null, evenly subsampled to :attr:`max_window` when larger.
        """
        return np.arange(n) if self.max_window is None else even_subsample(n, self.max_window)

    def _check_fitted(self) -> None:
        if not getattr(self, "is_fitted_", False):
            raise NotFittedError("DriftDetector has not been fit: call fit(Z_ref) first")

    # ---- test ----------------------------------------------------------------------------------------------
    def test(
        self, Z_cur: Any, cur_scores: Any = None, model_id: str | None = None, cur_quality: Any = None,
        cur_strata: Any = None,
    ) -> DriftResult:
        """Test one window against the reference.

        Args:
            Z_cur: window latents (n_cur, d).
            cur_scores: anomaly scores (n_cur,) of the window; required iff ``ref_scores`` were given to ``fit``.
            model_id: id of the model that encoded ``Z_cur``; must equal the reference's when both are known.
            cur_quality: image-quality channels (n_cur, k) of the window; required iff ``ref_quality`` was given,
                with the same channels.
            cur_strata: product label (n_cur,) of every window image. With ``ref_strata`` given to ``fit``, every
                family compares the window with the reference **re-weighted to the window's product shares**
                (:mod:`pipeline.analysis.strata`): each product with its own kind, so a swing of the product mix is not
                drift; the lot null is calibrated at the window's mix. The mix itself is reported in
                ``DriftResult.mix``.

        Returns:
            :class:`DriftResult`.

        Raises:
            NotFittedError: before ``fit``.
            ValueError: too-small window, NaNs, model-id or dimension mismatch, scores given on one side only.
        """
        win = self._window(Z_cur, cur_scores, model_id, cur_quality, cur_strata)
        families = ["axes", "mmd"] + (["scores"] if win.scores is not None else []) + (
            ["quality"] if win.quality is not None else []
        )
        if not win.comparable:
            return self._not_comparable(win, families)
        fam_alpha = self.alpha / len(families)
        if self.null == "lot" and (self.n_calibration + 1) * fam_alpha < 1.0:
            raise ValueError(
                f"n_calibration={self.n_calibration} cannot resolve p-values at alpha/{len(families)}="
                f"{fam_alpha:.3g}; use at least {math.ceil(1.0 / fam_alpha)}"
            )
        # seeded by the window's content: reproducible for a given window, but a fresh reference subsample and
        # permutation set for each window, so the false-alarm rate over many windows does not hinge on one
        # particular MMD reference subsample
        rng = np.random.default_rng([self.random_state, win.n, zlib.crc32(win.Z.tobytes())])
        stats_ = _FamilyStats(family_p={}, thresholds={
            "alpha": self.alpha, "family_alpha": fam_alpha,
            "psi_null_expected": (len(self.psi_edges_[0])) * (1.0 / win.n + 1.0 / self.n_ref_),
        })
        self._describe(win, stats_, rng)
        if self.null == "iid":
            self._iid_families(win, stats_, fam_alpha, rng)
        else:
            self._lot_families(win, stats_, fam_alpha, rng)
        return self._result(win, stats_, families, fam_alpha)

    def _window(self, Z_cur: Any, cur_scores: Any, model_id: str | None, cur_quality: Any, cur_strata: Any
                ) -> _WindowData:
        """Validate a window and work out the reference weights that match its product mix."""
        self._check_fitted()
        if model_id is not None and self.model_id_ is not None and model_id != self.model_id_:
            raise ValueError(
                f"reference was encoded by model {self.model_id_!r} but the window by model {model_id!r}; "
                "latents of different models are not comparable: re-encode the reference or the window"
            )
        Z = as_latent_matrix(Z_cur, "Z_cur")
        n = Z.shape[0]
        if n < self.min_window:
            raise ValueError(_too_small(n, self.min_window, self.alpha))
        if Z.shape[1] != self.n_features_in_:
            raise ValueError(
                f"window has {Z.shape[1]} latent axes but the reference has {self.n_features_in_}; "
                "were they encoded by different models?"
            )
        _both_or_neither(self.ref_scores_, cur_scores, "anomaly scores", "ref_scores", "cur_scores")
        scores = None
        if cur_scores is not None:
            scores = np.asarray(cur_scores, dtype=np.float64).ravel()
            if scores.size != n:
                raise ValueError(f"cur_scores has {scores.size} values for {n} window images")
            if not np.isfinite(scores).all():
                raise ValueError("cur_scores contain NaN or inf")
        _both_or_neither(self.ref_quality_, cur_quality, "image-quality channels", "ref_quality", "cur_quality")
        quality = None
        if cur_quality is not None:
            quality, names = _as_channels(cur_quality, n, "cur_quality")
            if quality.shape[1] != self.ref_quality_.shape[1] or (
                isinstance(cur_quality, pd.DataFrame) and list(names) != list(self.quality_names_)
            ):
                raise ValueError(
                    f"window quality channels {list(names)} do not match the reference's {list(self.quality_names_)}"
                )
        win = _WindowData(Z, scores, quality, n, *self._mix_weights(cur_strata, n))
        return self._supported_part(win)

    def _supported_part(self, win: _WindowData) -> _WindowData:
        """The window's cells of products the reference knows; cells of another product are not tested.

        A product the reference holds (almost) no images of cannot be compared with its own kind: testing it against
        the other products would call every such day drift, keep it out of the next training, and so never let the
        model learn it. Its cells are left out of the test (``DriftResult.n_untested``) and the mix names them; with
        fewer than ``min_window`` cells left the window is not comparable (:meth:`_not_comparable`).
        """
        from pipeline.analysis import strata as S

        if win.mix is None or not win.mix.unsupported:
            return win
        keep = ~np.isin(win.strata, list(win.mix.unsupported))
        if keep.sum() < self.min_window:
            return dataclasses.replace(win, n_untested=win.n, comparable=False)
        sub = dataclasses.replace(
            win, Z=win.Z[keep], n=int(keep.sum()), strata=win.strata[keep], n_untested=int((~keep).sum()),
            scores=None if win.scores is None else win.scores[keep],
            quality=None if win.quality is None else win.quality[keep])
        w = S.reference_weights(self.ref_strata_, sub.strata)
        cal = {lab: round(float(w[self.ref_strata_ == lab].sum()) * 20) / 20 for lab in self.strata_}
        return dataclasses.replace(sub, weights=w, cal_shares=cal)

    def _not_comparable(self, win: _WindowData, families: list[str]) -> DriftResult:
        """The result for a window with too few cells of known products to test: no drift, nothing fired."""
        d = self.n_features_in_
        table = pd.DataFrame({
            "axis": np.arange(d), "ks_stat": 0.0, "p_value": 1.0, "p_adjusted": 1.0, "effect_size": 0.0, "psi": 0.0,
            "psi_band": "stable", "significant": False, "rank": np.arange(1, d + 1)})
        return DriftResult(
            detected=False, fired=(), family_p=dict.fromkeys(families, 1.0), family_alpha=self.alpha / len(families),
            mmd_stat=0.0, mmd_p=1.0, score_stat=None, score_p=None, per_axis=table, top_axis=0, top_share=0.0,
            n_ref=self.n_ref_, n_cur=0, null=self.null, thresholds={"alpha": self.alpha}, mix=win.mix,
            n_untested=win.n_untested,
            meta={"name": self.name, "version": self.version, "params": self.get_params(), "model_id": self.model_id_,
                  "comparable": False},
        )

    def _mix_weights(self, cur_strata: Any, n: int
                     ) -> tuple[np.ndarray | None, Any, dict[str, float] | None, np.ndarray | None]:
        """(reference weights for the window's mix or None, the mix signal, calibration shares, window labels)."""
        from pipeline.analysis import strata as S

        if cur_strata is None:
            return None, None, None, None
        cur = S.labels(cur_strata)
        if cur.size != n:
            raise ValueError(f"cur_strata has {cur.size} values for {n} window images")
        if self.ref_strata_ is None:  # the reference's products are unknown: nothing to condition on or compare
            return None, None, None, cur
        w = S.reference_weights(self.ref_strata_, cur)
        # the lot null's calibration mix: the weights' share of each product (rounded: calibrations are cached)
        cal = {lab: round(float(w[self.ref_strata_ == lab].sum()) * 20) / 20 for lab in self.strata_}
        return w, S.mix_signal(self.ref_strata_, cur), cal, cur

    def _matched_reference(self, win: _WindowData, rng: np.random.Generator) -> np.ndarray:
        """Reference rows with the window's product mix (all rows when the window is not conditioned)."""
        from pipeline.analysis import strata as S

        if win.weights is None:
            return np.arange(self.n_ref_)
        return S.matched_rows(self.ref_strata_, win.strata, rng)

    def _describe(self, win: _WindowData, st: _FamilyStats, rng: np.random.Generator) -> None:
        """Per-axis KS (i.i.d. p-values), effect sizes and PSI, and the quality channels' shifts."""
        ref = self.ref_
        rows = self._matched_reference(win, rng)
        st.ks, st.p = ks_per_axis(ref[rows], win.Z)
        st.p_adj = bh_adjust(st.p) if self.correction == "bh" else bonferroni(st.p)
        w = win.weights
        if w is None:
            st.eff = effect_size(ref, win.Z)
            st.psis = _psi_from_edges(ref, win.Z, self.psi_edges_, 1e-4)
        else:
            st.eff = (win.Z.mean(axis=0) - w @ ref) / np.maximum(ref.std(axis=0, ddof=1), 1e-12)
            st.psis = _psi_from_edges(ref, win.Z, self.psi_edges_, 1e-4, ref_weights=w)
            st.ks = _weighted_ks(win.Z, ref, w)
        st.ref_rows = rows
        if win.quality is not None:
            q_ref = self.ref_quality_
            st.q_ks, _ = ks_per_axis(q_ref[rows], win.quality)
            st.q_eff = median_shift(q_ref, win.quality, self._q_scale, w)
            q_pv = stats.mannwhitneyu(win.quality, q_ref[rows], axis=0, alternative="two-sided").pvalue
            st.q_pv = np.where(np.isfinite(q_pv), q_pv, 1.0)
            st.q_reportable = (np.abs(st.q_eff) * self._q_scale >= self._q_floors) & (st.q_eff * self._q_dirs >= 0)
            st.quality_stat = float(np.max(np.abs(st.q_eff), initial=0.0, where=st.q_reportable))

    def _iid_families(self, win: _WindowData, st: _FamilyStats, fam_alpha: float, rng: np.random.Generator
                      ) -> None:
        """Family p-values under the i.i.d. null (the reference matched to the window's mix)."""
        ref = self.ref_[st.ref_rows]
        st.family_p["axes"] = float(st.p_adj.min())
        st.significant = st.p_adj <= fam_alpha
        st.mmd_stat, st.mmd_p = mmd_permutation_test(
            ref, win.Z, n_permutations=self.n_permutations, rng=rng, max_ref=self.mmd_max_ref
        )
        if win.scores is not None:
            r_scores = self.ref_scores_[st.ref_rows]
            st.score_stat, p_auc = score_distribution_test(r_scores, win.scores)
            st.tail_share, p_tail = score_tail_test(r_scores, win.scores, self.score_tail)
            st.score_p = min(1.0, 2.0 * min(p_auc, p_tail))
        if win.quality is not None:
            q_adj = bonferroni(st.q_pv)
            st.quality_p = float(np.min(q_adj, initial=1.0, where=st.q_reportable))
            st.q_sig = (q_adj <= fam_alpha) & st.q_reportable
        st.thresholds["p_adjusted"] = fam_alpha

    def _result(self, win: _WindowData, st: _FamilyStats, families: list[str], fam_alpha: float) -> DriftResult:
        """Assemble the :class:`DriftResult` (families fired, ranked axes, channels, mix)."""
        st.family_p["mmd"] = float(st.mmd_p)
        if st.score_p is not None:
            st.family_p["scores"] = float(st.score_p)
        per_channel = None
        if st.quality_p is not None:
            st.family_p["quality"] = float(st.quality_p)
            per_channel = pd.DataFrame(
                {"channel": list(self.quality_names_), "ks_stat": st.q_ks, "p_value": st.q_pv,
                 "effect_size": st.q_eff, "reportable": st.q_reportable, "significant": st.q_sig}
            ).assign(_abs=np.abs(st.q_eff)).sort_values(["significant", "_abs"], ascending=False, kind="stable",
                                                        ignore_index=True).drop(columns="_abs")
        fired = tuple(k for k in families if st.family_p[k] <= fam_alpha * (1 + 1e-9))
        # rank: significant axes by |effect| first, then the rest by |effect|
        abs_eff = np.abs(st.eff)
        order = np.lexsort((-abs_eff, ~st.significant))
        rank = np.empty(order.size, dtype=int)
        rank[order] = np.arange(1, order.size + 1)
        table = pd.DataFrame({
            "axis": np.arange(self.n_features_in_), "ks_stat": st.ks, "p_value": st.p, "p_adjusted": st.p_adj,
            "effect_size": st.eff, "psi": st.psis, "psi_band": [psi_band(v) for v in st.psis],
            "significant": st.significant, "rank": rank,
        }).sort_values("rank", kind="stable", ignore_index=True)
        top = int(order[0])
        total = float(abs_eff.sum())
        return DriftResult(
            detected=bool(fired), fired=fired, family_p=st.family_p, family_alpha=fam_alpha,
            mmd_stat=float(st.mmd_stat), mmd_p=float(st.mmd_p), score_stat=st.score_stat, score_p=st.score_p,
            per_axis=table, top_axis=top, top_share=float(abs_eff[top] / total) if total > 0 else 0.0,
            n_ref=self.n_ref_, n_cur=win.n, null=self.null, thresholds=st.thresholds,
            quality_stat=st.quality_stat, quality_p=st.quality_p, per_channel=per_channel,
            score_tail=st.tail_share, score_tail_expected=None if st.tail_share is None else self.score_tail,
            mix=win.mix, n_untested=win.n_untested,
            meta={"name": self.name, "version": self.version, "params": self.get_params(), "model_id": self.model_id_,
                  "calibration_shares": win.cal_shares},
        )


def even_subsample(n: int, k: int) -> np.ndarray:
    """``min(n, k)`` row positions spread evenly over ``0 .. n-1`` (first and last included), in order.

    How a window larger than :attr:`DriftDetector.max_window` is cut down: every part of the window (every lot it
    spans, every hour of the shift) keeps its share.
    """
    if n < 0 or k < 1:
        raise ValueError(f"even_subsample needs n >= 0 and k >= 1, got n={n}, k={k}")
    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))
