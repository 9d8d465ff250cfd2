"""Monitor flow: encode new images with the champion, score, test drift per window, alert, log (every 15 min).

The job is :func:`pipeline.monitoring.monitor.monitor`. Each new alert is also emitted as the Prefect event
``linewatch.drift.alert`` (resource ``linewatch.line.<line>``), which the automation built by
:func:`flows.deploy.drift_alert_automation` turns into a webhook notification.

Encoding is spread over the flow's task runner: a planning task lists the monitored images the champion has not
encoded yet in chunks, one ``encode-chunk`` task per chunk writes a part file next to the latents table, and one
``residual-chunk`` task per chunk of images without diffusion residuals (the per-image score's costly part, about
100x an encoding) writes a residual part (both mapped, so on Dask each chunk runs on a worker); the pass (scoring,
drift, alerts) then folds the parts into the tables as their single writer and runs as one task: it needs every
window's latents together. :func:`flows.runners.
with_task_runner` picks the runner from ``LINEWATCH_TASK_RUNNER`` (``dask``: a ``prefect_dask.DaskTaskRunner``;
workers need the catalog and the checkpoint folder on a shared file system).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import flow, task, unmapped

from flows import job_task_options
from flows.runners import with_task_runner

ALERT_EVENT = "linewatch.drift.alert"


@task(name="monitor-windows", timeout_seconds=3600, **job_task_options())
def monitor_task(config: Any) -> dict[str, Any]:
    """Run one monitor pass (``pipeline.monitoring.monitor.monitor``) and return its result as a dict.

    A retry is safe: encoding resumes from the latents table and the alert manager's persisted state keeps an
    alert from being sent twice.
    """
    from pipeline.monitoring.monitor import monitor
    from pipeline.settings import ensure_dirs, get_settings

    settings = ensure_dirs(get_settings())
    res = monitor(settings, config)
    for w in res.windows:
        verdict = f"DRIFT {', '.join(w.causes)} ({w.description})" if w.detected else "no drift"
        print(f"monitor: line {w.line} window {w.window_id}: n={w.n_images}, {w.n_anomalous} anomalous, {verdict}")
    return res.to_dict()


@task(name="plan-encoding", **job_task_options())
def plan_encoding_task(config: Any, chunk_size: int) -> dict[str, Any]:
    """Chunks of monitored images the champion has not encoded yet (``pipeline.monitoring.scoring.encoding_plan``)."""
    from pipeline.monitoring.monitor import encoding_plan
    from pipeline.settings import ensure_dirs, get_settings

    return encoding_plan(ensure_dirs(get_settings()), config, chunk_size)


@task(name="encode-chunk", timeout_seconds=3600, **job_task_options())
def encode_chunk_task(checkpoint_dir: str, records: list[dict[str, str]]) -> str:
    """Encode one chunk into a part file (``pipeline.monitoring.scoring.encode_chunk``); a retry rewrites the same part."""
    from pipeline.monitoring.monitor import encode_chunk
    from pipeline.settings import ensure_dirs, get_settings

    return encode_chunk(ensure_dirs(get_settings()), checkpoint_dir, records)


@task(name="residual-chunk", timeout_seconds=3600, **job_task_options())
def residual_chunk_task(checkpoint_dir: str, scoring: dict[str, Any], records: list[dict[str, str]]) -> str:
    """Diffusion residuals of one chunk into a part file (``pipeline.monitoring.scoring.residual_chunk``); retry-safe."""
    from pipeline.monitoring.monitor import residual_chunk
    from pipeline.settings import ensure_dirs, get_settings

    return residual_chunk(ensure_dirs(get_settings()), checkpoint_dir, scoring, records)


def default_chunk_size(env: Mapping[str, str] | None = None) -> int:
    """Chunked encoding is on (1024 images per task) when the flows run on Dask, off (0) on the thread runner."""
    from flows.runners import runner_name

    return 1024 if runner_name(env) == "dask" else 0


def skip_reason() -> str | None:
    """Why a monitor run has nothing to do (a new line without a champion yet); None when it can run."""
    from pipeline.monitoring.monitor import NO_CHAMPION_YET, champion_version
    from pipeline.settings import get_settings

    return NO_CHAMPION_YET if champion_version(get_settings()) is None else None


def emit_alert_events(result: dict[str, Any]) -> int:
    """Emit ``linewatch.drift.alert`` for every window whose alert events were produced in this run.

    Returns:
        How many events were emitted (events that fail to send are logged, never raised).
    """
    from prefect.events import emit_event

    n = 0
    for w in result.get("windows", []):
        if not w.get("events") or not w.get("detected"):
            continue
        try:
            emit_event(
                event=ALERT_EVENT,
                resource={"prefect.resource.id": f"linewatch.line.{w['line']}",
                          "prefect.resource.name": f"line {w['line']}"},
                related=[{"prefect.resource.id": f"linewatch.model.v{result['model_version']}",
                          "prefect.resource.role": "model"}],
                payload={
                    "line": w["line"], "window_id": w["window_id"], "top_axis": w["top_axis"],
                    "description": w["description"], "effect": w["effect"], "summary": w["summary"],
                    "attribution": w["attribution"], "model_version": result["model_version"],
                    "report": w.get("report"), "causes": list(w.get("causes", ())),
                    "example_serials": list(w.get("example_serials", ())),
                    "events": [f"{e.get('kind')} {e.get('alert', {}).get('cause', '')}".strip()
                               for e in w["events"]],
                },
            )
            n += 1
        except Exception:  # noqa: BLE001 - events are notifications; the alert manager's sinks already ran
            pass
    return n


@flow(name="linewatch-monitor", log_prints=True, timeout_seconds=2 * 3600)
def monitor_flow(
    lines: list[str] | None = None,
    start: str | None = None,
    end: str | None = None,
    lookback_days: float = 2.0,
    window_by: str = "day",
    window_size: int | None = None,
    alpha: float = 0.01,
    null: str = "lot",
    min_window: int = 30,
    cards: bool = True,
    report: bool = True,
    heatmaps: bool = True,
    fusion: bool = True,
    residual_weight: float = 0.0,
    recentre: bool = True,
    quality: bool = True,
    scores: bool = True,
    encode_chunk_size: int | None = None,
) -> dict[str, Any]:
    """Monitor the recent catalog windows with the champion.

    Args:
        lines: Only these lines.
        start: First capture time (ISO 8601; default ``lookback_days`` before the newest image).
        end: End of the period (ISO 8601, exclusive).
        lookback_days: Period monitored without ``start``.
        window_by: ``day`` / ``shift`` / ``count``.
        window_size: Images per window with ``count``.
        alpha: False-alarm rate per window.
        null: ``lot`` or ``iid``.
        min_window: Smallest window tested.
        cards: Render axis cards for alerted axes.
        report: Draw drift report pictures.
        heatmaps: Draw heatmap overlays of the top flagged cells of a window that fired (alert and report).
        fusion: Flag cells by the backbone's patch maps judged against the calibration cells' (off: the diffusion
            residual alone).
        residual_weight: Weight of the diffusion residual fused into the patch family's score (0: the patch family
            alone, no residuals computed; 1: both equally).
        recentre: Judge each cell against its own line-day (its score in units of the day's median and
            interquartile range), so a day of new lots is flagged at about the configured rate.
        quality: Also test the full-resolution image-quality channels (blur, noise, rotation).
        scores: Also test whether the window's per-image anomaly scores rose against the reference's.
        encode_chunk_size: Images per parallel ``encode-chunk`` task; 0 = encode inside the monitor pass; None =
            1024 on the Dask runner, else 0.

    Returns:
        ``MonitorResult.to_dict()`` plus ``events_emitted`` and ``encode_chunks`` (encoding and residual chunks run
        in parallel); on a line without a champion yet, only ``skipped`` (why) and no windows: the run completes.
    """
    from pipeline.monitoring.monitor import monitor_config

    config = monitor_config(
        lines=lines, start=start, end=end, lookback_days=lookback_days, window_by=window_by,
        window_size=window_size, alpha=alpha, null=null, min_window=min_window, cards=cards, report=report,
        heatmaps=heatmaps, fusion=fusion, residual_weight=residual_weight, recentre=recentre, quality=quality,
        scores=scores,
    )
    skipped = skip_reason()
    if skipped:
        print(f"monitor: skipped ({skipped})")
        return {"skipped": skipped, "windows": [], "model_version": None, "n_encoded": 0}
    chunk = default_chunk_size() if encode_chunk_size is None else int(encode_chunk_size)
    n_chunks = 0
    if chunk > 0:
        plan = plan_encoding_task.submit(config, chunk).result()
        n_chunks = len(plan["chunks"]) + len(plan["residual_chunks"])
        futures = []
        if plan["chunks"]:
            futures += list(encode_chunk_task.map(unmapped(plan["checkpoint"]), plan["chunks"]))
        if plan["residual_chunks"]:
            futures += list(residual_chunk_task.map(unmapped(plan["checkpoint"]), unmapped(plan["scoring"]),
                                                    plan["residual_chunks"]))
        for f in futures:  # wait for every chunk; the first failure fails the flow
            f.result()
    # submitted (not called) so the flow's task runner runs it: a Dask worker under LINEWATCH_TASK_RUNNER=dask
    result = monitor_task.submit(config).result()
    result["events_emitted"] = emit_alert_events(result)
    result["encode_chunks"] = n_chunks
    return result


# A work-pool deployment (prefect.yaml) loads ``flows/monitor.py:monitor_flow`` from its entrypoint in the worker's
# process: give the module-level flow the runner that process's environment names (LINEWATCH_TASK_RUNNER), as the CLI
# and `linewatch serve` do when they start a flow.
monitor_flow = with_task_runner(monitor_flow)
