"""The lot-aware null of the drift tests: calibration on windows of consecutive reference images.

Images on a line are not i.i.d.: cells of one lot resemble each other, so a window of consecutive images differs from
the reference by lot-to-lot variation that every i.i.d. two-sample test flags. :class:`LotNull` calibrates instead on
windows of *consecutive reference images* (a moving-block bootstrap over the reference in production order, or whole
production blocks of :mod:`pipeline.analysis.blocks`), computes each family's statistic of every calibration window
against the rest of the reference (leave-window-out with a guard band, or leave-lots-out), and turns a window's
statistics into empirical p-values ``(1 + #{boot >= obs}) / (B + 1)``.

:class:`LotNull` is the part of :class:`pipeline.analysis.drift.DriftDetector` that does this; it reads the fitted
reference the detector stores (``ref_``, ``ref_scores_``, ``ref_quality_``, ``n_ref_``, ``sigma_ref_``, ``strata_``,
``ref_strata_``, ``_streams``, ``_q_scale``, ``_calibrations``) and its settings (``lot_block``, ``n_calibration``,
``mmd_max_ref``, ``score_tail``, ``random_state``, ``progress``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pipeline.analysis.drift.result import _FamilyStats, _WindowData
from pipeline.analysis.drift.statistics import (
    _auc,
    _max_weighted_ks,
    _weighted_auc,
    _weighted_mmd2,
    _weighted_quantile,
    median_shift,
    mmd2_unbiased,
)

__all__ = ["LotNull"]

log = logging.getLogger("pipeline.analysis.drift")


class LotNull:
    """Lot-null calibration and the lot-null family p-values of a window (a part of ``DriftDetector``)."""

    # ---- the reference's lots and production blocks ----------------------------------------------------------
    def _fit_lots(self, ref_lots: Any, order: np.ndarray, n: int) -> None:
        """Lot starts and lot ids of the reference in production order (None without ``ref_lots``)."""
        self._lot_starts = None
        self._lot_ids = None
        if ref_lots is not None:
            lots = np.asarray(ref_lots)
            if lots.shape[0] != n:
                raise ValueError(f"ref_lots has {lots.shape[0]} values for {n} reference images")
            lots = lots[order]
            self._lot_starts = np.r_[0, np.flatnonzero(lots[1:] != lots[:-1]) + 1]
            self._lot_ids = np.cumsum(np.r_[0, lots[1:] != lots[:-1]])  # runs of equal labels, in order

    def _fit_blocks(self, ref_streams: Any, ref_periods: Any, order: np.ndarray, n: int) -> None:
        """The reference's production blocks (None without streams and periods, or with too few blocks)."""
        self._blocks = None
        if (ref_streams is None) != (ref_periods is None):
            raise ValueError("give ref_streams and ref_periods together (the production block of each image)")
        if ref_streams is not None:
            from pipeline.analysis.blocks import ProductionBlocks

            for name, v in (("ref_streams", ref_streams), ("ref_periods", ref_periods)):
                if np.asarray(v).shape[0] != n:
                    raise ValueError(f"{name} has {np.asarray(v).shape[0]} values for {n} reference images")
            blocks = ProductionBlocks.from_labels(np.asarray(ref_streams)[order], np.asarray(ref_periods)[order])
            self._blocks = blocks if blocks.usable else None
            if self._blocks is None:
                log.warning("only %d production blocks in the reference: the lot null calibrates on runs of "
                            "consecutive images instead", len(blocks.rows))

    # ---- calibration -----------------------------------------------------------------------------------------
    def _shares(self, shares: dict[str, float] | None) -> list[float]:
        """Share of each stratum (stream order) in a calibration window: ``shares``, else the reference's."""
        if shares is None or self.strata_ is None:
            return [share for _, share in self._streams]
        raw = np.array([max(0.0, float(shares.get(lab, 0.0))) for lab in self.strata_])
        return (raw / raw.sum()).tolist() if raw.sum() > 0 else [share for _, share in self._streams]

    def _allocation(self, n: int, shares: dict[str, float] | None = None) -> list[int]:
        """Images per stratum in a calibration window of ``n`` (``shares``, else the reference's mix)."""
        raw = np.array([share * n for share in self._shares(shares)])
        k = np.floor(raw).astype(int)
        for i in np.argsort(-(raw - k), kind="stable")[: n - int(k.sum())]:
            k[i] += 1
        return k.tolist()

    def _block_indices(self, n: int, rng: np.random.Generator, shares: dict[str, float] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of one calibration window, and the rows to leave out of "the rest" for it.

        Per stratum (one stream of all rows without ``ref_strata``), the window takes its share as blocks of
        consecutive rows of that stratum. Left out of the rest are the window itself plus a guard band of one block
        length on each side of every block (or, with ``ref_lots``, every lot the window touches): a window that
        starts or ends inside a lot must not be compared with the other part of that same lot, which would make the
        calibration windows look more alike than new lots do.
        """
        N = self.n_ref_
        excl = np.zeros(N, dtype=bool)
        parts = []
        alloc = self._allocation(n, shares)
        for (rows, _), k in zip(self._streams, alloc, strict=True):
            if k == 0:
                continue
            n_s = rows.size
            L = k if self.lot_block is None else min(self.lot_block, k)
            n_blocks = math.ceil(k / L)
            cand = None
            if self._lot_ids is not None:
                ids = self._lot_ids[rows]
                first = np.r_[0, np.flatnonzero(ids[1:] != ids[:-1]) + 1]  # lot starts within this stratum
                cand = first[first <= n_s - L]
            if cand is not None and cand.size:
                starts = rng.choice(cand, size=n_blocks)
            else:
                starts = rng.integers(0, n_s - L + 1, size=n_blocks)
            pos = (starts[:, None] + np.arange(L)[None, :]).ravel()[:k]
            parts.append(rows[pos])
            if self._lot_ids is None:
                guard = max(0, min(L, (n_s - 2 * k) // (2 * n_blocks)))  # leave at least k rows of the stratum
                for s0 in starts:
                    excl[rows[max(0, s0 - guard) : s0 + L + guard]] = True
        idx = np.concatenate(parts)
        if self._lot_ids is not None:
            excl = np.isin(self._lot_ids, np.unique(self._lot_ids[idx]))
        excl[idx] = True
        short = any(
            k > 0 and int((~excl[rows]).sum()) < max(2, k // 2)
            for (rows, _), k in zip(self._streams, alloc, strict=True)
        )
        if N - int(excl.sum()) < n or short:  # lots larger than the reference allows: leave out the window alone
            excl[:] = False
            excl[idx] = True
        return idx, excl

    def _rest_weights(self, keep: np.ndarray, shares: dict[str, float] | None = None) -> np.ndarray:
        """Weights (summing to 1) of the kept reference rows that give them the calibration window's shares."""
        w = np.zeros(keep.size)
        for (rows, _), share in zip(self._streams, self._shares(shares), strict=True):
            kept = rows[keep[rows]]
            if kept.size:
                w[kept] = share / kept.size
        w = w[keep]
        return w / w.sum()

    def _block_weights(self, idx: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Weights of the kept rows giving them the product mix of a production-block window.

        The calibration window is compared with its own kinds, as a tested window is (uniform without strata).
        """
        from pipeline.analysis import strata as S

        rest = np.flatnonzero(keep)
        if self.ref_strata_ is None:
            return np.full(rest.size, 1.0 / rest.size)
        return S.reference_weights(self.ref_strata_[rest], self.ref_strata_[idx])

    def _window_stats_vs_rest(
        self, idx: np.ndarray, excl: np.ndarray, rng: np.random.Generator, shares: dict[str, float] | None = None,
        weights: np.ndarray | None = None,
    ) -> tuple[float, float, float, float, float]:
        """Family statistics of rows ``idx`` (repeats allowed) against the re-weighted rest.

        Max KS (axes), MMD^2, score AUC, max |median shift| in robust sd (quality) and the score tail share. ``weights`` (of
        the kept rows) replace the stratum re-weighting to ``shares``.
        """
        keep = ~excl
        rest_idx = np.flatnonzero(keep)
        w = self._rest_weights(keep, shares) if weights is None else weights
        ks = _max_weighted_ks(self.ref_[idx], self.ref_[rest_idx], w)
        repeats = np.unique(idx).size < idx.size
        if repeats or rest_idx.size > self.mmd_max_ref:  # a weighted subsample keeps the stratum shares
            from pipeline.analysis.blocks import mmd2_multiset

            pos = np.flatnonzero(w > 0)
            sub = rng.choice(pos, min(self.mmd_max_ref, pos.size), replace=False, p=w[pos] / w[pos].sum())
            mmd = mmd2_multiset(self.ref_[rest_idx[sub]], self.ref_[idx], idx, self.sigma_ref_) if repeats else \
                mmd2_unbiased(self.ref_[rest_idx[sub]], self.ref_[idx], self.sigma_ref_)
        else:
            mmd = _weighted_mmd2(self.ref_[rest_idx], w, self.ref_[idx], self.sigma_ref_)
        auc = tail = math.nan
        if self.ref_scores_ is not None:
            auc = _weighted_auc(self.ref_scores_[idx], self.ref_scores_[rest_idx], w)
            cut = _weighted_quantile(self.ref_scores_[rest_idx], w, 1.0 - self.score_tail)
            tail = float(np.mean(self.ref_scores_[idx] > cut))
        qstat = math.nan
        if self.ref_quality_ is not None:
            shift = median_shift(self.ref_quality_[rest_idx], self.ref_quality_[idx], self._q_scale, w)
            qstat = float(np.max(np.abs(shift)))
        return ks, mmd, auc, qstat, tail

    def calibrate(self, n: int, shares: dict[str, float] | None = None) -> dict[str, np.ndarray]:
        """Lot-null bootstrap distributions of the family statistics for windows of ``n`` images (cached).

        With ``shares`` (product -> share, with ``ref_strata``), calibration windows have that product mix and are
        compared with the rest re-weighted to it (the mix of a window tested with ``cur_strata``); default: the
        reference's own mix.

        Returns:
            ``{"axes": max-KS (B,), "mmd": MMD^2 (B,), "scores": AUC (B,), "quality": max |shift| (B,),
            "scores_tail": tail share (B,), "scores_minp": the smaller of the two score p-values (B,)}``, each sorted
            ascending (NaNs for a family without reference data). ``scores_minp`` is computed per bootstrap window
            (each against the other windows), so the score family's combined p-value keeps the AUC and the tail
            share's dependence.
        """
        self._check_fitted()
        if self._blocks is not None:
            return self._calibrate_blocks(n)
        key: Any = n if shares is None or self.strata_ is None else (n, tuple(np.round(self._shares(shares), 4)))
        if key in self._calibrations:
            return self._calibrations[key]
        if self.n_ref_ < 2 * n:
            raise ValueError(
                f"the lot null needs a reference at least twice the window: reference {self.n_ref_}, window {n}; "
                "use a larger reference or smaller windows"
            )
        rng = np.random.default_rng([self.random_state, n])
        out = np.empty((self.n_calibration, 5))
        it = range(self.n_calibration)
        for b in tqdm(it, desc=f"lot null n={n}", disable=not self.progress, leave=False):
            idx, excl = self._block_indices(n, rng, shares)
            out[b] = self._window_stats_vs_rest(idx, excl, rng, shares)
        self._calibrations[key] = self._calibration_table(out)
        return self._calibrations[key]

    def _calibrate_blocks(self, n: int) -> dict[str, np.ndarray]:
        """:meth:`calibrate` on production blocks (``pipeline.analysis.blocks``): any window size, any product mix."""
        from pipeline.analysis.blocks import draw_block_window

        key = ("blocks", n)
        if key not in self._calibrations:
            rng = np.random.default_rng([self.random_state, n, 1])
            out = np.empty((self.n_calibration, 5))
            it = range(self.n_calibration)
            for b in tqdm(it, desc=f"lot null n={n} (blocks)", disable=not self.progress, leave=False):
                idx, excl = draw_block_window(self._blocks, self.n_ref_, n, rng)
                out[b] = self._window_stats_vs_rest(idx, excl, rng, weights=self._block_weights(idx, ~excl))
            self._calibrations[key] = self._calibration_table(out)
        return self._calibrations[key]

    def _calibration_table(self, out: np.ndarray) -> dict[str, np.ndarray]:
        cal = {k: np.sort(out[:, i]) for i, k in enumerate(("axes", "mmd", "scores", "quality", "scores_tail"))}
        cal["scores_minp"] = np.sort(np.minimum(self._self_p(out[:, 2]), self._self_p(out[:, 4])))
        return cal

    @staticmethod
    def _boot_threshold(boot: np.ndarray, level: float) -> float:
        """Largest bootstrap value a statistic must exceed for its empirical p-value to be <= level."""
        # the most bootstrap values allowed at or above the statistic (1e-9: float-safe at level * (B + 1) integer)
        k_max = math.floor(level * (boot.size + 1) - 1 + 1e-9)
        return float(boot[boot.size - k_max - 1])

    @staticmethod
    def _self_p(values: np.ndarray) -> np.ndarray:
        """Empirical upper-tail p-value of each bootstrap value against the other ones: ``(#{others >= v} + 1) / B``."""
        s = np.sort(values)
        n_ge = values.size - np.searchsorted(s, values - 1e-12, side="left")  # counts itself
        return n_ge / values.size

    @staticmethod
    def _boot_p(boot: np.ndarray, obs: float) -> float:
        n_ge = boot.size - np.searchsorted(boot, obs - 1e-12, side="left")
        return float((1.0 + n_ge) / (1.0 + boot.size))

    # ---- a window under the lot null -----------------------------------------------------------------------
    def _lot_mmd(self, win: _WindowData, rng: np.random.Generator) -> float:
        """MMD^2 of the window against the (mix-weighted) reference, with the reference bandwidth."""
        ref, w = self.ref_, win.weights
        if w is None:
            sub = ref if ref.shape[0] <= self.mmd_max_ref else ref[rng.choice(ref.shape[0], self.mmd_max_ref,
                                                                              replace=False)]
            return mmd2_unbiased(sub, win.Z, self.sigma_ref_)
        if ref.shape[0] > self.mmd_max_ref:
            keep = np.flatnonzero(w > 0)
            sub = rng.choice(keep, min(self.mmd_max_ref, keep.size), replace=False, p=w[keep] / w[keep].sum())
            return mmd2_unbiased(ref[sub], win.Z, self.sigma_ref_)
        return _weighted_mmd2(ref, w, win.Z, self.sigma_ref_)

    def _lot_scores(self, win: _WindowData) -> tuple[float, float]:
        """Score AUC and tail share of the window against the (mix-weighted) reference."""
        if win.weights is None:
            cut = np.quantile(self.ref_scores_, 1.0 - self.score_tail)
            return _auc(win.scores, self.ref_scores_), float(np.mean(win.scores > cut))
        cut = _weighted_quantile(self.ref_scores_, win.weights, 1.0 - self.score_tail)
        return _weighted_auc(win.scores, self.ref_scores_, win.weights), float(np.mean(win.scores > cut))

    def _lot_families(self, win: _WindowData, st: _FamilyStats, fam_alpha: float, rng: np.random.Generator
                      ) -> None:
        """Family p-values under the lot null, calibrated at the window's size and product mix."""
        cal = self.calibrate(win.n, shares=win.cal_shares)
        ks_thr = self._boot_threshold(cal["axes"], fam_alpha)
        st.family_p["axes"] = self._boot_p(cal["axes"], float(st.ks.max()))
        st.significant = st.ks > ks_thr
        st.mmd_stat = self._lot_mmd(win, rng)
        st.mmd_p = self._boot_p(cal["mmd"], st.mmd_stat)
        st.thresholds.update({"max_ks": ks_thr, "mmd2": self._boot_threshold(cal["mmd"], fam_alpha)})
        if win.scores is not None:
            st.score_stat, st.tail_share = self._lot_scores(win)
            min_p = min(self._boot_p(cal["scores"], st.score_stat), self._boot_p(cal["scores_tail"], st.tail_share))
            n_le = int(np.searchsorted(cal["scores_minp"], min_p + 1e-12, side="right"))
            st.score_p = (1.0 + n_le) / (1.0 + cal["scores_minp"].size)
            st.thresholds["score_auc"] = self._boot_threshold(cal["scores"], fam_alpha)
            st.thresholds["score_tail_share"] = self._boot_threshold(cal["scores_tail"], fam_alpha)
        if win.quality is not None:
            q_thr = self._boot_threshold(cal["quality"], fam_alpha)
            st.quality_p = self._boot_p(cal["quality"], st.quality_stat)
            st.q_sig = (np.abs(st.q_eff) > q_thr) & st.q_reportable
            st.thresholds["quality_max_shift_sd"] = q_thr
