"""Fixtures of the tracking tests: a local SQLite MLflow store per test module (creating the schema takes seconds),
a registered-model name per test, fake and real checkpoints."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline import settings as lw_settings
from pipeline import tracking


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lwhome")


@pytest.fixture
def lw_env(store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    monkeypatch.setenv("LINEWATCH_HOME", str(store_dir))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store_dir / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("LINEWATCH_MODEL_NAME", "lw-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:60])
    monkeypatch.setenv("LINEWATCH_MLFLOW_BACKOFF_S", "0")
    monkeypatch.chdir(tmp_path)  # anything written relative to cwd (./mlruns) would land here
    tracking.reset()
    yield lw_settings.get_settings()
    tracking.reset()
    assert not (tmp_path / "mlruns").exists(), "MLflow wrote ./mlruns"


def fake_checkpoint(path: Path, payload: bytes = b"weights") -> Path:
    path.mkdir(parents=True)
    (path / "weights.safetensors").write_bytes(payload)
    (path / "config.json").write_text(json.dumps({"format_version": 1}))
    (path / "train_state.pt").write_bytes(b"pickled resume state")  # must not be registered
    (path / "bundle").mkdir()
    (path / "bundle" / "gate.json").write_text('{"passed": true}')  # subfolders travel with the model
    return path


def client(st: lw_settings.Settings) -> MlflowClient:
    return MlflowClient(tracking_uri=st.mlflow_tracking_uri, registry_uri=st.mlflow_registry_uri)


def register(tmp_path: Path, tag: str, **tags) -> tracking.ModelVersionInfo:
    ckpt = fake_checkpoint(tmp_path / f"ckpt-{tag}", payload=tag.encode())
    with tracking.start_training_run(f"train-{tag}"):
        return tracking.log_checkpoint_and_register(ckpt, tags=tracking.lineage_tags(data_digest="d" * 64, **tags))


DAY = dt.datetime(2026, 1, 11, 23, 0, tzinfo=dt.UTC)  # plant midnight in Europe/Berlin


@pytest.fixture(scope="module")
def two_windows() -> list:
    """Real drift results: a healthy window, then one whose axis 2 moved by +1.5 sd."""
    rng = np.random.default_rng(0)
    from pipeline.analysis.drift import DriftDetector

    det = DriftDetector(alpha=0.01, null="iid", n_permutations=50, min_window=20).fit(rng.normal(size=(300, 4)))
    healthy = det.test(rng.normal(size=(60, 4)))
    moved = rng.normal(size=(60, 4))
    moved[:, 2] += 1.5
    return [healthy, det.test(moved)]


def windows_of(results: list) -> list[tracking.DriftWindowMetrics]:
    labels = {0: "mean intensity (r = 0.91)", 2: "sharpness (r = -0.62)"}
    out = []
    for i, res in enumerate(results):
        top = 2 if res.detected else None
        out.append(tracking.drift_window(
            res, line="L1", window_id=f"2026-01-{12 + i}", start=DAY + dt.timedelta(days=i),
            alert_active=bool(res.detected), top_axis=top, labels=labels, n_images=60, n_anomalous=3 * i,
            summary="axis 2 (sharpness, r = -0.62) moved by +1.5 σ; 80% of the drift" if top is not None else ""))
    return out
