"""The control chart's pure maths (:mod:`pipeline.analysis.spc`): lot-bootstrap streams and run lengths.

:func:`lot_runs` and :func:`lot_groups` cut an in-control history into its bootstrap units (lots, or blocks of
consecutive images); :func:`resample_stream` draws whole units with replacement into an in-control stream;
:func:`window_means` summarises a stream window by window; :func:`ewma` smooths the window vectors;
:func:`run_alarms` counts the run lengths of a chart statistic against a limit, resetting after each alarm;
:func:`calibrate_limit` finds the limit whose in-control average run length is the target ARL0;
:func:`change_point` estimates where a persistent shift began; and :func:`return_llr` with :data:`BACK_LIMIT` decide,
window by window, whether a shift found by an alarm has ended.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.signal import lfilter


def lot_runs(n: int, lots: Any = None, block: int = 60) -> list[np.ndarray]:
    """Row positions of the bootstrap units of an in-control history of ``n`` rows in production order.

    Args:
        n: rows.
        lots: lot label per row; a unit is a run of equal consecutive labels. None: blocks of ``block`` rows.
        block: block length without lots.

    Returns:
        One int array of consecutive positions per unit, in order.
    """
    if lots is None:
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        return [np.arange(s, min(s + block, n)) for s in range(0, n, block)]
    lots = np.asarray(lots)
    if lots.shape[0] != n:
        raise ValueError(f"lots has {lots.shape[0]} labels for {n} rows")
    starts = np.r_[0, np.flatnonzero(lots[1:] != lots[:-1]) + 1, n]
    return [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True) if b > a]


def lot_groups(runs: Sequence[np.ndarray], lots: Any = None) -> list[np.ndarray]:
    """Indices into ``runs`` grouped by lot label (a lot met several times in the history is one group).

    Without labels every run is its own group.
    """
    if lots is None:
        return [np.array([i]) for i in range(len(runs))]
    labels = np.asarray(lots)[[int(r[0]) for r in runs]].astype(str)
    _, inv = np.unique(labels, return_inverse=True)
    return [np.flatnonzero(inv == k) for k in range(int(inv.max()) + 1)] if len(runs) else []


def resample_stream(runs: Sequence[np.ndarray], n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of a stream of ``n_rows`` rows made of whole units drawn with replacement."""
    sizes = np.array([len(r) for r in runs])
    k = int(math.ceil(n_rows / max(1.0, sizes.mean()) * 1.2)) + 2
    picks = rng.integers(len(runs), size=k)
    while sizes[picks].sum() < n_rows:
        picks = np.r_[picks, rng.integers(len(runs), size=k)]
    return np.concatenate([runs[i] for i in picks])[:n_rows]


def window_means(D: np.ndarray, pos: np.ndarray, window: int, chunk: int = 1000) -> np.ndarray:
    """Means of ``D[pos]`` over consecutive windows of ``window`` rows (a trailing part window is dropped).

    The rows are gathered ``chunk`` windows at a time, so a long bootstrap stream never sits in memory whole.
    """
    t = len(pos) // window
    out = np.empty((t, D.shape[1]))
    for a in range(0, t, chunk):
        b = min(t, a + chunk)
        out[a:b] = D[pos[a * window : b * window]].reshape(b - a, window, D.shape[1]).mean(axis=1)
    return out


def ewma(V: np.ndarray, lam: float) -> np.ndarray:
    """EWMA ``E_t = (1 - lam) E_(t-1) + lam V_t`` down the rows of ``V``, started at 0."""
    return lfilter([lam], [1.0, -(1.0 - lam)], np.asarray(V, float), axis=0)


def run_alarms(E: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], h: float, lam: float,
               chunk: int = 2048) -> list[int]:
    """Alarm positions of an EWMA chart that restarts at 0 after every alarm.

    ``E`` is the EWMA without restarts (:func:`ewma`). After a restart at ``t0`` the chart is
    ``E_t - (1 - lam)**(t - t0) E_t0``, so every run is found with vector operations.

    Args:
        E: (T, K) EWMA of the window vectors, never restarted.
        statistic: maps (n, K) EWMA vectors to (n,) chart statistics.
        h: the limit (alarm when the statistic exceeds it).
        lam: the EWMA weight.
        chunk: windows examined per vector step.

    Returns:
        The positions (0-based) of the windows that raised an alarm.
    """
    T = len(E)
    alarms: list[int] = []
    start, base, age = 0, np.zeros(E.shape[1]), 0
    while start < T:
        L = min(chunk, T - start)
        decay = (1.0 - lam) ** (age + np.arange(1, L + 1))
        seg = E[start : start + L] - decay[:, None] * base[None, :]
        hit = np.flatnonzero(statistic(seg) > h)
        if hit.size == 0:
            start, age = start + L, age + L
            continue
        t = start + int(hit[0])
        alarms.append(t)
        start, base, age = t + 1, E[t].copy(), 0
    return alarms


def calibrate_limit(segments: Sequence[tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]], lam: float,
                    arl0: float, iters: int = 40) -> tuple[float, float]:
    """The limit whose average run length on in-control EWMA segments is ``arl0`` (bisection).

    Args:
        segments: ``(E, statistic)`` pairs: in-control EWMA sequences (each (T_i, K), from :func:`ewma`, each
            starting a fresh chart) with the chart statistic that watches it (charts fitted on different Phase I
            resamples differ).
        lam: EWMA weight.
        arl0: target average run length, in windows.
        iters: bisection steps.

    Returns:
        ``(limit, achieved ARL)``: the ARL is total windows / alarms (restarting after each).
    """
    total = sum(len(E) for E, _ in segments)
    if total < 5 * arl0:
        raise ValueError(f"{total} in-control windows cannot calibrate an ARL0 of {arl0}: use at least {5 * arl0:.0f}")

    def arl(h: float) -> float:
        n = sum(len(run_alarms(E, stat, h, lam)) for E, stat in segments)
        return total / max(n, 1)

    lo = 0.0
    hi = max(float(stat(E).max()) for E, stat in segments) * 1.01 + 1e-12
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if arl(mid) < arl0 else (lo, mid)
        if hi - lo < 1e-4 * hi:
            break
    return hi, arl(hi)


def change_point(V: np.ndarray, direction: np.ndarray, min_len: int = 1) -> int:
    """Most likely start of a step change of the window deviations along ``direction`` (maximum likelihood).

    The deviations are projected on the direction the chart moved in (``y_t = V_t . direction``); for every
    candidate start ``tau`` the likelihood ratio of a step of unknown size in the sign of ``direction`` is
    ``max(0, sum(y[tau:]))**2 / (T - tau)`` (in-control mean 0). Projecting first keeps the noise of the
    statistics that did not move out of the estimate.

    Args:
        V: (T, K) window deviations, oldest first.
        direction: (K,) the direction of the shift (e.g. ``S^-1 E`` of the EWMA ``E``).
        min_len: shortest step considered.

    Returns:
        The position in ``V`` of the first window after the change.
    """
    T = len(V)
    if T == 0:
        raise ValueError("no windows to locate a change in")
    y = np.asarray(V, float) @ np.asarray(direction, float)
    tail = np.maximum(np.cumsum(y[::-1])[::-1], 0.0)  # tail[tau] = sum y[tau:], steps along the direction only
    lr = tail**2 / (T - np.arange(T))
    lr[T - min_len + 1 :] = -np.inf
    return int(np.argmax(lr))


BACK_LIMIT = math.log(20.0)
"""Level of the return-to-control CUSUM (``max(0, R - llr)`` over :func:`return_llr`) at which a shift counts as
ended: Wald's bound for about a 5 % chance of calling a shift that goes on ended."""


def return_llr(v: Any, shift: Any, precision: Any) -> float:
    """Log-likelihood ratio of one window's deviation ``v`` between "still shifted by ``shift``" and "in control".

    Window deviations are taken as Gaussian with the between-window precision ``precision`` (``S^-1``):
    ``llr = shift' P v - shift' P shift / 2``. Positive: the window looks more like the shifted process; a window
    back at the centre gives ``-shift' P shift / 2``, so a large shift is seen to end at its first clean window and a
    small one after a few.
    """
    d, x, P = (np.asarray(a, float) for a in (shift, v, precision))
    return float(d @ P @ x - 0.5 * d @ P @ d)
