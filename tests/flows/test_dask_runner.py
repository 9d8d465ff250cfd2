"""``LINEWATCH_TASK_RUNNER=dask``: the runner choice, and flows whose tasks really run on a local Dask cluster."""

from __future__ import annotations

import pytest
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows.runners import task_runner_from_env, with_task_runner

DASK_ENV = {"LINEWATCH_TASK_RUNNER": "dask", "LINEWATCH_DASK_WORKERS": "2", "LINEWATCH_DASK_PROCESSES": "0"}


def _on_dask_worker() -> str | None:
    """Address of the Dask worker running the caller, or None outside a worker."""
    from distributed import get_worker

    try:
        return get_worker().address
    except ValueError:
        return None


def test_default_is_the_thread_pool_runner():
    assert isinstance(task_runner_from_env({}), ThreadPoolTaskRunner)
    assert isinstance(task_runner_from_env({"LINEWATCH_TASK_RUNNER": "thread"}), ThreadPoolTaskRunner)


def test_dask_runner_from_env_local_cluster_or_address():
    runner = task_runner_from_env({"LINEWATCH_TASK_RUNNER": "Dask"})
    assert isinstance(runner, DaskTaskRunner) and runner.address is None
    assert runner.cluster_kwargs == {"n_workers": 2, "threads_per_worker": 1, "processes": True}
    runner = task_runner_from_env(DASK_ENV | {"LINEWATCH_DASK_WORKERS": "3"})
    assert runner.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "processes": False}
    runner = task_runner_from_env(DASK_ENV | {"LINEWATCH_DASK_ADDRESS": "tcp://sched:8786"})
    assert runner.address == "tcp://sched:8786"


@pytest.mark.parametrize("env, match", [
    ({"LINEWATCH_TASK_RUNNER": "ray"}, "LINEWATCH_TASK_RUNNER must be one of"),
    (DASK_ENV | {"LINEWATCH_DASK_WORKERS": "0"}, "LINEWATCH_DASK_WORKERS must be a positive integer"),
    (DASK_ENV | {"LINEWATCH_DASK_WORKERS": "two"}, "LINEWATCH_DASK_WORKERS must be a positive integer"),
    (DASK_ENV | {"LINEWATCH_DASK_PROCESSES": "maybe"}, "LINEWATCH_DASK_PROCESSES must be 1/0"),
])
def test_bad_runner_settings_are_rejected(env, match):
    with pytest.raises(ValueError, match=match):
        task_runner_from_env(env)


@task
def _score(batch: list[int]) -> dict:
    return {"sum": sum(x * x for x in batch), "worker": _on_dask_worker()}


@flow
def _batches_flow(batches: list[list[int]]) -> list[dict]:
    return [f.result() for f in _score.map(batches)]


def test_mapped_tasks_run_on_dask_workers_with_the_default_runners_results(prefect_harness):
    batches = [[1, 2], [3, 4, 5], [6], [7, 8]]
    on_dask = with_task_runner(_batches_flow, DASK_ENV)(batches)
    on_threads = with_task_runner(_batches_flow, {})(batches)
    assert [r["sum"] for r in on_dask] == [r["sum"] for r in on_threads] == [5, 50, 36, 113]
    assert all(r["worker"] for r in on_dask)  # every batch ran inside a Dask worker
    assert all(r["worker"] is None for r in on_threads)


def test_monitor_flow_submits_its_pass_to_the_dask_runner(tmp_path, monkeypatch, prefect_harness):
    """The real monitor flow through the CLI's code path; the job itself is stubbed (its maths is tested elsewhere)."""
    import pipeline.monitoring.monitor as M
    from flows.cli import FlowRunner
    from tests.flows.world import monitor_params, set_env

    set_env(monkeypatch, tmp_path)
    seen: list[tuple[str | None, M.MonitorConfig]] = []

    def fake_monitor(settings, config):
        seen.append((_on_dask_worker(), config))
        return M.MonitorResult((), (), None, "1", "model-a", 42)

    monkeypatch.setattr(M, "monitor", fake_monitor)
    monkeypatch.setattr("flows.monitor.skip_reason", lambda: None)  # as if the line had a champion
    for key, value in DASK_ENV.items():
        monkeypatch.setenv(key, value)
    on_dask = FlowRunner().monitor(**monitor_params(), encode_chunk_size=0)
    monkeypatch.setenv("LINEWATCH_TASK_RUNNER", "thread")
    on_threads = FlowRunner().monitor(**monitor_params())
    assert on_dask == on_threads
    assert on_dask["n_encoded"] == 42 and on_dask["events_emitted"] == 0
    assert seen[0][0] is not None and seen[1][0] is None  # the pass ran on a Dask worker, then on a thread
    assert seen[0][1] == seen[1][1] and seen[0][1].min_window == 15



def test_monitor_flow_encodes_chunks_on_dask_workers_before_the_pass(tmp_path, monkeypatch, prefect_harness):
    """Chunked encoding: one mapped task per chunk on the Dask workers, then the pass; off on the thread runner."""
    import pipeline.monitoring.monitor as M
    from flows.cli import FlowRunner
    from flows.monitor import default_chunk_size
    from tests.flows.world import monitor_params, set_env

    set_env(monkeypatch, tmp_path)
    order: list[tuple[str, object]] = []

    def fake_plan(settings, config, chunk_size):
        order.append(("plan", chunk_size))
        return {"checkpoint": "/ckpt/v1", "model_id": "model-a",
                "chunks": [[{"image_id": f"i{k}", "store_path": f"p{k}"}] for k in range(5)],
                "scoring": {"t_stars": [100, 250], "steps": 10, "seeds": [0, 1, 2], "k": 25},
                "residual_chunks": [[{"image_id": f"r{k}", "store_path": f"p{k}"}] for k in range(3)]}

    def fake_chunk(settings, checkpoint_dir, records):
        order.append(("chunk", (checkpoint_dir, records[0]["image_id"], _on_dask_worker())))
        return f"part-{records[0]['image_id']}"

    def fake_residual_chunk(settings, checkpoint_dir, scoring, records):
        assert scoring["t_stars"] == [100, 250]
        order.append(("residuals", (checkpoint_dir, records[0]["image_id"], _on_dask_worker())))
        return f"rpart-{records[0]['image_id']}"

    def fake_monitor(settings, config):
        order.append(("pass", _on_dask_worker()))
        return M.MonitorResult((), (), None, "1", "model-a", 5)

    monkeypatch.setattr(M, "encoding_plan", fake_plan)
    monkeypatch.setattr(M, "encode_chunk", fake_chunk)
    monkeypatch.setattr(M, "residual_chunk", fake_residual_chunk)
    monkeypatch.setattr(M, "monitor", fake_monitor)
    monkeypatch.setattr("flows.monitor.skip_reason", lambda: None)  # as if the line had a champion
    for key, value in DASK_ENV.items():
        monkeypatch.setenv(key, value)
    assert default_chunk_size() == 1024
    res = FlowRunner().monitor(**monitor_params())
    assert res["encode_chunks"] == 5 + 3
    assert order[0] == ("plan", 1024) and order[-1][0] == "pass"
    chunks = [v for k, v in order if k == "chunk"]
    assert sorted(c[1] for c in chunks) == [f"i{k}" for k in range(5)]
    assert all(c[0] == "/ckpt/v1" and c[2] for c in chunks)  # every chunk ran on a Dask worker
    rchunks = [v for k, v in order if k == "residuals"]
    assert sorted(c[1] for c in rchunks) == ["r0", "r1", "r2"] and all(c[2] for c in rchunks)
    # the thread runner encodes inside the pass (no plan, no chunks) unless asked
    order.clear()
    monkeypatch.setenv("LINEWATCH_TASK_RUNNER", "thread")
    assert default_chunk_size() == 0
    res = FlowRunner().monitor(**monitor_params())
    assert res["encode_chunks"] == 0 and [k for k, _ in order] == ["pass"]
    order.clear()
    res = FlowRunner().monitor(**monitor_params(), encode_chunk_size=2)
    assert res["encode_chunks"] == 8 and [k for k, _ in order][0] == "plan" and order[-1][0] == "pass"
    assert sorted(k for k, _ in order[1:-1]) == ["chunk"] * 5 + ["residuals"] * 3


@pytest.mark.parametrize("runner, expected", [("dask", "DaskTaskRunner"), ("thread", "ThreadPoolTaskRunner")])
def test_work_pool_entrypoint_gets_the_runner_of_the_workers_environment(runner, expected):
    """prefect.yaml's entrypoint ``flows/monitor.py:monitor_flow`` is imported by the worker: it honours the env."""
    import os
    import subprocess
    import sys

    code = "from flows.monitor import monitor_flow; print(type(monitor_flow.task_runner).__name__)"
    env = {**os.environ, "LINEWATCH_TASK_RUNNER": runner}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == expected
