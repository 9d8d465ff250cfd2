"""How large the monitor's drift reference must be, and growing the calibration snapshot to that size.

The lot-aware null (``pipeline.analysis.drift.DriftDetector``, ``null="lot"``) calibrates a window of ``n`` images on runs
of ``n`` consecutive reference images, each compared with the rest of the reference minus a guard band of ``n``
images on either side, so that a calibration window is never compared with the other half of its own lot. That
only fits when the reference holds at least three windows (:func:`reference_needed`); a smaller reference makes the
monitor test an even subsample of each window (``DriftDetector.rows_to_test``), which is how only 30-48 of a day's
120 images came to be tested.

The nightly retrain therefore grows its calibration snapshot to three of the line's largest day windows
(:func:`extend_calibration`): when the training window's held-out images are too few, it reaches further back for
held-out images of healthy days. Those are images no model trained on: the held-out side of the split is a fixed
function of the image id (``pipeline.training.retrain.holdout_mask``), the same every night, so an image that is held out
tonight was held out every night before.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

import pandas as pd

__all__ = ["REFERENCE_WINDOWS", "extend_calibration", "largest_window", "needed_for", "reference_needed"]

REFERENCE_WINDOWS = 3
"""Windows the lot null's reference must hold: the window, a guard band of one window, and a comparison set."""


def reference_needed(window_size: int, min_window: int = 30) -> int:
    """Reference images the lot null needs to test a whole window of ``window_size`` images."""
    if window_size < 0 or min_window < 1:
        raise ValueError(f"reference_needed needs window_size >= 0 and min_window >= 1, got {window_size}, {min_window}")
    return REFERENCE_WINDOWS * max(int(window_size), int(min_window))


def largest_window(catalog: pd.DataFrame, timezone: str = "UTC") -> int:
    """The most images one line captured on one plant day (``captured_at`` in ``timezone``); 0 for no rows."""
    if catalog.empty:
        return 0
    day = pd.to_datetime(catalog["captured_at"], utc=True).dt.tz_convert(timezone).dt.date
    keys = [catalog["line"].astype(str), day] if "line" in catalog.columns else [day]
    return int(catalog.groupby(keys).size().max())


def extend_calibration(
    selection: Any,
    catalog: pd.DataFrame,
    *,
    need: int,
    holdout_share: float,
    alert_windows: pd.DataFrame | None = None,
    max_days: int = 28,
) -> Any:
    """Grow a selection's calibration snapshot to ``need`` images with held-out images from before its window.

    Args:
        selection: a ``pipeline.training.retrain.DataSelection``.
        catalog: the catalog rows the selection was made from.
        need: calibration images wanted (:func:`reference_needed`).
        holdout_share: the retrain's held-out share (the same split as the selection's).
        alert_windows: intervals under an alert (``line, start, end``): their images are not normal production.
        max_days: reach back at most this many days before the selection's window.

    Returns:
        The selection with the most recent earlier held-out images of healthy windows added to ``calibration``
        (in capture order), and ``excluded["reference_added"]`` set to how many; unchanged when it already holds
        ``need`` images or nothing earlier is available.
    """
    from pipeline.training.selection import select_training_data

    missing = need - len(selection.calibration)
    start = selection.window[0]
    ts = pd.to_datetime(catalog["captured_at"], utc=True)
    if missing <= 0 or not (ts < pd.Timestamp(start)).any():
        return dataclasses.replace(selection, excluded={**selection.excluded, "reference_added": 0})
    older = select_training_data(catalog, window_days=max_days, end=start, alert_windows=alert_windows,
                                 holdout_share=holdout_share, exclude_anomalous=False).calibration
    older = older.assign(_ts=pd.to_datetime(older["captured_at"], utc=True)).sort_values("_ts")
    added = older.tail(missing).drop(columns="_ts")
    calibration = pd.concat([added, selection.calibration], ignore_index=True)
    return dataclasses.replace(selection, calibration=calibration,
                               excluded={**selection.excluded, "reference_added": int(len(added))})


def needed_for(catalog: pd.DataFrame, window: tuple[datetime, datetime], timezone: str = "UTC",
               min_window: int = 30) -> int:
    """Reference images needed for the largest day window among the catalog rows inside ``window`` (start, end)."""
    ts = pd.to_datetime(catalog["captured_at"], utc=True)
    inside = catalog.loc[((ts >= pd.Timestamp(window[0])) & (ts < pd.Timestamp(window[1]))).to_numpy()]
    return reference_needed(largest_window(inside, timezone), min_window)
