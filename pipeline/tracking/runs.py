"""Runs: open and close them, and log params, metrics, tags, descriptions, datasets, tables and artifacts.

Every logging function takes ``run_id=``; without it, the run opened by the enclosing ``start_*_run`` block (a
context variable) is used. Artifacts are uploaded readable by the group and others (files 0644, folders 0755), so a
team tracking server running as another user can serve them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import mlflow.data
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline.settings import code_version
from pipeline.tracking.client import (
    CURRENT_RUN,
    NOTE_TAG,
    TrackingUnavailable,
    client,
    experiment_id,
    log,
    retry,
    settings,
)

PARAM_VALUE_MAX = 500
ARTIFACT_FILE_MODE = 0o644
ARTIFACT_DIR_MODE = 0o755
_DIGEST_MAX = 36  # mlflow's datasets.digest column is VARCHAR(36); the full digest goes to tags
_BATCH_METRICS = 1000
_BATCH_PARAMS = 100
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


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
        model_inputs: Ids of the logged models the run used (MLflow 3 model inputs).
        model_outputs: Ids of the logged models the run produced.
    """

    run_id: str
    experiment: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]
    datasets: tuple[DatasetRef, ...]
    artifact_uri: str
    model_inputs: tuple[str, ...] = ()
    model_outputs: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------------------------
# runs


def current_run_id() -> str | None:
    """The run opened by the enclosing ``start_training_run`` / ``start_monitoring_run`` block, if any."""
    return CURRENT_RUN.get()


def run_id_or_current(run_id: str | None) -> str:
    """``run_id``, else the current run's.

    Raises:
        ValueError: Neither is given.
    """
    rid = run_id or CURRENT_RUN.get()
    if not rid:
        raise ValueError("no MLflow run: pass run_id= or call inside `with tracking.start_training_run(...)`")
    return rid


def _end(run_id: str, status: str) -> None:
    try:
        retry(f"end run {run_id}", lambda: client().set_terminated(run_id, status=status))
    except TrackingUnavailable:
        if status == "FINISHED":
            raise
        log.exception("could not mark run %s as FAILED", run_id)


@contextlib.contextmanager
def _run(experiment: str, run_name: str, kind: str, tags: Mapping[str, Any] | None,
         description: str | None) -> Iterator[str]:
    exp_id = experiment_id(experiment, kind)
    all_tags = {"linewatch.kind": kind, "linewatch.code_version": code_version()}
    all_tags.update({k: to_text(v) for k, v in (tags or {}).items()})
    if description:
        all_tags[NOTE_TAG] = description
    run = retry(f"create run {run_name!r}", lambda: client().create_run(exp_id, tags=all_tags, run_name=run_name))
    run_id = run.info.run_id
    token = CURRENT_RUN.set(run_id)
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        yield run_id
        status = RunStatus.to_string(RunStatus.FINISHED)
    finally:
        CURRENT_RUN.reset(token)
        _end(run_id, status)


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
    return _run(settings().training_experiment, run_name, "training", tags, description)


def start_monitoring_run(run_name: str, *, tags: Mapping[str, Any] | None = None,
                         description: str | None = None) -> contextlib.AbstractContextManager[str]:
    """Open a run in the monitoring experiment; ``with`` yields its run id (see ``start_training_run``)."""
    return _run(settings().monitoring_experiment, run_name, "monitoring", tags, description)


def set_description(text: str, *, run_id: str | None = None) -> None:
    """Set the run's description (Markdown; shown at the top of the run page)."""
    set_tags({NOTE_TAG: text}, run_id=run_id)


# ----------------------------------------------------------------------------------------------------------------
# params, metrics, tags


def metric_key(key: str) -> str:
    """A metric / param / tag name MLflow accepts (other characters become ``_``, at most 250 characters)."""
    return _KEY_BAD.sub("_", str(key))[:250]


def to_text(value: Any) -> str:
    """A tag or param value as text (lists and tuples as JSON)."""
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
        text = to_text(v)
        if len(text) > PARAM_VALUE_MAX:
            text = text[: PARAM_VALUE_MAX - 3] + "..."
        out[metric_key(key)] = text
    return out


def log_params_flat(config: Mapping[str, Any] | Any, *, prefix: str = "", run_id: str | None = None) -> dict[str, str]:
    """Log a nested config as flat params (see ``flatten_params``); returns what was logged."""
    rid = run_id_or_current(run_id)
    params = flatten_params(config, prefix)
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), _BATCH_PARAMS):
        chunk = items[i : i + _BATCH_PARAMS]
        retry("log params", lambda chunk=chunk: client().log_batch(rid, params=chunk, synchronous=True))
    return params


def _metric_batch(rid: str, metrics: Sequence[Metric], what: str) -> None:
    for i in range(0, len(metrics), _BATCH_METRICS):
        chunk = list(metrics[i : i + _BATCH_METRICS])
        retry(what, lambda chunk=chunk: client().log_batch(rid, metrics=chunk, synchronous=True))


def now_ms() -> int:
    """Wall-clock time in milliseconds (MLflow's timestamps)."""
    return int(time.time() * 1000)


def timestamp_ms(when: Any) -> int | None:
    """Milliseconds since the epoch of a ``datetime`` / ``pandas.Timestamp`` (naive = UTC), or None."""
    if when is None or not hasattr(when, "timestamp"):
        return None
    if getattr(when, "tzinfo", None) is None and isinstance(when, dt.datetime):
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def log_metrics(metrics: Mapping[str, float], *, step: int = 0, run_id: str | None = None,
                timestamp_ms: int | None = None) -> None:
    """Log scalar metrics at one step (and one time, default now). Non-finite values are skipped with a warning."""
    rid = run_id_or_current(run_id)
    ts = timestamp_ms or now_ms()
    batch = []
    for k, v in metrics.items():
        value = float(v)
        if not math.isfinite(value):
            log.warning("metric %s=%r is not finite; not logged", k, v)
            continue
        batch.append(Metric(metric_key(k), value, ts, int(step)))
    _metric_batch(rid, batch, "log metrics")


def _history_records(history: Any) -> list[tuple[str, Any, int]]:
    if hasattr(history, "to_dict") and hasattr(history, "columns"):  # DataFrame
        history = history.to_dict(orient="list")
    records: list[tuple[str, Any, int]] = []
    if isinstance(history, Mapping):
        steps = history.get("step")
        for k, values in history.items():
            if k == "step" or isinstance(values, str | bytes):
                continue
            try:
                seq = list(values)
            except TypeError:  # a scalar summary such as {"final_loss": 0.1}: not a curve
                continue
            records.extend((k, v, int(steps[i]) if steps is not None else i) for i, v in enumerate(seq))
    elif isinstance(history, Sequence):
        for i, rec in enumerate(history):
            if not isinstance(rec, Mapping):
                raise ValueError("log_history: a list history must hold dicts like {'step': 0, 'loss': 0.1}")
            step = int(rec.get("step", rec.get("epoch", i)))
            records.extend((k, v, step) for k, v in rec.items() if k not in ("step", "epoch"))
    else:
        raise ValueError(f"log_history: unsupported history type {type(history).__name__}")
    return records


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
    rid = run_id_or_current(run_id)
    ts = now_ms()
    metrics = []
    for k, v, step in _history_records(history):
        try:
            value = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            metrics.append(Metric(metric_key(f"{prefix}{k}"), value, ts, step))
    _metric_batch(rid, metrics, "log history")
    return len(metrics)


def set_tags(tags: Mapping[str, Any], *, run_id: str | None = None) -> None:
    """Set run tags (values stringified)."""
    rid = run_id_or_current(run_id)
    items = [RunTag(metric_key(k), to_text(v)) for k, v in tags.items()]
    retry("set tags", lambda: client().log_batch(rid, tags=items, synchronous=True))


def get_metric_history(key: str, *, run_id: str | None = None,
                       with_timestamps: bool = False) -> list[tuple[int, float]] | list[tuple[int, int, float]]:
    """A metric's series as ``[(step, value), ...]`` sorted by step (``(step, timestamp_ms, value)`` on request)."""
    rid = run_id_or_current(run_id)
    hist = retry(f"read metric {key}", lambda: client().get_metric_history(rid, key))
    if with_timestamps:
        return sorted((m.step, m.timestamp, m.value) for m in hist)
    return sorted((m.step, m.value) for m in hist)


def _dataset_refs(run: Any) -> tuple[DatasetRef, ...]:
    out = []
    for di in (run.inputs.dataset_inputs if run.inputs else []) or []:
        tags = {t.key: t.value for t in di.tags}
        out.append(DatasetRef(name=di.dataset.name, digest=tags.get("linewatch.digest", di.dataset.digest),
                              context=tags.get(MLFLOW_DATASET_CONTEXT), source=di.dataset.source))
    return tuple(out)


def run_summary(run_id: str | None = None) -> RunSummary:
    """What a run recorded: params, tags, latest metrics, dataset and model inputs, model outputs."""
    rid = run_id_or_current(run_id)
    run = retry(f"get run {rid}", lambda: client().get_run(rid))
    exp = retry("get experiment", lambda: client().get_experiment(run.info.experiment_id))
    model_inputs = tuple(m.model_id for m in (getattr(run.inputs, "model_inputs", None) or []))
    model_outputs = tuple(m.model_id for m in (getattr(run.outputs, "model_outputs", None) or []))
    return RunSummary(run_id=rid, experiment=exp.name, status=run.info.status, params=dict(run.data.params),
                      tags=dict(run.data.tags), metrics=dict(run.data.metrics), datasets=_dataset_refs(run),
                      artifact_uri=run.info.artifact_uri, model_inputs=model_inputs, model_outputs=model_outputs)


# ----------------------------------------------------------------------------------------------------------------
# datasets, tables and artifacts


def log_dataset(df: Any, *, name: str, digest: str, source: str, context: str,
                run_id: str | None = None, tags: Mapping[str, str] | None = None) -> None:
    """Log a data snapshot as an MLflow dataset input of the run.

    MLflow keeps name, digest, source, schema and a profile, shown under the run's "Datasets" in the UI. Our snapshot
    digest (sha256) is used instead of MLflow's hash; MLflow's digest column holds 36 characters, so the full digest
    is also stored as the input tag ``linewatch.digest`` and the run tag ``data.<context>.digest``.

    Args:
        df: The snapshot rows (pandas DataFrame; e.g. image_id, sha256, line, date).
        name: Dataset name (``train``, ``calibration``, ``L1 2026-11-27``).
        digest: Our snapshot digest.
        source: Where it lives (snapshot descriptor path or URI).
        context: ``training``, ``calibration`` or ``monitoring``.
        run_id: Run (default: the current one).
        tags: Extra input tags.
    """
    if not digest:
        raise ValueError("log_dataset needs the snapshot digest (pipeline.catalog.tables.snapshot(...).digest)")
    rid = run_id_or_current(run_id)
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": both readings are local paths
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_pandas(df, source=source, name=name, digest=digest[:_DIGEST_MAX])
    input_tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("linewatch.digest", digest[:500])]
    input_tags += [InputTag(metric_key(k), to_text(v)[:500]) for k, v in (tags or {}).items()]
    dsi = DatasetInput(dataset=ds._to_mlflow_entity(), tags=input_tags)
    retry(f"log dataset {name!r}", lambda: client().log_inputs(rid, datasets=[dsi]))
    set_tags({f"data.{context}.digest": digest, f"data.{context}.name": name, f"data.{context}.rows": len(df)},
             run_id=rid)


def log_table(df: Any, artifact_file: str, *, run_id: str | None = None) -> None:
    """Log a table (pandas DataFrame) as a JSON table artifact (``MlflowClient.log_table``).

    The UI shows it as a table in the run's Artifacts tab (and in the experiment's table views).
    """
    rid = run_id_or_current(run_id)
    retry(f"log table {artifact_file}", lambda: client().log_table(rid, data=df, artifact_file=artifact_file))


def make_readable(path: Path) -> Path:
    """Give a file 0644, or a folder 0755 and everything in it 0644 / 0755 (readable by group and others)."""
    if path.is_file():
        path.chmod(ARTIFACT_FILE_MODE)
        return path
    path.chmod(ARTIFACT_DIR_MODE)
    for p in path.rglob("*"):
        p.chmod(ARTIFACT_DIR_MODE if p.is_dir() else ARTIFACT_FILE_MODE)
    return path


@contextlib.contextmanager
def readable_copy(src: Path, name: str | None = None) -> Iterator[Path]:
    """A copy of a file or folder (named ``name``) with 0644 files and 0755 folders, removed afterwards.

    The local artifact store copies permissions with the files (a ``tempfile`` is 0600, its folder 0700), so
    uploads go through a readable copy.
    """
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / (name or src.name)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))
        else:
            shutil.copyfile(src, dst)
        yield make_readable(dst)


def log_artifacts(local_dir: str | os.PathLike[str], artifact_path: str | None = None, *,
                  run_id: str | None = None) -> None:
    """Upload a folder's files (axis cards, reports ...) under ``artifact_path`` (0644; hidden files skipped)."""
    rid = run_id_or_current(run_id)
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"log_artifacts: {local_dir} is not a folder")
    with readable_copy(local_dir) as src:
        retry(f"upload {local_dir.name}/", lambda: client().log_artifacts(rid, str(src), artifact_path))


def log_artifact(local_file: str | os.PathLike[str], artifact_path: str | None = None, *,
                 run_id: str | None = None, name: str | None = None) -> None:
    """Upload one file under ``artifact_path`` of the run (0644), as ``name`` (default: its own name)."""
    rid = run_id_or_current(run_id)
    local_file = Path(local_file)
    if not local_file.is_file():
        raise FileNotFoundError(f"log_artifact: {local_file} is not a file")
    with readable_copy(local_file, name) as src:
        retry(f"upload {src.name}", lambda: client().log_artifact(rid, str(src), artifact_path))


def _parent_or_none(artifact_file: str) -> str | None:
    parent = str(Path(artifact_file).parent)
    return None if parent == "." else parent


def log_figure(figure: Any, artifact_file: str, *, run_id: str | None = None, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG (or the suffix of ``artifact_file``) and upload it."""
    rid = run_id_or_current(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        figure.savefig(path, dpi=dpi, bbox_inches="tight")
        log_artifact(path, _parent_or_none(artifact_file), run_id=rid)


def log_image(image: Any, artifact_file: str, *, run_id: str | None = None) -> None:
    """Upload an image: a uint8 array ``(H, W)`` / ``(H, W, 3)``, a PIL image or an image file path."""
    rid = run_id_or_current(run_id)
    if isinstance(image, str | os.PathLike):
        log_artifact(image, _parent_or_none(artifact_file), run_id=rid, name=Path(artifact_file).name)
        return
    from PIL import Image

    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / Path(artifact_file).name
        pil.save(dst)
        log_artifact(dst, _parent_or_none(artifact_file), run_id=rid)
