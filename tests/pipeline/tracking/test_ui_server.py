"""The MLflow UI's own data, read from a real ``mlflow server`` the way the browser reads it (``/ajax-api`` REST calls).

The server runs as the native stack runs it (``--serve-artifacts``, one worker on 127.0.0.1), with a SQLite store. A
training run registers two versions of a real (tiny) model, the second is promoted, and a monitoring run logs two
windows; then every page a quality engineer opens is checked through the calls that page makes: experiments (kind
tag), runs (description, tags, metric names, model and dataset inputs), metric history (window timestamps), artifacts
(the table, 0644 files on the server's disk), the alias, the versions (lineage as models:/ URIs, demotion) and the
logged model (MLmodel with a signature).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

from pipeline import tracking
from tests.pipeline.tracking.conftest import DAY, windows_of

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start in 300 s"
            time.sleep(1)
        yield url, root / "artifacts"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def logged(server, tiny_bundle: Path, two_windows, tmp_path_factory: pytest.TempPathFactory):
    """What the nightly and the monitor log, against the server (through pipeline.tracking only)."""
    url, _ = server
    home = tmp_path_factory.mktemp("home")
    env = {"MLFLOW_TRACKING_URI": url, "LINEWATCH_HOME": str(home), "LINEWATCH_MODEL_NAME": "lw-ui",
           "LINEWATCH_MLFLOW_BACKOFF_S": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    tracking.reset()
    try:
        versions = []
        for parent in (None, 1):
            with tracking.start_training_run(f"retrain-v{len(versions) + 1}"):
                versions.append(tracking.log_checkpoint_and_register(
                    tiny_bundle, description="gate: all checks passed",
                    tags=tracking.lineage_tags(data_digest="d" * 64, parent_version=parent, code_version="git:ui")))
        tracking.set_alias("champion", 1, who="nightly", why="first model", event="promote")
        tracking.set_alias("champion", 2, who="nightly", why="gate passed", event="promote")
        cards = home / "cards"
        cards.mkdir()
        fd, card = tempfile.mkstemp(dir=cards, prefix="axis_02", suffix=".png")  # 0600, as cards once were
        os.close(fd)
        Path(card).write_bytes(b"\x89PNG card")
        with tracking.start_monitoring_run("monitor L1 2026-01-12..2026-01-13") as rid:
            tracking.link_model_version("lw-ui", 2)
            import pandas as pd

            tracking.log_monitored_images(pd.DataFrame({"image_id": ["a", "b"], "sha256": ["1" * 64, "2" * 64]}),
                                          name="L1 2026-01-12..2026-01-13")
            tracking.log_monitoring_windows(windows_of(two_windows), model_name="lw-ui", model_version=2)
            tracking.log_artifacts(cards, "axis_cards")
        yield {"url": url, "versions": versions, "monitor_run": rid}
    finally:
        tracking.reset()
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def api(url: str, path: str, **params) -> dict:
    r = requests.get(f"{url}/ajax-api/2.0/mlflow/{path}", params=params, timeout=30)
    assert r.status_code == 200, (path, r.text)
    return r.json()


def post(url: str, path: str, body: dict) -> dict:
    r = requests.post(f"{url}/ajax-api/2.0/mlflow/{path}", json=body, timeout=30)
    assert r.status_code == 200, (path, r.text)
    return r.json()


def tags_of(entity: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in entity.get("tags", [])}


def test_experiments_page(logged) -> None:
    exps = post(logged["url"], "experiments/search", {"max_results": 50})["experiments"]
    by_name = {e["name"]: tags_of(e) for e in exps}
    for name in ("linewatch-training", "linewatch-monitoring"):
        assert by_name[name]["mlflow.experimentKind"] == "custom_model_development", name


def test_monitoring_run_page(logged) -> None:
    url, rid = logged["url"], logged["monitor_run"]
    run = api(url, "runs/get", run_id=rid)["run"]
    tags = tags_of(run["data"])
    assert tags["mlflow.note.content"].startswith("Drift on line L1, window 2026-01-13 (alert open): axis 2")
    assert tags["linewatch.model_uri"] == "models:/lw-ui/2"
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"drift/detected", "drift/top_axis", "drift/moved_axes", "axes/p", "mmd/p", "axis_02/effect",
            "axis_02/ks", "alert/active"} <= metrics and not [k for k in metrics if k.startswith("drift.")]
    (ds,) = run["inputs"]["dataset_inputs"]
    assert ds["dataset"]["name"] == "L1 2026-01-12..2026-01-13" and len(ds["dataset"]["digest"]) == 36
    assert tags_of(ds)["mlflow.data.context"] == "monitoring"
    assert [m["model_id"] for m in run["inputs"]["model_inputs"]] == [logged["versions"][1].model_id]
    for key in ("axis_02/effect", "alert/active"):
        hist = api(url, "metrics/get-history", run_id=rid, metric_key=key)["metrics"]
        assert sorted((int(m["step"]), int(m["timestamp"])) for m in hist) == [
            (0, int(DAY.timestamp() * 1000)), (1, int(DAY.timestamp() * 1000) + 86_400_000)], key


def test_monitoring_artifacts(logged, server) -> None:
    url, rid = logged["url"], logged["monitor_run"]
    listed = {f["path"] for f in api(url, "artifacts/list", run_id=rid).get("files", [])}
    assert {"drift", "axis_cards"} <= listed
    r = requests.get(f"{url}/get-artifact", params={"path": "drift/windows.json", "run_uuid": rid}, timeout=30)
    table = r.json()
    assert table["columns"] == list(tracking.TABLE_COLUMNS) and len(table["data"]) == 8
    _, store = server
    files = [p for p in store.rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}
    assert any(p.name.startswith("axis_02") for p in files)


def test_model_pages(logged) -> None:
    url = logged["url"]
    champion = api(url, "registered-models/alias", name="lw-ui", alias="champion")["model_version"]
    assert champion["version"] == "2"
    assert "[`models:/lw-ui/1`](#/models/lw-ui/versions/1?workflowType=machine_learning)" in champion["description"]
    v1 = api(url, "model-versions/get", name="lw-ui", version="1")["model_version"]
    t1 = tags_of(v1)
    assert t1["champion.event"] == "demoted" and t1["champion.replaced_by"] == "2"
    assert "No longer champion" in v1["description"]
    model_id = logged["versions"][1].model_id
    assert champion["source"] == f"models:/{model_id}"
    lm = api(url, f"logged-models/{model_id}")["model"]
    assert lm["info"]["source_run_id"] == champion["run_id"]
    r = requests.get(f"{url}/ajax-api/2.0/mlflow/logged-models/{model_id}/artifacts/files",
                     params={"artifact_file_path": "MLmodel"}, timeout=30)
    mlmodel = yaml.safe_load(r.text)
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "pipeline.handoff.serving"
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert [(c["name"], c["type"]) for c in inputs] == [("image", "binary"), ("path", "string")]
    assert mlmodel.get("saved_input_example_info")
