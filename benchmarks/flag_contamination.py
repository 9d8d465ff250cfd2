"""Why a soak's per-image flags miss the configured false-flag rate: the calibration cells are not all healthy.

The flag threshold is the configured rate's quantile of the calibration cells' out-of-period patch scores. Those cells
are production, defective ones included. For each model of a soak whose calibration cells' scores are kept (in its
bundle's patch family, ``linewatch/patches.npz`` under the MLflow artifacts, or in the monitor's patch cache of older
bundles, ``state/patches/<model id>/*.reference.npz``), this reports the share of p = 1 cells among its calibration
cells and the rate at which its own threshold flags their healthy (p < 1) cells; and, for the monitored days of the
soak, the healthy cells' flag rate with the line-day offset (what the monitor flagged) and without it.

Command::

    python -m benchmarks.flag_contamination --name soak_s30
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import common as C

__all__ = ["calibration_rows", "calibration_scores", "day_rates", "day_rule_rates", "main"]


def _truth(home: Path) -> pd.DataFrame:
    """Image id -> truth (``prob``, ``line``, ``day``) of a soak's catalogued cells."""
    from pipeline.catalog.tables import read_catalog

    cat = read_catalog(home, columns=["image_id", "source_path"])
    cat["serial"] = cat["source_path"].map(lambda p: Path(str(p)).stem)
    return cat.merge(pd.read_parquet(home / "truth.parquet"), on="serial")[["image_id", "prob", "line", "day"]]


def calibration_scores(home: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Model id -> (calibration image ids, their out-of-period patch scores), from bundles and monitor caches."""
    import json

    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path in sorted((home / "mlartifacts").glob("**/linewatch/patches.npz")):
        gate = path.parent / "gate.json"
        if gate.is_file():
            with np.load(path, allow_pickle=False) as z:
                out[str(json.loads(gate.read_text())["model_id"])] = (z["image_id"].astype(str),
                                                                      z["ref_scores"].astype(np.float64))
    for path in sorted((home / "state" / "patches").glob("*/*.reference.npz")):
        if path.parent.name not in out:
            with np.load(path, allow_pickle=False) as z:
                out[path.parent.name] = (z["image_id"].astype(str), z["scores"].astype(np.float64))
    return out


def calibration_rows(home: Path, scores: pd.DataFrame, truth: pd.DataFrame) -> list[dict[str, Any]]:
    """Per kept model: calibration cells, their p = 1 share, and the healthy share its threshold flags."""
    out = []
    for model_id, d in _fused_reference(home, truth).items():
        thr = scores.loc[scores["model_id"] == model_id, "threshold"]
        if thr.empty:
            continue
        healthy = d["prob"] < 1
        out.append({"model_id": model_id, "cells": len(d), "p1_share": float((d["prob"] >= 1).mean()),
                    "threshold": float(thr.iloc[0]), "healthy_flagged": float((d.loc[healthy, "s"] > thr.iloc[0]).mean())})
    return out


def day_rates(scores: pd.DataFrame, truth: pd.DataFrame, days: pd.DataFrame | None = None) -> dict[str, float]:
    """Healthy (p < 1) and p = 1 cells' flag rates, with and without the line-day offset.

    Each cell is taken under the first model that scored it (the day's champion). With ``days`` (``line``, ``day``,
    ``status`` of ``benchmarks.soak_eval.line_days``) only the healthy, product-mix and recovery days count (the
    soak's target); else every monitored day.
    """
    first = scores.drop_duplicates("image_id", keep="first").merge(truth, on="image_id")
    if days is not None:
        first = first.merge(days[["line", "day", "status"]], on=["line", "day"])
        first = first[first["status"].isin(["healthy", "mix", "recovery"])]
    with_offset = first["score"] - first["day_offset"] > first["threshold"]
    without = first["score"] > first["threshold"]
    h, p1 = first["prob"] < 1, first["prob"] >= 1
    return {"cells": len(first), "healthy_with_offset": float(with_offset[h].mean()),
            "healthy_without_offset": float(without[h].mean()), "recall_with_offset": float(with_offset[p1].mean()),
            "recall_without_offset": float(without[p1].mean())}


def _fused_reference(home: Path, truth: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Model id -> its calibration cells' out-of-period patch scores on the threshold's scale, with their truth."""
    from pipeline.analysis.fusion import FAMILIES, ScoreFusion

    out = {}
    for model_id, (ids, raw) in calibration_scores(home).items():
        S = np.column_stack([raw, np.zeros(len(raw))])
        # the patch family alone on the threshold's scale, fitted as pipeline.analysis.fusion.fuse_families does
        fused = ScoreFusion(FAMILIES, log=(True, False), weights=(1.0, 0.0)).fit(S).score(S)
        out[model_id] = pd.DataFrame({"image_id": ids, "s": fused}).merge(truth, on="image_id", how="left")
    return out


def day_rule_rates(home: Path, scores: pd.DataFrame, truth: pd.DataFrame, days: pd.DataFrame | None = None,
                   fpr: float = 0.05, min_cells: int = 30, fence: float | None = None) -> dict[str, float]:
    """Healthy and p = 1 cells' flag rates when each cell is judged in robust units of its own line-day.

    The rule of ``pipeline.analysis.thresholds.day_thresholds``: each model's threshold in period units
    (``period_threshold``, periods of ``PERIOD_MIN_CELLS`` cells or more) from its calibration cells' out-of-period
    scores and their line-days, then each monitored day's own median and interquartile range (days of ``min_cells``
    or more, the monitor's ``min_window``; the model's own calibration cells left out of them, as the monitor does).
    Cells as in :func:`day_rates` (the first model that scored them). ``fence``: ``period_threshold``'s fence
    (None: the monitor's, ``PERIOD_FENCE``).
    """
    from pipeline.analysis.thresholds import PERIOD_FENCE, day_thresholds, period_threshold

    refs = _fused_reference(home, truth)
    first = scores.drop_duplicates("image_id", keep="first").merge(truth, on="image_id")
    first = first[first["model_id"].isin(list(refs))]
    first["key"] = first["line"].astype(str) + "|" + first["day"].astype(str)
    thr_day = pd.Series(np.nan, index=first.index)
    for model_id, rows in first.groupby("model_id"):
        ref = refs[model_id]
        unit = period_threshold(ref["s"], ref["line"].astype(str) + "|" + ref["day"].astype(str), fpr,
                                fence=PERIOD_FENCE if fence is None else fence)
        own = rows["image_id"].isin(set(ref["image_id"])).to_numpy()  # the model's calibration cells, in-sample
        thr_day[rows.index] = day_thresholds(rows["score"], rows["key"], float(rows["threshold"].iloc[0]), unit,
                                             min_cells=min_cells, basis=~own)
    if days is not None:
        keep = first.merge(days[["line", "day", "status"]], on=["line", "day"], how="left")["status"]
        sel = keep.isin(["healthy", "mix", "recovery"]).to_numpy()
        first, thr_day = first[sel], thr_day[sel]
    flagged = first["score"] > thr_day
    h, p1 = first["prob"] < 1, first["prob"] >= 1
    return {"cells": len(first), "healthy_day_rule": float(flagged[h].mean()), "recall_day_rule": float(flagged[p1].mean())}


def main(argv: list[str] | None = None) -> int:
    """Command line: print both tables for a soak."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True, help="the soak (benchmarks/out/soak/<name>)")
    ap.add_argument("--fences", default="",
                    help="also replay the line-day rule with these period fences, comma-separated (e.g. 1.5,2,3)")
    args = ap.parse_args(argv)
    try:
        fences = [float(f) for f in args.fences.split(",") if f.strip()]
    except ValueError:
        print(f"flag_contamination: --fences takes numbers separated by commas, got {args.fences!r}")
        return 2
    home = C.OUT / "soak" / args.name
    if not (home / "state" / "scores.parquet").is_file():
        print(f"flag_contamination: no scores table under {home}: run the soak first")
        return 2
    from benchmarks.soak import saved_config
    from benchmarks.soak_eval import line_days

    scores, truth = pd.read_parquet(home / "state" / "scores.parquet"), _truth(home)
    rows = calibration_rows(home, scores[scores["scorer"] == "patch"], truth)
    print(pd.DataFrame(rows).round(3).to_string(index=False) if rows else "no calibration scores kept")
    config = saved_config(home)
    days = None if config is None else line_days(config)
    print(pd.Series(day_rates(scores, truth, days)).round(3).to_string())
    patch = scores[scores["scorer"] == "patch"]
    print(pd.Series(day_rule_rates(home, patch, truth, days)).round(3).to_string())
    for fence in fences:
        rates = day_rule_rates(home, patch, truth, days, fence=fence)
        print(f"period fence {fence:g}: " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items() if k != "cells"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
