"""Production blocks: lot-null calibration windows with the production structure of a monitored window.

A monitored window is *one line's production over one period* (a plant day): n consecutive cells from the few lots
that line made that day. The monitor's reference is the champion's calibration snapshot: about a quarter of every
line-day of the last week or more, held out by a hash of the image id, both lines interleaved in time. A run of n
consecutive reference images therefore spans four days and two lines, a dozen lots, and differs from the rest of the
reference much less than a real day does: a lot null calibrated on such runs is far too narrow. Measured on the
simulated ELPV line (two lines, 150 cells a day in lot order, reference = the hash-held-out quarter of 7 days,
pixel-PCA latents + the image-quality channels), healthy days were called drift in 14 of 22 windows at alpha = 0.05.

Production blocks fix the structure: each reference image belongs to the block of its stream (line) and period
(plant day). A calibration window for a window of n images is one block, resampled with replacement to n images: it
holds the lots of one real line-day, in the proportions that day made them. It is compared with the rest of the
reference without its own block and the same line's neighbouring periods (a lot that runs over midnight must not be
compared with its own other half). Resampling a quarter of a day up to a whole day adds sampling noise that a real
day does not have, so the null errs on the wide (quiet) side; its tail is only as well known as the reference holds
line-days, which is why the nightly retrain grows the reference (``pipeline.training.reference``).

Pure functions on label arrays; :class:`pipeline.analysis.drift.DriftDetector` uses them when it is fitted with
``ref_streams`` and ``ref_periods``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "MIN_BLOCK", "MIN_BLOCKS", "ProductionBlocks", "blocks_shortfall", "draw_block_window", "mmd2_multiset",
    "reference_blocks",
]

MIN_BLOCK = 8
"""Fewest reference images of a block for it to stand for a period of production."""
MIN_BLOCKS = 4
"""Fewest usable blocks for block calibration; fewer and the detector falls back to runs of consecutive images."""


@dataclass(frozen=True)
class ProductionBlocks:
    """Reference rows grouped by (stream, period), with the rows each block's guard band leaves out.

    Attributes:
        rows: the rows of each usable block (at least ``MIN_BLOCK`` images).
        guard: for each usable block, every row of its stream within ``guard_periods`` periods of it.
        labels: ``(stream, period)`` of each usable block.
    """

    rows: tuple[np.ndarray, ...]
    guard: tuple[np.ndarray, ...]
    labels: tuple[tuple[str, int], ...]

    @classmethod
    def from_labels(cls, streams: np.ndarray, periods: np.ndarray, guard_periods: int = 1,
                    min_block: int = MIN_BLOCK) -> ProductionBlocks:
        """Blocks of the reference rows from each row's stream (e.g. the line) and period (e.g. the plant day index).

        Raises:
            ValueError: labels of another length than each other.
        """
        streams = np.asarray(streams).astype(str)
        periods = np.asarray(periods).astype(np.int64)
        if streams.shape != periods.shape:
            raise ValueError(f"ref_streams ({streams.shape}) and ref_periods ({periods.shape}) differ in length")
        rows, guard, labels = [], [], []
        for s in np.unique(streams):
            in_s = streams == s
            for p in np.unique(periods[in_s]):
                r = np.flatnonzero(in_s & (periods == p))
                if r.size < min_block:
                    continue
                rows.append(r)
                guard.append(np.flatnonzero(in_s & (np.abs(periods - p) <= guard_periods)))
                labels.append((str(s), int(p)))
        return cls(tuple(rows), tuple(guard), tuple(labels))

    @property
    def usable(self) -> bool:
        """Enough blocks to calibrate on (``MIN_BLOCKS``)."""
        return len(self.rows) >= MIN_BLOCKS


def blocks_shortfall(streams: np.ndarray | None, periods: np.ndarray | None, min_blocks: int = MIN_BLOCKS
                     ) -> str | None:
    """Why a reference is too young for a lot null on production blocks; None when it holds ``min_blocks``.

    Fewer usable blocks (periods of a stream with at least ``MIN_BLOCK`` images) leave the lot null nothing to learn
    how much one period differs from another: it falls back to runs of consecutive images, which are far too alike
    (the module docstring), and healthy days are called drift. None too for unlabelled references (``streams`` None)
    and for ``min_blocks`` <= 0 (the check turned off).
    """
    if streams is None or periods is None or min_blocks <= 0:
        return None
    blocks = ProductionBlocks.from_labels(streams, periods)
    if len(blocks.rows) >= min_blocks:
        return None
    return (f"the reference holds {len(blocks.rows)} line-periods of at least {MIN_BLOCK} images; the lot null needs "
            f"{min_blocks} to learn how much one period of production differs from another")


def draw_block_window(blocks: ProductionBlocks, n_ref: int, n: int, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    """One calibration window: a random block resampled with replacement to ``n`` rows, and the rows left out.

    Returns:
        ``(idx, excl)``: ``n`` row positions (with repeats) and a boolean mask of the rows that are not "the rest"
        (the block's guard band: its stream's rows in the neighbouring periods, itself included).
    """
    b = int(rng.integers(len(blocks.rows)))
    idx = rng.choice(blocks.rows[b], size=n, replace=True)
    excl = np.zeros(n_ref, dtype=bool)
    excl[blocks.guard[b]] = True
    return idx, excl


def mmd2_multiset(R: np.ndarray, W: np.ndarray, w_src: np.ndarray, sigma: float) -> float:
    """MMD^2 between R (unweighted, unbiased within R) and a resampled window W whose rows come from ``w_src``.

    The within-window term averages the kernel over pairs of *different source images* only, so repeats of one image
    (from resampling) do not count as perfectly similar neighbours.
    """
    g = 1.0 / (2.0 * sigma**2)

    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
        return np.exp(-g * np.maximum(d2, 0.0))

    m = R.shape[0]
    krr = (k(R, R).sum() - m) / (m * (m - 1))
    kww = k(W, W)
    other = w_src[:, None] != w_src[None, :]
    ww = float(kww[other].mean()) if other.any() else 1.0
    return float(krr + ww - 2.0 * k(R, W).mean())


def reference_blocks(reference: pd.DataFrame, timezone: str, window_by: str
                     ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(streams, periods) of the reference rows for windows cut ``window_by`` (``"day"`` or ``"shift"``).

    The stream is the line; the period the plant day (``"day"``: the local date's ordinal in ``timezone``) or the
    shift (``"shift"``: three per day, as :func:`pipeline.analysis.drift.windows` cuts them). ``(None, None)`` for count
    windows or a reference without ``line`` and ``captured_at``.
    """
    if window_by not in ("day", "shift") or not {"line", "captured_at"} <= set(reference.columns):
        return None, None
    local = pd.to_datetime(reference["captured_at"], utc=True).dt.tz_convert(timezone)
    if window_by == "day":
        periods = local.dt.tz_localize(None).dt.normalize()
        period = ((periods - pd.Timestamp("1970-01-01")) // pd.Timedelta(days=1)).to_numpy()
    else:
        from pipeline.analysis.windows import DEFAULT_SHIFTS, _shift_of

        idx, sdate = _shift_of(local.dt.tz_localize(None), DEFAULT_SHIFTS)
        day = ((sdate.dt.normalize() - pd.Timestamp("1970-01-01")) // pd.Timedelta(days=1)).to_numpy()
        period = day * len(DEFAULT_SHIFTS) + idx.to_numpy()
    return reference["line"].astype(str).to_numpy(), np.asarray(period, dtype=np.int64)
