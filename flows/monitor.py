"""Monitor flow: encode new images with the champion, score, test drift per window, alert, log (every 15 min).

The job is :func:`pipeline.monitor.monitor`. Each new alert is also emitted as the Prefect event
``linewatch.drift.alert`` (resource ``linewatch.line.<line>``), which the automation built by
:func:`flows.deploy.drift_alert_automation` turns into a webhook notification.

The pass (encode, score, drift) is submitted to the flow's task runner; :func:`flows.runners.with_task_runner`
picks it from ``LINEWATCH_TASK_RUNNER`` (``dask``: a ``prefect_dask.DaskTaskRunner``).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows import job_task_options

ALERT_EVENT = "linewatch.drift.alert"


@task(name="monitor-windows", timeout_seconds=3600, **job_task_options())
def monitor_task(config: Any) -> dict[str, Any]:
    """Run one monitor pass (``pipeline.monitor.monitor``) and return its result as a dict.

    A retry is safe: encoding resumes from the latents table and the alert manager's persisted state keeps an
    alert from being sent twice.
    """
    from pipeline.monitor import monitor
    from pipeline.settings import ensure_dirs, get_settings

    settings = ensure_dirs(get_settings())
    res = monitor(settings, config)
    for w in res.windows:
        verdict = f"DRIFT axis {w.top_axis} ({w.description})" if w.detected else "no drift"
        print(f"monitor: line {w.line} window {w.window_id}: n={w.n_images}, {w.n_anomalous} anomalous, {verdict}")
    return res.to_dict()


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
                    "report": w.get("report"),
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

    Returns:
        ``MonitorResult.to_dict()`` plus ``events_emitted``.
    """
    from pipeline.monitor import monitor_config

    config = monitor_config(
        lines=lines, start=start, end=end, lookback_days=lookback_days, window_by=window_by,
        window_size=window_size, alpha=alpha, null=null, min_window=min_window, cards=cards, report=report,
    )
    # submitted (not called) so the flow's task runner runs it: a Dask worker under LINEWATCH_TASK_RUNNER=dask
    result = monitor_task.submit(config).result()
    result["events_emitted"] = emit_alert_events(result)
    return result
