"""Nightly retrain flow: snapshot -> train (warm start) -> evaluate -> register -> gate -> alias.

The job itself is :func:`pipeline.training.retrain.retrain`; this module adds retries with back-off (MLflow unreachable, the
catalog lock busy, a crash in training: the retry resumes from the candidate's checkpoint), a timeout, and Prefect
events ``linewatch.model.promoted`` / ``linewatch.model.rejected``. Too few healthy images
(``pipeline.training.retrain.InsufficientData``) is not retried: it raises at once, the champion stays.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows import job_task_options


@task(name="retrain-candidate", timeout_seconds=6 * 3600, **job_task_options(retries=2))
def retrain_task(config: Any) -> dict[str, Any]:
    """Run one retrain (``pipeline.training.retrain.retrain``) and return its result as a dict."""
    from pipeline.monitoring.monitor import monitor_config, retrain_hooks
    from pipeline.settings import ensure_dirs, get_settings
    from pipeline.training.retrain import retrain

    settings = ensure_dirs(get_settings())
    # the monitor's side of the gate: its check of the candidate, its floor, its alert delivery for ops alerts
    res = retrain(settings, config, hooks=retrain_hooks(settings, monitor_config(**(config.monitor or {}))))
    verdict = "promoted to champion" if res.promoted else "kept as challenger"
    print(
        f"retrain: v{res.version} {verdict} ({res.gate.reason}); parent v{res.parent_version or '-'}, "
        f"{res.n_train} train / {res.n_calibration} calibration images over {res.lookback_days} days, "
        f"excluded {res.excluded}"
    )
    return res.to_dict()


def emit_model_event(result: dict[str, Any]) -> None:
    """Emit ``linewatch.model.promoted`` or ``linewatch.model.rejected`` for a retrain result (never raises)."""
    try:
        from prefect.events import emit_event

        emit_event(
            event="linewatch.model.promoted" if result["promoted"] else "linewatch.model.rejected",
            resource={"prefect.resource.id": f"linewatch.model.v{result['version']}",
                      "prefect.resource.name": f"model v{result['version']}"},
            payload={"version": result["version"], "parent_version": result["parent_version"],
                     "gate": result["gate"]["reason"], "alias": result["alias"]},
        )
    except Exception:  # noqa: BLE001 - an event is a notification, not part of the job
        pass


@flow(name="linewatch-retrain", log_prints=True, timeout_seconds=8 * 3600)
def retrain_flow(
    preset: str = "cpu",
    steps: int = 300,
    window_days: int = 7,
    end: str | None = None,
    lines: list[str] | None = None,
    from_scratch: bool = False,
    exclude_alerts: bool = True,
    exclude_anomalous: bool = True,
    batch_size: int | None = None,
    inject_weight_noise: float = 0.0,
    holdout_share: float = 0.25,
    min_train_images: int = 32,
    min_calibration_images: int | None = None,
    max_lookback_days: int = 28,
    keep_size: bool = True,
    monitor: dict[str, Any] | None = None,
    gate: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Retrain InfoDiffusion on the recent catalog window and promote it only through the gate.

    Args:
        preset: Model preset (``tiny``, ``cpu``, ``standard``, ``large``).
        steps: Optimiser steps.
        window_days: Training window, last N days.
        end: End of the window (ISO 8601; default: after the newest image).
        lines: Only these lines.
        from_scratch: Ignore the champion (no warm start).
        exclude_alerts: Drop images in windows under an active drift alert.
        exclude_anomalous: Drop images the champion flagged anomalous.
        batch_size: Override the preset's batch size.
        inject_weight_noise: Fault injection (tests, demos): degrade the candidate's weights.
        holdout_share: Calibration share of the window (by image-id hash).
        min_train_images: Floor on training images (the window reaches back for healthy ones below it).
        min_calibration_images: Floor on calibration images (default: what the monitor's drift test needs).
        max_lookback_days: How far back the window may reach for healthy images.
        keep_size: Reach back for as many healthy images as the exclusions dropped.
        monitor: The monitor settings the candidate must serve (``MonitorConfig`` fields); the gate checks them.
        gate: ``GateConfig`` overrides.
        seed: Seed.

    Returns:
        ``RetrainResult.to_dict()``.
    """
    from pipeline.training.retrain import retrain_config

    config = retrain_config(
        preset=preset, steps=steps, window_days=window_days, end=end, lines=lines, from_scratch=from_scratch,
        exclude_alerts=exclude_alerts, exclude_anomalous=exclude_anomalous, batch_size=batch_size,
        inject_weight_noise=inject_weight_noise, holdout_share=holdout_share, min_train_images=min_train_images,
        min_calibration_images=min_calibration_images, max_lookback_days=max_lookback_days, keep_size=keep_size,
        monitor=monitor, gate=gate, seed=seed,
    )
    result = retrain_task(config)
    emit_model_event(result)
    return result


__all__ = ["retrain_task", "retrain_flow", "emit_model_event"]
