"""pipeline.tracking.logged_model: a registered version is an MLflow pyfunc model that loads and serves, pickle-free."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from mlflow.models import Model

from pipeline import tracking
from pipeline.handoff.serving import BundleScorer
from tests.pipeline.tracking.conftest import client

REPO = Path(__file__).resolve().parents[3]


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def register_bundle(bundle: Path, **tags) -> tracking.ModelVersionInfo:
    with tracking.start_training_run("retrain"):
        return tracking.log_checkpoint_and_register(
            bundle, tags=tracking.lineage_tags(data_digest="d" * 64, code_version="git:abc", **tags),
            description="gate: all checks passed")


def test_version_is_a_pyfunc_model_over_the_checkpoint(lw_env, tiny_bundle: Path, tmp_path: Path) -> None:
    mv = register_bundle(tiny_bundle)
    lm = client(lw_env).get_logged_model(mv.model_id)
    assert lm.source_run_id == mv.run_id and str(lm.status) == "READY" and lm.model_type == "InfoDiffusion"
    assert json.loads(lm.tags["mlflow.modelVersions"]) == [{"name": lw_env.model_name, "version": "1"}]
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=lm.artifact_location, dst_path=str(tmp_path / "m"),
                                                     tracking_uri=lw_env.mlflow_tracking_uri))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert (flavor["loader_module"], flavor["data"]) == ("pipeline.handoff.serving", "data/checkpoint")
    meta = Model.load(str(local))
    assert meta.signature.inputs.input_names() == ["image", "path"]
    assert meta.signature.outputs.input_names() == [*(f"z_{i}" for i in range(8)), "anomaly_score", "is_anomaly",
                                                    "threshold", "scorer"]
    example = meta.load_input_example(str(local))
    assert list(example.columns) == ["image"] and len(example) == 1
    assert "torch==" in (local / "requirements.txt").read_text()
    files = [p for p in local.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".pt", ".pth")]  # no pickle anywhere
    assert {p.relative_to(local).as_posix() for p in files} >= {
        "data/checkpoint/weights.safetensors", "data/checkpoint/config.json",
        "data/checkpoint/linewatch/calibration.parquet", "data/checkpoint/linewatch/gate.json"}
    stored = Path(lm.artifact_location.removeprefix("file://"))
    modes = {stat.S_IMODE(p.stat().st_mode) for p in stored.rglob("*") if p.is_file()}
    assert modes == {0o644}, "model files must be readable by a server running as another user"
    assert mv.description.startswith("gate: all checks passed") and f"runs:/{mv.run_id}" in mv.description
    assert "**Parent:** none" in mv.description


def test_pyfunc_load_model_by_alias_scores_like_the_monitor(lw_env, tiny_bundle: Path, elpv_small) -> None:
    mv = register_bundle(tiny_bundle)
    tracking.set_alias("champion", mv.version, who="ci")
    model = mlflow.pyfunc.load_model(f"models:/{lw_env.model_name}@champion")
    frame = pd.DataFrame({"image": [png_bytes(im) for im in elpv_small.images[:2]]})
    got = model.predict(frame)
    pd.testing.assert_frame_equal(got, BundleScorer(tiny_bundle).predict(frame))
    assert got["is_anomaly"].dtype == bool and np.isfinite(got["anomaly_score"]).all()
    with pytest.raises(Exception, match="image"):  # the signature refuses a table without the input columns
        model.predict(pd.DataFrame({"file": ["x.png"]}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} not up after {timeout_s} s")


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(lw_env, tiny_bundle: Path, elpv_small, tmp_path: Path) -> None:
    mv = register_bundle(tiny_bundle)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": lw_env.mlflow_tracking_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # venv active
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{lw_env.model_name}/{mv.version}",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        _wait_http(f"http://127.0.0.1:{port}/ping", proc, 300)
        images = [png_bytes(im) for im in elpv_small.images[:2]]
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in images]}}
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = pd.DataFrame(r.json()["predictions"])
        expected = BundleScorer(tiny_bundle).predict(pd.DataFrame({"image": images}))
        # float32 scoring in another process (its own thread count): equal to float32 rounding, scores sit near 0
        np.testing.assert_allclose(got["anomaly_score"], expected["anomaly_score"], rtol=1e-5, atol=1e-5)
        assert got["is_anomaly"].tolist() == expected["is_anomaly"].tolist()
        np.testing.assert_allclose(got["z_0"], expected["z_0"], rtol=1e-5, atol=1e-6)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
