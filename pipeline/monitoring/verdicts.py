"""The window verdict log (``<state>/windows.parquet``): append-only, one row per window and model version.

The verdict, report picture and alert of a window are kept as the champion of that moment made them. A later model
that tests the same window again (the nightly re-monitors the last days after a retrain) adds a row beside the
first, marked ``original=False``; nothing already written changes. Readers that need *the* verdict of a window take
the original one (:func:`window_verdicts`); the retrain's exclusion of alerted windows reads every row
(``pipeline.training.retrain.alert_windows``: a window any model called drifted stays out of training; an open
alert counts from the original row only).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pandas as pd

from pipeline.common import atomic
from pipeline.handoff.state import read_verdicts, state_dir, windows_table_path  # noqa: F401 - re-exported

VERDICT_KEYS = ["line", "window_id", "model_version"]


def _verdict_rows(outcomes: list[Any]) -> pd.DataFrame:
    now = pd.Timestamp.now(tz="UTC")
    return pd.DataFrame([{
        "line": o.line, "window_id": o.window_id, "model_version": str(o.model_version), "original": False,
        "start": o.start, "end": o.end, "detected": o.detected, "alert_active": o.alert_active,
        "fired": ",".join(o.fired), "causes": ",".join(o.causes), "top_axis": -1 if o.top_axis is None else o.top_axis,
        "n_images": o.n_images, "n_tested": o.n_tested, "n_anomalous": o.n_anomalous, "description": o.description,
        "summary": o.summary, "report": o.report or "", "example_serials": ",".join(o.example_serials),
        "shift_since": o.shift_since, "tested_at": now,
    } for o in outcomes])


def record_verdicts(settings: Any, model_version: str, outcomes: list[Any]) -> list[Any]:
    """Append the verdicts of this pass to :func:`windows_table_path`, never changing a row already there.

    A window's first verdict is its ``original``; the same window tested again by another model version is stored
    beside it; by the same model version again, nothing is written (the first row stays as made).

    Returns:
        The outcomes with ``original`` set.
    """
    if not outcomes:
        return outcomes
    path = windows_table_path(settings)
    old = read_verdicts(path) if path.exists() else pd.DataFrame(columns=[*VERDICT_KEYS, "original"])
    first_by = {(str(r.line), str(r.window_id)): str(r.model_version)
                for r in old[old["original"].astype(bool)].itertuples(index=False)}
    seen_rows = set(zip(old["line"].astype(str), old["window_id"].astype(str), old["model_version"], strict=True))
    originals = {(o.line, o.window_id) for o in outcomes} - set(first_by)
    # a rerun by the model that made the original verdict is that verdict again (nothing new is written for it)
    out = [replace(o, original=(o.line, o.window_id) in originals
                   or first_by.get((o.line, o.window_id)) == str(model_version)) for o in outcomes]
    new = _verdict_rows([o for o in out if (o.line, o.window_id, str(model_version)) not in seen_rows])
    if len(new):
        new["original"] = [(r.line, r.window_id) in originals for r in new.itertuples(index=False)]
        merged = pd.concat([old, new], ignore_index=True) if len(old) else new
        atomic.write_parquet(path, merged)
    return out


def window_verdicts(settings: Any, *, which: str = "original") -> pd.DataFrame:
    """The verdicts of every window: ``"original"`` (the one its alert was made from), ``"latest"`` or ``"all"``.

    Returns:
        One row per window (``"original"``, ``"latest"``) or per window and model version (``"all"``).
    """
    if which not in ("original", "latest", "all"):
        raise ValueError(f"which must be 'original', 'latest' or 'all', got {which!r}")
    path = windows_table_path(settings)
    if not path.exists():
        return pd.DataFrame(columns=[*VERDICT_KEYS, "original", "detected", "alert_active"])
    df = read_verdicts(path)
    if which == "original":
        df = df[df["original"].astype(bool)]
    elif which == "latest":
        df = df.drop_duplicates(["line", "window_id"], keep="last")
    return df.reset_index(drop=True)


__all__ = ["VERDICT_KEYS", "record_verdicts", "window_verdicts", "windows_table_path"]
