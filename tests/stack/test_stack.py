"""Integration tests against the native twin of docker-compose.yml (PostgreSQL, mlflow server, prefect server, a
process worker) started by ``deploy/native_stack.sh``. See tests/stack/conftest.py for when they skip / fail."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline import tracking

pytestmark = pytest.mark.stack

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _checkpoint(path: Path, payload: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "weights.safetensors").write_bytes(payload)
    (path / "config.json").write_text(json.dumps({"format_version": 1}))
    return path


# ---------------------------------------------------------------------------------------------------------------
# MLflow server backed by PostgreSQL, artifacts proxied (--serve-artifacts)


@pytest.mark.slow
def test_registry_lineage_and_drift_metrics_on_the_server(stack_env, tmp_path: Path) -> None:
    df = pd.DataFrame({"image_id": ["a", "b"], "sha256": ["1", "2"]})
    versions = []
    for i in range(2):
        with tracking.start_training_run(f"stack-train-{i}"):
            tracking.log_params_flat({"model": {"unet": {"base_channels": 16 * (i + 1)}}})
            tracking.log_history({"loss": [1.0, 0.5]})
            tracking.log_dataset(df, name="train", digest=f"{i}" * 64, source="/snap.json", context="training")
            versions.append(tracking.log_checkpoint_and_register(
                _checkpoint(tmp_path / f"ck{i}", bytes([i]) * 64),
                tags=tracking.lineage_tags(data_digest=f"{i}" * 64, parent_version=i or None,
                                           code_version="git:stack", gates={"passed": True})))
    assert [v.version for v in versions] == [1, 2]
    assert versions[1].source == f"models:/{versions[1].model_id}"  # an MLflow 3 logged model
    s = tracking.run_summary(versions[1].run_id)
    assert s.artifact_uri.startswith("mlflow-artifacts:/")  # proxied through the server, not a client path
    assert s.params["model.unet.base_channels"] == "32" and s.datasets[0].digest == "1" * 64

    tracking.set_alias("champion", 1, who="ci", why="first")
    tracking.set_alias("challenger", 2, who="nightly", why="gates passed")
    tracking.set_alias("champion", 2, who="ci", why="promoted")
    assert tracking.rollback(who="ci", why="stack test").version == 1
    info = tracking.get_model_version(2)
    assert info.tags["lineage.parent_version"] == "1" and info.tags["data.train_digest"] == "1" * 64
    assert info.tags["champion.rolled_back_by"] == "ci" and "challenger" in info.aliases
    assert info.tags["champion.event"] == "rolled back" and "No longer champion" in info.description
    got = tracking.download_model("champion", tmp_path / "dl")
    assert (got / "weights.safetensors").read_bytes() == bytes([0]) * 64

    with tracking.start_monitoring_run("stack-monitor") as mid:
        for w in range(3):
            tracking.log_drift_window(w, tracking.DriftWindowMetrics(
                detected=w == 2, mmd_stat=0.1 * w, mmd_p=0.5, axes={3: {"effect": 0.2 * w, "p": 0.01}}))
        tracking.log_alert_state(active=True, step=2, level="drift", moved_axes=[3])
    series = tracking.get_metric_history("axis_03/effect", run_id=mid)
    assert [st for st, _ in series] == [0, 1, 2] and series[-1][1] == pytest.approx(0.4)
    assert tracking.run_summary(mid).tags["alert.moved_axes"] == "axis_03"


def test_mlflow_rejects_unknown_host_headers(stack) -> None:
    """--allowed-hosts is set: a request naming another host is refused (MLflow >= 3.5 security middleware)."""
    import urllib.error
    import urllib.request

    url = f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"  # /health is exempt
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
    req = urllib.request.Request(url, headers={"Host": "evil.example.com"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 403


# ---------------------------------------------------------------------------------------------------------------
# Prefect server + process worker


def _deploy_smoke(stack, tmp_path: Path) -> str:
    """Deploy tests/stack/smoke_flow.py with `prefect deploy` from a prefect.yaml shaped like the project's."""
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pool = dict(project["definitions"]["work_pool"], name=stack.work_pool)
    name = f"smoke-{uuid.uuid4().hex[:6]}"
    spec = {
        "name": "linewatch-stack-test",
        "prefect-version": project["prefect-version"],
        "build": None,
        "push": None,
        "deployments": [{
            "name": name,
            "entrypoint": "smoke_flow.py:smoke",
            "schedules": [dict(project["deployments"][0]["schedules"][0], active=False)],
            "work_pool": pool,
            "parameters": {"path": str(tmp_path / "marker.json")},
        }],
    }
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = dict(os.environ, PREFECT_API_URL=stack.prefect_api_url, LINEWATCH_TIMEZONE="Europe/Berlin")
    out = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all",
         "--prefect-file", str(prefect_file)],
        cwd=HERE, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return f"linewatch-stack-smoke/{name}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deploy_and_run_a_flow_on_the_worker(stack_env, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack_env.prefect_api_url}):
        with get_client(sync_client=True) as client:
            pool = client.read_work_pool(stack_env.work_pool)
            assert pool.type == "process"
            full_name = _deploy_smoke(stack_env, tmp_path)
            dep = client.read_deployment_by_name(full_name)
            assert dep.work_pool_name == stack_env.work_pool
            assert dep.schedules[0].schedule.timezone == "Europe/Berlin"  # templated from the environment
            assert dep.schedules[0].schedule.cron == "0 2 * * *"
            run = run_deployment(full_name, timeout=400, poll_interval=2)
            state = client.read_flow_run(run.id).state
    assert state is not None and state.is_completed(), state
    marker = json.loads((tmp_path / "marker.json").read_text())
    assert marker["text"] == "ran" and marker["pid"] != os.getpid()
    assert marker["mlflow"] == stack_env.mlflow_url  # the worker's env reaches the flow run


@pytest.mark.timeout(300)
def test_drift_event_triggers_the_webhook_automation(stack_env, webhook_server) -> None:
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL, temporary_settings

    spec = importlib.util.spec_from_file_location("setup_automation", REPO / "deploy" / "setup_automation.py")
    assert spec and spec.loader
    setup_automation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_automation)
    with temporary_settings({PREFECT_API_URL: stack_env.prefect_api_url}):
        setup_automation.setup(webhook_server.url, allow_private_urls=True)
        time.sleep(2)  # the triggers service loads new automations
        tag = uuid.uuid4().hex[:8]
        emit_event(
            event="linewatch.drift.alert",
            resource={"prefect.resource.id": "linewatch.line.L1", "prefect.resource.name": "line L1"},
            payload={"line": "L1", "window_id": tag, "top_axis": 3, "effect": 0.8, "model_version": 1,
                     "summary": f"axis_03 moved ({tag})", "description": "brightness"},
        )
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=30)
        got = webhook_server.wait_for(1, timeout=120)
    assert got, "no webhook call within 120 s of the drift event"
    assert any(tag in json.dumps(g) and g.get("source") == "prefect-automation" for g in got), got


# ---------------------------------------------------------------------------------------------------------------
# The full nightly / monitor flows through the stack
#
# >>> FLOWS HELPER: add `test_nightly_flow_through_the_stack` here. <<<
# Use the fixtures `stack_env` (env pointing at the stack; unique model name) and `webhook_server`; deploy the
# project's prefect.yaml with `prefect deploy --all` (cwd = repo root, PREFECT_API_URL=stack.prefect_api_url),
# trigger `linewatch-nightly/nightly` with `run_deployment(..., timeout=...)`, then assert with pipeline.tracking:
# registry versions, aliases (champion / challenger), lineage tags (data.train_digest, lineage.parent_version,
# lineage.code_version, gate.*), drift metrics (axis_NN/effect series) and a POST on webhook_server.


def _deploy_project(stack) -> None:
    """`prefect deploy --all` of the project's prefect.yaml (repo root), then switch its schedules off.

    The schedules (ingest every 10 min, monitor every 15 min) would otherwise start runs on the shared worker
    with the worker's own LINEWATCH_HOME while this test (and later ones) use the stack.
    """
    from prefect.client.orchestration import get_client

    env = dict(os.environ, PREFECT_API_URL=stack.prefect_api_url, LINEWATCH_TIMEZONE="Europe/Berlin")
    out = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with get_client(sync_client=True) as client:
        for name in ("linewatch-nightly/nightly", "linewatch-monitor/monitor", "linewatch-ingest/ingest"):
            dep = client.read_deployment_by_name(name)
            assert dep.work_pool_name == stack.work_pool and dep.entrypoint.startswith("flows/")
            for sched in dep.schedules:
                client.update_deployment_schedule(dep.id, sched.id, active=False)
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterName,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        scheduled = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["nightly", "monitor", "ingest"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
        )
        for fr in scheduled:
            if "auto-scheduled" in (fr.tags or []):
                client.delete_flow_run(fr.id)


def _run_nightly(stack, parameters: dict, env: dict[str, str], timeout: float = 420.0):
    """Trigger the deployed nightly flow on the worker and wait for its final state."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    run = run_deployment("linewatch-nightly/nightly", parameters=parameters, job_variables={"env": env},
                         timeout=timeout, poll_interval=2)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    return run, state


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_nightly_flow_through_the_stack(stack_env, webhook_server, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Deploy prefect.yaml, run the nightly flow twice on the process worker against the Postgres-backed MLflow.

    Run 1 (ingest the drop folder, train from scratch, monitor days 4-6, gain fault from day 5): v1 is champion
    with lineage tags, the monitoring run has the per-axis drift series, the alert reaches the webhook.
    Run 2 (warm start from v1, degraded weights, no monitor): v2 is refused by the gate, becomes challenger with
    parent v1, and the champion stays on v1.
    """
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipeline.line.faults import FaultSpec
    from pipeline.line.simulate import simulate_line
    from pipeline.settings import get_settings
    from tests.flows import world

    # A fresh world: simulated line in the drop folder (not yet ingested: the nightly's ingest step does it).
    home = tmp_path / "home"
    world.set_env(monkeypatch, home, tracking_uri=stack_env.mlflow_url)
    tag = uuid.uuid4().hex[:8]
    env = {
        "LINEWATCH_HOME": str(home),
        "LINEWATCH_TIMEZONE": world.TZ,
        "MLFLOW_TRACKING_URI": stack_env.mlflow_url,
        "LINEWATCH_MODEL_NAME": os.environ["LINEWATCH_MODEL_NAME"],
        "LINEWATCH_TRAINING_EXPERIMENT": f"lw-stack-training-{tag}",
        "LINEWATCH_MONITORING_EXPERIMENT": f"lw-stack-monitoring-{tag}",
        "LINEWATCH_WEBHOOK_URL": webhook_server.url,
        "LINEWATCH_MLFLOW_RETRIES": "3",
        "LINEWATCH_MLFLOW_BACKOFF_S": "0.5",
        "LINEWATCH_MLFLOW_TIMEOUT_S": "30",
        "OMP_NUM_THREADS": "2",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    tracking.reset()
    settings = get_settings()
    simulate_line(settings.drop_dir, days=world.DAYS, per_day=world.PER_DAY, lines=("L1",), seed=0,
                  fault=FaultSpec("gain", start_day=world.FAULT_DAY - 1, severity=1.6), progress=False)

    with temporary_settings({PREFECT_API_URL: stack_env.prefect_api_url}):
        _deploy_project(stack_env)
        run1, state1 = _run_nightly(stack_env, {"ingest": True, "retrain": world.tiny_retrain_params(),
                                                "monitor": world.monitor_params()}, env)
        assert state1 is not None and state1.is_completed(), (state1, run1.id)
        got = webhook_server.wait_for(1, timeout=30)  # sent by the monitor step inside the flow run
        run2, state2 = _run_nightly(stack_env, {
            "ingest": False, "monitor": {"skip": True},
            "retrain": world.tiny_retrain_params(from_scratch=False, steps=10, inject_weight_noise=0.5)}, env)
        assert state2 is not None and state2.is_completed(), (state2, run2.id)

    # Ingest step: the drop folder reached the catalog, in the worker's flow run (not this process).
    from pipeline.catalog.tables import read_catalog

    assert len(read_catalog(settings.catalog_root)) == world.DAYS * world.PER_DAY

    # Registry, aliases, lineage on the Postgres-backed MLflow server.
    tracking.configure(settings)
    versions = tracking.list_versions()
    assert sorted(v.version for v in versions) == [1, 2]
    v1, v2 = tracking.get_model_version(1), tracking.get_model_version(2)
    assert tracking.get_alias_version("champion") == 1 and "champion" in v1.aliases
    assert tracking.get_alias_version("challenger") == 2 and "challenger" in v2.aliases
    assert v1.source == f"models:/{v1.model_id}"
    assert v1.tags["lineage.parent_version"] == "none" and v2.tags["lineage.parent_version"] == "1"
    assert v2.tags["warm_start"] == "true"
    for v in (v1, v2):
        assert len(v.tags["data.train_digest"]) == 64 and len(v.tags["data.calibration_digest"]) == 64
        assert v.tags["lineage.code_version"]
    assert v1.tags["data.train_digest"] == v2.tags["data.train_digest"]  # same window, same snapshot
    assert v1.tags["gate.passed"].lower() == "true" and v2.tags["gate.passed"].lower() == "false"
    assert "eps_mse" in v2.tags["gate.reason"]
    train = tracking.run_summary(v1.run_id)
    assert train.artifact_uri.startswith("mlflow-artifacts:/")
    assert any(d.digest == v1.tags["data.train_digest"] for d in train.datasets)

    # Drift metrics: one monitoring run for days 4..6, per-axis effect series, alert state on the run.
    client = MlflowClient(stack_env.mlflow_url)
    exp = client.get_experiment_by_name(env["LINEWATCH_MONITORING_EXPERIMENT"])
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    mid = runs[0].info.run_id
    assert runs[0].data.tags["model_version"] == "1"
    effect_keys = sorted(k for k in runs[0].data.metrics if k.startswith("axis_") and k.endswith("/effect"))
    assert effect_keys
    series = tracking.get_metric_history(effect_keys[0], run_id=mid)
    assert [step for step, _ in series] == [0, 1, 2]
    detected = tracking.get_metric_history("drift/detected", run_id=mid)
    assert [step for step, _ in detected] == [0, 1, 2] and detected[0][1] == 0.0 and detected[-1][1] == 1.0
    assert tracking.run_summary(mid).tags["alert.moved_axes"].startswith("axis_")

    # The alert webhook: a JSON POST from the flow run's alert manager to the local server.
    # the latent alert names its axes; a control-chart alert (family spc) may open beside it and names its statistic
    opened = [g for g in got if g.get("kind") == "opened"]
    latent = [g for g in opened if g["alert"].get("family") == "latent"]
    assert latent, got
    alert = latent[0]["alert"]
    assert alert["line"] == "L1" and alert["model_version"] == "1" and alert["status"] == "open"
    assert alert["top_axes"] and alert["window"]["id"] == latent[0]["window_id"]
    for g in opened:
        if g["alert"].get("family") == "spc":
            assert g["alert"]["cause"].startswith("spc:") and g["alert"]["card_paths"], g
