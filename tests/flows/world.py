"""A small simulated line with a strong gain fault (x0.6), ingested into a fresh LINEWATCH_HOME (shared by the job/flow tests)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

TZ = "Europe/Berlin"
DAYS = 6
PER_DAY = 30
FAULT_DAY = 5  # 1-based: days 5 and 6 are faulty
TRAIN_DAYS = 3


def day(k: int) -> dt.date:
    """1-based simulated day."""
    from pipeline.line.simulate import DEFAULT_START

    return DEFAULT_START + dt.timedelta(days=k - 1)


def midnight(k: int) -> str:
    """Local midnight starting 1-based day ``k`` (ISO 8601)."""
    return dt.datetime.combine(day(k), dt.time(0), tzinfo=ZoneInfo(TZ)).isoformat()


def set_env(monkeypatch: pytest.MonkeyPatch, home: Path, tracking_uri: str | None = None) -> None:
    """Point linewatch at ``home`` (SQLite MLflow inside unless ``tracking_uri``)."""
    monkeypatch.setenv("LINEWATCH_HOME", str(home))
    monkeypatch.setenv("LINEWATCH_TIMEZONE", TZ)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri or f"sqlite:///{home / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    for key in ("LINEWATCH_CATALOG", "LINEWATCH_DROP", "LINEWATCH_STATE", "LINEWATCH_CHECKPOINTS",
                "LINEWATCH_WEBHOOK_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LINEWATCH_MLFLOW_RETRIES", "2")
    monkeypatch.setenv("LINEWATCH_MLFLOW_BACKOFF_S", "0.05")
    monkeypatch.setenv("LINEWATCH_MLFLOW_TIMEOUT_S", "2")


def make_world(home: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    """Simulate ``DAYS`` x ``PER_DAY`` cells (gain x0.6 from ``FAULT_DAY``), ingest them; return the settings."""
    from pipeline import tracking
    from pipeline.catalog.ingest import ingest
    from pipeline.line.faults import FaultSpec
    from pipeline.line.simulate import simulate_line
    from pipeline.settings import ensure_dirs, get_settings

    set_env(monkeypatch, home)
    tracking.reset()
    settings = ensure_dirs(get_settings())
    simulate_line(settings.drop_dir, days=DAYS, per_day=PER_DAY, lines=("L1",), seed=0,
                  fault=FaultSpec("gain", start_day=FAULT_DAY - 1, severity=1.6),
                  truth=home / "truth.parquet", progress=False)
    ingest(settings.drop_dir, settings.catalog_root, progress=False)
    return settings


def tiny_retrain_params(**over: object) -> dict:
    """Retrain parameters for the tiny preset on days 1..TRAIN_DAYS (seconds, not minutes)."""
    params = {
        "preset": "tiny", "steps": 80, "batch_size": 16, "window_days": TRAIN_DAYS, "end": midnight(TRAIN_DAYS + 1),
        "holdout_share": 0.4, "min_train_images": 8, "from_scratch": True,
        # the monitor this candidate must serve (monitor_params below): the gate checks it can; min_reference_blocks=0:
        # the world's reference holds TRAIN_DAYS = 3 line-days, one fewer than the lot null's production blocks need
        # (its lot null runs on runs of consecutive images; tests/pipeline/training/test_retrain.py checks that the
        # default refuses such a reference)
        "monitor": {"min_window": 15, "quality": False, "scores": False, "min_reference_blocks": 0},
        "gate": {"recon_images": 4, "recon_steps": 4, "eval_repeats": 1, "fpr_tolerance": 0.3, "axis_std_floor": 0.005},
    }
    params.update(over)
    return params


def monitor_params(**over: object) -> dict:
    """Monitor parameters for days TRAIN_DAYS+1 .. DAYS."""
    # quality=False, scores=False: the tiny world's reference (~36 cells from one or two lots) is too small to
    # calibrate the lot null of the image-quality channels and of the anomaly scores of an 80-step tiny model (a
    # healthy day's scores differ from it at p = 0.002); tests/pipeline/test_monitor.py runs both once on their own
    # heatmaps=False: the real backbone on every alerted window would slow every monitor test; the heatmap step has
    # its own tests (tests/pipeline/monitoring/test_heatmaps.py) and one run in the golden end-to-end test
    # fusion=False: the same backbone on every cell; the fused score has its own tests
    # (tests/pipeline/monitoring/test_patches.py) and one run in tests/pipeline/monitoring/test_monitor.py
    params = {"start": midnight(TRAIN_DAYS + 1), "end": midnight(DAYS + 1), "window_by": "day", "min_window": 15,
              "cards": False, "quality": False, "scores": False, "heatmaps": False, "fusion": False}
    params.update(over)
    return params
