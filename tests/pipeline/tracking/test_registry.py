"""pipeline.tracking.registry: demotion recorded on the demoted version, lineage as models:/ URIs, old-layout downloads."""

from __future__ import annotations

from pathlib import Path

from pipeline import tracking
from tests.pipeline.tracking.conftest import client, fake_checkpoint, register


def test_demoted_version_says_so(lw_env, tmp_path: Path) -> None:
    for tag in "abc":
        register(tmp_path, tag)
    tracking.set_alias("champion", 1, who="ci", why="first", event="promote")
    assert tracking.get_model_version(1).tags["champion.event"] == "promote"
    tracking.set_alias("champion", 2, who="bob", why="better AUROC", event="promote")
    v1 = tracking.get_model_version(1)
    assert v1.tags["champion.event"] == "demoted" and v1.tags["champion.replaced_by"] == "2"
    assert v1.tags["champion.demoted_by"] == "bob" and v1.tags["champion.demoted_reason"] == "better AUROC"
    assert v1.tags["champion.set_by"] == "ci"  # its own promotion stays on record
    assert "No longer champion" in v1.description and f"models:/{lw_env.model_name}/2" in v1.description
    assert tracking.get_model_version(2).tags["champion.event"] == "promote"
    tracking.set_alias("champion", 2, who="bob")  # same holder again: nobody is demoted
    assert tracking.get_model_version(2).tags["champion.event"] == "set"
    assert tracking.rollback(who="carol", why="false alarms").version == 1
    v2 = tracking.get_model_version(2)
    assert v2.tags["champion.event"] == "rolled back" and v2.tags["champion.replaced_by"] == "1"
    assert tracking.get_model_version(1).tags["champion.event"] == "rollback"
    assert "champion.event" not in tracking.get_model_version(3).tags  # never held it: nothing recorded


def test_lineage_is_written_as_models_uris(lw_env, tmp_path: Path) -> None:
    register(tmp_path, "a")
    v2 = register(tmp_path, "b", parent_version=1, code_version="git:abc")
    name = lw_env.model_name
    assert v2.tags["lineage.parent_uri"] == f"models:/{name}/1" and v2.uri == f"models:/{name}/2"
    assert f"[`models:/{name}/1`](#/models/{name}/versions/1?workflowType=machine_learning)" in v2.description
    assert f"runs:/{v2.run_id}" in v2.description and "git:abc" in v2.description
    assert "snapshot `dddddddddddddddd`" in v2.description
    assert "**Parent:** none" in tracking.get_model_version(1).description


def test_versions_registered_from_run_artifacts_still_download(lw_env, tmp_path: Path) -> None:
    """A store written before the pyfunc models (``runs:/<run>/model`` sources) keeps working."""
    ckpt = fake_checkpoint(tmp_path / "old", payload=b"old weights")
    c = client(lw_env)
    with tracking.start_training_run("old-layout") as rid:
        c.log_artifact(rid, str(ckpt / "weights.safetensors"), "model")
        c.log_artifact(rid, str(ckpt / "config.json"), "model")
    c.create_registered_model(lw_env.model_name)
    c.create_model_version(lw_env.model_name, f"runs:/{rid}/model", run_id=rid)
    mv = tracking.get_model_version(1)
    assert mv.model_id is None and mv.source == f"runs:/{rid}/model"
    got = tracking.download_model(1, tmp_path / "dl")
    assert (got / "weights.safetensors").read_bytes() == b"old weights"
