"""Monitoring runs as a quality engineer reads them: window metrics, the per-window table, the alert, the links.

One monitoring run per line and monitor pass. In it:

* **Metrics per window**, named test or axis first with ``/`` sections (the UI groups charts by the part before the
  first ``/``), each stamped with the window's start time (timestamp) and its index in the run (step):
  ``drift/detected``, ``drift/top_axis``, ``drift/top_effect``, ``drift/moved_axes``, ``drift/fired_<test>``
  (the summary); ``axes/p``, ``mmd/p``, ``mmd/stat``, ``quality/p``, ``scores/p`` (each test's p-value);
  ``axis_03/effect``, ``axis_03/ks``, ``axis_03/p``, ``axis_03/psi`` (each latent axis); whatever the caller adds
  (``scores/auc``, ``scores/tail_share``, ``quality/noise_level/effect``, ``window/n_images``); ``alert/active``.
* **One table** ``drift/windows.json`` (``MlflowClient.log_table``): one row per window and axis with ``line, window,
  axis, label, effect, ks, p, psi, significant``.
* **The description**: the alert in one sentence, the model as a link and a ``models:/`` URI.
* **Links**: the model version (tags ``linewatch.model_uri`` ...; the MLflow 3 logged model as a model input) and the
  monitored images as a dataset input with their snapshot digest.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import LoggedModelInput

from pipeline.tracking.client import client, retry, settings
from pipeline.tracking.registry import get_model_version, model_uri
from pipeline.tracking.runs import (
    log_artifact,
    log_dataset,
    log_metrics,
    log_table,
    run_id_or_current,
    set_description,
    set_tags,
    timestamp_ms,
)
from pipeline.tracking.ui import model_version_page

WINDOW_TABLE = "drift/windows.json"
"""Artifact of the per-window, per-axis table."""
TABLE_COLUMNS = ("line", "window", "axis", "label", "effect", "ks", "p", "psi", "significant")
TEST_NAMES = {"axes": "latent axes (KS)", "mmd": "MMD over all axes", "quality": "image quality",
              "scores": "anomaly scores"}
_AXIS_STATS = {"effect": "effect", "ks": "ks", "p": "p", "psi": "psi"}


def axis_key(axis: int) -> str:
    """Metric section of a latent axis: ``axis_03`` (zero-padded to two digits)."""
    axis = int(axis)
    if axis < 0:
        raise ValueError(f"axis index must be >= 0, got {axis}")
    return f"axis_{axis:02d}"


@dataclass(frozen=True)
class DriftWindowMetrics:
    """One monitoring window, in the shape ``log_drift_window`` logs (build it with :func:`drift_window`).

    Attributes:
        detected: Whether the window was declared drifted.
        mmd_stat: Multivariate statistic (MMD^2) of the window, or None.
        mmd_p: Its p-value, or None.
        axes: Per-axis statistics, ``{axis: {"effect", "ks", "p", "psi", "significant"}}``.
        extra: Further scalar metrics, logged under their own names (``scores/auc``, ``window/n_images``).
        fired: Tests that fired (``axes``, ``mmd``, ``quality``, ``scores``).
        family_p: p-value of each test.
        top_axis: The axis that moved most when the latent tests fired, else None.
        top_effect: Its signed effect (reference standard deviations).
        alert_active: Whether an alert is open for the line after this window (None: unknown).
        line: Production line.
        window_id: Window name (``2026-01-13``).
        start: Window start; the metrics' timestamp.
        labels: What each axis means (``{3: "brightness (r = 0.94)"}``).
        summary: The attribution sentence (``axis 3 (brightness, r = 0.94) moved by -1.8 σ; ...``).
    """

    detected: bool
    mmd_stat: float | None = None
    mmd_p: float | None = None
    axes: Mapping[int, Mapping[str, float]] = field(default_factory=dict)
    extra: Mapping[str, float] = field(default_factory=dict)
    fired: tuple[str, ...] = ()
    family_p: Mapping[str, float] = field(default_factory=dict)
    top_axis: int | None = None
    top_effect: float | None = None
    alert_active: bool | None = None
    line: str = ""
    window_id: str = ""
    start: dt.datetime | None = None
    labels: Mapping[int, str] = field(default_factory=dict)
    summary: str = ""


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _axis_stats(per_axis: Any) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for row in per_axis.itertuples(index=False):
        out[int(row.axis)] = {"effect": float(row.effect_size), "ks": float(row.ks_stat), "p": float(row.p_value),
                              "psi": float(getattr(row, "psi", float("nan"))),
                              "significant": float(bool(row.significant))}
    return out


def _image_level(result: Any) -> dict[str, float]:
    """The image-level statistics of a drift result: anomaly-score AUC and tail share, quality-channel shifts."""
    out: dict[str, float] = {}
    for attr, key in (("score_stat", "scores/auc"), ("score_tail", "scores/tail_share"),
                      ("quality_stat", "quality/max_shift_sd")):
        if getattr(result, attr, None) is not None:
            out[key] = float(getattr(result, attr))
    per_channel = getattr(result, "per_channel", None)
    if per_channel is not None:
        for r in per_channel.itertuples(index=False):
            out[f"quality/{r.channel}/effect"] = float(r.effect_size)
    return out


def drift_window(result: Any, *, line: str, window_id: str, start: dt.datetime | None, alert_active: bool | None,
                 top_axis: int | None, top_effect: float | None = None, labels: Mapping[int, str] | None = None,
                 n_images: int | None = None, n_anomalous: int | None = None, summary: str = "") -> DriftWindowMetrics:
    """A window's metrics from its ``pipeline.analysis.drift.DriftResult`` and the monitor's verdict."""
    extra = _image_level(result)
    if n_images is not None:
        extra["window/n_images"] = float(n_images)
        if n_anomalous is not None:
            extra["window/anomalous_share"] = n_anomalous / max(n_images, 1)
    return DriftWindowMetrics(
        detected=bool(result.detected), mmd_stat=float(result.mmd_stat), mmd_p=float(result.mmd_p),
        axes=_axis_stats(result.per_axis), extra=extra, fired=tuple(result.fired or ()),
        family_p={k: float(v) for k, v in (result.family_p or {}).items()}, top_axis=top_axis,
        top_effect=top_effect, alert_active=alert_active, line=line, window_id=window_id, start=start,
        labels=dict(labels or {}), summary=summary,
    )


def _summary_metrics(window: Any, axes: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    out = {"drift/detected": float(bool(_field(window, "detected", False))),
           "drift/moved_axes": float(sum(bool(s.get("significant", 0)) for s in axes.values()))}
    top, effect = _field(window, "top_axis"), _field(window, "top_effect")
    if top is not None:
        out["drift/top_axis"] = float(top)
        if effect is None and int(top) in axes:
            effect = axes[int(top)].get("effect")
    if effect is not None:
        out["drift/top_effect"] = float(effect)
    fired = set(_field(window, "fired", ()) or ())
    for test in dict(_field(window, "family_p", {}) or {}):
        out[f"drift/fired_{test}"] = float(test in fired)
    return out


def window_metrics(window: DriftWindowMetrics | Mapping[str, Any] | Any) -> dict[str, float]:
    """The metrics of one window by name (see the module docstring); ``window`` may also be a mapping."""
    axes = {int(a): dict(s) for a, s in dict(_field(window, "axes", {}) or {}).items()}
    metrics = _summary_metrics(window, axes)
    for test, p in dict(_field(window, "family_p", {}) or {}).items():
        metrics[f"{test}/p"] = float(p)
    for src, dst in (("mmd_stat", "mmd/stat"), ("mmd_p", "mmd/p")):
        if _field(window, src) is not None:
            metrics[dst] = float(_field(window, src))
    for axis, stats in sorted(axes.items()):
        for stat, value in stats.items():
            if value is not None and stat != "significant":
                metrics[f"{axis_key(axis)}/{_AXIS_STATS.get(stat, stat)}"] = float(value)
    metrics.update({k: float(v) for k, v in dict(_field(window, "extra", {}) or {}).items()})
    if _field(window, "alert_active") is not None:
        metrics["alert/active"] = float(bool(_field(window, "alert_active")))
    return metrics


def log_drift_window(step: int, window: DriftWindowMetrics | Mapping[str, Any] | Any, *,
                     run_id: str | None = None, timestamp: dt.datetime | None = None) -> dict[str, float]:
    """Log one window's metrics at ``step`` (its index in the run), stamped with the window's start time.

    Args:
        step: Window index (monotone over the run).
        window: A ``DriftWindowMetrics``, or a mapping / object with the same field names.
        run_id: Run (default: the current one).
        timestamp: Metric time (default: the window's ``start``, else now).

    Returns:
        The metrics logged.
    """
    metrics = window_metrics(window)
    ts = timestamp_ms(timestamp if timestamp is not None else _field(window, "start"))
    log_metrics(metrics, step=step, run_id=run_id_or_current(run_id), timestamp_ms=ts)
    return metrics


def set_alert_tags(*, active: bool, level: str = "", moved_axes: Sequence[int] = (), message: str = "",
                   run_id: str | None = None) -> None:
    """Tag the run's alert state: ``alert.active``, ``alert.level``, ``alert.moved_axes``, ``alert.message``."""
    set_tags({
        "alert.active": str(bool(active)).lower(),
        "alert.level": level or "-",
        "alert.moved_axes": ",".join(axis_key(a) for a in moved_axes) or "-",
        "alert.message": (message or "-")[:5000],
    }, run_id=run_id_or_current(run_id))


def log_alert_state(*, active: bool, step: int = 0, level: str = "", moved_axes: Sequence[int] = (),
                    message: str = "", state: Mapping[str, Any] | None = None, run_id: str | None = None,
                    timestamp: dt.datetime | None = None) -> None:
    """Record the alert state of a monitoring run.

    Logs metric ``alert/active`` (0/1) at ``step`` and ``timestamp`` (the window start; default now), the tags of
    :func:`set_alert_tags` and, when ``state`` is given, the JSON file ``alerts/state_<step>.json``.
    """
    rid = run_id_or_current(run_id)
    log_metrics({"alert/active": float(bool(active))}, step=step, run_id=rid, timestamp_ms=timestamp_ms(timestamp))
    set_alert_tags(active=active, level=level, moved_axes=moved_axes, message=message, run_id=rid)
    if state is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"state_{int(step):04d}.json"
            path.write_text(json.dumps(dict(state), indent=1, default=str))
            log_artifact(path, "alerts", run_id=rid)


def window_table(windows: Sequence[DriftWindowMetrics]) -> Any:
    """One row per window and axis: ``line, window, axis, label, effect, ks, p, psi, significant``."""
    import pandas as pd

    rows = [{"line": w.line, "window": w.window_id, "axis": int(a), "label": w.labels.get(int(a), ""),
             "effect": s.get("effect"), "ks": s.get("ks"), "p": s.get("p"), "psi": s.get("psi"),
             "significant": bool(s.get("significant", 0))}
            for w in windows for a, s in sorted(w.axes.items())]
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def log_window_table(windows: Sequence[DriftWindowMetrics], *, run_id: str | None = None) -> None:
    """Log :func:`window_table` as the run's table ``drift/windows.json``."""
    log_table(window_table(windows), WINDOW_TABLE, run_id=run_id)


def _tests_text(fired: Sequence[str]) -> str:
    return ", ".join(TEST_NAMES.get(t, t) for t in fired) or "none"


def alert_sentence(windows: Sequence[DriftWindowMetrics]) -> str:
    """The run's verdict in one sentence: the last drifted window (line, date, what moved, tests), or no drift."""
    if not windows:
        return "No window was tested."
    line, first, last = windows[0].line, windows[0].window_id, windows[-1].window_id
    drifted = [w for w in windows if w.detected]
    span = first if first == last else f"{first} to {last}"
    if not drifted:
        return f"No drift on line {line} in {len(windows)} window(s), {span}."
    w = drifted[-1]
    state = "alert open" if w.alert_active else "no alert open"
    count = f" ({len(drifted)} of {len(windows)} windows drifted)" if len(windows) > 1 else ""
    what = w.summary.strip().rstrip(".") or "drift detected"
    return (f"Drift on line {line}, window {w.window_id} ({state}): {what}; tests that fired: "
            f"{_tests_text(w.fired)}{count}.")


def _model_link(name: str, version: int | str) -> str:
    return f"[{name} v{int(version)}]({model_version_page(name, version)}) (`{model_uri(name, version)}`)"


def describe_monitoring_run(windows: Sequence[DriftWindowMetrics], *, model_name: str, model_version: int | str,
                            reports: Sequence[str] = (), run_id: str | None = None) -> str:
    """Write the run description: the alert sentence, then the model, the table and the reports; returns it."""
    lines = [alert_sentence(windows), "", f"- **Model:** {_model_link(model_name, model_version)}",
             f"- **Per-window, per-axis table:** `{WINDOW_TABLE}` (Artifacts)"]
    if reports:
        lines.append("- **Drift reports:** " + ", ".join(f"`{r}`" for r in reports))
    text = "\n".join(lines)
    set_description(text, run_id=run_id)
    return text


def link_model_version(name: str, version: int | str, *, run_id: str | None = None) -> str:
    """Link the run to the model version it used.

    Tags ``linewatch.model_uri`` (``models:/<name>/<version>``), ``linewatch.model_name``, ``linewatch.model_version``
    and, for an MLflow 3 logged model, ``linewatch.model_id`` and the model as a run input.

    Returns:
        The ``models:/`` URI.
    """
    rid = run_id_or_current(run_id)
    uri = model_uri(name, version)
    set_tags({"linewatch.model_uri": uri, "linewatch.model_name": name, "linewatch.model_version": int(version)},
             run_id=rid)
    model_id = get_model_version(version, name=name).model_id
    if model_id:
        set_tags({"linewatch.model_id": model_id}, run_id=rid)
        retry("link run to model", lambda: client().log_inputs(rid, models=[LoggedModelInput(model_id)]))
    return uri


def monitored_images_digest(frame: Any) -> str:
    """The snapshot digest of a set of catalog rows (``image_id``, ``sha256``), as ``catalog.snapshot`` computes it."""
    from pipeline.catalog.tables import snapshot_digest

    return snapshot_digest(zip(frame["image_id"].astype(str), frame["sha256"].astype(str), strict=True))


def log_monitored_images(frame: Any, *, name: str, source: str | None = None, run_id: str | None = None) -> str:
    """Log the monitored catalog rows as the run's ``monitoring`` dataset input (name, digest, source, profile).

    Args:
        frame: Catalog rows (``image_id``, ``sha256``; ``line``, ``captured_at``, ``product_type`` kept if present).
        name: Dataset name (``L1 2026-01-11..2026-01-13``).
        source: Where the images are (default: the catalog root).
        run_id: Run (default: the current one).

    Returns:
        The digest.
    """
    keep = [c for c in ("image_id", "sha256", "line", "captured_at", "product_type") if c in frame.columns]
    rows = frame[keep].drop_duplicates("image_id").copy()
    if "captured_at" in rows.columns:
        rows["captured_at"] = rows["captured_at"].astype(str)
    digest = monitored_images_digest(rows)
    log_dataset(rows.reset_index(drop=True), name=name, digest=digest, context="monitoring", run_id=run_id,
                source=source or Path(settings().catalog_root).resolve().as_uri())
    return digest


def report_artifact(line: str, window_id: str) -> str:
    """Artifact path of a window's drift report: ``reports/drift_<line>_<window>.png``."""
    return f"reports/drift_{line}_{str(window_id).replace('/', '-')}.png"


def log_report(path: str | Path, *, line: str, window_id: str, run_id: str | None = None) -> str:
    """Upload a window's drift report as :func:`report_artifact`; returns the artifact path."""
    artifact = report_artifact(line, window_id)
    log_artifact(path, str(Path(artifact).parent), run_id=run_id, name=Path(artifact).name)
    return artifact


def log_monitoring_windows(windows: Sequence[DriftWindowMetrics], *, model_name: str, model_version: int | str,
                           reports: Mapping[str, str] | None = None, run_id: str | None = None) -> list[str]:
    """Log a line's windows into its monitoring run: metrics, alert tags, table, reports, description.

    Each window's metrics are logged at step = its index in the run and timestamp = its start.

    Args:
        windows: The line's windows in time order.
        model_name: Registered model used.
        model_version: Its version.
        reports: ``{window_id: local drift report PNG}``.
        run_id: Run (default: the current one).

    Returns:
        The uploaded report artifacts.
    """
    rid = run_id_or_current(run_id)
    for step, w in enumerate(windows):
        log_drift_window(step, w, run_id=rid)
    if windows:
        last = windows[-1]
        moved = [w.top_axis for w in windows if w.detected and w.top_axis is not None][-1:]
        set_alert_tags(active=bool(last.alert_active), level="drift" if last.detected else "", moved_axes=moved,
                       message=alert_sentence(windows), run_id=rid)
        log_window_table(windows, run_id=rid)
    uploaded = [log_report(p, line=windows[0].line, window_id=wid, run_id=rid) for wid, p in (reports or {}).items()]
    describe_monitoring_run(windows, model_name=model_name, model_version=model_version, reports=uploaded, run_id=rid)
    return uploaded


def log_chart_windows(points: Sequence[tuple[Mapping[str, float], dt.datetime | None]], *,
                      run_id: str | None = None, prefix: str = "spc") -> int:
    """Log the control chart's numbers of a line's windows (``spc/value``, ``spc/limit``, ...), one step per window.

    With ``prefix="golden"`` the same for the golden-sample check's numbers (``golden_alarm`` -> ``golden/alarm``).

    Each window's metrics are stamped with its start time and logged at its index in the run (the same step as
    :func:`log_drift_window`), so the MLflow UI draws the chart as curves over the windows' dates.

    Args:
        points: per window (in time order), its chart metrics (``pipeline.monitoring.charts.point_metrics``; empty
            when the chart did not run) and its start.
        run_id: Run (default: the current one).
        prefix: the metrics' group (``spc`` or ``golden``); a key's ``<prefix>_`` start is dropped.

    Returns:
        The windows logged.
    """
    rid, n = None, 0
    for step, (metrics, start) in enumerate(points):
        if not metrics:
            continue
        rid = rid or run_id_or_current(run_id)
        named = {f"{prefix}/{k.removeprefix(prefix + '_')}": float(v) for k, v in metrics.items()}
        log_metrics(named, step=step, run_id=rid, timestamp_ms=timestamp_ms(start))
        n += 1
    return n

