"""Training selection: golden-sample captures never train or calibrate a model."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd

from pipeline.training.selection import select_training_data

T0 = datetime(2026, 1, 5, tzinfo=UTC)


def _catalog(days: int = 4, per_day: int = 20, golden_per_day: int = 6) -> pd.DataFrame:
    rows = []
    for d in range(days):
        for i in range(per_day):
            rows.append({"image_id": f"img-{d}-{i}", "line": "L1", "sample_kind": "production", "golden_cell": None,
                         "captured_at": T0 + timedelta(days=d, hours=6 + i * 0.5)})
        for g in range(golden_per_day):
            rows.append({"image_id": f"gold-{d}-{g}", "line": "L1", "sample_kind": "golden",
                         "golden_cell": f"G{g % 3 + 1:02d}", "captured_at": T0 + timedelta(days=d, minutes=5 + g)})
    return pd.DataFrame(rows)


def test_golden_captures_are_never_selected_and_are_counted():
    sel = select_training_data(_catalog(), window_days=4, holdout_share=0.3)
    used = set(sel.train["image_id"]) | set(sel.calibration["image_id"])
    assert len(used) == 80 and not any(i.startswith("gold-") for i in used)
    assert sel.excluded == {"alert_window": 0, "anomalous": 0, "golden": 24}


def test_golden_captures_do_not_count_towards_the_floors_or_the_window_size():
    cat = _catalog()
    sel = select_training_data(cat, window_days=1, max_lookback_days=4, keep_size=True, min_train=30,
                               holdout_share=0.3)
    assert len(sel.train) >= 30 and not sel.train["image_id"].str.startswith("gold-").any()
    assert sel.target == 20  # the window's production images, not its golden captures


def test_old_catalog_rows_without_the_column_are_production():
    cat = _catalog(golden_per_day=0).drop(columns=["sample_kind", "golden_cell"])
    sel = select_training_data(cat, window_days=4, holdout_share=0.3)
    assert len(sel.train) + len(sel.calibration) == 80 and "golden" not in sel.excluded
    nulls = _catalog(golden_per_day=0).assign(sample_kind=None)
    assert len(select_training_data(nulls, window_days=4, holdout_share=0.3).train) == len(sel.train)
