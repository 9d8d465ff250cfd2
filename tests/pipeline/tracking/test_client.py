"""pipeline.tracking.client: the experiments open in the MLflow UI's machine-learning layout."""

from __future__ import annotations

from pipeline import tracking
from tests.pipeline.tracking.conftest import client


def test_experiments_are_tagged_as_machine_learning(lw_env) -> None:
    with tracking.start_training_run("t"), tracking.start_monitoring_run("m"):
        pass
    c = client(lw_env)
    for name, kind in ((lw_env.training_experiment, "training"), (lw_env.monitoring_experiment, "monitoring")):
        tags = c.get_experiment_by_name(name).tags
        assert tags["mlflow.experimentKind"] == tracking.EXPERIMENT_KIND == "custom_model_development"
        assert tags["linewatch.kind"] == kind and tags["mlflow.note.content"]


def test_an_older_experiment_gets_the_tag_and_keeps_its_description(lw_env, monkeypatch) -> None:
    monkeypatch.setenv("LINEWATCH_TRAINING_EXPERIMENT", "older-training")
    c = client(lw_env)
    exp_id = c.create_experiment("older-training",
                                 artifact_location=(lw_env.mlflow_artifacts_dir / "old").as_uri(),
                                 tags={"mlflow.note.content": "our notes", "mlflow.experimentKind": "genai_development"})
    tracking.reset()
    with tracking.start_training_run("t") as rid:
        pass
    assert c.get_run(rid).info.experiment_id == exp_id
    tags = c.get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development" and tags["mlflow.note.content"] == "our notes"
