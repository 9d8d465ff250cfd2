"""The task runner of the linewatch flows, chosen from the environment at call / serve time.

=============================  ==================================================================================
variable                       meaning
=============================  ==================================================================================
``LINEWATCH_TASK_RUNNER``      ``thread`` (default: Prefect's ``ThreadPoolTaskRunner``) or ``dask``
                               (``prefect_dask.DaskTaskRunner``; needs the ``prefect-dask`` package)
``LINEWATCH_DASK_ADDRESS``     scheduler of an existing Dask cluster (``tcp://host:8786``); unset: a local cluster
                               is started for each flow run and closed at its end
``LINEWATCH_DASK_WORKERS``     workers of the local cluster (default 2)
``LINEWATCH_DASK_PROCESSES``   ``1`` (default): one process per worker; ``0``: threads in the flow's process
=============================  ==================================================================================

Flow decorators are evaluated at import, so the runner is applied with :func:`with_task_runner`
(``flow.with_options(task_runner=...)``) in the code paths that run a flow: ``flows/cli.py``, ``flows/deploy.py``
and the nightly flow's monitor sub-flow. ``prefect_dask`` is imported only when ``dask`` is configured.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

RUNNER_ENV = "LINEWATCH_TASK_RUNNER"
ADDRESS_ENV = "LINEWATCH_DASK_ADDRESS"
WORKERS_ENV = "LINEWATCH_DASK_WORKERS"
PROCESSES_ENV = "LINEWATCH_DASK_PROCESSES"
RUNNERS = ("thread", "dask")


def _flag(value: str, key: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{key} must be 1/0 (true/false), got {value!r}")


def runner_name(env: Mapping[str, str] | None = None) -> str:
    """The runner named by ``LINEWATCH_TASK_RUNNER`` (``thread`` when unset), validated.

    Raises:
        ValueError: an unknown runner name.
    """
    env = os.environ if env is None else env
    name = (env.get(RUNNER_ENV) or "thread").strip().lower()
    if name not in RUNNERS:
        raise ValueError(f"{RUNNER_ENV} must be one of {list(RUNNERS)}, got {name!r}")
    return name


def task_runner_from_env(env: Mapping[str, str] | None = None) -> Any:
    """The task runner configured by ``LINEWATCH_TASK_RUNNER`` (see the module docstring).

    Args:
        env: Mapping to read instead of ``os.environ``.

    Returns:
        A ``prefect_dask.DaskTaskRunner`` (``dask``) or a ``prefect.task_runners.ThreadPoolTaskRunner``
        (``thread`` / unset). No cluster is started here: a Dask runner starts (or connects to) its cluster when
        the flow run enters it.

    Raises:
        ValueError: an unknown runner name or a bad worker count / flag.
        ImportError: ``dask`` is configured but ``prefect-dask`` is not installed.
    """
    env = os.environ if env is None else env
    name = runner_name(env)
    if name == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner()
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(f"{RUNNER_ENV}=dask needs prefect-dask: pip install prefect-dask") from exc
    address = (env.get(ADDRESS_ENV) or "").strip()
    if address:
        return DaskTaskRunner(address=address)
    raw = (env.get(WORKERS_ENV) or "2").strip()
    try:
        n_workers = int(raw)
    except ValueError:
        n_workers = 0
    if n_workers < 1:
        raise ValueError(f"{WORKERS_ENV} must be a positive integer, got {raw!r}")
    processes = _flag(env.get(PROCESSES_ENV) or "1", PROCESSES_ENV)
    return DaskTaskRunner(cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "processes": processes})


def with_task_runner(flow: Any, env: Mapping[str, str] | None = None) -> Any:
    """``flow`` with the task runner of :func:`task_runner_from_env` (a copy; the module-level flow is unchanged)."""
    return flow.with_options(task_runner=task_runner_from_env(env))
