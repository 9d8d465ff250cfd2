"""pipeline.tracking.ui: links open the UI's model-training layout."""

from __future__ import annotations

from pipeline import settings as lw_settings
from pipeline import tracking


def test_links_select_the_model_training_layout(lw_env) -> None:
    assert tracking.ui_url() == "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    assert tracking.run_page("3", "abc") == "#/experiments/3/runs/abc?workflowType=machine_learning"
    assert tracking.experiment_page("3") == "#/experiments/3/runs?workflowType=machine_learning"
    assert tracking.model_version_page("lw model", 2) == "#/models/lw%20model/versions/2?workflowType=machine_learning"
    server = lw_settings.get_settings({"MLFLOW_TRACKING_URI": "http://mlflow:5000/"})
    assert tracking.ui_url("models", settings=server) == "http://mlflow:5000/#/models?workflowType=machine_learning"
