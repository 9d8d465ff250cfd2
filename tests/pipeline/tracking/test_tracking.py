"""pipeline.tracking and pipeline.settings on a local SQLite MLflow store (one store per module: creating the
schema takes seconds; every test gets its own registered-model name)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline import settings as lw_settings
from pipeline import tracking
from tests.pipeline.tracking.conftest import client, fake_checkpoint, register

# ---------------------------------------------------------------------------------------------------------------
# settings


def test_settings_defaults_are_local_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    st = lw_settings.get_settings({})
    assert st.home == (tmp_path / ".linewatch").resolve()
    assert st.mlflow_tracking_uri == f"sqlite:///{st.home / 'mlflow.db'}"
    assert st.mlflow_registry_uri == st.mlflow_tracking_uri
    assert st.mlflow_artifacts_dir == st.home / "mlartifacts"
    assert st.mlflow_is_local
    assert (st.model_name, st.training_experiment, st.monitoring_experiment) == (
        "linewatch-infodiffusion", "linewatch-training", "linewatch-monitoring")
    assert st.timezone == lw_settings.local_timezone({}) and st.webhook_url is None
    assert st.work_pool == "linewatch-process"
    lw_settings.ensure_dirs(st)
    assert st.state_dir.is_dir() and st.checkpoints_dir.is_dir() and st.drop_dir.is_dir()
    assert not (tmp_path / "mlruns").exists()


def test_settings_from_env_and_errors(tmp_path: Path) -> None:
    env = {"LINEWATCH_HOME": str(tmp_path / "h"), "MLFLOW_TRACKING_URI": "http://mlflow:5000",
           "LINEWATCH_TIMEZONE": "Europe/Berlin", "LINEWATCH_WEBHOOK_URL": "http://hook/x",
           "LINEWATCH_MLFLOW_RETRIES": "5"}
    st = lw_settings.get_settings(env)
    assert not st.mlflow_is_local and st.mlflow_retries == 5 and st.zoneinfo.key == "Europe/Berlin"
    assert st.webhook_url == "http://hook/x" and st.state_dir == (tmp_path / "h" / "state").resolve()
    with pytest.raises(ValueError, match="time zone"):
        lw_settings.get_settings({"LINEWATCH_TIMEZONE": "Mars/Olympus"})
    with pytest.raises(ValueError, match="file store"):
        lw_settings.get_settings({"MLFLOW_TRACKING_URI": "file:///tmp/mlruns"})
    with pytest.raises(ValueError, match="LINEWATCH_MLFLOW_RETRIES"):
        lw_settings.get_settings({"LINEWATCH_MLFLOW_RETRIES": "many"})


def test_default_time_zone_is_the_machines(tmp_path: Path) -> None:
    """The MES stamps parts in plant time; without LINEWATCH_TIMEZONE the machine's zone is used, not UTC."""
    etc = tmp_path / "etc"
    etc.mkdir()
    assert lw_settings.local_timezone({}, etc=etc) == "UTC"  # nothing says: UTC
    (etc / "localtime").symlink_to("/usr/share/zoneinfo/Europe/Berlin")
    assert lw_settings.local_timezone({}, etc=etc) == "Europe/Berlin"
    (etc / "timezone").write_text("America/Chicago\n")
    assert lw_settings.local_timezone({}, etc=etc) == "America/Chicago"
    assert lw_settings.local_timezone({"TZ": ":Asia/Tokyo"}, etc=etc) == "Asia/Tokyo"
    assert lw_settings.local_timezone({"TZ": "Mars/Olympus"}, etc=etc) == "America/Chicago"
    assert lw_settings.get_settings({"TZ": "Asia/Tokyo"}).timezone == "Asia/Tokyo"
    assert lw_settings.get_settings({"TZ": "Asia/Tokyo", "LINEWATCH_TIMEZONE": "UTC"}).timezone == "UTC"


def test_code_version_names_a_commit_or_the_package(tmp_path: Path) -> None:
    v = lw_settings.code_version()
    assert re.fullmatch(r"git:[0-9a-f]{40}(-dirty)?|pkg:.+", v), v
    assert lw_settings.code_version(tmp_path).startswith("pkg:")  # not a git checkout


# ---------------------------------------------------------------------------------------------------------------
# training lineage


def test_params_are_flattened_and_stringified(lw_env) -> None:
    cfg = {"model": {"unet": {"base_channels": 64, "channel_mult": (1, 2, 4)}, "latent_dim": 32},
           "note": "x" * 900}
    with tracking.start_training_run("params") as rid:
        logged = tracking.log_params_flat(cfg)
    summary = tracking.run_summary(rid)
    assert summary.params["model.unet.base_channels"] == "64"
    assert summary.params["model.unet.channel_mult"] == "[1, 2, 4]"
    assert summary.params["model.latent_dim"] == "32"
    assert len(summary.params["note"]) == 500 and summary.params["note"].endswith("...")
    assert logged == summary.params
    assert summary.status == "FINISHED" and summary.experiment == "linewatch-training"
    assert summary.tags["linewatch.kind"] == "training" and summary.tags["linewatch.code_version"]
    assert summary.artifact_uri.startswith((lw_env.mlflow_artifacts_dir / "linewatch-training").as_uri())


def test_params_accept_nested_dataclasses(lw_env) -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Inner:
        a: int = 1

    @dataclass(frozen=True)
    class Outer:
        inner: Inner = Inner()
        b: str = "y"

    assert tracking.flatten_params(Outer(), prefix="cfg.") == {"cfg.inner.a": "1", "cfg.b": "y"}
    with pytest.raises(ValueError, match="mapping or a dataclass"):
        tracking.flatten_params([1, 2])


def test_history_is_logged_as_metric_series(lw_env) -> None:
    with tracking.start_training_run("history") as rid:
        n = tracking.log_history({"loss": [1.0, 0.5, 0.25], "mmd": [0.3, 0.2, float("nan")], "final": 0.1})
        n += tracking.log_history([{"step": 10, "val_loss": 0.9}, {"step": 20, "val_loss": 0.7}], prefix="")
        assert tracking.get_metric_history("train.loss") == [(0, 1.0), (1, 0.5), (2, 0.25)]
        assert tracking.get_metric_history("train.mmd") == [(0, 0.3), (1, 0.2)]  # NaN skipped
        assert tracking.get_metric_history("val_loss") == [(10, 0.9), (20, 0.7)]
    assert n == 7
    assert tracking.run_summary(rid).metrics["train.loss"] == 0.25


def test_dataset_is_logged_with_our_digest(lw_env) -> None:
    df = pd.DataFrame({"image_id": ["a", "b", "c"], "sha256": ["1", "2", "3"]})
    digest = "ab" * 32  # a sha256 hex digest: longer than MLflow's 36-character column
    with tracking.start_training_run("data") as rid:
        tracking.log_dataset(df, name="train", digest=digest, source="/data/snapshots/ab.json", context="training")
        tracking.log_dataset(df.head(2), name="calib", digest="cd" * 32, source="/data/c.json", context="calibration")
    s = tracking.run_summary(rid)
    by_ctx = {d.context: d for d in s.datasets}
    assert by_ctx["training"].digest == digest and by_ctx["training"].name == "train"
    assert by_ctx["calibration"].digest == "cd" * 32
    assert "/data/snapshots/ab.json" in by_ctx["training"].source
    assert s.tags["data.training.digest"] == digest and s.tags["data.calibration.rows"] == "2"
    with tracking.start_training_run("no-digest"), pytest.raises(ValueError, match="digest"):
        tracking.log_dataset(df, name="x", digest="", source="s", context="training")


def test_failed_block_marks_run_failed(lw_env) -> None:
    with pytest.raises(RuntimeError, match="boom"), tracking.start_training_run("fails") as rid:
        raise RuntimeError("boom")
    assert tracking.run_summary(rid).status == "FAILED"
    assert tracking.current_run_id() is None
    with pytest.raises(ValueError, match="no MLflow run"):
        tracking.log_metrics({"x": 1.0})


def test_checkpoint_is_registered_pickle_free_and_loads(lw_env, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import models

    torch.manual_seed(0)
    preset = models.get_preset("tiny")
    model = models.InfoDiffusion(preset.model)
    ckpt = models.save_checkpoint(model, tmp_path / "ckpt", preprocess=preset.preprocess,
                                  train_state={"step": 3})
    with tracking.start_training_run("register") as rid:
        mv = tracking.log_checkpoint_and_register(
            ckpt, tags=tracking.lineage_tags(data_digest="d" * 64, calibration_digest="c" * 64, parent_version=None,
                                             code_version="git:abc", gates={"auroc": 0.8, "passed": True}))
    assert (mv.version, mv.run_id, mv.source) == (1, rid, f"models:/{mv.model_id}")  # an MLflow 3 logged model
    assert tracking.run_summary(rid).model_outputs == (mv.model_id,)  # the training run produced it
    assert mv.tags["data.train_digest"] == "d" * 64 and mv.tags["lineage.parent_version"] == "none"
    assert mv.tags["gate.passed"] == "True" and mv.tags["lineage.code_version"] == "git:abc"
    assert mv.aliases == ()  # registering never moves an alias
    got = tracking.download_model(1, tmp_path / "dl")
    assert sorted(p.name for p in got.iterdir()) == ["config.json", "weights.safetensors"]  # no train_state.pt
    loaded = models.load_checkpoint(got)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert tracking.run_summary(rid).tags["linewatch.registered_version"] == "1"
    assert tracking.run_summary(rid).tags["linewatch.model_uri"] == f"models:/{lw_env.model_name}/1"


def test_not_a_checkpoint_is_refused(lw_env, tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "weights.safetensors").write_bytes(b"w")
    with tracking.start_training_run("bad"), pytest.raises(ValueError, match="config.json"):
        tracking.log_checkpoint_and_register(tmp_path / "x")
    assert tracking.list_versions() == []


# ---------------------------------------------------------------------------------------------------------------
# registry: aliases, promote, rollback


def test_aliases_move_with_who_and_why(lw_env, tmp_path: Path) -> None:
    v1 = register(tmp_path, "a")
    v2 = register(tmp_path, "b", parent_version=1)
    assert tracking.get_alias_version("champion") is None
    ch = tracking.set_alias("champion", v1.version, who="alice", why="first model")
    assert ch.previous is None and ch.version == 1
    tracking.set_alias("challenger", v2.version, who="nightly", why="passed gates")
    ch = tracking.set_alias("champion", v2.version, who="bob", why="better AUROC", event="promote")
    assert (ch.previous, ch.version, ch.who) == (1, 2, "bob")
    assert tracking.get_alias_version("champion") == 2 and tracking.get_alias_version("challenger") == 2
    info = tracking.get_model_version(2)
    assert info.tags["champion.set_by"] == "bob" and info.tags["champion.reason"] == "better AUROC"
    assert info.tags["champion.previous_version"] == "1" and info.tags["champion.event"] == "promote"
    assert info.tags["challenger.set_by"] == "nightly" and info.tags["lineage.parent_version"] == "1"
    assert set(info.aliases) == {"champion", "challenger"}
    with pytest.raises(tracking.RegistryError, match=r"no version 7; known versions: \[1, 2\]"):
        tracking.set_alias("champion", 7)
    assert tracking.get_alias_version("champion") == 2


def test_rollback_walks_back_the_promotion_history(lw_env, tmp_path: Path) -> None:
    for tag in "abc":
        register(tmp_path, tag)
    with pytest.raises(tracking.RegistryError, match="no 'champion' alias"):
        tracking.rollback()
    for v in (1, 2, 3):
        tracking.set_alias("champion", v, who="ci")
    ch = tracking.rollback(who="carol", why="false alarms on line 2")
    assert (ch.previous, ch.version) == (3, 2)
    demoted = tracking.get_model_version(3)
    assert demoted.tags["champion.rolled_back_by"] == "carol"
    assert demoted.tags["champion.rollback_reason"] == "false alarms on line 2"
    assert tracking.get_model_version(2).tags["champion.event"] == "rollback"
    assert tracking.rollback().version == 1  # a rollback does not rewrite the history it walks
    with pytest.raises(tracking.RegistryError, match="no recorded previous"):
        tracking.rollback()
    assert tracking.get_alias_version("champion") == 1


def test_download_by_alias_verifies_digest(lw_env, tmp_path: Path) -> None:
    v = register(tmp_path, "dl")
    tracking.set_alias("champion", v.version)
    got = tracking.download_model("champion", tmp_path / "out")
    assert (got / "weights.safetensors").read_bytes() == b"dl"
    assert (got / "bundle" / "gate.json").read_text() == '{"passed": true}'
    assert not (got / "train_state.pt").exists()
    with pytest.raises(tracking.RegistryError, match="no alias 'challenger'"):
        tracking.download_model("challenger", tmp_path / "out2")


# ---------------------------------------------------------------------------------------------------------------
# monitoring


def test_drift_metrics_are_named_test_or_axis_first_with_window_steps(lw_env, tmp_path: Path) -> None:
    import datetime as dt

    day = dt.datetime(2026, 1, 11, tzinfo=dt.UTC)
    with tracking.start_monitoring_run("monitor-L1") as rid:
        for w in range(3):
            window = tracking.DriftWindowMetrics(
                detected=w == 2, mmd_stat=0.01 * w, mmd_p=0.5 / (w + 1), start=day + dt.timedelta(days=w),
                axes={3: {"effect": 0.1 * w, "ks": 0.2, "p": 0.04, "psi": 0.3}, 12: {"effect": 0.0}},
            )
            logged = tracking.log_drift_window(w, window)
        tracking.log_drift_window(3, {"detected": False, "axes": {3: {"effect": 0.05}}})  # mapping form
        tracking.log_alert_state(active=True, step=3, level="drift", moved_axes=[3], message="axis 3 moved",
                                 state={"open": ["axis_03"]}, timestamp=day + dt.timedelta(days=3))
        series = tracking.get_metric_history("axis_03/effect")
        assert [s for s, _ in series] == [0, 1, 2, 3]
        assert [v for _, v in series] == pytest.approx([0.0, 0.1, 0.2, 0.05])
        assert tracking.get_metric_history("drift/detected") == [(0, 0.0), (1, 0.0), (2, 1.0), (3, 0.0)]
        stamped = tracking.get_metric_history("mmd/p", with_timestamps=True)
        assert [t for _, t, _ in stamped] == [int((day + dt.timedelta(days=w)).timestamp() * 1000) for w in range(3)]
        alert = tracking.get_metric_history("alert/active", with_timestamps=True)
        assert alert == [(3, int((day + dt.timedelta(days=3)).timestamp() * 1000), 1.0)]
    assert set(logged) == {"drift/detected", "drift/moved_axes", "mmd/stat", "mmd/p", "axis_03/effect",
                           "axis_03/ks", "axis_03/p", "axis_03/psi", "axis_12/effect"}
    s = tracking.run_summary(rid)
    assert s.experiment == "linewatch-monitoring" and s.tags["linewatch.kind"] == "monitoring"
    assert s.tags["alert.moved_axes"] == "axis_03" and s.metrics["alert/active"] == 1.0
    assert tracking.axis_key(7) == "axis_07"


def test_figures_and_images_are_artifacts(lw_env, tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.bar([0, 1], [1, 2])
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "axis_03.md").write_text("# axis 3")
    with tracking.start_monitoring_run("report") as rid:
        tracking.log_figure(fig, "report/drift.png")
        tracking.log_image(np.zeros((8, 8), np.uint8), "examples/window0.png")
        tracking.log_artifacts(cards, "axis_cards")
    plt.close(fig)
    c = client(lw_env)
    names = {a.path for p in ("report", "examples", "axis_cards") for a in c.list_artifacts(rid, p)}
    assert names == {"report/drift.png", "examples/window0.png", "axis_cards/axis_03.md"}


# ---------------------------------------------------------------------------------------------------------------
# reliability


def test_unreachable_server_fails_after_bounded_retries(lw_env, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("LINEWATCH_MLFLOW_BACKOFF_S")
    sleeps: list[float] = []
    monkeypatch.setattr(tracking.client, "_sleep", sleeps.append)
    tracking.reset()
    with pytest.raises(tracking.TrackingUnavailable, match=rf"http://127.0.0.1:{port} is unreachable after 3 tries"):
        with tracking.start_training_run("never"):
            pass
    assert sleeps == [1.0, 2.0]  # 3 tries, back-off 1 s then 2 s
    with pytest.raises(tracking.TrackingUnavailable):
        tracking.get_alias_version("champion")


def test_failure_during_registration_leaves_nothing_half_registered(
    lw_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = register(tmp_path, "ok")
    tracking.set_alias("champion", v1.version)

    def down(*args, **kwargs):
        raise MlflowException("API request to http://mlflow:5000 failed with exception Connection refused",
                              error_code="INTERNAL_ERROR")

    monkeypatch.setattr(MlflowClient, "create_model_version", down)
    ckpt = fake_checkpoint(tmp_path / "ckpt-new")
    with pytest.raises(tracking.TrackingUnavailable, match="after 3 tries"):
        with tracking.start_training_run("half") as rid:
            tracking.log_checkpoint_and_register(ckpt)
    assert [v.version for v in tracking.list_versions()] == [1]
    assert tracking.get_alias_version("champion") == 1
    assert tracking.run_summary(rid).status == "FAILED"
    monkeypatch.setattr(MlflowClient, "log_model_artifacts", down)  # upload fails: registration is never attempted
    monkeypatch.setattr(MlflowClient, "create_model_version", lambda *a, **k: pytest.fail("registered"))
    with pytest.raises(tracking.TrackingUnavailable), tracking.start_training_run("half2"):
        tracking.log_checkpoint_and_register(ckpt)
    assert [v.version for v in tracking.list_versions()] == [1]


def test_registration_retry_after_lost_response_does_not_duplicate(
    lw_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = MlflowClient.create_model_version
    calls = []

    def lost_response(self, *args, **kwargs):
        calls.append(1)
        real(self, *args, **kwargs)  # the server created it ...
        raise MlflowException("API request to x failed with exception timed out", error_code="INTERNAL_ERROR")

    monkeypatch.setattr(MlflowClient, "create_model_version", lost_response)
    mv = register(tmp_path, "once")
    assert len(calls) == 1 and mv.version == 1
    assert [v.version for v in tracking.list_versions()] == [1]


def test_ui_command_uses_the_local_store(lw_env) -> None:
    cmd = tracking.ui_command(5123)
    assert cmd[1:4] == ["-m", "mlflow", "ui"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == lw_env.mlflow_tracking_uri
    assert cmd[cmd.index("--default-artifact-root") + 1] == lw_env.mlflow_artifacts_dir.as_uri()
    assert cmd[-6:] == ["--host", "127.0.0.1", "--port", "5123", "--workers", "1"]
    with pytest.raises(ValueError, match="server"):
        tracking.ui_command(5000, lw_settings.get_settings({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}))


def test_every_setting_is_documented_with_its_default() -> None:
    """README and docs/deployment.md list every variable that pipeline/settings.py and flows/ read, in a table."""
    import re

    root = Path(__file__).resolve().parents[3]
    code = "".join((root / f).read_text() for f in ("pipeline/settings.py", "flows/runners.py", "flows/__init__.py"))
    names = set(re.findall(r'"((?:LINEWATCH|MLFLOW)_[A-Z_]+)"', code)) - {"LINEWATCH_TEST_CRASH_AT"}
    assert {"LINEWATCH_DROP", "LINEWATCH_TIMEZONE", "LINEWATCH_HOME", "LINEWATCH_TASK_RUNNER"} <= names
    for doc in ("README.md", "docs/deployment.md"):
        rows = {m.group(1) for m in re.finditer(r"^\| `([A-Z_]+)` \| [^|]+ \| [^|]+ \|$", (root / doc).read_text(),
                                                re.M)}
        assert names <= rows, (doc, sorted(names - rows))
