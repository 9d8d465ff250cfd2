"""pipeline.training.sweep / ``linewatch sweep`` on the tiny preset with a local SQLite MLflow store in tmp_path."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline import settings as lw_settings
from pipeline import tracking
from pipeline.cli import CLIError
from pipeline.training.sweep import GridPoint, grid, preset_for, sweep, table_markdown


@pytest.fixture
def lw_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LINEWATCH_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("LINEWATCH_MLFLOW_BACKOFF_S", "0")
    monkeypatch.chdir(tmp_path)
    tracking.reset()
    yield lw_settings.get_settings()
    tracking.reset()
    assert not (tmp_path / "mlruns").exists(), "MLflow wrote ./mlruns"


def test_grid_and_preset_overrides() -> None:
    """The grid is the cartesian product without duplicates; zeta < 1 switches the stochastic head on."""
    pts = grid((0.0, 0.1, 0.1), (1.0, 0.5), (8,))
    assert pts == [GridPoint(0.0, 1.0, 8), GridPoint(0.0, 0.5, 8), GridPoint(0.1, 1.0, 8), GridPoint(0.1, 0.5, 8)]
    assert pts[2].name == "lam0.1_zeta1_d8"
    p = preset_for("tiny", GridPoint(0.3, 0.5, 6))
    assert (p.model.loss.lambda_mmd, p.model.loss.zeta, p.model.latent_dim) == (0.3, 0.5, 6)
    assert p.model.encoder.stochastic
    assert not preset_for("tiny", GridPoint(0.3, 1.0, 6)).model.encoder.stochastic
    for bad in (dict(lambdas=(-1,)), dict(zetas=(1.5,)), dict(latent_dims=(0,)), dict(lambdas=())):
        kw = {"lambdas": (0.1,), "zetas": (1.0,), "latent_dims": (8,), **bad}
        with pytest.raises(ValueError):
            grid(**kw)


def test_sweep_rejects_bad_input(lw_env, elpv_small) -> None:
    """Neither / both image sources, or probe labels of the wrong length, fail before any training."""
    with pytest.raises(ValueError, match="either images or snapshot"):
        sweep(None)
    with pytest.raises(ValueError, match="one label per evaluation image"):
        sweep(elpv_small.images, probe_labels={"t": elpv_small.types[:5]}, steps=1)


@pytest.mark.slow
def test_sweep_logs_parent_and_children(lw_env, elpv_small, tmp_path: Path) -> None:
    """Two grid points: one parent run, two nested child runs with params, metrics and artifacts; one row each."""
    import torch

    torch.set_num_threads(1)
    res = sweep(
        elpv_small.images[:16],
        preset="tiny",
        lambdas=(0.0, 0.1),
        latent_dims=(4,),
        steps=3,
        batch_size=4,
        eval_images=elpv_small.images,
        probe_labels={"mono_poly": elpv_small.types, "defective": (elpv_small.probs > 0.5).astype(int)},
        out_dir=tmp_path / "out",
        run_name="sweep-test",
        traverse_steps=2,
        progress=False,
    )
    t = res.table
    assert len(t) == 2 and t["point"].tolist() == ["lam0_zeta1_d4", "lam0.1_zeta1_d4"]
    assert (t["status"] == "ok").all(), t["error"].tolist()
    for col in ("final_loss", "mmd_to_prior", "disentanglement", "probe.mono_poly.auroc_mean"):
        assert np.isfinite(t[col].astype(float)).all(), col
    assert len(res.child_run_ids) == 2 and list(t["run_id"]) == list(res.child_run_ids)
    assert "| lam0_zeta1_d4 |" in res.markdown()

    client = MlflowClient(tracking_uri=lw_env.mlflow_tracking_uri)
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep-test"
    assert parent.data.params["sweep.lambdas"] == "[0.0, 0.1]"
    parent_files = {f.path for f in client.list_artifacts(res.parent_run_id, "sweep")}
    assert parent_files == {"sweep/sweep_table.csv", "sweep/sweep_table.md", "sweep/sweep_summary.png"}
    for rid, lam in zip(res.child_run_ids, ("0.0", "0.1"), strict=True):
        child = client.get_run(rid)
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == res.parent_run_id
        assert child.data.params["lambda_mmd"] == lam and child.data.params["latent_dim"] == "4"
        assert child.data.params["model.loss.lambda_mmd"] == lam
        m = child.data.metrics
        for key in ("final.loss", "final.eps_mse", "quality.mmd_to_prior", "quality.active_axes",
                    "disentanglement.total", "disentanglement.mean_intensity.gap",
                    "probe.mono_poly.auroc_mean", "probe.defective.accuracy_mean"):
            assert key in m, key
        files = {f.path for f in client.list_artifacts(rid, "sweep")}
        assert {"sweep/traversal.png", "sweep/disentanglement.csv"} <= files
    found = client.search_runs([parent.info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    assert {r.info.run_id for r in found} == set(res.child_run_ids)
    assert (tmp_path / "out" / "sweep_summary.png").stat().st_size > 0


def test_failed_point_does_not_sink_the_sweep(lw_env, elpv_small, tmp_path: Path, monkeypatch) -> None:
    """A point whose training raises ends as a FAILED child and a 'failed' row; the sweep carries on."""
    import pipeline.training.sweep as sw

    def boom(*a, **k):
        raise RuntimeError("non-finite loss nan at step 3; lower the lr or check the data")

    monkeypatch.setattr("models.train", boom)
    res = sw.sweep(elpv_small.images[:8], lambdas=(0.1,), latent_dims=(4,), steps=2, out_dir=tmp_path / "o",
                   progress=False)
    assert res.table["status"].tolist() == ["failed"] and "non-finite" in res.table["error"].iloc[0]
    client = MlflowClient(tracking_uri=lw_env.mlflow_tracking_uri)
    child = client.get_run(res.child_run_ids[0])
    assert child.info.status == "FAILED" and "non-finite" in child.data.tags["sweep.error"]
    assert "failed" in table_markdown(res.table)


def _parser() -> argparse.ArgumentParser:
    from pipeline.cli import sweep as cli_sweep

    parser = argparse.ArgumentParser(prog="linewatch")
    cli_sweep.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_help_and_argument_errors(capsys) -> None:
    """--help shows examples; malformed grids are CLIErrors."""
    from pipeline.cli.sweep import cmd_sweep

    with pytest.raises(SystemExit):
        _parser().parse_args(["sweep", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "--elpv-pool" in out and "--snapshot" in out
    for argv, match in ((["--lambdas", "0,x"], "--lambdas"), (["--latent-dims", "8.5"], "integers"),
                        (["--images", "a", "--snapshot", "b"], "not both")):
        with pytest.raises(CLIError, match=match):
            cmd_sweep(_parser().parse_args(["sweep", *argv]))


@pytest.mark.slow
def test_cli_sweep_on_a_folder_json(lw_env, elpv_small, png_writer, tmp_path: Path, capsys) -> None:
    """``linewatch sweep --images DIR --json`` end to end (one grid point, 2 steps)."""
    import torch

    from pipeline.cli.sweep import cmd_sweep

    torch.set_num_threads(1)
    png_writer(elpv_small.images[:8], tmp_path / "imgs")
    args = _parser().parse_args(["sweep", "--images", str(tmp_path / "imgs"), "--lambdas", "0.1",
                                 "--latent-dims", "4", "--steps", "2", "--batch-size", "4",
                                 "--traverse-steps", "1", "--json", "--no-progress"])
    assert cmd_sweep(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["table"]) == 1 and out["table"][0]["status"] == "ok"
    assert out["table"][0]["run_id"] == out["child_run_ids"][0]


def test_sweep_with_the_pretrained_encoder(lw_env, elpv_small, tmp_path: Path, monkeypatch) -> None:
    """Sweep points of a ``"pretrained"`` encoder preset train from backbone features and probe their z; the
    backbone reads the training and the evaluation images once per sweep, not once per point."""
    import dataclasses

    import torch

    from models import get_preset
    from models.config import EncoderConfig
    from pipeline.latent import features

    torch.set_num_threads(1)
    seen: list[int] = []
    real = features.compute_features
    monkeypatch.setattr(features, "compute_features", lambda images, **kw: seen.append(len(images)) or real(images, **kw))
    tiny = get_preset("tiny")
    base = dataclasses.replace(tiny, name="tiny-pretrained", model=tiny.model.replace(
        encoder=EncoderConfig(kind="pretrained", head_hidden=16)))
    res = sweep(elpv_small.images[:16], preset=base, lambdas=(0.0, 0.1), latent_dims=(4,), steps=3, batch_size=4,
                eval_images=elpv_small.images, probe_labels={"mono_poly": elpv_small.types},
                out_dir=tmp_path / "out", run_name="sweep-pretrained", traverse_steps=2, progress=False)
    t = res.table
    assert (t["status"] == "ok").all(), t["error"].tolist()
    assert len(t) == 2 and sorted(seen)[-2:] == sorted([16, len(elpv_small.images)])
    assert sum(n > 1 for n in seen) == 2  # once for the training images, once for the evaluation images
    assert np.isfinite(t["probe.mono_poly.auroc_mean"].astype(float)).all()
    assert (tmp_path / "out" / "lam0.1_zeta1_d4" / "traversal.png").stat().st_size > 0
