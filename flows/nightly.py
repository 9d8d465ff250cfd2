"""The nightly parent flow: ingest -> retrain -> monitor (scheduled at 02:00 in the configured time zone).

Each step is a sub-flow with its own retries and timeout. The first step that still fails after its retries stops
the run with :class:`flows.StepFailed`, whose message names the step; later steps do not run. What each step
leaves behind is consistent by construction: ingestion publishes catalog batches atomically under the catalog lock,
the retrain registers a version only after every check and upload succeeded (and aliases it last), and the alert
state is only written by the monitor's alert manager, one window at a time.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows import StepFailed
from flows.ingest import ingest_flow
from flows.monitor import monitor_flow
from flows.retrain import retrain_flow
from flows.runners import with_task_runner


def _step(name: str, fn: Any, **kwargs: Any) -> Any:
    try:
        return fn(**kwargs)
    except Exception as exc:
        print(f"nightly: step '{name}' failed: {type(exc).__name__}: {exc}")
        raise StepFailed(name, exc) from exc


@flow(name="linewatch-nightly", log_prints=True, timeout_seconds=10 * 3600)
def nightly_flow(
    ingest: bool = True,
    retrain: dict[str, Any] | None = None,
    monitor: dict[str, Any] | None = None,
    drop: str | None = None,
) -> dict[str, Any]:
    """Ingest the drop folder, retrain (with the promotion gate), then monitor with the (new) champion.

    Args:
        ingest: Run the ingest step first.
        retrain: Parameters of ``retrain_flow`` (preset, steps, window_days, from_scratch, ...).
        monitor: Parameters of ``monitor_flow`` (lookback_days, window_by, ...); None skips nothing: the defaults
            are used. Pass ``{"skip": True}`` to skip the monitor step.
        drop: Drop folder of the ingest step (default ``settings.drop_dir``).

    Returns:
        ``{"ingest": ..., "retrain": ..., "monitor": ...}`` results of the steps that ran.

    Raises:
        StepFailed: A step failed after its retries; the message names it.
    """
    out: dict[str, Any] = {}
    if ingest:
        out["ingest"] = _step("ingest", ingest_flow, drop=drop)
    out["retrain"] = _step("retrain", retrain_flow, **(retrain or {}))
    mon = dict(monitor or {})
    if not mon.pop("skip", False):
        out["monitor"] = _step("monitor", with_task_runner(monitor_flow), **mon)
    return out
