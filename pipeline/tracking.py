"""All MLflow calls of linewatch: lineage of training runs, monitoring runs and the model registry.

This is the only module that imports ``mlflow``. Everything goes through an explicit ``MlflowClient`` (never the
fluent global state), so two configurations in one process cannot leak into each other.

Where things go:

* Local default: ``sqlite:///$LINEWATCH_HOME/mlflow.db`` with artifacts under ``$LINEWATCH_HOME/mlartifacts``
  (never ``./mlruns``). On the stack: ``MLFLOW_TRACKING_URI=http://mlflow:5000`` (artifacts proxied by the server).
* Two experiments: ``linewatch-training`` and ``linewatch-monitoring`` (names from ``pipeline.settings``).
* The model is logged **pickle-free**: the checkpoint folder (``weights.safetensors`` + ``config.json``) is logged as
  run artifacts under ``model/`` and a registry version is created from ``runs:/<run_id>/model``. No pyfunc flavour,
  no cloudpickle: ``download_model`` gives the folder back and ``models.load_checkpoint`` reads it.
* Registry: aliases ``champion`` / ``challenger`` (never stages). Who moved an alias, when and why is written as
  model-version tags (``champion.set_by``, ``champion.set_at``, ``champion.reason``, ``champion.previous_version``).

Typical training flow::

    from pipeline import tracking
    tracking.configure()                                  # from pipeline.settings (env); lazy, no network
    with tracking.start_training_run("nightly-2026-11-27", tags={"trigger": "schedule"}) as run_id:
        tracking.log_params_flat(config_dict)             # model.unet.base_channels = "64", ...
        tracking.log_history(result.history)              # train.loss, train.mmd ... with step
        tracking.log_dataset(train_df, name="train", digest=snap.digest, source=str(snap.path), context="training")
        tracking.log_artifacts(cards_dir, "axis_cards")
        mv = tracking.log_checkpoint_and_register(ckpt_dir, tags=tracking.lineage_tags(
            data_digest=snap.digest, parent_version=parent, code_version=code_version(), gates=gates))
    tracking.set_alias(mv.name, "challenger", mv.version, who="nightly", why="passed gates")

Monitoring::

    with tracking.start_monitoring_run("monitor-L1-2026-11-27") as run_id:
        for w, res in enumerate(windows):
            tracking.log_drift_window(w, DriftWindowMetrics(detected=..., mmd_stat=..., mmd_p=...,
                                                           axes={3: {"effect": .8, "ks": .3, "p": 1e-5, "psi": .4}}))
        tracking.log_alert_state(active=True, step=w, level="drift", moved_axes=[3])
        tracking.log_figure(fig, "drift_report.png")

Every logging function takes ``run_id=``; without it, the run opened by the enclosing ``start_*_run`` block (a
context variable) is used. Pass ``run_id`` explicitly inside Prefect tasks that run in worker threads.

Reliability: every call that may reach a server is tried ``settings.mlflow_retries`` times (default 3) with
back-off 1 s, 2 s, ... and then raises ``TrackingUnavailable`` ("MLflow at http://... is unreachable after 3 tries:
..."). MLflow's own HTTP retry loop is shortened (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``,
``MLFLOW_HTTP_REQUEST_TIMEOUT``) unless the environment already sets it. A model version is created only after all
artifacts are uploaded and listed back, and a retried registration reuses the version a lost response created, so
a failure never leaves a half-registered version nor moves an alias.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import getpass
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import mlflow.artifacts
import mlflow.data
import requests
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline.settings import Settings, code_version, get_settings

__all__ = [
    "CHECKPOINT_FILES",
    "AliasChange",
    "DatasetRef",
    "DriftWindowMetrics",
    "ModelVersionInfo",
    "RegistryError",
    "RunSummary",
    "TrackingUnavailable",
    "axis_key",
    "check_reachable",
    "configure",
    "current_run_id",
    "download_model",
    "flatten_params",
    "get_alias_version",
    "get_metric_history",
    "get_model_version",
    "lineage_tags",
    "list_versions",
    "log_alert_state",
    "log_artifact",
    "log_artifacts",
    "log_checkpoint_and_register",
    "log_dataset",
    "log_drift_window",
    "log_figure",
    "log_history",
    "log_image",
    "log_metrics",
    "log_params_flat",
    "reset",
    "rollback",
    "run_summary",
    "set_alias",
    "set_tags",
    "start_monitoring_run",
    "start_training_run",
    "ui_command",
    "ui_command_text",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Files a checkpoint folder must contain (written by ``models.save_checkpoint``).
CHECKPOINT_FILES = ("weights.safetensors", "config.json")
#: Extensions that would mean pickled objects; refused by ``log_checkpoint_and_register``.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib")
MODEL_ARTIFACT_PATH = "model"
ALIASES = ("champion", "challenger")
PARAM_VALUE_MAX = 500
_DIGEST_MAX = 36  # mlflow's datasets.digest column is VARCHAR(36); the full digest goes to tags
_BATCH_METRICS = 1000
_BATCH_PARAMS = 100

_sleep = time.sleep  # patched in tests


# ----------------------------------------------------------------------------------------------------------------
# errors and result types


class TrackingUnavailable(RuntimeError):
    """MLflow could not be reached (or kept failing) after the bounded retries."""


class RegistryError(ValueError):
    """A registry request that cannot succeed as asked (unknown version, no previous champion, ...)."""


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered model version.

    Attributes:
        name: Registered model name.
        version: Version number.
        run_id: Training run that logged it.
        source: Where the checkpoint lives (``runs:/<run_id>/model``).
        tags: Model-version tags (lineage, gates, alias audit).
        aliases: Aliases currently pointing at it.
        created_at: Creation time (UTC).
    """

    name: str
    version: int
    run_id: str | None
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    created_at: dt.datetime | None = None


@dataclass(frozen=True)
class AliasChange:
    """Result of moving an alias.

    Attributes:
        name: Registered model name.
        alias: The alias moved.
        version: Version it points at now.
        previous: Version it pointed at before (None if it was unset).
        who: Who moved it.
        why: The reason given.
        at: When (UTC, ISO 8601).
    """

    name: str
    alias: str
    version: int
    previous: int | None
    who: str
    why: str
    at: str


@dataclass(frozen=True)
class DatasetRef:
    """A dataset logged as a run input.

    Attributes:
        name: Dataset name.
        digest: Full digest (our snapshot digest; MLflow's own column keeps the first 36 characters).
        context: ``training`` / ``calibration`` / ``monitoring`` ...
        source: Where the data came from (path or URI).
    """

    name: str
    digest: str
    context: str | None
    source: str


@dataclass(frozen=True)
class RunSummary:
    """What a run recorded (for checks, tests and the CLI).

    Attributes:
        run_id: Run id.
        experiment: Experiment name.
        status: ``RUNNING`` / ``FINISHED`` / ``FAILED``.
        params: Parameters.
        tags: Tags (MLflow's own ``mlflow.*`` tags included).
        metrics: Latest value of each metric.
        datasets: Logged dataset inputs.
        artifact_uri: Root artifact URI.
    """

    run_id: str
    experiment: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]
    datasets: tuple[DatasetRef, ...]
    artifact_uri: str


@dataclass(frozen=True)
class DriftWindowMetrics:
    """Drift statistics of one monitoring window, in the shape ``log_drift_window`` logs.

    Attributes:
        detected: Whether the window was declared drifted.
        mmd_stat: Multivariate statistic (MMD^2) of the window, or None.
        mmd_p: Its p-value, or None.
        axes: Per-axis statistics, ``{axis_index: {"effect": ..., "ks": ..., "p": ..., "psi": ...}}``.
        extra: Any further scalar metrics, logged as ``drift.<key>``.
    """

    detected: bool
    mmd_stat: float | None = None
    mmd_p: float | None = None
    axes: Mapping[int, Mapping[str, float]] = field(default_factory=dict)
    extra: Mapping[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# configuration and retries


@dataclass
class _State:
    settings: Settings
    client: MlflowClient
    experiment_ids: dict[str, str] = field(default_factory=dict)


_STATE: _State | None = None
_CURRENT_RUN: contextvars.ContextVar[str | None] = contextvars.ContextVar("linewatch_mlflow_run", default=None)


def configure(settings: Settings | None = None) -> None:
    """Point this module at an MLflow store. Lazy: nothing is contacted until the first call that needs it.

    With a local store (SQLite) the artifact folder ``settings.mlflow_artifacts_dir`` is created and the experiments
    are created there. With a server, the HTTP client's own retry loop is shortened so ``TrackingUnavailable``
    comes after our bounded retries, not after minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and
    ``MLFLOW_HTTP_REQUEST_TIMEOUT=settings.mlflow_timeout_s``, unless those variables are already set).

    Args:
        settings: Settings to use; read from the environment when None.
    """
    global _STATE
    settings = settings or get_settings()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(settings.mlflow_timeout_s))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if settings.mlflow_is_local:
        settings.mlflow_artifacts_dir.mkdir(parents=True, exist_ok=True)
        if settings.mlflow_tracking_uri.startswith("sqlite:///"):
            Path(settings.mlflow_tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_registry_uri)
    _STATE = _State(settings=settings, client=client)


def reset() -> None:
    """Forget the configuration and the current run (tests; a later call re-reads the environment)."""
    global _STATE
    _STATE = None
    _CURRENT_RUN.set(None)


def _state() -> _State:
    if _STATE is None:
        configure()
    assert _STATE is not None
    return _STATE


def _settings() -> Settings:
    return _state().settings


def _client() -> MlflowClient:
    return _state().client


_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
_TRANSIENT_TEXT = (
    "API request to",
    "Max retries exceeded",
    "Connection refused",
    "connection refused",
    "timed out",
    "database is locked",
    "Failed to establish a new connection",
    "RemoteDisconnected",
)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, requests.exceptions.HTTPError):
        resp = exc.response
        return resp is None or resp.status_code >= 500 or resp.status_code == 429
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError):
        return True
    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES or any(t in str(exc) for t in _TRANSIENT_TEXT)
    return any(t in str(exc) for t in ("database is locked",)) or isinstance(exc, TimeoutError)


def _retry(
    what: str, fn: Callable[[], T], *, before_retry: Callable[[], T | None] | None = None, quiet: bool = False
) -> T:
    """Call ``fn`` up to ``settings.mlflow_retries`` times, backing off 1, 2, 4 ... s on transient errors.

    Args:
        what: Human description of the operation, for the error message.
        fn: The call.
        before_retry: Called before each retry; a non-None return value is taken as the result (idempotency check
            for non-idempotent calls such as creating a model version).
        quiet: Log the retries at DEBUG instead of WARNING (a reachability check reports once, by raising).

    Raises:
        TrackingUnavailable: Every try failed with a transient error.
    """
    st = _settings()
    tries = st.mlflow_retries
    last: BaseException | None = None
    for attempt in range(tries):
        if attempt and before_retry is not None:
            try:
                done = before_retry()
            except Exception as exc:  # noqa: BLE001 - the check itself may hit the outage
                if not _is_transient(exc):
                    raise
                done = None
            if done is not None:
                return done
        try:
            return fn()
        except Exception as exc:
            if not _is_transient(exc):
                raise
            last = exc
            if attempt + 1 < tries:
                delay = st.mlflow_backoff_s * 2**attempt
                log.log(logging.DEBUG if quiet else logging.WARNING,
                        "MLflow %s failed (try %d/%d), retrying in %.1f s: %s", what, attempt + 1, tries, delay,
                        _short(exc))
                _sleep(delay)
    raise TrackingUnavailable(
        f"MLflow at {st.mlflow_tracking_uri} is unreachable after {tries} tries ({what}): {_short(last)}. "
        "Check that the tracking server is running and MLFLOW_TRACKING_URI is right; nothing was registered."
    ) from last


def check_reachable() -> None:
    """Raise ``TrackingUnavailable`` when the tracking server cannot be reached (after the bounded retries).

    One cheap request, retried like every other call but without logging each try, so a command can answer "MLflow
    is down" with one message before it starts any work. A local (SQLite) store is not contacted.
    """
    if _settings().mlflow_is_local:
        return
    _retry("reach the tracking server", lambda: _client().search_experiments(max_results=1), quiet=True)


def _short(exc: BaseException | None) -> str:
    text = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
    return text if len(text) < 400 else text[:400] + " ..."


def _experiment_id(name: str) -> str:
    st = _state()
    if name in st.experiment_ids:
        return st.experiment_ids[name]
    client = st.client

    def get_or_create() -> str:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        location = None
        if st.settings.mlflow_is_local:
            location = (st.settings.mlflow_artifacts_dir / name).resolve().as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags={"linewatch": "1"})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
            assert exp is not None
            return exp.experiment_id

    st.experiment_ids[name] = _retry(f"get or create experiment {name!r}", get_or_create)
    return st.experiment_ids[name]


# ----------------------------------------------------------------------------------------------------------------
# runs


def current_run_id() -> str | None:
    """The run opened by the enclosing ``start_training_run`` / ``start_monitoring_run`` block, if any."""
    return _CURRENT_RUN.get()


def _run_id(run_id: str | None) -> str:
    rid = run_id or _CURRENT_RUN.get()
    if not rid:
        raise ValueError("no MLflow run: pass run_id= or call inside `with tracking.start_training_run(...)`")
    return rid


@contextlib.contextmanager
def _run(experiment: str, run_name: str, kind: str, tags: Mapping[str, Any] | None,
         description: str | None) -> Iterator[str]:
    client = _client()
    exp_id = _experiment_id(experiment)
    all_tags = {"linewatch.kind": kind, "linewatch.code_version": code_version()}
    all_tags.update({k: _str(v) for k, v in (tags or {}).items()})
    if description:
        all_tags["mlflow.note.content"] = description
    run = _retry(f"create run {run_name!r}", lambda: client.create_run(exp_id, tags=all_tags, run_name=run_name))
    run_id = run.info.run_id
    token = _CURRENT_RUN.set(run_id)
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        yield run_id
        status = RunStatus.to_string(RunStatus.FINISHED)
    finally:
        _CURRENT_RUN.reset(token)
        try:
            _retry(f"end run {run_id}", lambda: client.set_terminated(run_id, status=status))
        except TrackingUnavailable:
            if status == "FINISHED":
                raise
            log.exception("could not mark run %s as FAILED", run_id)


def start_training_run(run_name: str, *, tags: Mapping[str, Any] | None = None,
                       description: str | None = None) -> contextlib.AbstractContextManager[str]:
    """Open a run in the training experiment; ``with`` yields its run id.

    The run ends FINISHED when the block exits normally and FAILED when it raises. The tags
    ``linewatch.kind=training`` and ``linewatch.code_version`` are added.

    Args:
        run_name: Display name of the run.
        tags: Extra run tags (values stringified).
        description: Markdown note shown in the MLflow UI.
    """
    return _run(_settings().training_experiment, run_name, "training", tags, description)


def start_monitoring_run(run_name: str, *, tags: Mapping[str, Any] | None = None,
                         description: str | None = None) -> contextlib.AbstractContextManager[str]:
    """Open a run in the monitoring experiment; ``with`` yields its run id (see ``start_training_run``)."""
    return _run(_settings().monitoring_experiment, run_name, "monitoring", tags, description)


# ----------------------------------------------------------------------------------------------------------------
# params, metrics, tags


_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def _key(key: str) -> str:
    return _KEY_BAD.sub("_", str(key))[:250]


def _str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return json.dumps([v if isinstance(v, int | float | str | bool) or v is None else str(v) for v in value])
    return str(value)


def flatten_params(config: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Flatten a nested config (mappings and dataclasses) to ``{"model.unet.base_channels": "64"}``.

    Lists/tuples become JSON text; values longer than 500 characters are cut and end in ``...``.

    Args:
        config: A mapping or a (nested) dataclass instance.
        prefix: Key prefix (``"model."`` ...).
    """
    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    if not isinstance(config, Mapping):
        raise ValueError(f"flatten_params needs a mapping or a dataclass instance, got {type(config).__name__}")
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if is_dataclass(v) and not isinstance(v, type):
            v = asdict(v)
        if isinstance(v, Mapping):
            out.update(flatten_params(v, prefix=f"{key}."))
            continue
        text = _str(v)
        if len(text) > PARAM_VALUE_MAX:
            text = text[: PARAM_VALUE_MAX - 3] + "..."
        out[_key(key)] = text
    return out


def log_params_flat(config: Mapping[str, Any] | Any, *, prefix: str = "", run_id: str | None = None) -> dict[str, str]:
    """Log a nested config as flat params (see ``flatten_params``); returns what was logged."""
    rid = _run_id(run_id)
    params = flatten_params(config, prefix)
    items = [Param(k, v) for k, v in params.items()]
    client = _client()
    for i in range(0, len(items), _BATCH_PARAMS):
        chunk = items[i : i + _BATCH_PARAMS]
        _retry("log params", lambda chunk=chunk: client.log_batch(rid, params=chunk, synchronous=True))
    return params


def _metric_batch(rid: str, metrics: Sequence[Metric], what: str) -> None:
    client = _client()
    for i in range(0, len(metrics), _BATCH_METRICS):
        chunk = list(metrics[i : i + _BATCH_METRICS])
        _retry(what, lambda chunk=chunk: client.log_batch(rid, metrics=chunk, synchronous=True))


def _now_ms() -> int:
    return int(time.time() * 1000)


def log_metrics(metrics: Mapping[str, float], *, step: int = 0, run_id: str | None = None,
                timestamp_ms: int | None = None) -> None:
    """Log scalar metrics at one step. Non-finite values are skipped with a warning."""
    rid = _run_id(run_id)
    ts = timestamp_ms or _now_ms()
    batch = []
    for k, v in metrics.items():
        value = float(v)
        if not math.isfinite(value):
            log.warning("metric %s=%r is not finite; not logged", k, v)
            continue
        batch.append(Metric(_key(k), value, ts, int(step)))
    _metric_batch(rid, batch, "log metrics")


def log_history(history: Any, *, prefix: str = "train.", run_id: str | None = None) -> int:
    """Log loss curves as metric series (one point per step).

    Accepts ``{"loss": [...], "mmd": [...]}`` (step = index, or the ``"step"`` column when present), a list of
    records ``[{"step": 0, "loss": ...}, ...]`` (``step``, ``epoch`` or the index), or a pandas DataFrame.

    Args:
        history: The curves.
        prefix: Metric name prefix (``train.loss`` ...).
        run_id: Run (default: the current one).

    Returns:
        Number of points logged.
    """
    rid = _run_id(run_id)
    if hasattr(history, "to_dict") and hasattr(history, "columns"):  # DataFrame
        history = history.to_dict(orient="list")
    records: list[tuple[str, float, int]] = []
    if isinstance(history, Mapping):
        steps = history.get("step")
        for k, values in history.items():
            if k == "step" or isinstance(values, str | bytes):
                continue
            try:
                seq = list(values)
            except TypeError:  # a scalar summary such as {"final_loss": 0.1}: not a curve
                continue
            for i, v in enumerate(seq):
                records.append((k, v, int(steps[i]) if steps is not None else i))
    elif isinstance(history, Sequence):
        for i, rec in enumerate(history):
            if not isinstance(rec, Mapping):
                raise ValueError("log_history: a list history must hold dicts like {'step': 0, 'loss': 0.1}")
            step = int(rec.get("step", rec.get("epoch", i)))
            records.extend((k, v, step) for k, v in rec.items() if k not in ("step", "epoch"))
    else:
        raise ValueError(f"log_history: unsupported history type {type(history).__name__}")
    ts = _now_ms()
    metrics = []
    for k, v, step in records:
        try:
            value = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            metrics.append(Metric(_key(f"{prefix}{k}"), value, ts, step))
    _metric_batch(rid, metrics, "log history")
    return len(metrics)


def set_tags(tags: Mapping[str, Any], *, run_id: str | None = None) -> None:
    """Set run tags (values stringified)."""
    rid = _run_id(run_id)
    items = [RunTag(_key(k), _str(v)) for k, v in tags.items()]
    _retry("set tags", lambda: _client().log_batch(rid, tags=items, synchronous=True))


def get_metric_history(key: str, *, run_id: str | None = None) -> list[tuple[int, float]]:
    """A metric's series as ``[(step, value), ...]`` sorted by step."""
    rid = _run_id(run_id)
    hist = _retry(f"read metric {key}", lambda: _client().get_metric_history(rid, key))
    return sorted((m.step, m.value) for m in hist)


def run_summary(run_id: str | None = None) -> RunSummary:
    """What a run recorded: params, tags, latest metrics, dataset inputs."""
    rid = _run_id(run_id)
    client = _client()
    run = _retry(f"get run {rid}", lambda: client.get_run(rid))
    exp = _retry("get experiment", lambda: client.get_experiment(run.info.experiment_id))
    datasets = []
    for di in (run.inputs.dataset_inputs if run.inputs else []) or []:
        tags = {t.key: t.value for t in di.tags}
        datasets.append(DatasetRef(
            name=di.dataset.name,
            digest=tags.get("linewatch.digest", di.dataset.digest),
            context=tags.get(MLFLOW_DATASET_CONTEXT),
            source=di.dataset.source,
        ))
    return RunSummary(
        run_id=rid,
        experiment=exp.name,
        status=run.info.status,
        params=dict(run.data.params),
        tags=dict(run.data.tags),
        metrics=dict(run.data.metrics),
        datasets=tuple(datasets),
        artifact_uri=run.info.artifact_uri,
    )


# ----------------------------------------------------------------------------------------------------------------
# datasets and artifacts


def log_dataset(df: Any, *, name: str, digest: str, source: str, context: str,
                run_id: str | None = None, tags: Mapping[str, str] | None = None) -> None:
    """Log a data snapshot as an MLflow dataset input of the run.

    MLflow keeps name, digest, source, schema and a profile, shown under the run's "Datasets" in the UI. Our snapshot
    digest (sha256) is used instead of MLflow's hash; MLflow's digest column holds 36 characters, so the full digest
    is also stored as the input tag ``linewatch.digest`` and the run tag ``data.<context>.digest``.

    Args:
        df: The snapshot rows (pandas DataFrame; e.g. image_id, sha256, line, date).
        name: Dataset name (``train``, ``calibration``, ``window-2026-11-27``).
        digest: Our snapshot digest.
        source: Where it lives (snapshot descriptor path or URI).
        context: ``training``, ``calibration`` or ``monitoring``.
        run_id: Run (default: the current one).
        tags: Extra input tags.
    """
    if not digest:
        raise ValueError("log_dataset needs the snapshot digest (pipeline.catalog.snapshot(...).digest)")
    rid = _run_id(run_id)
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": both readings are local paths
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_pandas(df, source=source, name=name, digest=digest[:_DIGEST_MAX])
    input_tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("linewatch.digest", digest[:500])]
    input_tags += [InputTag(_key(k), _str(v)[:500]) for k, v in (tags or {}).items()]
    dsi = DatasetInput(dataset=ds._to_mlflow_entity(), tags=input_tags)
    client = _client()
    _retry(f"log dataset {name!r}", lambda: client.log_inputs(rid, datasets=[dsi]))
    set_tags({f"data.{context}.digest": digest, f"data.{context}.name": name, f"data.{context}.rows": len(df)},
             run_id=rid)


def log_artifacts(local_dir: str | os.PathLike[str], artifact_path: str | None = None, *,
                  run_id: str | None = None) -> None:
    """Upload a folder (axis cards, traversal grids, reconstructions) under ``artifact_path`` of the run."""
    rid = _run_id(run_id)
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"log_artifacts: {local_dir} is not a folder")
    _retry(f"upload {local_dir.name}/", lambda: _client().log_artifacts(rid, str(local_dir), artifact_path))


def log_artifact(local_file: str | os.PathLike[str], artifact_path: str | None = None, *,
                 run_id: str | None = None) -> None:
    """Upload one file under ``artifact_path`` of the run."""
    rid = _run_id(run_id)
    local_file = Path(local_file)
    if not local_file.is_file():
        raise FileNotFoundError(f"log_artifact: {local_file} is not a file")
    _retry(f"upload {local_file.name}", lambda: _client().log_artifact(rid, str(local_file), artifact_path))


def log_figure(figure: Any, artifact_file: str, *, run_id: str | None = None, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG (or the suffix of ``artifact_file``) and upload it."""
    rid = _run_id(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        figure.savefig(path, dpi=dpi, bbox_inches="tight")
        parent = str(Path(artifact_file).parent)
        log_artifact(path, None if parent == "." else parent, run_id=rid)


def log_image(image: Any, artifact_file: str, *, run_id: str | None = None) -> None:
    """Upload an image: a uint8 array ``(H, W)`` / ``(H, W, 3)``, a PIL image or an image file path."""
    rid = _run_id(run_id)
    parent = str(Path(artifact_file).parent)
    parent_or_none = None if parent == "." else parent
    if isinstance(image, str | os.PathLike):
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp) / Path(artifact_file).name
            dst.write_bytes(Path(image).read_bytes())
            log_artifact(dst, parent_or_none, run_id=rid)
        return
    from PIL import Image

    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / Path(artifact_file).name
        pil.save(dst)
        log_artifact(dst, parent_or_none, run_id=rid)


# ----------------------------------------------------------------------------------------------------------------
# model registry


def lineage_tags(*, data_digest: str | None = None, calibration_digest: str | None = None,
                 parent_version: int | None = None, code_version: str | None = None,
                 gates: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, str]:
    """The standard lineage tags of a model version (pass to ``log_checkpoint_and_register(tags=...)``).

    Args:
        data_digest: Training snapshot digest -> ``data.train_digest``.
        calibration_digest: Calibration snapshot digest -> ``data.calibration_digest``.
        parent_version: Version it was fine-tuned from / compared against -> ``lineage.parent_version``
            (``none`` for a first model).
        code_version: ``pipeline.settings.code_version()`` -> ``lineage.code_version``.
        gates: Gate results (``{"auroc": 0.81, "passed": True}``) -> ``gate.<name>``.
        **extra: More tags, keys used as given.
    """
    tags: dict[str, str] = {}
    if data_digest:
        tags["data.train_digest"] = data_digest
    if calibration_digest:
        tags["data.calibration_digest"] = calibration_digest
    tags["lineage.parent_version"] = "none" if parent_version is None else str(int(parent_version))
    if code_version:
        tags["lineage.code_version"] = code_version
    for k, v in (gates or {}).items():
        tags[f"gate.{k}"] = _str(v)
    tags.update({k: _str(v) for k, v in extra.items()})
    return tags


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_checkpoint_dir(ckpt_dir: Path) -> list[Path]:
    """Relative paths of the files of a checkpoint folder that get registered (all but pickles and hidden files)."""
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt_dir} does not exist")
    missing = [f for f in CHECKPOINT_FILES if not (ckpt_dir / f).is_file()]
    if missing:
        raise ValueError(f"{ckpt_dir} is not a linewatch checkpoint: missing {missing} (use models.save_checkpoint)")
    files = sorted(p.relative_to(ckpt_dir) for p in ckpt_dir.rglob("*") if p.is_file())
    files = [p for p in files if not any(part.startswith(".") for part in p.parts)]
    skipped = [str(p) for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
    if skipped:
        log.info("not registering pickle-format files %s (resume state stays local)", skipped)
    return [p for p in files if p.suffix.lower() not in PICKLE_SUFFIXES]


def _version_info(mv: Any) -> ModelVersionInfo:
    created = dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=dt.UTC) if mv.creation_timestamp else None
    return ModelVersionInfo(
        name=mv.name,
        version=int(mv.version),
        run_id=mv.run_id or None,
        source=mv.source,
        tags=dict(mv.tags or {}),
        aliases=tuple(sorted(getattr(mv, "aliases", None) or ())),
        created_at=created,
    )


def _ensure_registered_model(name: str) -> None:
    client = _client()

    def create() -> None:
        try:
            client.create_registered_model(name, description="linewatch InfoDiffusion checkpoints (safetensors)")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    _retry(f"create registered model {name!r}", create)


def _artifact_tree(run_id: str, path: str) -> set[str]:
    """Relative paths of every file under ``path`` of the run's artifacts (recursive)."""
    client = _client()
    out: set[str] = set()
    todo = [path]
    while todo:
        here = todo.pop()
        for f in _retry("list artifacts", lambda here=here: client.list_artifacts(run_id, here)):
            if f.is_dir:
                todo.append(f.path)
            else:
                out.add(str(Path(f.path).relative_to(path)))
    return out


def log_checkpoint_and_register(ckpt_dir: str | os.PathLike[str], *, model_name: str | None = None,
                                tags: Mapping[str, Any] | None = None, run_id: str | None = None,
                                description: str | None = None) -> ModelVersionInfo:
    """Log a checkpoint folder as run artifacts (pickle-free) and register it as a new model version.

    Steps, each retried: upload the files of ``ckpt_dir`` (subfolders such as a ``linewatch/`` bundle included;
    pickle formats such as a resume ``train_state.pt`` stay local) to ``model/`` of the run, list it back and check every file arrived,
    create the registered model if needed, create the version from ``runs:/<run_id>/model`` with all tags in the
    same request. If the registration response is lost and retried, the version that was created is found (same
    run and source) and returned instead of making a second one. No alias is touched here.

    Args:
        ckpt_dir: Folder with ``weights.safetensors`` + ``config.json`` (``models.save_checkpoint``).
        model_name: Registered model (default ``settings.model_name``).
        tags: Version tags, typically ``lineage_tags(...)``; ``checkpoint.weights_sha256``,
            ``checkpoint.format`` and ``lineage.run_id`` are added.
        run_id: Training run (default: the current one).
        description: Version description.

    Returns:
        The new version.

    Raises:
        ValueError: The folder is not a checkpoint (``weights.safetensors`` / ``config.json`` missing).
        TrackingUnavailable: MLflow failed; no version was created.
    """
    rid = _run_id(run_id)
    ckpt_dir = Path(ckpt_dir)
    files = _check_checkpoint_dir(ckpt_dir)
    name = model_name or _settings().model_name
    client = _client()
    local_files = {str(p) for p in files}
    with tempfile.TemporaryDirectory() as tmp:  # only the pickle-free files travel (subfolders kept)
        for rel in files:
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ckpt_dir / rel, Path(tmp) / rel)
        log_artifacts(tmp, MODEL_ARTIFACT_PATH, run_id=rid)
    uploaded = _artifact_tree(rid, MODEL_ARTIFACT_PATH)
    if not local_files <= uploaded:
        raise TrackingUnavailable(
            f"checkpoint upload incomplete: {sorted(local_files - uploaded)} missing under runs:/{rid}/model; "
            "nothing was registered"
        )
    version_tags = {k: _str(v) for k, v in (tags or {}).items()}
    version_tags.update({
        "checkpoint.weights_sha256": _sha256(ckpt_dir / "weights.safetensors"),
        "checkpoint.format": "safetensors+json",
        "lineage.run_id": rid,
    })
    _ensure_registered_model(name)
    source = f"runs:/{rid}/{MODEL_ARTIFACT_PATH}"

    def find_existing() -> Any:
        found = client.search_model_versions(f"name='{name}' and run_id='{rid}'")
        return next((mv for mv in found if mv.source == source or mv.source.endswith(f"/{MODEL_ARTIFACT_PATH}")),
                    None)

    mv = _retry(
        f"register {name}",
        lambda: client.create_model_version(name, source, run_id=rid, tags=version_tags, description=description),
        before_retry=find_existing,
    )
    info = _version_info(mv)
    set_tags({"linewatch.registered_model": name, "linewatch.registered_version": info.version}, run_id=rid)
    log.info("registered %s version %d from run %s", name, info.version, rid)
    return info


def _not_found(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(exc).lower()


def get_model_version(version: int | str, *, name: str | None = None) -> ModelVersionInfo:
    """One version with its tags and aliases.

    Raises:
        RegistryError: The model or version does not exist.
    """
    name = name or _settings().model_name
    client = _client()

    def get() -> Any:
        try:
            return client.get_model_version(name, str(int(version)))
        except MlflowException as exc:
            if _not_found(exc) or exc.error_code == "INVALID_PARAMETER_VALUE":
                return None
            raise

    mv = _retry(f"get {name} v{version}", get)
    if mv is None:
        known = [v.version for v in list_versions(name=name)]
        raise RegistryError(f"{name} has no version {version}; known versions: {known or 'none'}")
    return _version_info(mv)


def get_alias_version(alias: str, *, name: str | None = None) -> int | None:
    """The version an alias points at, or None when the alias (or the model) does not exist."""
    name = name or _settings().model_name
    client = _client()

    def get() -> int | None:
        try:
            return int(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            if _not_found(exc) or exc.error_code == "INVALID_PARAMETER_VALUE":
                return None
            raise

    return _retry(f"get alias {name}@{alias}", get)


def list_versions(*, name: str | None = None) -> list[ModelVersionInfo]:
    """All versions of the registered model, oldest first, with tags and aliases (empty if none)."""
    name = name or _settings().model_name
    client = _client()
    found = _retry(f"list {name}", lambda: client.search_model_versions(f"name='{name}'"))
    if not found:
        return []
    # search results carry tags but not aliases: take those from the registered model (one more call)
    model = _retry(f"get {name}", lambda: client.get_registered_model(name))
    by_version: dict[int, list[str]] = {}
    for alias, version in (getattr(model, "aliases", None) or {}).items():
        by_version.setdefault(int(version), []).append(alias)
    out = [replace(_version_info(mv), aliases=tuple(sorted(by_version.get(int(mv.version), []))))
           for mv in found]
    return sorted(out, key=lambda v: v.version)


def _who(who: str | None) -> str:
    if who:
        return who
    try:
        return os.environ.get("USER") or getpass.getuser()
    except Exception:  # noqa: BLE001 - getpass raises various errors without a passwd entry
        return "unknown"


def set_alias(alias: str, version: int, *, name: str | None = None, who: str | None = None, why: str = "",
              record_previous: bool = True, event: str = "set") -> AliasChange:
    """Point ``alias`` at ``version`` and record who, when and why as tags of that version.

    Tags written on ``version``: ``<alias>.set_by``, ``<alias>.set_at`` (UTC ISO), ``<alias>.reason``,
    ``<alias>.event`` (``set`` / ``promote`` / ``rollback``) and, with ``record_previous``,
    ``<alias>.previous_version`` (the version that held the alias before; what ``rollback`` returns to).

    Args:
        alias: ``champion`` / ``challenger`` (any MLflow alias name is accepted).
        version: Target version.
        name: Registered model (default ``settings.model_name``).
        who: Who does it (default ``$USER``).
        why: Free-text reason.
        record_previous: Write ``<alias>.previous_version`` (False for rollbacks, which must not rewrite history).
        event: Recorded as ``<alias>.event``.

    Raises:
        RegistryError: The version does not exist.
    """
    name = name or _settings().model_name
    target = get_model_version(version, name=name)  # raises RegistryError with the known versions
    previous = get_alias_version(alias, name=name)
    who = _who(who)
    at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    client = _client()
    _retry(f"set {name}@{alias}", lambda: client.set_registered_model_alias(name, alias, str(target.version)))
    tags = {f"{alias}.set_by": who, f"{alias}.set_at": at, f"{alias}.reason": why or "-", f"{alias}.event": event}
    if record_previous and previous is not None and previous != target.version:
        tags[f"{alias}.previous_version"] = str(previous)
    for k, v in tags.items():
        _retry(f"tag {name} v{target.version}",
               lambda k=k, v=v: client.set_model_version_tag(name, str(target.version), k, v))
    log.info("%s@%s: %s -> %d by %s (%s)", name, alias, previous, target.version, who, why or "-")
    return AliasChange(name, alias, target.version, previous, who, why, at)


def rollback(*, alias: str = "champion", name: str | None = None, who: str | None = None,
             why: str = "") -> AliasChange:
    """Move ``alias`` back to the version that held it before the current one.

    The target is the ``<alias>.previous_version`` tag of the current holder, so repeated rollbacks walk back
    through the promotion history (a rollback does not rewrite that tag). The demoted version gets
    ``<alias>.rolled_back_by`` / ``_at`` / ``.rollback_reason`` tags.

    Raises:
        RegistryError: The alias is unset or no previous holder was recorded.
    """
    name = name or _settings().model_name
    current = get_alias_version(alias, name=name)
    if current is None:
        raise RegistryError(f"{name} has no '{alias}' alias to roll back; use `linewatch promote --version N`")
    info = get_model_version(current, name=name)
    prev = info.tags.get(f"{alias}.previous_version")
    if not prev:
        raise RegistryError(
            f"{name} v{current} ({alias}) has no recorded previous {alias}; use `linewatch promote --version N`"
        )
    change = set_alias(alias, int(prev), name=name, who=who, why=why, record_previous=False, event="rollback")
    client = _client()
    for k, v in {f"{alias}.rolled_back_by": change.who, f"{alias}.rolled_back_at": change.at,
                 f"{alias}.rollback_reason": why or "-"}.items():
        _retry(f"tag {name} v{current}", lambda k=k, v=v: client.set_model_version_tag(name, str(current), k, v))
    return change


def download_model(alias_or_version: str | int, dst: str | os.PathLike[str], *,
                   name: str | None = None) -> Path:
    """Download a registered checkpoint folder and verify its weights digest.

    Args:
        alias_or_version: ``"champion"``, ``"challenger"``, a version number (int or digits).
        dst: Folder to download into (created).
        name: Registered model (default ``settings.model_name``).

    Returns:
        The checkpoint folder (contains ``weights.safetensors`` + ``config.json``): load it with
        ``models.load_checkpoint``.

    Raises:
        RegistryError: Unknown alias / version, or the downloaded weights do not match the registered digest.
    """
    name = name or _settings().model_name
    key = str(alias_or_version)
    if key.isdigit():
        version = int(key)
    else:
        found = get_alias_version(key, name=name)
        if found is None:
            raise RegistryError(f"{name} has no alias {key!r}")
        version = found
    mv = get_model_version(version, name=name)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if mv.run_id and mv.source.startswith("runs:/"):
        artifact_path = mv.source.split("/", 3)[3] if mv.source.count("/") >= 3 else MODEL_ARTIFACT_PATH
        local = _retry(f"download {name} v{version}",
                       lambda: _client().download_artifacts(mv.run_id, artifact_path, str(dst)))
    else:
        local = _retry(f"download {name} v{version}", lambda: mlflow.artifacts.download_artifacts(
            artifact_uri=mv.source, dst_path=str(dst), tracking_uri=_settings().mlflow_tracking_uri))
    path = Path(local)
    _check_checkpoint_dir(path)
    pickled = [p.name for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickled:
        raise RegistryError(f"{name} v{version} holds pickle-format files {pickled}; refusing to hand them out")
    expected = mv.tags.get("checkpoint.weights_sha256")
    if expected and _sha256(path / "weights.safetensors") != expected:
        raise RegistryError(f"downloaded weights of {name} v{version} do not match the registered sha256")
    return path


# ----------------------------------------------------------------------------------------------------------------
# monitoring


def axis_key(axis: int) -> str:
    """Metric name part of a latent axis: ``axis_03`` (zero-padded to two digits)."""
    axis = int(axis)
    if axis < 0:
        raise ValueError(f"axis index must be >= 0, got {axis}")
    return f"axis_{axis:02d}"


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def log_drift_window(step: int, window: DriftWindowMetrics | Mapping[str, Any] | Any, *,
                     run_id: str | None = None, timestamp: dt.datetime | None = None) -> dict[str, float]:
    """Log one monitoring window's drift statistics as metrics at ``step`` (the window index).

    Names: ``drift.detected`` (0/1), ``drift.mmd.stat``, ``drift.mmd.p``, ``drift.axis_03.effect``,
    ``drift.axis_03.ks``, ``drift.axis_03.p``, ``drift.axis_03.psi`` (any per-axis key is accepted), plus
    ``drift.<key>`` for ``extra``. Chart e.g. ``drift.axis_03.effect`` over steps in the MLflow UI.

    Args:
        step: Window index (monotone over the run).
        window: A ``DriftWindowMetrics``, or a mapping / object with the same field names.
        run_id: Run (default: the current one).
        timestamp: Window time (default: now), used as the metric timestamp.

    Returns:
        The metrics logged.
    """
    rid = _run_id(run_id)
    metrics: dict[str, float] = {"drift.detected": float(bool(_field(window, "detected", False)))}
    for src, dst in (("mmd_stat", "drift.mmd.stat"), ("mmd_p", "drift.mmd.p")):
        value = _field(window, src)
        if value is not None:
            metrics[dst] = float(value)
    for axis, stats in dict(_field(window, "axes", {}) or {}).items():
        for stat, value in dict(stats).items():
            if value is not None:
                metrics[f"drift.{axis_key(axis)}.{stat}"] = float(value)
    for k, v in dict(_field(window, "extra", {}) or {}).items():
        metrics[f"drift.{k}"] = float(v)
    ts = int(timestamp.timestamp() * 1000) if hasattr(timestamp, "timestamp") else None  # datetime / Timestamp
    log_metrics(metrics, step=step, run_id=rid, timestamp_ms=ts)
    return metrics


def log_alert_state(*, active: bool, step: int = 0, level: str = "", moved_axes: Sequence[int] = (),
                    message: str = "", state: Mapping[str, Any] | None = None,
                    run_id: str | None = None) -> None:
    """Record the alert state of a monitoring run.

    Logs metric ``alert.active`` (0/1) at ``step``, tags ``alert.active``, ``alert.level``, ``alert.moved_axes``
    (``axis_03,axis_07``) and ``alert.message``, and, when ``state`` is given, the JSON file
    ``alerts/state_<step>.json``.
    """
    rid = _run_id(run_id)
    log_metrics({"alert.active": float(bool(active))}, step=step, run_id=rid)
    set_tags({
        "alert.active": str(bool(active)).lower(),
        "alert.level": level or "-",
        "alert.moved_axes": ",".join(axis_key(a) for a in moved_axes) or "-",
        "alert.message": (message or "-")[:5000],
    }, run_id=rid)
    if state is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"state_{int(step):04d}.json"
            path.write_text(json.dumps(dict(state), indent=1, default=str))
            log_artifact(path, "alerts", run_id=rid)


# ----------------------------------------------------------------------------------------------------------------
# UI


def ui_command(port: int = 5000, settings: Settings | None = None) -> list[str]:
    """The command that opens the MLflow UI on the local store (``linewatch ui`` runs it).

    Raises:
        ValueError: The configured tracking URI is a server (open its URL instead).
    """
    settings = settings or (_STATE.settings if _STATE else get_settings())
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
