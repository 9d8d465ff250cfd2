"""All MLflow calls of linewatch: training runs, the model registry, monitoring runs and the UI.

This is the only package that imports ``mlflow``. Modules, one job each:

* ``client``: configuration (``configure``, ``reset``), bounded retries, errors, the two experiments (tagged as
  "Machine learning" experiments for the MLflow 3 UI).
* ``runs``: open / close runs; params, metrics, history, tags, descriptions, datasets, tables and artifacts (uploaded
  0644 / 0755).
* ``logged_model``: a checkpoint folder logged as an MLflow 3 model (pyfunc flavour over the checkpoint, signature,
  input example; no pickle) and registered as a new version.
* ``registry``: versions, aliases with who / when / why on the promoted and on the demoted version, lineage as
  ``models:/`` URIs in the version description, downloads.
* ``monitoring``: monitoring runs (window metrics named test or axis first, the per-window table, the alert as the
  run description, links to the model version and to the monitored images).
* ``ui``: the command that opens the UI on the local store and links to its pages.

``from pipeline import tracking; tracking.x(...)`` reaches every public function below.

Where things go: local default ``sqlite:///$LINEWATCH_HOME/mlflow.db`` with artifacts under
``$LINEWATCH_HOME/mlartifacts`` (never ``./mlruns``); on the stack ``MLFLOW_TRACKING_URI=http://mlflow:5000``
(artifacts proxied by the server). Two experiments: ``linewatch-training`` and ``linewatch-monitoring``.

Typical training flow::

    from pipeline import tracking
    tracking.configure()                                  # from pipeline.settings (env); lazy, no network
    with tracking.start_training_run("retrain-20261127T0200", tags={"trigger": "schedule"}) as run_id:
        tracking.log_params_flat(config_dict)             # model.unet.base_channels = "64", ...
        tracking.log_history(result.history)              # train.loss, train.mmd ... with step
        tracking.log_dataset(train_df, name="train", digest=snap.digest, source=str(snap.path), context="training")
        mv = tracking.log_checkpoint_and_register(ckpt_dir, description="gate: all checks passed",
            tags=tracking.lineage_tags(data_digest=snap.digest, parent_version=parent, code_version=code_version()))
    tracking.set_alias("champion", mv.version, who="nightly", why="passed gates", event="promote")

Monitoring (one run per line and pass)::

    with tracking.start_monitoring_run("monitor L1 2026-11-25..2026-11-27") as run_id:
        tracking.link_model_version(model_name, version)
        tracking.log_monitored_images(rows, name="L1 2026-11-25..2026-11-27")
        windows = [tracking.drift_window(res, line="L1", window_id=..., start=..., alert_active=..., top_axis=3)
                   for res in results]
        tracking.log_monitoring_windows(windows, model_name=model_name, model_version=version,
                                        reports={"2026-11-27": "drift_L1_2026-11-27.png"})

Every logging function takes ``run_id=``; without it, the run opened by the enclosing ``start_*_run`` block (a
context variable) is used. Pass ``run_id`` explicitly inside Prefect tasks that run in worker threads.

Reliability: every call that may reach a server is tried ``settings.mlflow_retries`` times (default 3) with
back-off 1 s, 2 s, ... and then raises ``TrackingUnavailable`` ("MLflow at http://... is unreachable after 3 tries:
..."). MLflow's own HTTP retry loop is shortened (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``,
``MLFLOW_HTTP_REQUEST_TIMEOUT``) unless the environment already sets it. A model version is created only after all
its files are uploaded and listed back, and a retried registration reuses the version a lost response created, so
a failure never leaves a half-registered version nor moves an alias.
"""

from __future__ import annotations

from pipeline.tracking.client import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    RegistryError,
    TrackingUnavailable,
    check_reachable,
    configure,
    reset,
)
from pipeline.tracking.logged_model import (
    CHECKPOINT_DATA,
    LOADER_MODULE,
    build_model_folder,
    log_checkpoint_and_register,
)
from pipeline.tracking.monitoring import (
    TABLE_COLUMNS,
    WINDOW_TABLE,
    DriftWindowMetrics,
    alert_sentence,
    axis_key,
    describe_monitoring_run,
    drift_window,
    link_model_version,
    log_alert_state,
    log_chart_windows,
    log_drift_window,
    log_monitored_images,
    log_monitoring_windows,
    log_report,
    log_window_table,
    report_artifact,
    window_metrics,
    window_table,
)
from pipeline.tracking.registry import (
    ALIASES,
    CHECKPOINT_FILES,
    AliasChange,
    ModelVersionInfo,
    download_model,
    get_alias_version,
    get_model_version,
    lineage_tags,
    list_versions,
    model_uri,
    rollback,
    set_alias,
)
from pipeline.tracking.runs import (
    DatasetRef,
    RunSummary,
    current_run_id,
    flatten_params,
    get_metric_history,
    log_artifact,
    log_artifacts,
    log_dataset,
    log_figure,
    log_history,
    log_image,
    log_metrics,
    log_params_flat,
    log_table,
    run_summary,
    set_description,
    set_tags,
    start_monitoring_run,
    start_training_run,
)
from pipeline.tracking.ui import (
    experiment_page,
    model_version_page,
    run_page,
    ui_command,
    ui_command_text,
    ui_url,
)

__all__ = [
    "ALIASES", "CHECKPOINT_DATA", "CHECKPOINT_FILES", "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "LOADER_MODULE",
    "TABLE_COLUMNS", "WINDOW_TABLE", "AliasChange", "DatasetRef", "DriftWindowMetrics", "ModelVersionInfo",
    "RegistryError", "RunSummary", "TrackingUnavailable", "alert_sentence", "check_reachable", "axis_key", "build_model_folder",
    "configure", "current_run_id", "describe_monitoring_run", "download_model", "drift_window", "experiment_page",
    "flatten_params", "get_alias_version", "get_metric_history", "get_model_version", "lineage_tags",
    "link_model_version", "list_versions", "log_alert_state", "log_artifact", "log_artifacts",
    "log_checkpoint_and_register", "log_chart_windows", "log_dataset", "log_drift_window", "log_figure", "log_history", "log_image",
    "log_metrics", "log_monitored_images", "log_monitoring_windows", "log_params_flat", "log_report", "log_table",
    "log_window_table", "model_uri", "model_version_page", "report_artifact", "reset", "rollback", "run_page",
    "run_summary", "set_alias", "set_description", "set_tags", "start_monitoring_run", "start_training_run",
    "ui_command", "ui_command_text", "ui_url", "window_metrics", "window_table",
]
