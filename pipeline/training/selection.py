"""Which catalog images a retrain trains and calibrates on: the window, the exclusions, the reach back, the split.

A fault must never be learned away, so images in windows any verdict called drifted or alerted, and images the
monitor flagged, are excluded. Golden-sample captures (``sample_kind`` golden: the fixed reference cells re-imaged
every shift to check the camera, :mod:`pipeline.analysis.golden`) are never trained or calibrated on. Exclusions must not starve the model either: when they leave fewer images than the
floors (or, with ``keep_size``, fewer than the window held), the window reaches back, one whole day at a time and
at most ``max_lookback_days``, for older healthy images. The split into training and calibration images is by a hash
of the image id, so an image stays on the same side night after night. ``pipeline.training.retrain`` re-exports these names.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from pipeline.common.schemas import golden_mask
from pipeline.handoff.state import read_verdicts, scores_table_path, windows_table_path


@dataclass(frozen=True)
class DataSelection:
    """Which catalog images a retrain uses.

    Attributes:
        train: catalog rows of the training snapshot.
        calibration: catalog rows of the held-out calibration snapshot.
        excluded: reason -> number of images dropped (``alert_window``; ``anomalous``: flagged images kept out of
            the training part; ``reference_added``: older held-out images added to the calibration snapshot;
            ``golden``: golden-sample captures in the window, only present when there were any).
        window: (start, end) of the training window, UTC (the start reaches back past ``window_days`` when the
            floors or ``keep_size`` asked for older healthy images).
        lookback_days: days the window finally covers (``window_days`` when nothing was reached back for).
        target: images the selection aimed at (the window's size before exclusions with ``keep_size``, else 0).
    """

    train: pd.DataFrame
    calibration: pd.DataFrame
    excluded: dict[str, int]
    window: tuple[datetime, datetime]
    lookback_days: int = 0
    target: int = 0

    def shortfall(self, min_train: int, min_calibration: int) -> str:
        """``""`` when both floors are met, else what is missing, in words."""
        short = []
        if len(self.train) < min_train:
            short.append(f"{len(self.train)} training images (floor {min_train})")
        if len(self.calibration) < min_calibration:
            short.append(f"{len(self.calibration)} calibration images (floor {min_calibration})")
        return " and ".join(short)


def holdout_mask(image_ids: pd.Series | list[str], share: float, salt: str = "calibration") -> np.ndarray:
    """Deterministic hold-out: True for ids whose salted sha256 falls in the first ``share`` of the hash space.

    The same image is always on the same side, whatever else is in the window, so a model never trains on an
    image it was calibrated on across nights.
    """
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    out = np.empty(len(image_ids), dtype=bool)
    for i, image_id in enumerate(image_ids):
        h = hashlib.sha256(f"{salt}:{image_id}".encode()).digest()
        out[i] = int.from_bytes(h[:8], "big") / 2**64 < share
    return out


def select_training_data(
    catalog: pd.DataFrame,
    *,
    window_days: int,
    end: datetime | None = None,
    alert_windows: pd.DataFrame | None = None,
    anomalous_ids: set[str] | frozenset[str] = frozenset(),
    holdout_share: float = 0.25,
    exclude_alerts: bool = True,
    exclude_anomalous: bool = True,
    min_train: int = 0,
    min_calibration: int = 0,
    max_lookback_days: int | None = None,
    keep_size: bool = False,
) -> DataSelection:
    """Apply the data-selection rules to catalog rows (see the module docstring).

    Args:
        catalog: rows with at least ``image_id``, ``captured_at`` (tz-aware UTC) and ``line``.
        window_days: keep the last N days before ``end`` (None: 1 us after the newest ``captured_at``).
        end: exclusive end of the window.
        alert_windows: ``line`` (None/NaN = every line), ``start``, ``end`` (UTC) of windows to leave out.
        anomalous_ids: image ids flagged anomalous by the champion; dropped from the training part when
            ``exclude_anomalous`` (the calibration part keeps them: it stands for normal production).
        holdout_share: calibration share (hash of the image id).
        exclude_alerts: apply the alert-window rule.
        exclude_anomalous: apply the anomalous-image rule.
        min_train: training images to reach by reaching back, if the catalog has them.
        min_calibration: calibration images to reach likewise.
        max_lookback_days: farthest reach in days before ``end`` (None: ``window_days``, no reaching back).
        keep_size: also reach back until the selection is as large as the window before the exclusions.

    Returns:
        The selection. The floors are targets here; :func:`pipeline.training.retrain.retrain` refuses a selection below them.

    Raises:
        ValueError: the catalog lacks required columns or is empty.
    """
    days_max = max(window_days, max_lookback_days or window_days)
    df, df_ts, end_ts = _rows_in_reach(catalog, end, days_max)
    alert_hit = np.zeros(len(df), dtype=bool)
    if exclude_alerts and alert_windows is not None and len(alert_windows):
        alert_hit = _in_alert_windows(df, df_ts, alert_windows, end_ts)
    flagged = df["image_id"].isin(anomalous_ids).to_numpy() if exclude_anomalous and anomalous_ids else \
        np.zeros(len(df), dtype=bool)
    calib = holdout_mask(df["image_id"].tolist(), holdout_share) if len(df) else np.zeros(0, dtype=bool)
    age_days = ((end_ts - df_ts) / pd.Timedelta(days=1)).to_numpy()
    golden = golden_mask(df)  # camera-check captures: never a training or calibration image
    target = int(((age_days <= window_days) & ~golden).sum()) if keep_size else 0
    days = _reach_back(age_days, ~alert_hit & ~flagged & ~golden, calib, window_days, days_max,
                       target=target, min_train=min_train, min_calibration=min_calibration)
    inside = age_days <= days
    normal = inside & ~alert_hit & ~golden
    # flagged images never train a model (a defect must not be learned away), but the calibration snapshot keeps
    # them: it is the monitor's picture of normal production, defective cells at their usual share included, and a
    # reference without its top-scoring cells would set the per-image threshold and the score test too low
    excluded = {"alert_window": int((inside & alert_hit).sum()),
                "anomalous": int((normal & flagged & ~calib).sum())}
    if golden.any():
        excluded["golden"] = int((inside & golden).sum())
    return DataSelection(
        train=df.loc[normal & ~flagged & ~calib].reset_index(drop=True),
        calibration=df.loc[normal & calib].reset_index(drop=True),
        excluded=excluded,
        window=((end_ts - pd.Timedelta(days=days)).to_pydatetime(), end_ts.to_pydatetime()),
        lookback_days=days,
        target=target,
    )


def _rows_in_reach(catalog: pd.DataFrame, end: datetime | None,
                   days: int) -> tuple[pd.DataFrame, pd.Series, pd.Timestamp]:
    """The catalog rows of the ``days`` before ``end`` (default: just after the newest), their times, the end."""
    missing = {"image_id", "captured_at"} - set(catalog.columns)
    if missing:
        raise ValueError(f"catalog rows lack columns {sorted(missing)}; pass rows from pipeline.catalog.tables.read_catalog")
    if catalog.empty:
        raise ValueError("the catalog is empty: ingest images first (linewatch ingest / the ingest flow)")
    ts = pd.to_datetime(catalog["captured_at"], utc=True)
    end_ts = _utc(end) if end is not None else ts.max() + pd.Timedelta(microseconds=1)
    reach = ((ts >= end_ts - pd.Timedelta(days=days)) & (ts < end_ts)).to_numpy()
    return catalog.loc[reach].reset_index(drop=True), ts[reach].reset_index(drop=True), end_ts


def _reach_back(age_days: np.ndarray, healthy: np.ndarray, calib: np.ndarray, window_days: int, days_max: int, *,
                target: int, min_train: int, min_calibration: int) -> int:
    """Days the window must cover (from ``window_days`` up to ``days_max``, whole days) to meet the target and floors.

    Stops early when nothing older is left in the catalog.
    """
    days = window_days
    while True:
        use = (age_days <= days) & healthy
        n, n_cal = int(use.sum()), int((use & calib).sum())
        if (n >= target and n - n_cal >= min_train and n_cal >= min_calibration) or days >= days_max \
                or not (age_days > days).any():
            return days
        days += 1


def _utc(t: Any) -> pd.Timestamp:
    ts = pd.Timestamp(t)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _in_alert_windows(df: pd.DataFrame, df_ts: pd.Series, alert_windows: pd.DataFrame,
                      end_ts: pd.Timestamp) -> np.ndarray:
    """Which rows fall inside an alert interval of their line (an interval with no line covers every line)."""
    drop = np.zeros(len(df), dtype=bool)
    lines = df["line"].astype(str).to_numpy() if "line" in df.columns else np.full(len(df), "", dtype=object)
    for row in alert_windows.itertuples(index=False):
        a_start = _utc(row.start)
        a_end = _utc(row.end) if row.end is not None and not pd.isna(row.end) else end_ts
        hit = np.array((df_ts >= a_start) & (df_ts < a_end), dtype=bool)
        line = getattr(row, "line", None)
        if line is not None and not (isinstance(line, float) and math.isnan(line)):
            hit = hit & (lines == str(line))
        drop |= hit
    return drop



def anomalous_ids(settings: Any) -> set[str]:
    """Image ids the monitor flagged anomalous (any model version)."""
    path = scores_table_path(settings)
    if not path.exists():
        return set()
    df = pd.read_parquet(path, columns=["image_id", "is_anomaly"])
    return set(df.loc[df["is_anomaly"].astype(bool), "image_id"].astype(str))


def alert_windows(settings: Any) -> pd.DataFrame:
    """Windows to keep out of training, from the monitor's verdict log: drifted, or with an alert open on the line.

    Every verdict's drift counts (``pipeline.monitoring.verdicts``: the original one and any later model's
    re-evaluation): a window any model called drifted stays out. A drifted window counts even before the alert
    policy's hysteresis opened the alert (the first faulty day). An open alert counts from the original verdict only:
    a re-evaluation records the line's alert state at the time it ran (a healthy day re-tested the morning after a
    fault opened an alert would otherwise be kept out for that later alert). A window in which the line's control
    chart named a cause keeps out every window of its line from the chart's change point on (``shift_since``): a
    persistent shift is often under every per-window test for the days before the chart can call it, and those days
    are the fault too.

    Returns:
        Columns ``line, start, end`` (UTC), one row per window or charted shift.
    """
    path = windows_table_path(settings)
    if not path.exists():
        return pd.DataFrame(columns=["line", "start", "end"])
    df = read_verdicts(path)
    under_alert = df["alert_active"].astype(bool) & df["original"].astype(bool)
    out = df.loc[under_alert | df["detected"].astype(bool), ["line", "start", "end"]]
    shifts = _charted_shifts(df)
    if len(shifts):
        out = pd.concat([out, shifts], ignore_index=True)
    return out.drop_duplicates().reset_index(drop=True)


def _charted_shifts(verdicts: pd.DataFrame) -> pd.DataFrame:
    """``line, start, end`` from the first window of each charted shift (``shift_since``) to the window that named it.

    A change point before the first window on record starts at the naming window itself.
    """
    charted = verdicts.loc[verdicts["shift_since"] != ""]
    starts = verdicts.groupby(["line", "window_id"])["start"].min()
    rows = [{"line": r.line, "start": starts.get((r.line, str(r.shift_since)), r.start), "end": r.end}
            for r in charted.itertuples(index=False)]
    return pd.DataFrame(rows, columns=["line", "start", "end"])


__all__ = ["DataSelection", "alert_windows", "anomalous_ids", "holdout_mask", "select_training_data"]
