"""What a monitor pass leaves for people: drift report pictures and one MLflow monitoring run per line.

:func:`draw_reports` draws the report of every drifted window once per model version (``report_path``; a report
already drawn is kept as it is); :func:`log_run` logs each line's windows, charts, reports and axis cards through
``pipeline.tracking`` (the only module that calls MLflow).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipeline.handoff.state import state_dir
from pipeline.monitoring.champion import Champion
from pipeline.monitoring.tables import axis_descriptions

if TYPE_CHECKING:
    from pipeline.monitoring.config import MonitorConfig, WindowOutcome

logger = logging.getLogger(__name__)


def example_images(settings: Any, frame: pd.DataFrame, k: int = 4) -> tuple[list[str], list[str]]:
    """The ``k`` images of a window with the highest anomaly scores: (stored file paths, MES serials)."""
    from pipeline.catalog.tables import resolve_store_path, serial_of

    top = frame.sort_values("score", ascending=False).head(k)
    paths = [str(resolve_store_path(settings.catalog_root, p)) for p in top["store_path"]]
    serials = [serial_of(p) for p in top["source_path"]] if "source_path" in top.columns else []
    return paths, serials


def report_path(settings: Any, line: str, window_id: str, model_version: str) -> Path:
    """Where the drift report of a window made by a model version goes (one file per verdict, never replaced)."""
    safe = window_id.replace("/", "-")
    return state_dir(settings) / "reports" / f"drift_{line}_{safe}_v{model_version}.png"


def _card_path(settings: Any, champ: Champion, axis: int | None) -> Path | None:
    """The cached card of ``axis`` under the champion (rendered with the alert), or None."""
    return None if axis is None else state_dir(settings) / "axes" / champ.model_id / f"axis_{axis:02d}.png"


def draw_reports(settings: Any, champ: Champion, outcomes: list[WindowOutcome],
                  results: dict[tuple[str, str], tuple[Any, pd.DataFrame]]) -> list[WindowOutcome]:
    """Draw the report of every drifted window; a report already drawn by this model version is kept as it is."""
    from pipeline.monitoring.report import drift_report

    out = []
    history = [(o.window_id, results[(o.line, o.window_id)][0]) for o in outcomes]
    for o in outcomes:
        if not o.detected:
            out.append(o)
            continue
        path = report_path(settings, o.line, o.window_id, champ.version)
        if path.exists():
            out.append(replace(o, report=str(path)))
            continue
        res, frame = results[(o.line, o.window_id)]
        line_history = [h for h, o2 in zip(history, outcomes, strict=True) if o2.line == o.line]
        examples, serials = example_images(settings, frame)
        try:
            drift_report(res, line_history, axis=o.top_axis, description=o.description,
                         example_images=examples, example_labels=serials, out_path=path,
                         title=f"line {o.line}, window {o.window_id}, model v{champ.version}",
                         summary=o.explanation, axis_card=_card_path(settings, champ, o.top_axis),
                         heatmaps=o.heatmaps)
            out.append(replace(o, report=str(path)))
        except Exception:  # noqa: BLE001 - the picture is a convenience
            logger.exception("drift report failed for %s %s", o.line, o.window_id)
            out.append(o)
    return out


def _axis_labels(settings: Any, champ: Champion) -> dict[int, str]:
    """What each axis of the champion means (``{3: "brightness (r = 0.94)"}``), from the cached descriptions."""
    try:
        return {d.axis: d.text.split(": ", 1)[-1] for d in axis_descriptions(settings, champ)}
    except Exception:  # noqa: BLE001 - labels are a convenience of the logged table
        logger.exception("axis descriptions unavailable for model %s", champ.model_id)
        return {}


def log_run(settings: Any, champ: Champion, outcomes: list[WindowOutcome],
             results: dict[tuple[str, str], tuple[Any, pd.DataFrame]], config: MonitorConfig) -> str | None:
    """One MLflow monitoring run per line (``pipeline.tracking.monitoring``); returns the first line's run id."""
    if not outcomes:
        return None
    labels = _axis_labels(settings, champ)
    runs = [_log_line_run(settings, champ, [o for o in outcomes if o.line == line], results, config, labels)
            for line in dict.fromkeys(o.line for o in outcomes)]
    return runs[0]


def _log_line_run(settings: Any, champ: Champion, outcomes: list[WindowOutcome],
                  results: dict[tuple[str, str], tuple[Any, pd.DataFrame]], config: MonitorConfig,
                  labels: dict[int, str]) -> str:
    from pipeline import tracking

    line, first, last = outcomes[0].line, outcomes[0].window_id, outcomes[-1].window_id
    span = first if first == last else f"{first}..{last}"
    with tracking.start_monitoring_run(
        f"monitor {line} {span}",
        tags={"line": line, "model_version": champ.version, "model_id": champ.model_id, "null": config.null,
              "window_by": config.window_by},
    ) as run_id:
        tracking.log_params_flat({"monitor": {k: (str(v) if v is not None else "none") for k, v in
                                              asdict(config).items()}, "model_version": champ.version})
        tracking.link_model_version(settings.model_name, champ.version)
        tracking.log_monitored_images(pd.concat([results[(o.line, o.window_id)][1] for o in outcomes]),
                                      name=f"{line} {span}")
        windows = [tracking.drift_window(
            results[(o.line, o.window_id)][0], line=o.line, window_id=o.window_id, start=o.start,
            alert_active=o.alert_active, top_axis=o.top_axis, top_effect=o.effect if o.top_axis is not None else None,
            labels=labels, n_images=o.n_images, n_anomalous=o.n_anomalous, summary=o.attribution if o.detected else "",
        ) for o in outcomes]
        tracking.log_monitoring_windows(windows, model_name=settings.model_name, model_version=champ.version,
                                        reports={o.window_id: o.report for o in outcomes if o.report})
        tracking.log_chart_windows([(o.chart, o.start) for o in outcomes])
        tracking.log_chart_windows([(o.golden_metrics, o.start) for o in outcomes], prefix="golden")
        cards = state_dir(settings) / "axes" / champ.model_id
        if cards.is_dir():
            tracking.log_artifacts(cards, "axis_cards")
        for folder in dict.fromkeys(Path(o.heatmaps[0]).parent for o in outcomes if o.heatmaps):
            tracking.log_artifacts(folder, f"heatmaps/{folder.name}")
    return run_id
