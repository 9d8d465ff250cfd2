"""Growing the calibration snapshot (the monitor's drift reference) so the lot null can test whole windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from pipeline.training.reference import extend_calibration, largest_window, needed_for, reference_needed
from pipeline.training.retrain import holdout_mask, select_training_data

T0 = datetime(2026, 1, 5, tzinfo=UTC)


def _catalog(days: int = 12, per_day: int = 40) -> pd.DataFrame:
    rows = [{"image_id": f"img-{d}-{i}", "line": "L1", "captured_at": T0 + timedelta(days=d, minutes=20 + i * 30)}
            for d in range(days) for i in range(per_day)]
    return pd.DataFrame(rows)


def test_reference_needed_and_largest_window():
    assert reference_needed(120) == 360 and reference_needed(10, min_window=30) == 90
    cat = _catalog(days=2, per_day=40)
    assert largest_window(cat) == 40 and largest_window(cat.iloc[:0]) == 0
    assert needed_for(cat, (T0, T0 + timedelta(days=1))) == 120


def test_extend_calibration_reaches_back_for_held_out_images_of_healthy_days():
    cat = _catalog()
    sel = select_training_data(cat, window_days=3, holdout_share=0.25, anomalous_ids={"img-11-0"})
    alerts = pd.DataFrame({"line": ["L1"], "start": [T0 + timedelta(days=7)], "end": [T0 + timedelta(days=8)]})
    grown = extend_calibration(sel, cat, need=80, holdout_share=0.25, alert_windows=alerts)
    added = grown.calibration.iloc[: grown.excluded["reference_added"]]
    assert len(grown.calibration) == 80 and grown.excluded["reference_added"] == 80 - len(sel.calibration) > 40
    assert holdout_mask(added["image_id"].tolist(), 0.25).all()  # only images no model trained on
    ts = pd.to_datetime(added["captured_at"], utc=True)
    assert (ts < pd.Timestamp(sel.window[0])).all()
    assert not ts.between(T0 + timedelta(days=7), T0 + timedelta(days=8), inclusive="left").any()  # alerted day
    assert ts.min() > T0 + timedelta(days=2)  # the most recent earlier images first
    assert grown.train.equals(sel.train)
    assert pd.to_datetime(grown.calibration["captured_at"], utc=True).is_monotonic_increasing


@pytest.mark.parametrize("need", [0, 10])
def test_extend_calibration_leaves_a_large_enough_snapshot_alone(need):
    cat = _catalog()
    sel = select_training_data(cat, window_days=3, holdout_share=0.25)
    same = extend_calibration(sel, cat, need=need, holdout_share=0.25)
    assert same.calibration.equals(sel.calibration) and same.excluded["reference_added"] == 0


def test_extend_calibration_takes_what_there_is():
    cat = _catalog(days=4)
    sel = select_training_data(cat, window_days=3, holdout_share=0.25)
    grown = extend_calibration(sel, cat, need=10_000, holdout_share=0.25)
    assert 0 < grown.excluded["reference_added"] <= 40
