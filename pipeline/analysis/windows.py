"""Windows of a production stream: plant days, shifts or fixed counts of images, cut in local time.

A window is the unit the monitor tests for drift (:class:`pipeline.analysis.drift.DriftDetector`) and the unit the
lot null's production blocks are made of (:mod:`pipeline.analysis.blocks`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["DEFAULT_SHIFTS", "Window", "windows"]

log = logging.getLogger("pipeline.analysis.drift")

DEFAULT_SHIFTS: tuple[tuple[int, int], ...] = ((6, 14), (14, 22), (22, 6))
"""Three 8-hour shifts (start hour, end hour); a shift that wraps midnight belongs to the date it starts on."""


@dataclass(frozen=True)
class Window:
    """One monitoring window.

    Attributes:
        window_id: ``"count-00003"``, ``"2026-11-27/S2"`` (shift 2 of that date) or ``"2026-11-27"``.
        start: first timestamp (count windows: of the first row, or its position without a time column).
        end: end of the window (shift/day: exclusive boundary; count: last row's timestamp or position).
        frame: the rows of the window.
    """

    window_id: str
    start: Any
    end: Any
    frame: pd.DataFrame


def _shift_of(ts: pd.Series, shifts: Sequence[tuple[int, int]]) -> tuple[pd.Series, pd.Series]:
    hours = ts.dt.hour + ts.dt.minute / 60.0 + ts.dt.second / 3600.0
    day = ts.dt.normalize()
    idx = pd.Series(-1, index=ts.index)
    sdate = day.copy()
    for i, (a, b) in enumerate(shifts):
        if a < b:
            hit = (hours >= a) & (hours < b)
        else:  # wraps midnight: the early hours belong to the previous date's shift
            late, early = hours >= a, hours < b
            hit = late | early
            sdate = sdate.where(~early, day - pd.Timedelta(days=1))
        idx = idx.where(~hit, i)
    return idx, sdate


def _check_shifts(shifts: Sequence[tuple[int, int]]) -> None:
    cover = np.zeros(24, dtype=int)
    for a, b in shifts:
        if not (0 <= a < 24 and 0 <= b <= 24 and a != b):
            raise ValueError(
                f"shift ({a}, {b}) must be (start_hour, end_hour) with hours in 0..24 and start != end"
            )
        hrs = np.arange(a, b) if a < b else np.r_[np.arange(a, 24), np.arange(0, b)]
        cover[hrs] += 1
    if not (cover == 1).all():
        raise ValueError(f"shifts {tuple(shifts)} must cover every hour of the day exactly once")


def windows(
    df: pd.DataFrame,
    by: str = "count",
    size: int | None = None,
    time_col: str = "captured_at",
    shifts: Sequence[tuple[int, int]] = DEFAULT_SHIFTS,
    min_size: int = 30,
    on_small: str = "skip",
    skipped: list[dict[str, Any]] | None = None,
) -> Iterator[Window]:
    """Cut a table of images (catalog or latents rows) into monitoring windows.

    Windows smaller than ``min_size`` are not yielded with ``on_small="skip"`` (default): each is logged as a
    warning and, when a list is passed as ``skipped``, appended to it as ``{"window_id", "n", "reason"}``. With
    ``on_small="raise"`` the first one raises a ``ValueError``.

    Args:
        df: rows to window; needs ``time_col`` for ``by="shift"``/``"day"`` (and is then sorted by it).
        by: ``"count"`` (consecutive chunks of ``size`` rows), ``"shift"`` or ``"day"``.
        size: rows per count window.
        time_col: timestamp column.
        shifts: (start_hour, end_hour) per shift, covering the day exactly once; a shift that wraps midnight
            belongs to the date it starts on.
        min_size: smallest usable window (match ``DriftDetector.min_window``).
        on_small: ``"skip"`` or ``"raise"``.
        skipped: optional list collecting the skipped windows.

    Yields:
        :class:`Window`, in time (or row) order.
    """
    frame, has_time = _sorted_frame(df, by, time_col, on_small)
    for wid, start, end, sub in _groups(frame, by, size, time_col, shifts, has_time):
        if len(sub) < min_size:
            _skip_small(wid, len(sub), min_size, on_small, skipped)
            continue
        yield Window(wid, start, end, sub)


def _sorted_frame(df: pd.DataFrame, by: str, time_col: str, on_small: str) -> tuple[pd.DataFrame, bool]:
    """(the rows, sorted by a parsed ``time_col`` when there is one; whether there is one), arguments checked."""
    if by not in ("count", "shift", "day"):
        raise ValueError(f"by must be 'count', 'shift' or 'day', got {by!r}")
    if on_small not in ("skip", "raise"):
        raise ValueError(f"on_small must be 'skip' or 'raise', got {on_small!r}")
    has_time = time_col in df.columns
    if by != "count" and not has_time:
        raise ValueError(f"windows by {by!r} need a {time_col!r} column; columns are {list(df.columns)}")
    frame = df
    if has_time:
        ts = pd.to_datetime(df[time_col])
        if ts.isna().any():
            raise ValueError(f"{int(ts.isna().sum())} rows have no {time_col!r}; drop or fill them first")
        frame = df.assign(**{time_col: ts}).sort_values(time_col, kind="stable")
    return frame, has_time


_Group = tuple[str, Any, Any, pd.DataFrame]


def _groups(frame: pd.DataFrame, by: str, size: int | None, time_col: str, shifts: Sequence[tuple[int, int]],
            has_time: bool) -> list[_Group]:
    """(window_id, start, end, rows) of every window, small ones included, in time (or row) order."""
    if by == "count":
        return _count_groups(frame, size, time_col, has_time)
    if by == "day":
        day = frame[time_col].dt.normalize()
        return [(d.date().isoformat(), d, d + pd.Timedelta(days=1), sub)
                for d, sub in frame.groupby(day, sort=True)]
    return _shift_groups(frame, time_col, shifts)


def _count_groups(frame: pd.DataFrame, size: int | None, time_col: str, has_time: bool) -> list[_Group]:
    """Consecutive chunks of ``size`` rows."""
    if size is None or size < 1:
        raise ValueError(f"windows by count need size >= 1, got {size}")
    groups: list[_Group] = []
    for i, lo in enumerate(range(0, len(frame), size)):
        sub = frame.iloc[lo : lo + size]
        if has_time:
            start, end = sub[time_col].iloc[0], sub[time_col].iloc[-1]
        else:
            start, end = lo, lo + len(sub) - 1
        groups.append((f"count-{i:05d}", start, end, sub))
    return groups


def _shift_groups(frame: pd.DataFrame, time_col: str, shifts: Sequence[tuple[int, int]]) -> list[_Group]:
    """One group per (shift date, shift); a shift that wraps midnight belongs to the date it starts on."""
    _check_shifts(shifts)
    sidx, sdate = _shift_of(frame[time_col], shifts)
    groups: list[_Group] = []
    for (d, i), sub in frame.groupby([sdate, sidx], sort=True):
        a, b = shifts[int(i)]
        start = d + pd.Timedelta(hours=a)
        end = start + pd.Timedelta(hours=(b - a) % 24 or 24)
        groups.append((f"{d.date().isoformat()}/S{int(i) + 1}", start, end, sub))
    return groups


def _skip_small(wid: str, n: int, min_size: int, on_small: str, skipped: list[dict[str, Any]] | None) -> None:
    """A window under ``min_size``: raises with ``on_small="raise"``, else logs it and appends it to ``skipped``."""
    reason = (
        f"window has {n} images; at least {min_size} are needed for a drift test; "
        "widen the window (per day instead of per shift)"
    )
    if on_small == "raise":
        raise ValueError(f"window {wid}: {reason}")
    log.warning("skipping window %s: %s", wid, reason)
    if skipped is not None:
        skipped.append({"window_id": wid, "n": n, "reason": reason})
