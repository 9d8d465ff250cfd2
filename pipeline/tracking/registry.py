"""The model registry: versions, aliases with their audit trail, lineage, downloads.

Aliases ``champion`` / ``challenger`` (never stages). Who moved an alias, when and why is written as model-version
tags on the version that receives it (``champion.set_by``, ``champion.set_at``, ``champion.reason``,
``champion.event``, ``champion.previous_version``) and on the version that loses it (``champion.event=demoted``,
``champion.demoted_at`` / ``_by`` / ``champion.demoted_reason``, ``champion.replaced_by``, and a line in its
description). Lineage (parent version, data snapshots, code) is tagged and written into the version description as
``models:/`` URIs, which the UI shows at the top of the version page.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow.artifacts
import yaml
from mlflow.exceptions import MlflowException

from pipeline.tracking.client import RegistryError, client, log, not_found, retry, settings
from pipeline.tracking.runs import to_text
from pipeline.tracking.ui import model_version_page

ALIASES = ("champion", "challenger")
CHECKPOINT_FILES = ("weights.safetensors", "config.json")
"""Files a checkpoint folder must contain (written by ``models.save_checkpoint``)."""
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib")
"""Extensions that would mean pickled objects; never registered nor handed out."""


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered model version.

    Attributes:
        name: Registered model name.
        version: Version number.
        run_id: Training run that logged it.
        source: Where the model lives (``models:/<model_id>`` for an MLflow 3 logged model, or ``runs:/...``).
        tags: Model-version tags (lineage, gates, alias audit).
        aliases: Aliases currently pointing at it.
        created_at: Creation time (UTC).
        model_id: The MLflow 3 logged model behind it (None for versions registered from run artifacts).
        description: The version description (Markdown).
    """

    name: str
    version: int
    run_id: str | None
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    created_at: dt.datetime | None = None
    model_id: str | None = None
    description: str = ""

    @property
    def uri(self) -> str:
        """``models:/<name>/<version>``."""
        return model_uri(self.name, self.version)


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


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_checkpoint_dir(ckpt_dir: Path) -> list[Path]:
    """Relative paths of the files of a checkpoint folder that get registered (all but pickles and hidden files).

    Raises:
        FileNotFoundError: No such folder.
        ValueError: ``weights.safetensors`` or ``config.json`` is missing.
    """
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


def model_uri(name: str, version: int | str) -> str:
    """The registry URI of a version (``models:/linewatch-infodiffusion/3``), loadable by ``mlflow.pyfunc``."""
    return f"models:/{name}/{int(version)}"


def lineage_tags(*, data_digest: str | None = None, calibration_digest: str | None = None,
                 parent_version: int | None = None, code_version: str | None = None,
                 gates: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, str]:
    """The standard lineage tags of a model version (pass to ``log_checkpoint_and_register(tags=...)``).

    Args:
        data_digest: Training snapshot digest -> ``data.train_digest``.
        calibration_digest: Calibration snapshot digest -> ``data.calibration_digest``.
        parent_version: Version it was fine-tuned from / compared against -> ``lineage.parent_version``
            (``none`` for a first model); its URI goes into the version description when registered.
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
        tags[f"gate.{k}"] = to_text(v)
    tags.update({k: to_text(v) for k, v in extra.items()})
    return tags


def lineage_description(name: str, tags: Mapping[str, str], *, run_id: str | None, summary: str = "") -> str:
    """The version description: ``summary`` then its lineage as ``models:/`` URIs, snapshots and code (Markdown)."""
    parent = tags.get("lineage.parent_version", "none")
    lines = [summary.strip()] if summary.strip() else []
    if parent not in ("", "none"):
        lines.append(f"- **Parent:** [`{model_uri(name, parent)}`]({model_version_page(name, parent)}) (warm start)")
    else:
        lines.append("- **Parent:** none (trained from scratch)")
    for key, what in (("data.train_digest", "Training data"), ("data.calibration_digest", "Calibration data")):
        if tags.get(key):
            lines.append(f"- **{what}:** snapshot `{tags[key][:16]}`")
    if run_id:
        lines.append(f"- **Training run:** `runs:/{run_id}`")
    if tags.get("lineage.code_version"):
        lines.append(f"- **Code:** `{tags['lineage.code_version']}`")
    return "\n".join(lines)


def _model_id_of(mv: Any) -> str | None:
    """The logged model behind a version: its ``model_id``, else the id in its ``models:/m-...`` source.

    MLflow's SQL registry keeps the link in the source only.
    """
    model_id = getattr(mv, "model_id", None)
    if model_id:
        return model_id
    source = str(mv.source or "")
    rest = source.removeprefix("models:/")
    return rest if source.startswith("models:/") and rest.startswith("m-") and "/" not in rest else None


def version_info(mv: Any) -> ModelVersionInfo:
    """A registry ``ModelVersion`` as :class:`ModelVersionInfo`."""
    created = dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=dt.UTC) if mv.creation_timestamp else None
    return ModelVersionInfo(name=mv.name, version=int(mv.version), run_id=mv.run_id or None, source=mv.source,
                            tags=dict(mv.tags or {}), aliases=tuple(sorted(getattr(mv, "aliases", None) or ())),
                            created_at=created, model_id=_model_id_of(mv),
                            description=mv.description or "")


def ensure_registered_model(name: str) -> None:
    """Create the registered model ``name`` when it does not exist yet."""

    def create() -> None:
        try:
            client().create_registered_model(
                name, description="linewatch InfoDiffusion models: each version is an MLflow pyfunc model (image in; "
                "z, anomaly score and flag out) over a safetensors checkpoint and its calibration bundle.")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    retry(f"create registered model {name!r}", create)


def _none_if_missing(fn: Any) -> Any:
    try:
        return fn()
    except MlflowException as exc:
        if not_found(exc) or exc.error_code == "INVALID_PARAMETER_VALUE":
            return None
        raise


def get_model_version(version: int | str, *, name: str | None = None) -> ModelVersionInfo:
    """One version with its tags and aliases.

    Raises:
        RegistryError: The model or version does not exist.
    """
    name = name or settings().model_name
    mv = retry(f"get {name} v{version}",
               lambda: _none_if_missing(lambda: client().get_model_version(name, str(int(version)))))
    if mv is None:
        known = [v.version for v in list_versions(name=name)]
        raise RegistryError(f"{name} has no version {version}; known versions: {known or 'none'}")
    return version_info(mv)


def get_alias_version(alias: str, *, name: str | None = None) -> int | None:
    """The version an alias points at, or None when the alias (or the model) does not exist."""
    name = name or settings().model_name

    def get() -> int | None:
        mv = _none_if_missing(lambda: client().get_model_version_by_alias(name, alias))
        return None if mv is None else int(mv.version)

    return retry(f"get alias {name}@{alias}", get)


def list_versions(*, name: str | None = None) -> list[ModelVersionInfo]:
    """All versions of the registered model, oldest first, with tags and aliases (empty if none)."""
    name = name or settings().model_name
    found = retry(f"list {name}", lambda: client().search_model_versions(f"name='{name}'"))
    if not found:
        return []
    # search results carry tags but not aliases: take those from the registered model (one more call)
    model = retry(f"get {name}", lambda: client().get_registered_model(name))
    by_version: dict[int, list[str]] = {}
    for alias, version in (getattr(model, "aliases", None) or {}).items():
        by_version.setdefault(int(version), []).append(alias)
    out = [replace(version_info(mv), aliases=tuple(sorted(by_version.get(int(mv.version), []))))
           for mv in found]
    return sorted(out, key=lambda v: v.version)


def _who(who: str | None) -> str:
    if who:
        return who
    try:
        return os.environ.get("USER") or getpass.getuser()
    except Exception:  # noqa: BLE001 - getpass raises various errors without a passwd entry
        return "unknown"


def _tag_version(name: str, version: int, tags: Mapping[str, str]) -> None:
    for k, v in tags.items():
        retry(f"tag {name} v{version}",
              lambda k=k, v=v: client().set_model_version_tag(name, str(version), k, v))


def _append_description(name: str, version: int, line: str) -> None:
    current = get_model_version(version, name=name).description
    text = f"{current.rstrip()}\n\n{line}" if current.strip() else line
    retry(f"describe {name} v{version}",
          lambda: client().update_model_version(name, str(version), description=text))


def _record_demotion(name: str, alias: str, demoted: int, change: AliasChange, event: str) -> None:
    """Tag the version that lost ``alias`` (event, when, who, why, successor) and say so in its description."""
    what = "rolled back" if event == "rollback" else "demoted"
    _tag_version(name, demoted, {f"{alias}.event": what, f"{alias}.demoted_at": change.at,
                                 f"{alias}.demoted_by": change.who, f"{alias}.demoted_reason": change.why or "-",
                                 f"{alias}.replaced_by": str(change.version)})
    _append_description(name, demoted, f"**No longer {alias}** since {change.at}: {what} by {change.who}, "
                        f"replaced by [`{model_uri(name, change.version)}`]({model_version_page(name, change.version)}) "
                        f"({change.why or 'no reason given'}).")


def set_alias(alias: str, version: int, *, name: str | None = None, who: str | None = None, why: str = "",
              record_previous: bool = True, event: str = "set") -> AliasChange:
    """Point ``alias`` at ``version`` and record who, when and why on both versions concerned.

    Tags written on ``version``: ``<alias>.set_by``, ``<alias>.set_at`` (UTC ISO), ``<alias>.reason``,
    ``<alias>.event`` (``set`` / ``promote`` / ``rollback``) and, with ``record_previous``,
    ``<alias>.previous_version`` (the version that held the alias before; what ``rollback`` returns to). The version
    that held the alias before gets ``<alias>.event=demoted`` (``rolled back`` for a rollback), ``<alias>.demoted_at``,
    ``_by``, ``<alias>.demoted_reason``, ``<alias>.replaced_by`` and a line in its description.

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
    name = name or settings().model_name
    target = get_model_version(version, name=name)  # raises RegistryError with the known versions
    previous = get_alias_version(alias, name=name)
    change = AliasChange(name, alias, target.version, previous, _who(who), why,
                         dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    retry(f"set {name}@{alias}", lambda: client().set_registered_model_alias(name, alias, str(target.version)))
    tags = {f"{alias}.set_by": change.who, f"{alias}.set_at": change.at, f"{alias}.reason": why or "-",
            f"{alias}.event": event}
    if record_previous and previous is not None and previous != target.version:
        tags[f"{alias}.previous_version"] = str(previous)
    _tag_version(name, target.version, tags)
    if previous is not None and previous != target.version:
        _record_demotion(name, alias, previous, change, event)
    log.info("%s@%s: %s -> %d by %s (%s)", name, alias, previous, target.version, change.who, why or "-")
    return change


def rollback(*, alias: str = "champion", name: str | None = None, who: str | None = None,
             why: str = "") -> AliasChange:
    """Move ``alias`` back to the version that held it before the current one.

    The target is the ``<alias>.previous_version`` tag of the current holder, so repeated rollbacks walk back
    through the promotion history (a rollback does not rewrite that tag). The demoted version gets
    ``<alias>.event=rolled back`` and ``<alias>.rolled_back_by`` / ``_at`` / ``.rollback_reason`` tags.

    Raises:
        RegistryError: The alias is unset or no previous holder was recorded.
    """
    name = name or settings().model_name
    current = get_alias_version(alias, name=name)
    if current is None:
        raise RegistryError(f"{name} has no '{alias}' alias to roll back; use `linewatch promote --version N`")
    prev = get_model_version(current, name=name).tags.get(f"{alias}.previous_version")
    if not prev:
        raise RegistryError(
            f"{name} v{current} ({alias}) has no recorded previous {alias}; use `linewatch promote --version N`"
        )
    change = set_alias(alias, int(prev), name=name, who=who, why=why, record_previous=False, event="rollback")
    _tag_version(name, current, {f"{alias}.rolled_back_by": change.who, f"{alias}.rolled_back_at": change.at,
                                 f"{alias}.rollback_reason": why or "-"})
    return change


def resolve_version(alias_or_version: str | int, *, name: str) -> int:
    """A version number from ``"champion"`` / ``"challenger"`` / a number.

    Raises:
        RegistryError: Unknown alias.
    """
    key = str(alias_or_version)
    if key.isdigit():
        return int(key)
    found = get_alias_version(key, name=name)
    if found is None:
        raise RegistryError(f"{name} has no alias {key!r}")
    return found


def checkpoint_folder(model_dir: Path) -> Path:
    """The checkpoint inside a downloaded model: the pyfunc flavour's ``data`` folder, else the folder itself."""
    mlmodel = model_dir / "MLmodel"
    if mlmodel.is_file():
        flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
        data = (flavors.get("python_function") or {}).get("data")
        if data:
            return model_dir / data
    return model_dir


def _download(mv: ModelVersionInfo, dst: Path) -> Path:
    st = settings()
    if mv.model_id:
        location = retry(f"get logged model {mv.model_id}",
                         lambda: client().get_logged_model(mv.model_id).artifact_location)
        return Path(retry(f"download {mv.name} v{mv.version}", lambda: mlflow.artifacts.download_artifacts(
            artifact_uri=location, dst_path=str(dst), tracking_uri=st.mlflow_tracking_uri)))
    if mv.run_id and mv.source.startswith("runs:/"):
        artifact_path = mv.source.split("/", 3)[3] if mv.source.count("/") >= 3 else "model"
        return Path(retry(f"download {mv.name} v{mv.version}",
                          lambda: client().download_artifacts(mv.run_id, artifact_path, str(dst))))
    return Path(retry(f"download {mv.name} v{mv.version}", lambda: mlflow.artifacts.download_artifacts(
        artifact_uri=mv.source, dst_path=str(dst), tracking_uri=st.mlflow_tracking_uri)))


def download_model(alias_or_version: str | int, dst: str | os.PathLike[str], *,
                   name: str | None = None) -> Path:
    """Download a registered model and verify its weights digest.

    Args:
        alias_or_version: ``"champion"``, ``"challenger"``, a version number (int or digits).
        dst: Folder to download into (created).
        name: Registered model (default ``settings.model_name``).

    Returns:
        The checkpoint folder (``weights.safetensors`` + ``config.json`` + the ``linewatch/`` bundle): load it with
        ``models.load_checkpoint``. For an MLflow model (MLmodel file) it is the pyfunc flavour's data folder.

    Raises:
        RegistryError: Unknown alias / version, or the downloaded weights do not match the registered digest.
    """
    name = name or settings().model_name
    version = resolve_version(alias_or_version, name=name)
    mv = get_model_version(version, name=name)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    path = checkpoint_folder(_download(mv, dst))
    check_checkpoint_dir(path)
    pickled = [p.name for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickled:
        raise RegistryError(f"{name} v{version} holds pickle-format files {pickled}; refusing to hand them out")
    expected = mv.tags.get("checkpoint.weights_sha256")
    if expected and sha256_file(path / "weights.safetensors") != expected:
        raise RegistryError(f"downloaded weights of {name} v{version} do not match the registered sha256")
    return path
