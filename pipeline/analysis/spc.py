"""Statistical process control across windows: a multivariate EWMA chart with lot-aware limits and a stated ARL0.

A per-window drift test compares one window with the reference. A camera gain that drops by 10 % moves a window's
brightness by less than ordinary module-to-module (lot-to-lot) variation does (``benchmarks/results/
fault_vs_lots.md``), so no single window can show it; a *persistent* shift can still be found by accumulating the
evidence of many windows, which is what a control chart does.

**Statistics.** Each window (``window`` consecutive cells of one line, 100 by default) is summarised by the means of
a few per-image statistics: brightness and the other image properties of :mod:`pipeline.latent.properties`, every latent
axis z, and the share of cells whose anomaly score is above the reference's 90th percentile (any subset; see
:data:`STATISTICS` for the labels). Each cell's value is taken relative to the in-control mean of its stratum (the
product type), so a change of product mix does not read as a shift of the process.

**Chart.** A multivariate EWMA (Lowry et al. 1992): ``E_t = (1 - lam) E_(t-1) + lam v_t`` over the window vectors
``v_t``, and the statistic ``T2_t = E_t' S_E^-1 E_t`` with ``S_E = lam / (2 - lam) S``, where ``S`` is the
between-window covariance (shrunk towards its diagonal, so that a few dozen lots can estimate it). One chart on a
combined statistic controls the overall false-alarm rate, whatever the number of statistics; the alarm still says
which statistics moved and in which direction: every statistic whose own EWMA is beyond ``attribution_sd`` of its
in-control spread, in its physical unit ("brightness -10 %").

**Limits from between-lot variation.** Cells of one lot resemble each other, so the spread of a window's mean is
set by how many lots it spans and how much lots differ, not by the within-lot spread (the I-MR-R/S argument: within
understates between). The limits therefore come from a *lot bootstrap* of the in-control history (Phase I): whole
lots (or, without lot labels, blocks of consecutive images) are drawn with replacement and concatenated into
in-control streams, cut into windows like the monitored ones. The covariance ``S`` is estimated from those windows,
and the limit ``h`` is the value whose in-control average run length (ARL0, in windows) on them equals the target,
counted with a reset after every alarm. The centre the chart uses is itself estimated from a finite number of
lots; each segment of the bootstrap re-estimates it from a resample of the lots, so the limit allows for that
error too (a Phase I of a few dozen lots gets a wider limit than one of a few hundred), and so is the covariance
(``refit_covariance``, :class:`SpcConfig`): each segment's chart is the chart that Phase I resample would have
fitted.

**State.** :class:`SpcChart` holds the fitted limits and the running EWMA, serialises to JSON with the model id and
line it belongs to, and refuses a state of another model or line (:class:`ChartStateMismatch`). :meth:`SpcChart.reset`
restarts the EWMA after an alert is resolved.

**After an alarm.** The EWMA restarts after every alarm (``restart_on_alarm``), as the limit was calibrated
(:func:`run_alarms`): a shift that has ended then stops alarming at once instead of while the EWMA decays. The chart
keeps the shift the alarm found and judges each later window against it (:func:`return_llr`: closer to the shift or
to the centre?); a CUSUM of that evidence says when the shift has ended (:data:`BACK_LIMIT`). Until then a window
without an alarm is *ongoing* (:attr:`ChartPoint.ongoing`), so an alert on a small shift that goes on stays open
between the alarms, and one on a shift that has ended resolves.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.analysis.ewma import (  # the chart's pure maths; re-exported
    BACK_LIMIT,
    calibrate_limit,
    change_point,
    ewma,
    lot_groups,
    lot_runs,
    resample_stream,
    return_llr,
    run_alarms,
    window_means,
)
from pipeline.analysis.spc_stats import STATISTICS, Shift, report_value, stat_label
from pipeline.common import atomic

__all__ = [
    "STATISTICS",
    "ChartPoint",
    "ChartNotReady",
    "ChartStateMismatch",
    "Shift",
    "SpcChart",
    "SpcConfig",
    "resample_stream",
    "return_llr",
    "calibrate_limit",
    "change_point",
    "ewma",
    "lot_groups",
    "lot_runs",
    "phase1_problem",
    "run_alarms",
    "stat_label",
    "window_means",
]

STATE_KIND = "linewatch-spc-chart"
MIN_PATTERN_SIZE = 0.25
"""Smallest shift along a fault pattern (in units of the pattern) for an alarm to say it matches that pattern."""
STATE_VERSION = 1


# ------------------------------------------------------------------------------------------------ the chart
@dataclass(frozen=True)
class SpcConfig:
    """How a chart is fitted and decides.

    Attributes:
        arl0: in-control average run length, in windows: one false alarm every ``arl0`` windows on average
            (with 100-cell windows and 3,000 cells a day, 200 windows is about one false alarm in 7 days).
        lam: EWMA weight of the newest window (smaller: more memory, smaller shifts found, later).
        window: cells per chart window.
        shrinkage: weight of the diagonal in the between-window covariance (0: the sample covariance).
        n_windows: in-control bootstrap windows the limit is calibrated on.
        n_segments: bootstrap segments, each with its own re-estimated centre (the Phase I error).
        block: bootstrap block length (rows) when the history has no lot labels.
        pattern_share: share of the false alarms allotted to the fault-pattern charts (the MEWMA gets the rest);
            used only when the chart has patterns.
        refit_covariance: each bootstrap segment's chart re-estimates its covariance (and pattern scales) from its
            own lot resample, with as many bootstrap windows as the chart's own fit, not only its centre; the limit
            then allows for the error of the covariance too. Without it, fresh in-control streams run short of the
            calibrated ARL (BENCHMARKS.md, ``bench_spc``).
        holdout: share of the distinct lots each calibration segment holds out (0: off). A segment's chart is
            fitted (centre, covariance, pattern scales) on the other lots only and watches a stream of all the
            lots, so the limit is calibrated on a stream with lots the chart has never seen, as a Phase II's are. This
            removes the optimism of calibrating on the very lots the covariance came from (a few dozen lots
            estimate a covariance of 40 statistics poorly, and new lots fall in the directions it underrates).
        arl0_margin: the bootstrap calibrates the limit to ``arl0 * arl0_margin`` (1: to ``arl0`` itself). The
            default 1.15 is headroom for a Phase I whose lots underrate the line's variation: the fresh in-control
            ARL varies several-fold between Phase I samples (BENCHMARKS.md, ``bench_spc``).
        clip_quantile: each window's deviation enters the EWMA shrunk to at most this quantile of the in-control
            windows' Mahalanobis lengths (1: no clipping). An extreme lot then cannot raise an alarm on its own;
            the limit is calibrated on clipped windows too.
        min_lots: fewest lots in the in-control history (bootstrap blocks when it has no lot labels). The limits
            rest on the between-lot variation, which a history of one lot cannot show: a chart fitted on it takes
            the next lot for a shift (:class:`ChartNotReady`). Two is a floor, not a comfort: the fewer the lots,
            the further the realised ARL0 may fall short of the target.
        attribution_sd: a statistic is named in an alarm when its EWMA is this many in-control sd from 0.
        history: chart points kept in the state (for pictures and change points).
        seed: bootstrap seed.
        restart_on_alarm: restart the EWMA after every alarm (the limit's ARL0 is calibrated that way).
        back_limit: the return-to-control CUSUM's level at which the shift of the last alarm counts as ended
            (:data:`pipeline.analysis.ewma.BACK_LIMIT`).
    """

    arl0: float = 200.0
    lam: float = 0.2
    window: int = 100
    shrinkage: float = 0.2
    n_windows: int = 40_000
    n_segments: int = 40
    block: int = 60
    pattern_share: float = 0.8
    refit_covariance: bool = True
    holdout: float = 0.0
    clip_quantile: float = 1.0
    arl0_margin: float = 1.15
    min_lots: int = 2
    attribution_sd: float = 2.0
    history: int = 500
    seed: int = 0
    restart_on_alarm: bool = True
    back_limit: float = BACK_LIMIT

    def __post_init__(self) -> None:
        if not self.back_limit > 0:
            raise ValueError(f"SpcConfig.back_limit must be > 0, got {self.back_limit}")
        if not self.arl0 >= 2:
            raise ValueError(f"SpcConfig.arl0 must be >= 2 windows, got {self.arl0}")
        if not 0.0 < self.lam <= 1.0:
            raise ValueError(f"SpcConfig.lam must be in (0, 1], got {self.lam}")
        if self.window < 1:
            raise ValueError(f"SpcConfig.window must be >= 1 cell, got {self.window}")
        if not 0.0 < self.pattern_share < 1.0:
            raise ValueError(f"SpcConfig.pattern_share must be in (0, 1), got {self.pattern_share}")
        if not self.arl0_margin >= 1.0:
            raise ValueError(f"SpcConfig.arl0_margin must be >= 1, got {self.arl0_margin}")
        if not 0.0 < self.clip_quantile <= 1.0:
            raise ValueError(f"SpcConfig.clip_quantile must be in (0, 1], got {self.clip_quantile}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"SpcConfig.holdout must be in [0, 1), got {self.holdout}")
        if self.min_lots < 1:
            raise ValueError(f"SpcConfig.min_lots must be >= 1, got {self.min_lots}")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"SpcConfig.shrinkage must be in [0, 1], got {self.shrinkage}")
        if self.n_segments < 1 or self.n_windows < 5 * self.arl0:
            raise ValueError(f"SpcConfig.n_windows ({self.n_windows}) must be >= 5 x arl0 ({5 * self.arl0:.0f}) "
                             f"and n_segments ({self.n_segments}) >= 1")


@dataclass(frozen=True)
class ChartPoint:
    """One window on the chart.

    Attributes:
        window_id: the window.
        n_cells: cells in the window.
        value: the chart statistic (the MEWMA and the pattern charts, each over its own limit; see
            :meth:`SpcChart.statistic`).
        limit: the limit ``value`` is compared with (near 1).
        alarm: ``value > limit``.
        t2: the MEWMA statistic alone.
        shifts: statistics beyond ``attribution_sd``, largest first (on an alarm: at least the largest one), sized
            by the mean deviation since ``change_window`` on an alarm, by the EWMA otherwise.
        since_reset: windows since the chart last started.
        pattern: the fault pattern the shift matches (its chart beyond its limit), or None.
        pattern_size: the shift along that pattern, in units of the pattern (1.0 = the fault as measured).
        change_window: on an alarm, the first window of the most likely step change; on an ongoing point, that of
            the alarm it continues.
        messages: problems met (unknown stratum, missing statistic).
        ongoing: no alarm, but the shift of the last alarm has not ended (the return-to-control CUSUM is under
            ``SpcConfig.back_limit``); its ``shifts`` are sized by that alarm's shift.
    """

    window_id: str
    n_cells: int
    value: float
    limit: float
    alarm: bool
    t2: float
    shifts: tuple[Shift, ...]
    since_reset: int
    pattern: str | None = None
    pattern_size: float | None = None
    change_window: str | None = None
    messages: tuple[str, ...] = ()
    ongoing: bool = False

    @property
    def top(self) -> Shift | None:
        """The statistic that moved most."""
        return self.shifts[0] if self.shifts else None

    @property
    def text(self) -> str:
        """The alarm sentence, e.g. ``"persistent shift: brightness -10 % (EWMA over 6 windows); matches ..."``."""
        since = f" since window {self.change_window}" if self.change_window else ""
        if self.ongoing:
            return f"persistent shift{since} goes on: " + ", ".join(s.text for s in self.shifts[:4])
        if not self.alarm:
            return f"in control (chart {self.value:.2f}, limit {self.limit:.2f})"
        out = (f"persistent shift{since}: " + ", ".join(s.text for s in self.shifts[:4])
               + f" (EWMA over {self.since_reset} windows)")
        if self.pattern is not None and self.pattern_size is not None:
            out += f"; matches {self.pattern} (size {self.pattern_size:.1f})"
        return out


class ChartStateMismatch(ValueError):
    """A chart state belongs to another model or line, or is not a chart state."""


class ChartNotReady(ValueError):
    """The in-control history is too small for a chart (too few rows or lots): no chart until it grows."""


def phase1_problem(n_rows: int, lots: Any, config: SpcConfig) -> str | None:
    """Why an in-control history of ``n_rows`` rows (lot label per row, or None) cannot carry a chart; None if it can."""
    if n_rows < 2 * config.window:
        return (f"the in-control history has {n_rows} complete rows; a chart of {config.window}-cell windows needs "
                f"at least {2 * config.window}")
    n_lots = len(lot_groups(lot_runs(n_rows, lots, config.block), lots))
    if n_lots < config.min_lots:
        unit = "lots" if lots is not None else f"blocks of {config.block} images"
        return (f"the in-control history holds {n_lots} {unit}; a chart needs at least {config.min_lots} to know the "
                "variation between lots (it starts with a model whose reference holds more)")
    return None


def _lot_resample_center(X: np.ndarray, g: np.ndarray, n_g: int, runs: Sequence[np.ndarray],
                         rng: np.random.Generator | None) -> np.ndarray:
    """Per-stratum means (n_g, K) of the rows of ``runs`` (resampled with replacement when ``rng`` is given)."""
    pick = runs if rng is None else [runs[i] for i in rng.integers(len(runs), size=len(runs))]
    pos = np.concatenate(pick)
    out = np.full((n_g, X.shape[1]), np.nan)
    for s in range(n_g):
        rows = pos[g[pos] == s]
        if rows.size:
            out[s] = X[rows].mean(axis=0)
    return out


@dataclass(frozen=True)
class _Estimate:
    """What one Phase I estimates: centres, window covariance, the pattern directions and the EWMA scales."""

    centers: np.ndarray
    precision: np.ndarray
    window_sd: np.ndarray
    ewma_sd: np.ndarray
    weights: np.ndarray
    pattern_sd: np.ndarray
    lam: float
    clip: float = math.inf

    def clipped(self, V: np.ndarray) -> np.ndarray:
        """Window deviations (n, K) shrunk to a Mahalanobis length of at most ``clip`` (a Huber-type EWMA input).

        One extreme lot moves one or two windows far; clipped, it moves the EWMA no further than an ordinary
        unusual window does, while a persistent shift, small in every window, passes unchanged.
        """
        V = np.asarray(V, float)
        if not math.isfinite(self.clip):
            return V
        d = np.sqrt(np.maximum(np.einsum("...i,ij,...j->...", V, self.precision, V), 0.0))
        return V * np.minimum(1.0, self.clip / np.maximum(d, 1e-300))[..., None]

    def t2(self, E: np.ndarray) -> np.ndarray:
        """MEWMA statistic ``E' S_E^-1 E`` with ``S_E = lam / (2 - lam) S``."""
        scale = (2.0 - self.lam) / self.lam
        return scale * np.einsum("...i,ij,...j->...", np.asarray(E, float), self.precision, np.asarray(E, float))

    def patterns(self, E: np.ndarray) -> np.ndarray:
        """EWMA along each pattern's direction ``S^-1 delta``, in in-control sd."""
        return (np.asarray(E, float) @ self.weights.T) / self.pattern_sd


def _estimate(X: np.ndarray, g: np.ndarray, runs: Sequence[np.ndarray], patterns: np.ndarray, fallback: np.ndarray,
              n_windows: int, cfg: SpcConfig, rng: np.random.Generator) -> _Estimate:
    """Fit centres, shrunk covariance and pattern scales on in-control units ``runs`` (a lot bootstrap)."""
    centers = _lot_resample_center(X, g, len(fallback), runs, None)
    centers = np.where(np.isfinite(centers), centers, fallback)
    pos = resample_stream(runs, n_windows * cfg.window, rng)
    V = window_means(X - centers[g], pos, cfg.window)
    S = np.atleast_2d(np.cov(V.T))
    d = np.maximum(np.diag(S), 1e-24)
    precision = np.linalg.pinv((1.0 - cfg.shrinkage) * S + cfg.shrinkage * np.diag(d), hermitian=True)
    clip = math.inf
    if cfg.clip_quantile < 1.0:
        clip = float(np.quantile(np.sqrt(np.maximum(np.einsum("ti,ij,tj->t", V, precision, V), 0.0)),
                                 cfg.clip_quantile))
        V = _Estimate(centers, precision, d, d, patterns, d, cfg.lam, clip).clipped(V)
    E = ewma(V, cfg.lam)[min(len(V) - 1, int(5 / cfg.lam)) :]  # steady state
    weights = patterns @ precision
    return _Estimate(centers, precision, np.sqrt(d), np.maximum(E.std(axis=0), 1e-24), weights,
                     np.maximum((E @ weights.T).std(axis=0), 1e-24), cfg.lam, clip)


class SpcChart:
    """A multivariate EWMA chart of one line under one model (see the module docstring).

    Args:
        line: the production line.
        model_id: the model whose latents the statistics include (None when they are model-free).
        config: fitting and decision settings.
    """

    def __init__(self, line: str, model_id: str | None = None, config: SpcConfig = SpcConfig()) -> None:
        if not isinstance(line, str) or not line:
            raise ValueError("line must be a non-empty string")
        self.line = line
        self.model_id = model_id
        self.config = config
        self.is_fitted = False

    # ---- fit (Phase I) -------------------------------------------------------------------------------------
    def fit(self, X: Any, *, names: Sequence[str] | None = None, strata: Any = None, lots: Any = None,
            signatures: Mapping[str, Any] | None = None, one_sided: Collection[str] = ()) -> SpcChart:
        """Fit centre, covariance and limit on the line's in-control history (rows in production order).

        Args:
            X: per-image statistics (n, K): a DataFrame (its columns name the statistics) or an array with
                ``names``.
            names: statistic names for an array ``X``.
            strata: stratum label per row (e.g. the product type); None: one stratum.
            lots: lot label per row; None: bootstrap blocks of ``config.block`` consecutive rows.
            signatures: optional fault patterns, name -> (K,) mean change of each statistic under that fault
                (e.g. ``"camera gain x0.9"``: measured by applying :func:`pipeline.line.faults.gain` to in-control
                images). Each gets an EWMA along its most sensitive direction ``S^-1 delta`` beside the MEWMA, which
                watches every direction; the two share the ARL0.
            one_sided: the patterns whose fault moves only one way (more blur, more noise, more light fall-off):
                their charts alarm only on a shift in the pattern's own direction; the others on either direction
                (a gain can drop or rise). Fewer directions to watch give each a lower limit.

        Returns:
            self.
        """
        X, names = _as_matrix(X, names)
        keep = np.isfinite(X).all(axis=1)
        problem = phase1_problem(int(keep.sum()), None if lots is None else np.asarray(lots)[keep], self.config)
        if problem:
            raise ChartNotReady(problem)
        X = X[keep]
        labels, g = _strata_codes(strata, len(keep))
        g = g[keep]
        runs = lot_runs(len(X), None if lots is None else np.asarray(lots)[keep], self.config.block)
        self._groups = lot_groups(runs, None if lots is None else np.asarray(lots)[keep])
        self.names = tuple(names)
        self.strata = tuple(labels)
        self.center_all = X.mean(axis=0)
        self.pattern_names = tuple(signatures or ())
        self.patterns = np.array([np.asarray(signatures[k], float) for k in self.pattern_names]).reshape(
            len(self.pattern_names), len(self.names)) if signatures else np.zeros((0, len(self.names)))
        self.pattern_one_sided = np.array([k in set(one_sided) for k in self.pattern_names], dtype=bool)
        rng = np.random.default_rng([self.config.seed, 0x5BC])
        fallback = np.broadcast_to(self.center_all, (len(labels), len(names)))
        self._use(_estimate(X, g, runs, self.patterns, fallback, self.config.n_windows // 4, self.config, rng))
        self._set_limits(self._segments(X, g, runs, rng))
        self.fit_info = {"rows": int(len(X)), "rows_dropped": int((~keep).sum()), "units": len(runs),
                         "lots": lots is not None, "strata": {lab: int((g == i).sum()) for i, lab in enumerate(labels)}}
        self.reset()
        self.n_windows = 0
        self.history: list[dict[str, Any]] = []
        self.is_fitted = True
        return self

    def _use(self, est: _Estimate) -> None:
        self.estimate = est
        self.centers, self.precision = est.centers, est.precision
        self.window_sd, self.ewma_sd = est.window_sd, est.ewma_sd
        self.pattern_weights, self.pattern_sd = est.weights, est.pattern_sd

    def _segments(self, X: np.ndarray, g: np.ndarray, runs: Sequence[np.ndarray],
                  rng: np.random.Generator) -> list[tuple[np.ndarray, _Estimate]]:
        """In-control EWMA segments, each watched by a chart fitted on a lot resample of the Phase I.

        Every segment's windows come from the Phase I's own lots (the in-control process as far as it is known);
        the chart that watches them is fitted on a resample of those lots with replacement, so its centre and
        covariance are off by as much as a real Phase I's are, and the limit calibrated on them allows for it.
        """
        cfg = self.config
        per = int(math.ceil(cfg.n_windows / cfg.n_segments))
        if cfg.holdout > 0 and len(self._groups) >= 3:
            return [self._holdout_segment(X, g, runs, per, rng) for _ in range(cfg.n_segments)]
        out = []
        for _ in range(cfg.n_segments):
            resample = [runs[i] for i in rng.integers(len(runs), size=len(runs))]
            if cfg.refit_covariance:
                est = _estimate(X, g, resample, self.patterns, self.centers, cfg.n_windows // 4, cfg, rng)
            else:
                c = _lot_resample_center(X, g, len(self.strata), resample, None)
                est = replace(self.estimate, centers=np.where(np.isfinite(c), c, self.centers))
            pos = resample_stream(runs, per * cfg.window, rng)
            V = est.clipped(window_means(X - est.centers[g], pos, cfg.window))
            out.append((ewma(V, cfg.lam), est))
        return out

    def _holdout_segment(self, X: np.ndarray, g: np.ndarray, runs: Sequence[np.ndarray], per: int,
                         rng: np.random.Generator) -> tuple[np.ndarray, _Estimate]:
        """One calibration segment: a chart fitted without a random share of the lots watches a stream of all lots."""
        cfg, groups = self.config, self._groups
        n_out = min(len(groups) - 1, max(1, int(round(cfg.holdout * len(groups)))))
        out = set(rng.choice(len(groups), size=n_out, replace=False).tolist())
        train = [runs[i] for k, grp in enumerate(groups) if k not in out for i in grp]
        est = _estimate(X, g, train, self.patterns, self.centers, max(per, 500), cfg, rng)
        pos = resample_stream(runs, per * cfg.window, rng)
        return ewma(est.clipped(window_means(X - est.centers[g], pos, cfg.window)), cfg.lam), est

    def _set_limits(self, segments: Sequence[tuple[np.ndarray, _Estimate]]) -> None:
        """Limits of the MEWMA and the pattern charts (false alarms split by ``pattern_share``), then of both."""
        cfg, lam = self.config, self.config.lam
        target = cfg.arl0 * cfg.arl0_margin
        share = cfg.pattern_share if len(self.pattern_names) else 0.0
        self.t2_limit = calibrate_limit([(E, est.t2) for E, est in segments], lam, target / (1.0 - share))[0]
        self.pattern_limit = 1.0
        if share:
            self.pattern_limit = calibrate_limit(
                [(E, lambda x, est=est: self._pattern_max(est.patterns(x))) for E, est in segments],
                lam, target / share)[0]
        self.limit, self.arl0_fit = calibrate_limit(
            [(E, lambda x, est=est: self._combined(est, x)) for E, est in segments], lam, target)

    def _pattern_max(self, u: np.ndarray) -> np.ndarray:
        """The largest pattern chart value: ``u`` itself for a one-sided pattern, ``|u|`` for the others."""
        return np.where(self.pattern_one_sided, u, np.abs(u)).max(axis=-1)

    def _combined(self, est: _Estimate, E: np.ndarray) -> np.ndarray:
        out = est.t2(E) / self.t2_limit
        if len(self.pattern_names):
            out = np.maximum(out, self._pattern_max(est.patterns(E)) / self.pattern_limit)
        return out

    def clipped(self, V: np.ndarray) -> np.ndarray:
        """Window deviations (n, K) as they enter the EWMA (shrunk to the clip length; see ``clip_quantile``)."""
        return self.estimate.clipped(V)

    def t2(self, E: np.ndarray) -> np.ndarray:
        """The MEWMA statistic ``E' S_E^-1 E`` of EWMA vectors (n, K) (or one (K,) vector)."""
        return self.estimate.t2(E)

    def pattern_scores(self, E: np.ndarray) -> np.ndarray:
        """Each fault pattern's EWMA along its direction ``S^-1 delta``, in in-control sd (n, F) or (F,)."""
        return self.estimate.patterns(E)

    def statistic(self, E: np.ndarray) -> np.ndarray:
        """The chart statistic: the larger of the MEWMA and the pattern charts, each over its own limit."""
        return self._combined(self.estimate, E)

    # ---- Phase II ------------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError("the chart is not fitted: call fit() on the line's in-control history first")

    def deviation(self, X: Any, strata: Any = None) -> tuple[np.ndarray, int, list[str]]:
        """A window's mean deviation from the in-control centres (K,), its cell count, and what it lacked."""
        self._check_fitted()
        X, _ = _as_matrix(X, self.names)
        messages: list[str] = []
        known = {s: i for i, s in enumerate(self.strata)}
        if strata is None:
            centers = self.centers[np.zeros(len(X), int)] if len(self.strata) == 1 else self.center_all[None, :]
        else:
            lab = np.asarray(strata, dtype=object).astype(str)
            unknown = sorted(set(lab) - set(known))
            if unknown:
                messages.append(f"stratum {', '.join(unknown)} not in the chart's in-control history: compared "
                                "with the overall centre")
            centers = np.stack([self.centers[known[s]] if s in known else self.center_all for s in lab])
        D = X - centers
        v = np.zeros(len(self.names))
        for j, name in enumerate(self.names):
            col = D[:, j][np.isfinite(D[:, j])]
            if col.size:
                v[j] = col.mean()
            else:
                messages.append(f"{stat_label(name).label} missing in every cell of the window: held at its "
                                "in-control mean")
        return v, len(X), messages

    def update(self, window_id: str, X: Any, strata: Any = None) -> ChartPoint:
        """Add one window (its per-image statistics) to the chart.

        On an alarm the reported shifts are the mean deviations since the most likely change point
        (:func:`change_point`), which estimate the size of a step better than the EWMA does; that shift is kept,
        and the EWMA restarts (``SpcConfig.restart_on_alarm``). A window without an alarm while the kept shift has
        not ended is ``ongoing`` (:meth:`follow_shift`). A window id already on the chart is not added again: its
        recorded point is returned.
        """
        self._check_fitted()
        window_id = str(window_id)
        for h in self.history:
            if h["window_id"] == window_id:
                return _point_from_dict(h["point"])
        v, n_cells, messages = self.deviation(X, strata)
        ongoing = self.follow_shift(v)
        lam = self.config.lam
        self.ewma_state = (1.0 - lam) * self.ewma_state + lam * self.estimate.clipped(v)
        self.since_reset += 1
        self.n_windows += 1
        entry: dict[str, Any] = {"window_id": window_id, "v": v.tolist(), "reset": self.since_reset == 1}
        self.history.append(entry)
        del self.history[: max(0, len(self.history) - self.config.history)]
        value = float(self.statistic(self.ewma_state))
        alarm = value > self.limit
        if alarm:
            start, delta = self.change()
            pattern, size = self.pattern_match(delta)
            shifts = self.shifts(True, delta)
        else:
            start, delta, pattern, size = (self.shift_since if ongoing else None), self.ewma_state, None, None
            shifts = self.shifts(True, self.shift) if ongoing else self.shifts(False, delta)
        point = ChartPoint(window_id, n_cells, value, float(self.limit), bool(alarm),
                           float(self.t2(self.ewma_state)), shifts, self.since_reset, pattern,
                           size, start, tuple(messages), ongoing=bool(ongoing and not alarm))
        entry["point"] = _point_to_dict(point)
        if alarm:
            self.shift, self.shift_since, self.back = np.asarray(delta, float), start, 0.0
            if self.config.restart_on_alarm:
                self._restart()
        return point

    def follow_shift(self, v: Any) -> bool:
        """Judge a window's deviation ``v`` against the shift of the last alarm; whether that shift goes on.

        The return-to-control CUSUM ``R = max(0, R - llr)`` (:func:`return_llr`) grows while windows look like the
        centre; at ``SpcConfig.back_limit`` the shift has ended and is forgotten. False when no shift is kept.
        """
        if self.shift is None:
            return False
        self.back = max(0.0, self.back - return_llr(v, self.shift, self.precision))
        if self.back > self.config.back_limit:
            self.shift, self.shift_since, self.back = None, None, 0.0
            return False
        return True

    def shifts(self, alarm: bool = False, delta: np.ndarray | None = None) -> tuple[Shift, ...]:
        """The statistics whose EWMA is beyond ``attribution_sd`` (at least the largest one on an alarm).

        Args:
            alarm: name at least the largest statistic.
            delta: the shift estimate to report (default: the EWMA).
        """
        delta = self.ewma_state if delta is None else np.asarray(delta, float)
        z = self.ewma_state / self.ewma_sd
        order = np.argsort(-np.abs(z))
        chosen = [j for j in order if abs(z[j]) >= self.config.attribution_sd]
        if alarm and not chosen:
            chosen = [int(order[0])]
        out = []
        for j in chosen:
            value, unit = report_value(self.names[j], float(delta[j]), float(self.center_all[j]), float(self.window_sd[j]))
            out.append(Shift(self.names[j], stat_label(self.names[j]).label, float(delta[j]), float(z[j]), value,
                             unit))
        return tuple(out)

    def pattern_match(self, delta: np.ndarray | None = None) -> tuple[str | None, float | None]:
        """The fault pattern whose chart is beyond its limit, most strongly, and the size of ``delta`` along it.

        A pattern is named only when the shift goes its way by at least :data:`MIN_PATTERN_SIZE` of it (a shift
        against a pattern, such as added noise against defocus blur, is not that fault).

        Args:
            delta: the shift estimate (default: the EWMA); its size is in units of the pattern.
        """
        if not len(self.pattern_names):
            return None, None
        u = self.pattern_scores(self.ewma_state)  # > 0: the shift goes the pattern's way (w . delta > 0)
        f = int(np.argmax(u))
        if u[f] <= self.pattern_limit:
            return None, None
        w = self.pattern_weights[f]
        d = self.ewma_state if delta is None else np.asarray(delta, float)
        size = float(w @ d / (w @ self.patterns[f]))
        return (self.pattern_names[f], size) if size >= MIN_PATTERN_SIZE else (None, None)

    def change(self) -> tuple[str | None, np.ndarray]:
        """The most likely step change since the chart last started.

        Returns:
            The step's first window and the mean deviation of the windows from there on (its estimated size);
            ``(None, EWMA)`` before any window.
        """
        since = self.history[-min(self.since_reset, len(self.history)) :] if self.since_reset else []
        if not since:
            return None, self.ewma_state
        V = np.array([h["v"] for h in since])
        tau = change_point(V, self.precision @ self.ewma_state)
        return str(since[tau]["window_id"]), V[tau:].mean(axis=0)

    def reset(self) -> None:
        """Restart the EWMA at the in-control centre and forget the last alarm's shift (after an alert is resolved)."""
        self._restart()
        self.shift, self.shift_since, self.back = None, None, 0.0

    def _restart(self) -> None:
        """Restart the EWMA at the in-control centre (after an alarm)."""
        self.ewma_state = np.zeros(len(self.names))
        self.since_reset = 0

    # ---- state ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready state (fitted limits, running EWMA, recent history)."""
        self._check_fitted()
        return {
            "kind": STATE_KIND, "version": STATE_VERSION, "line": self.line, "model_id": self.model_id,
            "config": asdict(self.config), "names": list(self.names), "strata": list(self.strata),
            "centers": self.centers.tolist(), "center_all": self.center_all.tolist(),
            "window_sd": self.window_sd.tolist(), "ewma_sd": self.ewma_sd.tolist(),
            "precision": self.precision.tolist(), "limit": self.limit, "arl0_fit": self.arl0_fit,
            "t2_limit": self.t2_limit, "pattern_limit": self.pattern_limit, "pattern_names": list(self.pattern_names),
            "patterns": self.patterns.tolist(), "pattern_weights": self.pattern_weights.tolist(),
            "pattern_sd": self.pattern_sd.tolist(), "pattern_one_sided": self.pattern_one_sided.tolist(),
            "clip": self.estimate.clip if math.isfinite(self.estimate.clip) else None,
            "fit_info": self.fit_info, "ewma_state": self.ewma_state.tolist(), "since_reset": self.since_reset,
            "n_windows": self.n_windows, "history": self.history,
            "shift": None if self.shift is None else self.shift.tolist(), "shift_since": self.shift_since,
            "back": self.back,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, line: str, model_id: str | None) -> SpcChart:
        """Rebuild a chart from :meth:`to_dict`, refusing a state of another line or model."""
        if not isinstance(d, Mapping) or d.get("kind") != STATE_KIND:
            raise ChartStateMismatch(f"not a control-chart state (kind {d.get('kind') if isinstance(d, Mapping) else None!r})")
        if d.get("line") != line or d.get("model_id") != model_id:
            raise ChartStateMismatch(
                f"control-chart state of line {d.get('line')!r} and model {d.get('model_id')!r} cannot serve line "
                f"{line!r} and model {model_id!r}: fit a new chart (Phase I) for this line and model")
        if int(d.get("version", 0)) != STATE_VERSION:
            raise ChartStateMismatch(f"control-chart state version {d.get('version')} (expected {STATE_VERSION}): "
                                     "fit a new chart")
        out = cls(line, model_id, SpcConfig(**d["config"]))
        out.names, out.strata = tuple(d["names"]), tuple(d["strata"])
        for key in ("centers", "center_all", "window_sd", "ewma_sd", "precision", "ewma_state", "pattern_sd"):
            setattr(out, key, np.asarray(d[key], float))
        k = len(out.names)
        out.patterns = np.asarray(d["patterns"], float).reshape(-1, k)
        out.pattern_weights = np.asarray(d["pattern_weights"], float).reshape(-1, k)
        out.pattern_names = tuple(d["pattern_names"])
        # states written before one-sided patterns watched every pattern both ways
        out.pattern_one_sided = np.asarray(d.get("pattern_one_sided", [False] * len(out.pattern_names)), dtype=bool)
        out.limit, out.arl0_fit = float(d["limit"]), float(d["arl0_fit"])
        out.t2_limit, out.pattern_limit = float(d["t2_limit"]), float(d["pattern_limit"])
        clip = d.get("clip")
        out.estimate = _Estimate(out.centers, out.precision, out.window_sd, out.ewma_sd, out.pattern_weights,
                                 out.pattern_sd, out.config.lam, math.inf if clip is None else float(clip))
        out.fit_info, out.history = dict(d["fit_info"]), list(d["history"])
        out.since_reset, out.n_windows = int(d["since_reset"]), int(d["n_windows"])
        shift = d.get("shift")  # states written before the chart kept its last alarm's shift have none
        out.shift = None if shift is None else np.asarray(shift, float)
        out.shift_since, out.back = d.get("shift_since"), float(d.get("back", 0.0))
        out.is_fitted = True
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state as JSON, atomically."""
        atomic.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, line: str, model_id: str | None) -> SpcChart:
        """Read a state written by :meth:`save` (see :meth:`from_dict`)."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ChartStateMismatch(f"control-chart state {path} is not valid JSON ({e.msg}): fit a new chart") from None
        return cls.from_dict(d, line=line, model_id=model_id)


# ------------------------------------------------------------------------------------------------ helpers
def _as_matrix(X: Any, names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """(n, K) float matrix and its statistic names; a DataFrame is reordered to ``names`` when given."""
    if hasattr(X, "columns"):
        cols = list(map(str, X.columns)) if names is None else list(names)
        missing = [c for c in cols if c not in X.columns]
        if missing:
            raise ValueError(f"statistics {missing} missing from the window's columns")
        return X[cols].to_numpy(np.float64), cols
    A = np.atleast_2d(np.asarray(X, dtype=np.float64))
    if names is None or len(names) != A.shape[1]:
        raise ValueError(f"give one name per column: {A.shape[1]} columns, names {None if names is None else list(names)}")
    return A, list(names)


def _strata_codes(strata: Any, n: int) -> tuple[list[str], np.ndarray]:
    if strata is None:
        return [""], np.zeros(n, int)
    lab = np.asarray(strata, dtype=object)
    if lab.shape[0] != n:
        raise ValueError(f"strata has {lab.shape[0]} labels for {n} rows")
    labels, g = np.unique(lab.astype(str), return_inverse=True)
    return [str(x) for x in labels], g


def _point_to_dict(p: ChartPoint) -> dict[str, Any]:
    d = asdict(p)
    d["shifts"] = [asdict(s) for s in p.shifts]
    return d


def _point_from_dict(d: Mapping[str, Any]) -> ChartPoint:
    return ChartPoint(**{**d, "shifts": tuple(Shift(**s) for s in d["shifts"]),
                         "messages": tuple(d.get("messages", ()))})
