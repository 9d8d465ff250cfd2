"""A checkpoint folder logged as an MLflow 3 model and registered as a new version, pickle-free.

The registered artifact is an MLflow model (``MLmodel`` with the ``python_function`` flavour, a signature, an input
example and pinned requirements) whose data folder is the linewatch checkpoint (``weights.safetensors``,
``config.json`` and the ``linewatch/`` bundle). The flavour's ``loader_module`` is
:mod:`pipeline.handoff.serving`, so ``mlflow.pyfunc.load_model("models:/<name>@champion")`` and
``mlflow models serve -m models:/<name>/<version> --env-manager local`` score images (z, anomaly score, flag)
without unpickling anything. ``download_model`` hands the checkpoint folder back for ``models.load_checkpoint``.

Steps, each retried: create the logged model (linked to the training run as its output), build the MLflow model
folder locally, upload it, list it back and check every checkpoint file arrived, mark the model READY, create the
registered version from ``models:/<model_id>`` with all tags and the lineage description in the same request. A
retried registration reuses the version a lost response created, so a failure never leaves a half-registered
version nor moves an alias.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException

from pipeline.tracking.client import TrackingUnavailable, client, log, retry, settings
from pipeline.tracking.registry import (
    ModelVersionInfo,
    check_checkpoint_dir,
    ensure_registered_model,
    lineage_description,
    model_uri,
    sha256_file,
    version_info,
)
from pipeline.tracking.runs import make_readable, run_id_or_current, set_tags, to_text

LOADER_MODULE = "pipeline.handoff.serving"
"""The module MLflow's ``python_function`` flavour loads the model with (``_load_pyfunc(data_path)``)."""
CHECKPOINT_DATA = "checkpoint"
"""Name of the checkpoint folder inside the MLflow model (``data/checkpoint``)."""
MODEL_VERSIONS_TAG = "mlflow.modelVersions"
_REQUIREMENTS = ("linewatch", "torch", "numpy", "pandas", "pyarrow", "pillow", "safetensors", "scikit-learn",
                 "scipy", "mlflow")


def _config(ckpt_dir: Path) -> dict[str, Any]:
    try:
        doc = json.loads((ckpt_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _signature(latent_dim: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from pipeline.handoff.serving import input_columns, output_columns

    inputs = Schema([ColSpec(t, n, required=False) for n, t in input_columns()])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(t, n) for n, t in output_columns(latent_dim)]))


def _example_image(ckpt_dir: Path, size: int) -> bytes:
    """PNG bytes of the first calibration image of the bundle (a real cell), else a mid-grey square."""
    import numpy as np
    from PIL import Image

    from pipeline.handoff.bundle import BUNDLE_DIR, CALIBRATION_FILE

    calib = ckpt_dir / BUNDLE_DIR / CALIBRATION_FILE
    if calib.is_file():
        import pandas as pd

        from pipeline.catalog.tables import resolve_store_path

        rows = pd.read_parquet(calib)
        if "store_path" in rows.columns and len(rows):
            path = resolve_store_path(settings().catalog_root, str(rows["store_path"].iloc[0]))
            if path.is_file():
                return path.read_bytes()
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _requirements() -> list[str]:
    out = []
    for dist in _REQUIREMENTS:
        try:
            out.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def build_model_folder(ckpt_dir: Path, files: list[Path], out_dir: Path, *, mlflow_model: Any = None) -> Path:
    """Write the MLflow model of a checkpoint into ``out_dir``: MLmodel, checkpoint, signature, example, requirements.

    The checkpoint goes to ``data/checkpoint``; files are 0644, folders 0755.

    Args:
        ckpt_dir: The checkpoint folder.
        files: Its files to include (``check_checkpoint_dir``).
        out_dir: Where the model folder goes (must not exist).
        mlflow_model: An ``mlflow.models.Model`` carrying the run / logged-model ids (default: a bare one).
    """
    import mlflow.pyfunc
    import pandas as pd

    cfg = _config(ckpt_dir)
    latent_dim = int((cfg.get("model") or {}).get("latent_dim", 0))
    size = int((cfg.get("preprocess") or {}).get("image_size", 32))
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / CHECKPOINT_DATA
        for rel in files:
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ckpt_dir / rel, stage / rel)
        mlflow.pyfunc.save_model(
            str(out_dir), loader_module=LOADER_MODULE, data_path=str(stage), mlflow_model=mlflow_model,
            signature=_signature(latent_dim), pip_requirements=_requirements(),
            input_example=pd.DataFrame({"image": [_example_image(ckpt_dir, size)]}),
        )
    return make_readable(out_dir)


def _create_logged_model(run_id: str, name: str, ckpt_dir: Path, tags: Mapping[str, str]) -> Any:
    cfg = _config(ckpt_dir)
    model_cfg, meta = cfg.get("model") or {}, cfg.get("meta") or {}
    params = {k: to_text(model_cfg[k]) for k in ("latent_dim", "image_size", "in_channels") if k in model_cfg}
    params.update({k: to_text(meta[k]) for k in ("preset", "step") if k in meta})
    lm_tags = {k: v for k, v in tags.items() if k.startswith(("data.", "lineage.", "checkpoint.")) or k == "model_id"}
    exp_id = retry(f"get run {run_id}", lambda: client().get_run(run_id).info.experiment_id)
    return retry(f"create logged model {name!r}", lambda: client().create_logged_model(
        exp_id, name=name, source_run_id=run_id, tags=lm_tags, params=params, model_type="InfoDiffusion"))


def _logged_files(model_id: str, path: str = "") -> set[str]:
    """Relative paths of every file of a logged model's artifacts (recursive)."""
    out: set[str] = set()
    todo = [path or None]
    while todo:
        here = todo.pop()
        for f in retry("list model artifacts", lambda here=here: client().list_logged_model_artifacts(model_id, here)):
            (todo.append(f.path) if f.is_dir else out.add(f.path))
    return out


def _upload(model_id: str, folder: Path, files: list[Path]) -> None:
    """Upload the model folder and check every checkpoint file arrived."""
    retry(f"upload model {model_id}", lambda: client().log_model_artifacts(model_id, str(folder)))
    expected = {f"data/{CHECKPOINT_DATA}/{p.as_posix()}" for p in files} | {"MLmodel"}
    missing = expected - _logged_files(model_id)
    if missing:
        raise TrackingUnavailable(f"model upload incomplete: {sorted(missing)} missing under models:/{model_id}; "
                                  "nothing was registered")


@contextlib.contextmanager
def _registry_lookup_uri() -> Iterator[None]:
    """Make MLflow's default tracking URI our local store for one registry call (environment restored after).

    MLflow's SQL registry resolves a ``models:/<model_id>`` source with a client on the *default* tracking URI (a
    TODO in mlflow's store); a server resolves it itself. ``mlflow.set_tracking_uri`` is not used: restoring it
    would unset ``MLFLOW_TRACKING_URI`` for the whole process.
    """
    import mlflow

    uri = settings().mlflow_tracking_uri
    if not settings().mlflow_is_local or mlflow.get_tracking_uri() == uri:
        yield
        return
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def _register(name: str, run_id: str, model_id: str, tags: dict[str, str], description: str) -> Any:
    ensure_registered_model(name)
    source = f"models:/{model_id}"

    def find_existing() -> Any:
        found = client().search_model_versions(f"name='{name}' and run_id='{run_id}'")
        return next((mv for mv in found if mv.source == source), None)

    def create() -> Any:
        with _registry_lookup_uri():
            return client().create_model_version(name, source, run_id=run_id, tags=tags, description=description,
                                                 model_id=model_id)

    return retry(f"register {name}", create, before_retry=find_existing)


def _link_version(model_id: str, name: str, version: int) -> None:
    """Name the registered version on the logged model (the server does it too; a local store does not)."""
    model = retry("get logged model", lambda: client().get_logged_model(model_id))
    versions = json.loads(model.tags.get(MODEL_VERSIONS_TAG, "[]") or "[]")
    entry = {"name": name, "version": str(version)}
    if entry not in versions:
        retry("tag logged model", lambda: client().set_logged_model_tags(
            model_id, {MODEL_VERSIONS_TAG: json.dumps([*versions, entry])}))


def _model_metadata(run_id: str, model: Any) -> Any:
    from mlflow.models import Model

    return Model(artifact_path=model.artifact_location, run_id=run_id, model_uuid=model.model_id,
                 model_id=model.model_id)


def _fail(model_id: str) -> None:
    try:
        client().finalize_logged_model(model_id, LoggedModelStatus.FAILED)
    except (MlflowException, OSError) as exc:  # the outage that failed the upload may hide this too
        log.warning("could not mark logged model %s FAILED: %s", model_id, exc)


def log_checkpoint_and_register(ckpt_dir: str | os.PathLike[str], *, model_name: str | None = None,
                                tags: Mapping[str, Any] | None = None, run_id: str | None = None,
                                description: str | None = None) -> ModelVersionInfo:
    """Log a checkpoint folder as an MLflow model of the run (pickle-free) and register it as a new version.

    See the module docstring for the steps. No alias is touched here.

    Args:
        ckpt_dir: Folder with ``weights.safetensors`` + ``config.json`` (``models.save_checkpoint``), usually with
            the ``linewatch/`` bundle; pickle formats such as a resume ``train_state.pt`` stay local.
        model_name: Registered model (default ``settings.model_name``).
        tags: Version tags, typically ``lineage_tags(...)``; ``checkpoint.weights_sha256``,
            ``checkpoint.format``, ``lineage.run_id`` and ``lineage.parent_uri`` are added.
        run_id: Training run (default: the current one).
        description: First line of the version description (e.g. the gate's verdict); the lineage follows it.

    Returns:
        The new version.

    Raises:
        ValueError: The folder is not a checkpoint (``weights.safetensors`` / ``config.json`` missing).
        TrackingUnavailable: MLflow failed; no version was created.
    """
    rid = run_id_or_current(run_id)
    ckpt_dir = Path(ckpt_dir)
    files = check_checkpoint_dir(ckpt_dir)
    name = model_name or settings().model_name
    version_tags = {k: to_text(v) for k, v in (tags or {}).items()}
    version_tags.update({"checkpoint.weights_sha256": sha256_file(ckpt_dir / "weights.safetensors"),
                         "checkpoint.format": "safetensors+json (mlflow pyfunc)", "lineage.run_id": rid})
    if version_tags.get("lineage.parent_version", "none") != "none":
        version_tags["lineage.parent_uri"] = model_uri(name, version_tags["lineage.parent_version"])
    model = _create_logged_model(rid, name, ckpt_dir, version_tags)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = build_model_folder(ckpt_dir, files, Path(tmp) / "model", mlflow_model=_model_metadata(rid, model))
            _upload(model.model_id, folder, files)
    except BaseException:
        _fail(model.model_id)
        raise
    retry("finalize logged model", lambda: client().finalize_logged_model(model.model_id, LoggedModelStatus.READY))
    retry("link model to run", lambda: client().log_outputs(rid, [LoggedModelOutput(model.model_id, step=0)]))
    mv = _register(name, rid, model.model_id, version_tags,
                   lineage_description(name, version_tags, run_id=rid, summary=description or ""))
    info = version_info(mv)
    _link_version(model.model_id, name, info.version)
    set_tags({"linewatch.registered_model": name, "linewatch.registered_version": info.version,
              "linewatch.model_uri": info.uri}, run_id=rid)
    log.info("registered %s version %d from run %s (logged model %s)", name, info.version, rid, model.model_id)
    return info


__all__ = ["CHECKPOINT_DATA", "LOADER_MODULE", "build_model_folder", "check_checkpoint_dir",
           "log_checkpoint_and_register", "sha256_file"]
