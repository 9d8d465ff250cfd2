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
    assert versions[1].source == f"runs:/{versions[1].run_id}/model"
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
    got = tracking.download_model("champion", tmp_path / "dl")
    assert (got / "weights.safetensors").read_bytes() == bytes([0]) * 64

    with tracking.start_monitoring_run("stack-monitor") as mid:
        for w in range(3):
            tracking.log_drift_window(w, tracking.DriftWindowMetrics(
                detected=w == 2, mmd_stat=0.1 * w, mmd_p=0.5, axes={3: {"effect": 0.2 * w, "p": 0.01}}))
        tracking.log_alert_state(active=True, step=2, level="drift", moved_axes=[3])
    series = tracking.get_metric_history("drift.axis_03.effect", run_id=mid)
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
# lineage.code_version, gate.*), drift metrics (drift.axis_NN.effect series) and a POST on webhook_server.
