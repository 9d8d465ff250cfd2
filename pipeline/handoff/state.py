"""The state the two jobs share: the state folder, the tables one job writes and the other reads, the aliases.

The monitor writes per-image flags (``scores.parquet``) and window verdicts (``windows.parquet``); the nightly retrain
reads both to keep flagged images and drifted windows out of training. The retrain registers models under the
``champion`` / ``challenger`` aliases; the monitor loads the champion. :class:`MonitorHooks` is what the retrain asks
of the monitor, wired by whoever runs both jobs (the flows, the demo), so neither job imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAMPION = "champion"
"""Registry alias of the model the monitor uses."""
CHALLENGER = "challenger"
"""Registry alias of the latest candidate the gate refused."""


def state_dir(settings: Any) -> Path:
    """The jobs' state folder (``settings.state_dir``: locks, tables, alerts, reports), created when missing."""
    path = Path(settings.state_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def scores_table_path(settings: Any) -> Path:
    """Per-image scores and flags, one row per image and model (written by the monitor, read by the retrain)."""
    return state_dir(settings) / "scores.parquet"


def windows_table_path(settings: Any) -> Path:
    """Per-window verdicts, append-only: one row per (``line``, ``window_id``, ``model_version``).

    Columns: ``line, window_id, model_version, original, start, end, detected, alert_active, fired, causes,
    top_axis, n_images, n_tested, n_anomalous, description, summary, report, example_serials, shift_since,
    tested_at``.
    ``original`` marks the first verdict of a window (the one its alert was made from); a later model's
    re-evaluation is a further row (``pipeline.monitoring.verdicts``). Written by the monitor; the retrain keeps
    drifted and alerted windows out of training.
    """
    return state_dir(settings) / "windows.parquet"


def read_verdicts(path: Path) -> Any:
    """The verdict table at ``path`` (a DataFrame), with the columns later versions added filled in for older rows.

    A table from before append-only verdicts has one original row per window; rows from before the chart's change
    point was kept have an empty ``shift_since``.
    """
    import pandas as pd

    df = pd.read_parquet(path)
    if "original" not in df.columns:
        df["original"] = True
    if "shift_since" not in df.columns:
        df["shift_since"] = ""
    df["shift_since"] = df["shift_since"].fillna("").astype(str)
    df["model_version"] = df["model_version"].astype(str)
    return df


def ops_alerts_path(settings: Any) -> Path:
    """Operations events of the retrain (a refused or failed candidate), one JSON object per line."""
    return state_dir(settings) / "ops_alerts.jsonl"


@dataclass(frozen=True)
class MonitorHooks:
    """What the retrain asks of the monitor, given by whoever wires the two jobs (the flows, the demo).

    ``pipeline.monitoring.monitor.retrain_hooks(settings, monitor_config)`` builds them; training never imports
    monitoring. Without hooks the gate still checks the reference size against the drift detector's own minimum,
    and ops alerts go to ``<state>/ops_alerts.jsonl`` and the log only.

    Attributes:
        check_bundle: the problems the monitor would have with a model folder (``[]``: it can use it).
        reference_floor: fewest reference images the monitor's drift test needs.
        reference_problem: why the monitor's drift test could not be calibrated on a calibration snapshot
            (its rows); None when it can.
        notify_ops: sends an operations event through the monitor's alert delivery
            (``AlertManager.notify_ops(kind, message, key=..., **payload)``).
    """

    check_bundle: Callable[[Path], list[str]] | None = None
    reference_floor: int | None = None
    reference_problem: Callable[[Any], str | None] | None = None
    notify_ops: Callable[..., Any] | None = None
