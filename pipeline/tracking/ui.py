"""The MLflow UI: the command that opens it on the local store, and links to its pages.

The MLflow 3 UI has two layouts, "GenAI" and "Model training"; it remembers the last one per browser and starts in
GenAI. Every link made here carries ``workflowType=machine_learning``, which opens the model-training layout (runs,
charts, model registry) and keeps it while one clicks on. The experiments themselves are tagged
``mlflow.experimentKind=custom_model_development`` (``pipeline.tracking.client``).
"""

from __future__ import annotations

import shlex
import sys
from urllib.parse import quote

from pipeline.settings import Settings, get_settings
from pipeline.tracking.client import configured_settings

WORKFLOW_QUERY = "workflowType=machine_learning"
"""Query parameter of the UI's routes that selects the model-training layout."""


def ui_command(port: int = 5000, settings: Settings | None = None) -> list[str]:
    """The command that opens the MLflow UI on the local store (``linewatch ui`` runs it).

    Raises:
        ValueError: The configured tracking URI is a server (open its URL instead).
    """
    settings = settings or configured_settings() or get_settings()
    if not settings.mlflow_is_local:
        raise ValueError(
            f"MLFLOW_TRACKING_URI is a server ({settings.mlflow_tracking_uri}); open it in a browser instead"
        )
    return [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", settings.mlflow_tracking_uri,
        "--default-artifact-root", settings.mlflow_artifacts_dir.resolve().as_uri(),
        "--host", "127.0.0.1",
        "--port", str(int(port)),
        "--workers", "1",
    ]


def ui_command_text(port: int = 5000, settings: Settings | None = None) -> str:
    """``ui_command`` as one shell line (``mlflow ui ...``)."""
    cmd = ui_command(port, settings)
    return shlex.join(["mlflow", *cmd[3:]])


def ui_base_url(port: int = 5000, settings: Settings | None = None) -> str:
    """Where the UI is: the tracking server's URL, or ``http://127.0.0.1:<port>`` for ``linewatch ui``."""
    settings = settings or configured_settings() or get_settings()
    if settings.mlflow_is_local:
        return f"http://127.0.0.1:{int(port)}"
    return settings.mlflow_tracking_uri.rstrip("/")


def page(route: str) -> str:
    """A UI route with the model-training layout selected: ``#/<route>?workflowType=machine_learning``."""
    route = route.lstrip("#/")
    sep = "&" if "?" in route else "?"
    return f"#/{route}{sep}{WORKFLOW_QUERY}"


def experiment_page(experiment_id: str) -> str:
    """Route of an experiment's runs table."""
    return page(f"experiments/{experiment_id}/runs")


def run_page(experiment_id: str, run_id: str) -> str:
    """Route of a run's overview."""
    return page(f"experiments/{experiment_id}/runs/{run_id}")


def model_version_page(name: str, version: int | str) -> str:
    """Route of a registered model version."""
    return page(f"models/{quote(name, safe='')}/versions/{int(version)}")


def ui_url(route: str = "experiments", port: int = 5000, settings: Settings | None = None) -> str:
    """A full UI link (``http://127.0.0.1:5000/#/experiments?workflowType=machine_learning``)."""
    return f"{ui_base_url(port, settings)}/{page(route)}"
