"""Windows of a catalog: by count, by shift, by day."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.analysis.drift import windows


def _catalog(times):
    return pd.DataFrame(
        {"image_id": [f"i{k}" for k in range(len(times))], "captured_at": pd.to_datetime(times)}
    )


def test_windows_by_count_skips_small_remainder():
    df = pd.DataFrame({"image_id": range(75)})
    skipped = []
    ws = list(windows(df, by="count", size=30, min_size=30, skipped=skipped))
    assert [w.window_id for w in ws] == ["count-00000", "count-00001"]
    assert [len(w.frame) for w in ws] == [30, 30] and ws[1].start == 30
    assert skipped[0]["window_id"] == "count-00002" and skipped[0]["n"] == 15
    assert "per day instead of per shift" in skipped[0]["reason"]
    with pytest.raises(ValueError, match="count-00002: window has 15 images"):
        list(windows(df, by="count", size=30, min_size=30, on_small="raise"))


def test_windows_by_shift_and_day():
    times = (
        list(pd.date_range("2026-11-27 06:00", periods=40, freq="10min"))  # S1 of the 27th
        + list(pd.date_range("2026-11-27 22:30", periods=40, freq="10min"))  # night shift spanning midnight
        + list(pd.date_range("2026-11-28 14:00", periods=5, freq="10min"))  # too small
    )
    df = _catalog(times).sample(frac=1.0, random_state=0)  # order must not matter
    skipped = []
    ws = list(windows(df, by="shift", min_size=30, skipped=skipped))
    assert [w.window_id for w in ws] == ["2026-11-27/S1", "2026-11-27/S3"]
    night = ws[1]
    assert len(night.frame) == 40 and night.start == pd.Timestamp("2026-11-27 22:00")
    assert night.end == pd.Timestamp("2026-11-28 06:00")
    assert night.frame["captured_at"].is_monotonic_increasing
    assert skipped[0]["window_id"] == "2026-11-28/S2"
    days = list(windows(df, by="day", min_size=30))
    assert [(w.window_id, len(w.frame)) for w in days] == [("2026-11-27", 49), ("2026-11-28", 36)]


def test_windows_errors():
    df = pd.DataFrame({"x": range(10)})
    with pytest.raises(ValueError, match="captured_at"):
        list(windows(df, by="day"))
    with pytest.raises(ValueError, match="size"):
        list(windows(df, by="count"))
    with pytest.raises(ValueError, match="exactly once"):
        list(windows(_catalog(["2026-01-01 10:00"]), by="shift", shifts=((6, 14), (12, 22), (22, 6))))
    with pytest.raises(ValueError, match="by must"):
        list(windows(df, by="week"))
