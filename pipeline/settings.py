"""Paths, URIs and names of a linewatch installation, read once from the environment.

Everything that differs between a laptop, CI and the production stack lives here, so the rest of the code never reads
``os.environ`` itself. Defaults make a fresh checkout work with no configuration: all state goes under
``LINEWATCH_HOME`` (default ``./.linewatch``), MLflow uses a local SQLite file there (never ``./mlruns``).

Environment variables (all optional):

==============================  ===========================================================================
``LINEWATCH_HOME``              root of all local state (default ``./.linewatch``, made absolute)
``LINEWATCH_CATALOG``           Parquet catalog root (default ``$LINEWATCH_HOME``, as ``catalog.default_root``)
``LINEWATCH_DROP``              drop folder the line writes images to (default ``$LINEWATCH_HOME/drop``)
``LINEWATCH_STATE``             alert state, outbox, cursors (default ``$LINEWATCH_HOME/state``)
``LINEWATCH_CHECKPOINTS``       model checkpoints (default ``$LINEWATCH_HOME/checkpoints``)
``MLFLOW_TRACKING_URI``         default ``sqlite:///$LINEWATCH_HOME/mlflow.db``
``MLFLOW_REGISTRY_URI``         default: the tracking URI
``LINEWATCH_MODEL_NAME``        registered model name (default ``linewatch-infodiffusion``)
``LINEWATCH_TRAINING_EXPERIMENT``    default ``linewatch-training``
``LINEWATCH_MONITORING_EXPERIMENT``  default ``linewatch-monitoring``
``LINEWATCH_TIMEZONE``          IANA zone of the plant: schedules, day windows, dates shown (default: this machine's zone,
                                from ``TZ`` or ``/etc/localtime``; ``UTC`` when it cannot be told)
``LINEWATCH_WEBHOOK_URL``       alert webhook (default: none)
``LINEWATCH_WORK_POOL``         Prefect work pool (default ``linewatch-process``)
``LINEWATCH_MLFLOW_RETRIES``    tries per MLflow server call before giving up (default 3)
``LINEWATCH_MLFLOW_BACKOFF_S``  first back-off delay, doubled after each failed try (default 1.0)
``LINEWATCH_MLFLOW_TIMEOUT_S``  HTTP timeout of one MLflow request in seconds (default 30)
==============================  ===========================================================================
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_MODEL_NAME = "linewatch-infodiffusion"
DEFAULT_TRAINING_EXPERIMENT = "linewatch-training"
DEFAULT_MONITORING_EXPERIMENT = "linewatch-monitoring"
DEFAULT_WORK_POOL = "linewatch-process"


@dataclass(frozen=True)
class Settings:
    """Where linewatch keeps its state and how it reaches MLflow / Prefect.

    Attributes:
        home: Root of all local state (absolute).
        catalog_root: Parquet catalog root.
        drop_dir: Folder the line (or the simulator) writes new images into.
        state_dir: Alert state, outbox and ingestion cursors.
        checkpoints_dir: Model checkpoints (``weights.safetensors`` + ``config.json`` folders).
        mlflow_tracking_uri: MLflow tracking URI (``sqlite:///...`` locally, ``http://...`` on the stack).
        mlflow_registry_uri: MLflow model-registry URI (usually the tracking URI).
        mlflow_artifacts_dir: Artifact root used for experiments on a local (SQLite) store.
        model_name: Registered model name.
        training_experiment: Experiment of training runs.
        monitoring_experiment: Experiment of monitoring (drift) runs.
        timezone: IANA time zone of the plant: schedules, day windows, the dates ``catalog stats`` shows and naive
            MES timestamps (default: this machine's zone, :func:`local_timezone`).
        webhook_url: Alert webhook URL, or None.
        work_pool: Prefect work pool the deployments run on.
        mlflow_retries: Tries per MLflow server call before ``TrackingUnavailable``.
        mlflow_backoff_s: First back-off delay between tries (doubles each time).
        mlflow_timeout_s: HTTP timeout of a single MLflow request.
    """

    home: Path
    catalog_root: Path
    drop_dir: Path
    state_dir: Path
    checkpoints_dir: Path
    mlflow_tracking_uri: str
    mlflow_registry_uri: str
    mlflow_artifacts_dir: Path
    model_name: str = DEFAULT_MODEL_NAME
    training_experiment: str = DEFAULT_TRAINING_EXPERIMENT
    monitoring_experiment: str = DEFAULT_MONITORING_EXPERIMENT
    timezone: str = "UTC"
    webhook_url: str | None = None
    work_pool: str = DEFAULT_WORK_POOL
    mlflow_retries: int = 3
    mlflow_backoff_s: float = 1.0
    mlflow_timeout_s: int = 30

    @property
    def mlflow_is_local(self) -> bool:
        """True when MLflow is an embedded store (SQLite file), False for a tracking server."""
        return not self.mlflow_tracking_uri.startswith(("http://", "https://"))

    @property
    def zoneinfo(self) -> ZoneInfo:
        """The configured time zone as a ``ZoneInfo``."""
        return ZoneInfo(self.timezone)


def _valid_zone(name: str | None) -> str | None:
    if not name:
        return None
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None
    return name


def local_timezone(env: Mapping[str, str] | None = None, etc: Path = Path("/etc")) -> str:
    """This machine's IANA time zone, ``"UTC"`` when it cannot be told.

    In order: ``TZ`` if it names a zone, ``/etc/timezone``, the zone ``/etc/localtime`` links to.

    The MES that stamps the parts runs on plant time, and so usually does the machine linewatch runs on; defaulting
    to it keeps day windows, schedules and the dates ``catalog stats`` shows on the plant's days. Containers default
    to UTC: set ``LINEWATCH_TIMEZONE`` there (``.env.example`` does).
    """
    env = os.environ if env is None else env
    tz = _valid_zone((env.get("TZ") or "").lstrip(":"))
    if tz:
        return tz
    try:
        tz = _valid_zone((etc / "timezone").read_text().strip())
    except OSError:
        tz = None
    if tz:
        return tz
    try:
        target = str((etc / "localtime").resolve())
    except OSError:
        target = ""
    tz = _valid_zone(target.split("zoneinfo/", 1)[1]) if "zoneinfo/" in target else None
    return tz or "UTC"


def _path(env: Mapping[str, str], key: str, default: Path) -> Path:
    value = env.get(key)
    return Path(value).expanduser().resolve() if value else default


def _number(env: Mapping[str, str], key: str, default: float, kind: type) -> float:
    value = env.get(key)
    if value is None or value == "":
        return default
    try:
        out = kind(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not a valid {kind.__name__}; unset it or give a number") from None
    if out < 0:
        raise ValueError(f"{key}={value!r} must be >= 0")
    return out


def get_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from the environment (or from ``env`` when given), filling in defaults.

    The environment is read on every call (cheap), so tests can change it with ``monkeypatch.setenv``.

    Args:
        env: Mapping to read instead of ``os.environ``.

    Returns:
        The frozen settings. Directories are not created; call ``ensure_dirs``.

    Raises:
        ValueError: An unknown time zone or a malformed number.
    """
    env = os.environ if env is None else env
    home = _path(env, "LINEWATCH_HOME", Path("./.linewatch").resolve())
    tracking = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
    if tracking.startswith("file:") or (tracking and "://" not in tracking and not tracking.startswith("sqlite")):
        raise ValueError(
            f"MLFLOW_TRACKING_URI={tracking!r} is a file store, which MLflow 3 no longer supports; "
            "use sqlite:///<path>/mlflow.db or an http(s):// tracking server"
        )
    timezone = env.get("LINEWATCH_TIMEZONE") or local_timezone(env)
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"LINEWATCH_TIMEZONE={timezone!r} is not a known IANA time zone (e.g. 'UTC', 'Europe/Berlin')"
        ) from None
    retries = int(_number(env, "LINEWATCH_MLFLOW_RETRIES", 3, int))
    if retries < 1:
        raise ValueError("LINEWATCH_MLFLOW_RETRIES must be >= 1 (1 = no retry)")
    return Settings(
        home=home,
        catalog_root=_path(env, "LINEWATCH_CATALOG", home),
        drop_dir=_path(env, "LINEWATCH_DROP", home / "drop"),
        state_dir=_path(env, "LINEWATCH_STATE", home / "state"),
        checkpoints_dir=_path(env, "LINEWATCH_CHECKPOINTS", home / "checkpoints"),
        mlflow_tracking_uri=tracking,
        mlflow_registry_uri=env.get("MLFLOW_REGISTRY_URI") or tracking,
        mlflow_artifacts_dir=home / "mlartifacts",
        model_name=env.get("LINEWATCH_MODEL_NAME") or DEFAULT_MODEL_NAME,
        training_experiment=env.get("LINEWATCH_TRAINING_EXPERIMENT") or DEFAULT_TRAINING_EXPERIMENT,
        monitoring_experiment=env.get("LINEWATCH_MONITORING_EXPERIMENT") or DEFAULT_MONITORING_EXPERIMENT,
        timezone=timezone,
        webhook_url=env.get("LINEWATCH_WEBHOOK_URL") or None,
        work_pool=env.get("LINEWATCH_WORK_POOL") or DEFAULT_WORK_POOL,
        mlflow_retries=retries,
        mlflow_backoff_s=float(_number(env, "LINEWATCH_MLFLOW_BACKOFF_S", 1.0, float)),
        mlflow_timeout_s=max(1, int(_number(env, "LINEWATCH_MLFLOW_TIMEOUT_S", 30, int))),
    )


def ensure_dirs(settings: Settings | None = None) -> Settings:
    """Create the local state directories (home, catalog, drop, state, checkpoints, MLflow artifacts).

    Args:
        settings: Settings to use; read from the environment when None.

    Returns:
        The settings, for chaining.
    """
    settings = settings or get_settings()
    for path in (
        settings.home,
        settings.catalog_root,
        settings.drop_dir,
        settings.state_dir,
        settings.checkpoints_dir,
    ):
        path.mkdir(parents=True, exist_ok=True)
    if settings.mlflow_is_local:
        settings.mlflow_artifacts_dir.mkdir(parents=True, exist_ok=True)
    return settings


def code_version(repo_dir: Path | None = None) -> str:
    """The version of the code that is running, for lineage tags.

    Args:
        repo_dir: Where to look for a git checkout (default: this package's parent folder).

    Returns:
        ``git:<commit>`` (``-dirty`` appended when tracked files have uncommitted changes) inside a git checkout,
        else ``pkg:<installed linewatch version>`` (``pkg:unknown`` if not installed).
    """
    repo_dir = repo_dir or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo_dir), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo_dir), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        if commit:
            return f"git:{commit}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version

        return f"pkg:{version('linewatch')}"
    except PackageNotFoundError:
        return "pkg:unknown"
