"""Prefect 3 flows of linewatch: thin wrappers over the ``pipeline`` jobs.

* :mod:`flows.ingest`: drop folder -> catalog (every 10 minutes or on demand).
* :mod:`flows.retrain`: the nightly retrain with its promotion gate.
* :mod:`flows.monitor`: encode, score, test drift, alert (every 15 minutes).
* :mod:`flows.nightly`: ingest -> retrain -> monitor, the 02:00 job.
* :mod:`flows.deploy`: deployments with cron schedules (``linewatch serve``) and the drift-alert automation.

This package is the only one that imports Prefect. Policy (retries with back-off, timeouts, caching off for side
effects) lives in the decorators; the logic lives in ``pipeline``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

RETRY_ENV = "LINEWATCH_RETRY_DELAY_S"
"""First back-off delay (seconds) of a retried step; later tries wait 3x and 9x as long (default 10)."""


def retry_delays(first: float | None = None) -> list[float]:
    """Back-off delays of a step's retries: ``[d, 3d, 9d]`` with ``d`` from ``$LINEWATCH_RETRY_DELAY_S`` (10 s)."""
    d = float(os.environ.get(RETRY_ENV, "10")) if first is None else float(first)
    if d < 0:
        raise ValueError(f"{RETRY_ENV} must be >= 0, got {d}")
    return [d, 3 * d, 9 * d]


def is_retryable(exc: BaseException | None) -> bool:
    """Whether retrying a failed step can help.

    ``ValueError`` (bad input, too few images, a gate configuration error) and ``FileNotFoundError`` are
    deterministic: retrying gives the same answer. Everything else (MLflow unreachable, the catalog lock held, a
    timeout, an OS error) is retried; training resumes from its checkpoint on the retry.
    """
    if exc is None:
        return False
    return not isinstance(exc, ValueError | FileNotFoundError | KeyboardInterrupt)


def retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only failures that :func:`is_retryable` accepts."""
    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as err:  # noqa: BLE001 - reading the result may itself raise the exception
            exc = err
    return is_retryable(exc if isinstance(exc, BaseException) else None)


def use_local_prefect_home(home: str | os.PathLike[str]) -> Path:
    """Point Prefect at a private home (``<home>/prefect``) unless ``PREFECT_HOME`` / ``PREFECT_API_URL`` are set.

    Call before the first Prefect import so the ephemeral API's SQLite database and logs stay under
    ``LINEWATCH_HOME`` instead of ``~/.prefect``.

    Returns:
        The Prefect home in use.
    """
    if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
        path = Path(home) / "prefect"
        path.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(path)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the ephemeral API starts in a subprocess; 20 s (Prefect's default) is too short on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    return Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))


class StepFailed(RuntimeError):
    """A step of a parent flow failed; the message names the step and the cause."""

    def __init__(self, step: str, cause: BaseException) -> None:
        super().__init__(f"step '{step}' failed: {type(cause).__name__}: {cause}")
        self.step = step
        self.cause = cause


def job_task_options(*, retries: int = 3) -> dict[str, Any]:
    """The ``@task`` policy shared by the job wrappers (ingest, retrain, monitor).

    Retries with back-off (``retry_delays()``, jittered) only for transient failures (``retry_condition``); no result
    caching, since every job has side effects; prints go to the run log. Callers add their name and timeout.
    """
    from prefect.cache_policies import NO_CACHE

    return {
        "retries": retries,
        "retry_delay_seconds": retry_delays(),
        "retry_jitter_factor": 0.2,
        "retry_condition_fn": retry_condition,
        "cache_policy": NO_CACHE,
        "log_prints": True,
    }
