"""The nightly parent flow: ingest -> retrain -> monitor (scheduled at 02:00 in the configured time zone).

Each step is a sub-flow with its own retries and timeout. The line is never left unmonitored by the retrain:

* the retrain is told which monitor settings its candidate must serve (the nightly's ``monitor`` parameters), and its
  gate refuses a candidate the monitor could not use;
* a refused candidate (``status: "rejected"``), too few healthy images to train one (``"no_candidate"``), or a
  retrain that failed after its retries all leave the champion in place, and the monitor step still runs with it
  (a new line without any champion yet skips it: ``result["monitor_skipped"]``);
* a failed ingest stops the run (nothing new to train on or monitor); a retrain that failed is raised as
  :class:`flows.StepFailed` naming it, after the monitor step ran.

What each step leaves behind is consistent by construction: ingestion publishes catalog batches atomically under the
catalog lock, the retrain registers a version only after every check and upload succeeded (and aliases it last), and
the alert state is only written by the monitor's alert manager, one window at a time.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from prefect import flow

from flows import StepFailed
from flows.ingest import ingest_flow
from flows.monitor import monitor_flow, skip_reason
from flows.retrain import retrain_flow
from flows.runners import with_task_runner
from pipeline.monitoring.monitor import NO_CHAMPION_YET  # noqa: F401 - re-exported

STATUSES = ("promoted", "rejected", "no_candidate", "failed")
"""``result["status"]`` of a nightly run: what happened to the retrain's candidate (the champion stays unless
``promoted``)."""


def monitor_skip_reason(promoted: bool) -> str | None:
    """Why the nightly's monitor step cannot run after a retrain (:func:`flows.monitor.skip_reason`); None when it can."""
    return None if promoted else skip_reason()


def _step(name: str, fn: Any, **kwargs: Any) -> Any:
    try:
        return fn(**kwargs)
    except Exception as exc:
        print(f"nightly: step '{name}' failed: {type(exc).__name__}: {exc}")
        raise StepFailed(name, exc) from exc


def monitor_settings(monitor: dict[str, Any]) -> dict[str, Any]:
    """The ``MonitorConfig`` fields among the monitor step's parameters (what the retrain's gate checks)."""
    from pipeline.monitoring.monitor import MonitorConfig

    names = {f.name for f in fields(MonitorConfig)}
    return {k: v for k, v in monitor.items() if k in names}


def _retrain_step(params: dict[str, Any]) -> tuple[dict[str, Any], StepFailed | None]:
    """Run the retrain; a refused candidate, too few images or a failure never stop the monitor step."""
    from pipeline.training.retrain import InsufficientData

    try:
        res = retrain_flow(**params)
    except InsufficientData as exc:
        print(f"nightly: no candidate trained, the champion stays: {exc}")
        return {"status": "no_candidate", "promoted": False, "reason": str(exc)}, None
    except Exception as exc:
        print(f"nightly: step 'retrain' failed, the champion stays: {type(exc).__name__}: {exc}")
        return {"status": "failed", "promoted": False, "reason": f"{type(exc).__name__}: {exc}"}, \
            StepFailed("retrain", exc)
    res["status"] = "promoted" if res["promoted"] else "rejected"
    if not res["promoted"]:
        print(f"nightly: model v{res['version']} not promoted, the champion stays ({res['gate']['reason']})")
    return res, None


@flow(name="linewatch-nightly", log_prints=True, timeout_seconds=10 * 3600)
def nightly_flow(
    ingest: bool = True,
    retrain: dict[str, Any] | None = None,
    monitor: dict[str, Any] | None = None,
    drop: str | None = None,
) -> dict[str, Any]:
    """Ingest the drop folder, retrain (with the promotion gate), then monitor with the champion (new or kept).

    Args:
        ingest: Run the ingest step first.
        retrain: Parameters of ``retrain_flow`` (preset, steps, window_days, from_scratch, ...). Unless it names
            ``monitor``, the candidate is checked against this run's monitor settings.
        monitor: Parameters of ``monitor_flow`` (lookback_days, window_by, ...); None = the defaults. Pass
            ``{"skip": True}`` to skip the monitor step.
        drop: Drop folder of the ingest step (default ``settings.drop_dir``).

    Returns:
        ``{"ingest": ..., "retrain": ..., "monitor": ..., "status": ...}``: the results of the steps that ran, and
        ``status`` (:data:`STATUSES`; ``retrain["status"]`` too).

    Raises:
        StepFailed: The ingest or the monitor step failed after its retries, or the retrain did (raised after the
            monitor step ran with the champion); the message names the step.
    """
    out: dict[str, Any] = {}
    if ingest:
        out["ingest"] = _step("ingest", ingest_flow, drop=drop)
    mon = dict(monitor or {})
    skip_monitor = bool(mon.pop("skip", False))
    params = dict(retrain or {})
    params.setdefault("monitor", monitor_settings(mon))
    out["retrain"], failure = _retrain_step(params)
    out["status"] = out["retrain"]["status"]
    skipped = None if skip_monitor else monitor_skip_reason(out["status"] == "promoted")
    if skipped:
        out["monitor_skipped"] = skipped
        print(f"nightly: monitor skipped: {skipped}")
    elif not skip_monitor:
        out["monitor"] = _step("monitor", with_task_runner(monitor_flow), **mon)
    if failure is not None:
        raise failure
    return out
