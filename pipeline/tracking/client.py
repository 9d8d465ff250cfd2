"""The MLflow client of linewatch: configuration, bounded retries, errors and the two experiments.

Everything goes through one explicit ``MlflowClient`` (never the fluent global state), so two configurations in one
process cannot leak into each other. Every call that may reach a server goes through :func:`retry`.
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.settings import Settings, get_settings

log = logging.getLogger("pipeline.tracking")
T = TypeVar("T")

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""Experiment tag the MLflow 3 UI reads for an experiment's type."""
EXPERIMENT_KIND = "custom_model_development"
"""The UI's "Machine learning" type (model training layout: runs, charts, models), not "GenAI apps & agents"."""
NOTE_TAG = "mlflow.note.content"
"""Tag MLflow shows as the description of an experiment, a run or a model."""

_EXPERIMENT_NOTES = {
    "training": "Nightly retrains of the line's InfoDiffusion model: one run per training, with its data "
                "snapshots (Datasets), losses, gate metrics (`gate.*`) and the model it registered (Logged models).",
    "monitoring": "Monitoring of the line: one run per line and monitor pass. The run description says what the "
                  "alert said; charts group per test (`drift/`, `mmd/`, `quality/`, `scores/`) and per latent "
                  "axis (`axis_03/`); `drift/windows.json` is the per-window, per-axis table; `reports/` and "
                  "`axis_cards/` hold the pictures.",
}

_sleep = time.sleep  # patched in tests


class TrackingUnavailable(RuntimeError):
    """MLflow could not be reached (or kept failing) after the bounded retries."""


class RegistryError(ValueError):
    """A registry request that cannot succeed as asked (unknown version, no previous champion, ...)."""


@dataclass
class _State:
    settings: Settings
    client: MlflowClient
    experiment_ids: dict[str, str] = field(default_factory=dict)


_STATE: _State | None = None
CURRENT_RUN: contextvars.ContextVar[str | None] = contextvars.ContextVar("linewatch_mlflow_run", default=None)


def configure(settings: Settings | None = None) -> None:
    """Point linewatch at an MLflow store. Lazy: nothing is contacted until the first call that needs it.

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
    CURRENT_RUN.set(None)


def state() -> _State:
    """The configuration in force (configured from the environment on first use)."""
    if _STATE is None:
        configure()
    assert _STATE is not None
    return _STATE


def settings() -> Settings:
    """The settings in force."""
    return state().settings


def client() -> MlflowClient:
    """The ``MlflowClient`` in force."""
    return state().client


def configured_settings() -> Settings | None:
    """The settings in force, or None when nothing is configured yet (reads no environment)."""
    return _STATE.settings if _STATE is not None else None


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


def is_transient(exc: BaseException) -> bool:
    """Whether an error is worth retrying (server or network trouble, a locked SQLite database)."""
    if isinstance(exc, requests.exceptions.HTTPError):
        resp = exc.response
        return resp is None or resp.status_code >= 500 or resp.status_code == 429
    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError):
        return True
    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES or any(t in str(exc) for t in _TRANSIENT_TEXT)
    return any(t in str(exc) for t in ("database is locked",)) or isinstance(exc, TimeoutError)


def not_found(exc: MlflowException) -> bool:
    """Whether an MLflow error says the thing asked for does not exist."""
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(exc).lower()


def _checked(before_retry: Callable[[], T | None]) -> T | None:
    try:
        return before_retry()
    except Exception as exc:  # noqa: BLE001 - the check itself may hit the outage
        if not is_transient(exc):
            raise
        return None


def retry(
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
    st = settings()
    tries = st.mlflow_retries
    last: BaseException | None = None
    for attempt in range(tries):
        if attempt and before_retry is not None and (done := _checked(before_retry)) is not None:
            return done
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            last = exc
            if attempt + 1 < tries:
                delay = st.mlflow_backoff_s * 2**attempt
                log.log(logging.DEBUG if quiet else logging.WARNING,
                        "MLflow %s failed (try %d/%d), retrying in %.1f s: %s", what, attempt + 1, tries, delay,
                        short(exc))
                _sleep(delay)
    raise TrackingUnavailable(
        f"MLflow at {st.mlflow_tracking_uri} is unreachable after {tries} tries ({what}): {short(last)}. "
        "Check that the tracking server is running and MLFLOW_TRACKING_URI is right; nothing was registered."
    ) from last


def check_reachable() -> None:
    """Raise ``TrackingUnavailable`` when the tracking server cannot be reached (after the bounded retries).

    One cheap request, retried like every other call but without logging each try, so a command can answer "MLflow
    is down" with one message before it starts any work. A local (SQLite) store is not contacted.
    """
    if settings().mlflow_is_local:
        return
    retry("reach the tracking server", lambda: client().search_experiments(max_results=1), quiet=True)


def short(exc: BaseException | None) -> str:
    """An error as one line of at most ~400 characters."""
    text = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
    return text if len(text) < 400 else text[:400] + " ..."


def _experiment_tags(kind: str) -> dict[str, str]:
    tags = {"linewatch": "1", "linewatch.kind": kind, EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    if kind in _EXPERIMENT_NOTES:
        tags[NOTE_TAG] = _EXPERIMENT_NOTES[kind]
    return tags


def _tag_existing(exp: object, tags: dict[str, str]) -> None:
    """Add the tags an experiment created by an older linewatch lacks (never overwrites a description)."""
    have = dict(getattr(exp, "tags", {}) or {})
    for key, value in tags.items():
        if key not in have or (key == EXPERIMENT_KIND_TAG and have[key] != value):
            client().set_experiment_tag(exp.experiment_id, key, value)  # type: ignore[attr-defined]


def experiment_id(name: str, kind: str = "") -> str:
    """The id of experiment ``name``, created (or restored) when needed, tagged as a machine-learning experiment.

    Tags: ``mlflow.experimentKind=custom_model_development`` (the MLflow 3 UI's "Machine learning" type),
    ``linewatch=1``, ``linewatch.kind`` and a description (``mlflow.note.content``) of what its runs hold.
    """
    st = state()
    if name in st.experiment_ids:
        return st.experiment_ids[name]
    tags = _experiment_tags(kind)
    mlflow_client = st.client

    def get_or_create() -> str:
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                mlflow_client.restore_experiment(exp.experiment_id)
            _tag_existing(exp, tags)
            return exp.experiment_id
        location = None
        if st.settings.mlflow_is_local:
            location = (st.settings.mlflow_artifacts_dir / name).resolve().as_uri()
        try:
            return mlflow_client.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = mlflow_client.get_experiment_by_name(name)
            assert found is not None
            return found.experiment_id

    st.experiment_ids[name] = retry(f"get or create experiment {name!r}", get_or_create)
    return st.experiment_ids[name]
