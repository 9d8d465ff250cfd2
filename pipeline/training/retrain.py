"""The nightly retrain job: select data, train a candidate, evaluate it, register it, promote it only through a gate.

Plain functions with frozen configs and results; ``flows/retrain.py`` wraps them in Prefect tasks. The steps:

1. **Select** the training window from the catalog (last ``window_days`` days), minus images in windows any verdict
   called drifted or alerted and minus images the monitor flagged anomalous, so a fault is never learned away; when
   that leaves fewer images than the floors (or than the window held before the exclusions), the window reaches back
   for older healthy images, at most ``max_lookback_days`` (``pipeline.training.selection``). Still too few: no candidate
   (:class:`InsufficientData`), the champion stays and an ops alert says so.
2. **Split** the selection deterministically (hash of the image id) into a training snapshot and a held-out
   calibration snapshot; both are frozen with ``catalog.snapshot`` and their digests recorded.
3. **Train** InfoDiffusion, warm-started from the current champion (from scratch on the first night or on request).
4. **Evaluate** candidate (and champion, on the same calibration images, same noise): denoising loss,
   reconstruction error, latent quality (active axes, MMD to the prior), detector calibration (empirical FPR on a
   held-out half), axis alignment to the champion.
5. **Gate**: the metrics' checks, then the monitor's own: the calibration set (the drift reference) must be at least
   what the monitor's drift test needs, and the monitor must load the bundle and test a window with it. The monitor's
   side comes in through :class:`MonitorHooks` (``pipeline.monitoring.monitor.retrain_hooks``, which the flows and the
   demo pass), so a candidate that would stop monitoring is never promoted and training never imports monitoring.
6. **Register** the version with its lineage and **promote** it to ``champion`` only if every gate check passes;
   otherwise it is aliased ``challenger``, the champion stays, and an ops alert (through the alert outbox, log,
   ``alerts.jsonl`` and the webhook) says which check failed.

The model directory that is registered holds the checkpoint plus a ``linewatch/`` folder with what the monitor
needs: the calibration latents (drift reference), the fitted detector and the gate report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.common import atomic
from pipeline.handoff.bundle import (  # noqa: F401 - re-exported: the bundle format and the scoring recipe
    BUNDLE_DIR,
    CALIBRATION_FILE,
    GATE_FILE,
    ScoringConfig,
    _infer_threshold,
    detector_calibration,
    make_detector,
    reference_groups,
)
from pipeline.handoff.state import (  # noqa: F401 - re-exported: the state the jobs share
    CHALLENGER,
    CHAMPION,
    MonitorHooks,
    ops_alerts_path,
    state_dir,
)
from pipeline.training.evaluation import (  # noqa: F401 - re-exported: the retrain's evaluation helpers
    axis_alignment,
    calibration_scores,
    denoising_loss,
    encode_tensor,
    evaluate_model,
    latent_quality,
    mmd_to_prior,
    perturb_weights,
    reconstruction_error,
)
from pipeline.training.gate import GateConfig, GateResult, apply_gate  # noqa: F401 - re-exported
from pipeline.training.gate import gate_result as _gate_result
from pipeline.training.reference import extend_calibration, needed_for
from pipeline.training.selection import (  # noqa: F401 - re-exported: the retrain's data selection
    DataSelection,
    alert_windows,
    anomalous_ids,
    holdout_mask,
    select_training_data,
)

logger = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------------------------
# Configs and results
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrainConfig:
    """What the nightly retrain does.

    Attributes:
        preset: model preset name (``models.get_preset``).
        steps: optimiser steps of this training (warm start or scratch).
        batch_size: images per step (None: the preset's).
        window_days: training window, the last N days of the catalog (ending at ``end`` or the newest image).
        end: end of the window (exclusive); None = just after the newest catalogued image.
        lines: restrict to these production lines (None: all).
        exclude_alerts: drop images in windows that were under an active drift alert.
        exclude_anomalous: drop images the champion's detectors flagged anomalous.
        from_scratch: ignore the champion and train from initialisation.
        holdout_share: share of the window held out (by image-id hash) as the calibration snapshot.
        min_train_images: floor on training images. When the selection rules leave fewer, the window reaches back
            for older healthy images (up to ``max_lookback_days``); still fewer is :class:`InsufficientData`
            (nothing is trained or registered, the champion stays, an ops alert is sent).
        min_calibration_images: floor on calibration (reference) images, handled like ``min_train_images``; None =
            what the monitor's drift test needs (:meth:`calibration_floor`: 2 x its min_window).
        max_lookback_days: how far back (days before ``end``) the window may reach for healthy images when
            exclusions (alerted windows, flagged images) leave it short; at least ``window_days``.
        keep_size: when exclusions drop images, reach back for as many healthy older ones (up to
            ``max_lookback_days``), so the training and calibration sets do not shrink night after night.
        monitor: the monitor settings the candidate must serve (``pipeline.monitoring.config.MonitorConfig`` fields,
            e.g. ``{"min_window": 30}``); the floor follows them, and ``pipeline.monitoring.monitor.retrain_hooks``
            builds the gate's monitor check from them. None = the monitor's defaults.
        seed: training / evaluation seed.
        device: torch device for training and evaluation.
        inject_weight_noise: fault injection for tests and demos: add N(0, s * std(w)) noise to every weight of the
            trained candidate before evaluation (a deliberately regressed model). 0 = off.
        gate: promotion gate.
        scoring: the per-image anomaly score the monitor will use with this model (residual recipe).
        patch_family: fit the per-image patch family on the calibration cells and store it in the bundle, so the
            monitor, ``linewatch score`` and a served model flag a cell alike (``pipeline.handoff.patch_family``).
        lock_timeout_s: how long to wait for another retrain holding the lock.
    """

    preset: str = "cpu"
    steps: int = 300
    batch_size: int | None = None
    window_days: int = 7
    end: datetime | None = None
    lines: tuple[str, ...] | None = None
    exclude_alerts: bool = True
    exclude_anomalous: bool = True
    from_scratch: bool = False
    holdout_share: float = 0.25
    min_train_images: int = 32
    min_calibration_images: int | None = None
    max_lookback_days: int = 28
    keep_size: bool = True
    monitor: dict[str, Any] | None = None
    seed: int = 0
    device: str = "cpu"
    inject_weight_noise: float = 0.0
    gate: GateConfig = field(default_factory=GateConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    patch_family: bool = True
    lock_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"RetrainConfig.steps must be >= 1, got {self.steps}")
        if self.window_days < 1:
            raise ValueError(f"RetrainConfig.window_days must be >= 1, got {self.window_days}")
        if not 0 < self.holdout_share < 1:
            raise ValueError(f"RetrainConfig.holdout_share must be in (0, 1), got {self.holdout_share}")
        if self.inject_weight_noise < 0:
            raise ValueError(f"RetrainConfig.inject_weight_noise must be >= 0, got {self.inject_weight_noise}")
        if self.min_train_images < 1 or (self.min_calibration_images is not None and self.min_calibration_images < 9):
            raise ValueError("RetrainConfig.min_train_images must be >= 1 and min_calibration_images >= 9 "
                             "(the detector's three-way split)")
        if self.max_lookback_days < 1:
            raise ValueError(f"RetrainConfig.max_lookback_days must be >= 1, got {self.max_lookback_days}")

    def calibration_floor(self, hooks: MonitorHooks | None = None) -> int:
        """Fewest calibration images of the selection: ``min_calibration_images``, else :meth:`monitor_floor`."""
        if self.min_calibration_images is not None:
            return int(self.min_calibration_images)
        return self.monitor_floor(hooks)

    def monitor_floor(self, hooks: MonitorHooks | None = None) -> int:
        """Fewest reference images the monitor's drift test needs (at least 9, the detector's three-way split).

        ``hooks.reference_floor`` when the caller passed the monitor's hooks, else the drift detector's own minimum
        (``pipeline.analysis.drift.DriftDetector.min_reference``) for the drift settings in ``monitor``.
        """
        if hooks is not None and hooks.reference_floor is not None:
            return max(9, int(hooks.reference_floor))
        from pipeline.analysis.drift import DriftDetector

        drift = {k: v for k, v in (self.monitor or {}).items() if k in ("alpha", "null", "min_window", "n_calibration")}
        return max(9, DriftDetector(**drift).min_reference())


class InsufficientData(ValueError):
    """Too few healthy images for a candidate, even after reaching back ``max_lookback_days``.

    Nothing is trained or registered; the champion stays. ``linewatch retrain`` / ``nightly`` exit with
    ``EXIT_NO_CANDIDATE``.
    """


@dataclass(frozen=True)
class RetrainResult:
    """What a retrain produced.

    Attributes:
        version: registered model version (string, as the registry returns it).
        promoted: the version is now the champion.
        gate: the gate outcome.
        parent_version: the champion it was warm-started from (None: from scratch).
        data_digest: digest of the training snapshot.
        calibration_digest: digest of the calibration snapshot.
        alignment: mean |r| of matched axes against the champion (None without a champion).
        model_dir: local folder of the registered model (checkpoint + ``linewatch/`` bundle).
        model_id: the checkpoint's stable id.
        metrics: candidate (and champion) evaluation metrics.
        n_train: training images.
        n_calibration: calibration images.
        excluded: reason -> images dropped by the selection rules.
        run_id: MLflow run id of the training run.
        train_seconds: wall time of the training step.
        alias: alias the version received (``champion`` or ``challenger``).
        lookback_days: days the training window covered (more than ``window_days`` when it reached back).
    """

    version: str
    promoted: bool
    gate: GateResult
    parent_version: str | None
    data_digest: str
    calibration_digest: str
    alignment: float | None
    model_dir: Path
    model_id: str
    metrics: dict[str, float]
    n_train: int
    n_calibration: int
    excluded: dict[str, int]
    run_id: str | None
    train_seconds: float
    alias: str
    lookback_days: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (paths as strings, gate checks as lists)."""
        d = dataclasses.asdict(self)
        d["model_dir"] = str(self.model_dir)
        d["gate"]["checks"] = {k: list(v) for k, v in self.gate.checks.items()}
        return d


def retrain_config(**params: Any) -> RetrainConfig:
    """A ``RetrainConfig`` from JSON-friendly parameters (flow / deployment parameters).

    ``end`` may be an ISO 8601 string, ``lines`` a list, ``gate`` / ``scoring`` dicts of ``GateConfig`` /
    ``ScoringConfig`` fields; None values mean "the default".
    """
    p = {k: v for k, v in params.items() if v is not None}
    unknown = set(p) - {f.name for f in dataclasses.fields(RetrainConfig)}
    if unknown:
        raise ValueError(f"unknown retrain parameters {sorted(unknown)}")
    if isinstance(p.get("end"), str):
        p["end"] = datetime.fromisoformat(p["end"])
    if "lines" in p:
        p["lines"] = tuple(p["lines"])
    p["gate"] = p["gate"] if isinstance(p.get("gate"), GateConfig) else GateConfig(**(p.get("gate") or {}))
    if not isinstance(p.get("scoring"), ScoringConfig):
        sc = dict(p.get("scoring") or {})
        for key in ("t_stars", "seeds"):
            if key in sc:
                sc[key] = tuple(int(t) for t in sc[key])
        p["scoring"] = ScoringConfig(**sc)
    return RetrainConfig(**p)


# --------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------
def load_images(settings: Any, rows: pd.DataFrame, spec: Any) -> torch.Tensor:
    """Read the catalog rows' stored images into one model-input tensor."""
    from pipeline.common.images import load_batch

    return load_batch([resolve_store_path(settings, p) for p in rows["store_path"]], spec)


def resolve_store_path(settings: Any, store_path: str) -> Path:
    """Absolute path of a catalog ``store_path`` (relative to the catalog root)."""
    from pipeline.catalog.tables import resolve_store_path as _resolve

    return _resolve(settings.catalog_root, store_path)


def _read_catalog(settings: Any, lines: tuple[str, ...] | None) -> pd.DataFrame:
    from pipeline.catalog.tables import read_catalog

    return read_catalog(settings.catalog_root, lines=list(lines) if lines else None)


def _snapshot(settings: Any, df: pd.DataFrame, name: str) -> str:
    from pipeline.catalog.tables import snapshot

    return str(snapshot(df, name, settings.catalog_root).digest)


def retrain(
    settings: Any,
    config: RetrainConfig,
    *,
    progress: bool = False,
    train_fn: Callable[..., Any] | None = None,
    on_step: Callable[[dict[str, float]], bool | None] | None = None,
    hooks: MonitorHooks | None = None,
) -> RetrainResult:
    """Run one retrain: select, snapshot, train, evaluate, register, gate.

    Args:
        settings: ``pipeline.settings.get_settings()``.
        config: what to do.
        progress: show training progress.
        train_fn: replacement for ``models.train`` (tests inject crashes); same signature.
        on_step: forwarded to the trainer.
        hooks: the monitor's side of the gate and of ops alerts (:class:`MonitorHooks`); the flows pass
            ``pipeline.monitoring.monitor.retrain_hooks(...)``.

    Returns:
        The result; ``promoted`` says whether the version is now the champion. A candidate the gate refuses
        (including one the monitor could not use) is registered as ``challenger`` and an ops alert is sent.

    Raises:
        InsufficientData: too few healthy images even after reaching back (an ops alert is sent; the champion stays).
        pipeline.tracking.TrackingUnavailable: MLflow cannot be reached (nothing is registered then).
    """
    from filelock import FileLock

    lock = FileLock(str(state_dir(settings) / "retrain.lock"), timeout=config.lock_timeout_s)
    with lock:
        try:
            return _retrain_locked(settings, config, progress=progress, train_fn=train_fn, on_step=on_step,
                                   hooks=hooks or MonitorHooks())
        except InsufficientData as exc:
            _ops_alert(settings, hooks, f"no model trained: {exc}", kind="model.no_candidate",
                       key=datetime.now(UTC).strftime("%Y-%m-%dT%H"))
            raise


@dataclass
class _Candidate:
    """What the training and evaluation steps produced for one candidate."""

    model: Any
    step: int
    train_seconds: float
    metrics: dict[str, float]
    ref_metrics: dict[str, float] | None
    baseline: dict[str, float]
    z_cal: np.ndarray
    residuals: np.ndarray
    alignment: float | None
    pairs: dict[str, Any]
    gate: GateResult


@dataclass(frozen=True)
class _Features:
    """Pooled backbone features from the catalog's feature store, for models whose encoder reads them (else None).

    Attributes:
        train: of the training images, for the candidate's encoder.
        calibration: of the calibration images, for the candidate's encoder.
        champion: of the calibration images, for the champion's encoder.
    """

    train: torch.Tensor | None = None
    calibration: torch.Tensor | None = None
    champion: torch.Tensor | None = None


def _stored_features(settings: Any, config: RetrainConfig, sel: DataSelection, champ: Any) -> _Features:
    """Step 2b: the features a ``"pretrained"`` encoder reads, each image featurised once (then read from the store)."""
    from pipeline.latent.features import pooled_features

    root, cand_cfg = settings.catalog_root, _preset(config).model
    return _Features(train=pooled_features(cand_cfg, root, sel.train),
                     calibration=pooled_features(cand_cfg, root, sel.calibration),
                     champion=None if champ is None else pooled_features(champ.model.cfg, root, sel.calibration))


def _retrain_locked(
    settings: Any,
    config: RetrainConfig,
    *,
    progress: bool,
    train_fn: Callable[..., Any] | None,
    on_step: Callable[[dict[str, float]], bool | None] | None,
    hooks: MonitorHooks,
) -> RetrainResult:
    from models.train import train as models_train
    from pipeline import tracking

    torch.set_num_threads(min(2, torch.get_num_threads()))
    tracking.configure(settings)
    sel = _select_data(settings, config, hooks)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    data_digest = _snapshot(settings, sel.train, f"train-{stamp}")
    calib_digest = _snapshot(settings, sel.calibration, f"calibration-{stamp}")
    logger.info("retrain: %d train / %d calibration images over %d days, excluded %s", len(sel.train),
                len(sel.calibration), sel.lookback_days, sel.excluded)
    parent_version, champion_dir, champ = _current_champion(settings, config)
    spec = champ.preprocess if champ is not None else _preset(config).preprocess
    x_train, x_cal = load_images(settings, sel.train, spec), load_images(settings, sel.calibration, spec)
    feats = _stored_features(settings, config, sel, champ)
    work_dir = _candidate_dir(settings, config, data_digest, parent_version)
    with tracking.start_training_run(
        f"retrain-{stamp}",
        tags={"lineage.parent_version": parent_version or "none", "warm_start": str(champion_dir is not None).lower(),
              "preset": config.preset},
        description=f"Nightly retrain on {len(sel.train)} images ({sel.lookback_days} days), "
        f"{'warm start from v' + parent_version if parent_version else 'from scratch'}.",
    ) as run_id:
        _log_inputs(settings, config, sel, data_digest, calib_digest, parent_version)
        cand = _train_and_evaluate(config, x_train, x_cal, work_dir / "train", champ, champion_dir,
                                   train_fn or models_train, progress=progress, on_step=on_step,
                                   groups=reference_groups(sel.calibration), feats=feats)
        model_dir, model_id = _save_candidate(config, sel, cand, work_dir / "model", spec, hooks,
                                              parent_version=parent_version, data_digest=data_digest,
                                              calib_digest=calib_digest, catalog_root=settings.catalog_root)
        version, alias, metrics = _register(settings, config, cand, model_dir, model_id, parent_version,
                                            data_digest=data_digest, calib_digest=calib_digest,
                                            warm=champion_dir is not None)
    if not cand.gate.passed:
        _ops_alert(settings, hooks, f"model v{version} not promoted, champion v{parent_version or '-'} stays "
                   f"({cand.gate.reason})", kind="model.not_promoted", key=version, version=version,
                   champion=parent_version, gate=cand.gate)
    logger.info("retrain: v%s %s (%s)", version, alias, cand.gate.reason)
    return RetrainResult(
        version=version, promoted=cand.gate.passed, gate=cand.gate, parent_version=parent_version,
        data_digest=data_digest, calibration_digest=calib_digest, alignment=cand.alignment, model_dir=model_dir,
        model_id=model_id, metrics=metrics, n_train=len(sel.train), n_calibration=len(sel.calibration),
        excluded=sel.excluded, run_id=run_id, train_seconds=cand.train_seconds, alias=alias,
        lookback_days=sel.lookback_days,
    )


def _preset(config: RetrainConfig) -> Any:
    from models.presets import get_preset

    return get_preset(config.preset)


def _select_data(settings: Any, config: RetrainConfig, hooks: MonitorHooks) -> DataSelection:
    """Step 1: the training and calibration images, reaching back for healthy ones.

    Too few, or a calibration snapshot the monitor could not calibrate its drift test on
    (``hooks.reference_problem``), is InsufficientData.
    """
    min_cal = config.calibration_floor(hooks)
    catalog = _read_catalog(settings, config.lines)
    sel = select_training_data(
        catalog,
        window_days=config.window_days,
        end=config.end,
        alert_windows=alert_windows(settings) if config.exclude_alerts else None,
        anomalous_ids=anomalous_ids(settings) if config.exclude_anomalous else set(),
        holdout_share=config.holdout_share,
        exclude_alerts=config.exclude_alerts,
        exclude_anomalous=config.exclude_anomalous,
        min_train=config.min_train_images,
        min_calibration=min_cal,
        max_lookback_days=config.max_lookback_days,
        keep_size=config.keep_size,
    )
    # the calibration snapshot is the monitor's drift reference: grown to three day windows so whole windows are
    # tested (pipeline.training.reference)
    sel = extend_calibration(sel, catalog, need=needed_for(catalog, sel.window, settings.timezone),
                             holdout_share=config.holdout_share,
                             alert_windows=alert_windows(settings) if config.exclude_alerts else None)
    short = sel.shortfall(config.min_train_images, min_cal)
    if short:
        raise InsufficientData(
            f"only {short} after the selection rules, reaching back {sel.lookback_days} days "
            f"(window {config.window_days} days, max_lookback_days {config.max_lookback_days}, excluded "
            f"{sel.excluded}); the champion stays: ingest more healthy images or raise max_lookback_days"
        )
    young = hooks.reference_problem(sel.calibration) if hooks.reference_problem is not None else None
    if young:
        raise InsufficientData(f"{young} (window {config.window_days} days, reaching back {sel.lookback_days} days); "
                               "the champion stays: the line needs more days of healthy production")
    return sel


def _current_champion(settings: Any, config: RetrainConfig) -> tuple[str | None, Path | None, Any]:
    """Step 2: the champion to warm-start from: (version, downloaded folder, loaded checkpoint), or Nones."""
    from models.checkpoint import load_checkpoint
    from pipeline import tracking

    parent = None if config.from_scratch else tracking.get_alias_version(CHAMPION, name=settings.model_name)
    if parent is None:
        return None, None, None
    champion_dir = tracking.download_model(parent, Path(settings.checkpoints_dir) / f"registry-v{parent}",
                                           name=settings.model_name)
    return str(parent), champion_dir, load_checkpoint(champion_dir)


def _candidate_dir(settings: Any, config: RetrainConfig, data_digest: str, parent_version: str | None) -> Path:
    """The candidate's folder: a pure function of what is trained, so a retry after a crash resumes its checkpoint."""
    key = json.dumps([data_digest, parent_version, config.preset, config.steps, config.batch_size, config.seed,
                      config.inject_weight_noise], default=str)
    return Path(settings.checkpoints_dir) / f"candidate-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _log_inputs(settings: Any, config: RetrainConfig, sel: DataSelection, data_digest: str, calib_digest: str,
                parent_version: str | None) -> None:
    """Log the parameters and the two snapshots of the training run."""
    from pipeline import tracking

    tracking.log_params_flat(
        {"retrain": _plain(dataclasses.asdict(config)), "n_train": len(sel.train), "n_calibration":
         len(sel.calibration), "excluded": sel.excluded, "parent_version": parent_version or "none",
         "lookback_days": sel.lookback_days}
    )
    snap_cols = [c for c in ("image_id", "sha256", "line", "date") if c in sel.train.columns]
    for rows, name, digest, context in ((sel.train, "train", data_digest, "training"),
                                        (sel.calibration, "calibration", calib_digest, "calibration")):
        tracking.log_dataset(rows[snap_cols], name=name, digest=digest,
                             source=str(Path(settings.catalog_root) / "snapshots" / f"{digest}.json"), context=context)


def _train_and_evaluate(config: RetrainConfig, x_train: torch.Tensor, x_cal: torch.Tensor, out_dir: Path, champ: Any,
                        champion_dir: Path | None, train_fn: Callable[..., Any], *, progress: bool,
                        on_step: Callable[[dict[str, float]], bool | None] | None,
                        groups: np.ndarray | None = None, feats: _Features = _Features()) -> _Candidate:
    """Steps 3-4: train (warm start from the champion unless resuming) and evaluate against the champion."""
    from pipeline import tracking

    preset = _preset(config)
    kwargs: dict[str, Any] = {"steps": config.steps, "batch_size": config.batch_size or preset.train.batch_size,
                              "resume": True, "device": config.device, "progress": progress, "seed": config.seed}
    if champion_dir is not None and not (out_dir / "train_state.pt").exists():
        kwargs["init_from"] = champion_dir
    if on_step is not None:
        kwargs["on_step"] = on_step
    if feats.train is not None:
        kwargs["features"] = feats.train
    t0 = time.perf_counter()
    result = train_fn(preset, x_train, out_dir, **kwargs)
    train_seconds = time.perf_counter() - t0
    tracking.log_history(result.history)
    cand = result.model
    if config.inject_weight_noise > 0:
        perturb_weights(cand, config.inject_weight_noise, seed=config.seed)
    gate_cfg = config.gate
    z_given = None if feats.calibration is None else encode_tensor(cand, x_cal, features=feats.calibration)
    r_cand = config.scoring.residual_detector(cand, progress=progress).residuals(x_cal, z_given)
    metrics, z_cand, _ = evaluate_model(cand, x_cal, gate_cfg, seed=config.seed, residuals=r_cand,
                                        k=config.scoring.k, groups=groups, features=feats.calibration)
    ref_metrics, alignment, pairs, baseline = None, None, {}, {}
    if champ is not None:
        ref_metrics, z_champ, _ = evaluate_model(champ.model, x_cal, gate_cfg, seed=config.seed, with_detector=False,
                                                 features=feats.champion)
        alignment, pairs = axis_alignment(z_champ, z_cand)
        metrics["alignment"] = alignment
    else:
        from models.infodiffusion import InfoDiffusion

        torch.manual_seed(config.seed + 1)
        untrained = InfoDiffusion(preset.model)
        baseline["eps_mse"] = denoising_loss(untrained, x_cal, seed=config.seed, repeats=gate_cfg.eval_repeats,
                                             features=feats.calibration)
    gate = apply_gate(metrics, ref_metrics, gate_cfg, baseline=baseline)
    return _Candidate(cand, int(result.step), train_seconds, metrics, ref_metrics, baseline, z_cand, r_cand,
                      alignment, pairs, gate)


def _save_candidate(config: RetrainConfig, sel: DataSelection, cand: _Candidate, model_dir: Path, spec: Any,
                    hooks: MonitorHooks, *, parent_version: str | None, data_digest: str,
                    calib_digest: str, catalog_root: Any = None) -> tuple[Path, str]:
    """Step 5: write the registered folder (weights + bundle) and let the monitor try it; the gate learns the answer.

    The registered weights are exactly the evaluated ones (a clean folder: no resume state, no pickles). The bundle
    carries the per-image patch family of the calibration cells (:func:`patch_family_of`) when ``catalog_root`` is
    given and ``config.patch_family`` is on.
    """
    from models.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(cand.model, model_dir, preprocess=spec,
                    meta={"preset": config.preset, "step": cand.step, "parent_version": parent_version})
    model_id = str(load_checkpoint(model_dir).meta.get("model_id", ""))
    meta = {"scoring": dataclasses.asdict(config.scoring), "model_id": model_id, "parent_version": parent_version,
            "data_digest": data_digest, "calibration_digest": calib_digest, "detector_seed": config.seed,
            "fpr_target": config.gate.fpr_target}
    patches = patch_family_of(catalog_root, sel.calibration) if config.patch_family and catalog_root else None
    write_bundle(model_dir, sel.calibration, cand.z_cal, cand.gate, cand.metrics, cand.ref_metrics, cand.baseline,
                 cand.pairs, residuals=cand.residuals, patches=patches, **meta)
    cand.gate = monitor_gate(model_dir, cand.gate, config, hooks)
    write_gate_report(model_dir, cand.gate, cand.metrics, cand.ref_metrics, cand.baseline, cand.pairs, **meta)
    return model_dir, model_id


def patch_family_of(catalog_root: Any, calibration: pd.DataFrame) -> Any:
    """Step 5a: the per-image patch family fitted on the calibration cells (``pipeline.handoff.patch_family``).

    The cells' patch maps come from the catalog's feature store (computed and stored when missing). None, with a
    warning, when they cannot be had (no image digests, no weights package): the monitor then fits the family
    itself, and a served model scores with the residual family.
    """
    from pipeline.handoff.patch_family import fit_patch_family
    from pipeline.latent.features import BACKBONE_ID, SHA, load_or_compute_features

    try:
        if SHA not in calibration.columns or "store_path" not in calibration.columns:
            raise ValueError(f"the calibration rows have no {SHA!r} and 'store_path' columns")
        P = load_or_compute_features(catalog_root, calibration[[SHA, "store_path"]]).patches
        return fit_patch_family(P, calibration["image_id"].astype(str), BACKBONE_ID,
                                groups=reference_groups(calibration))
    except Exception as exc:  # noqa: BLE001 - the bundle is still usable without it
        logger.warning("retrain: no patch family in the bundle (%s: %s); the monitor fits it itself",
                       type(exc).__name__, exc)
        return None


def monitor_gate(model_dir: Path, gate: GateResult, config: RetrainConfig,
                 hooks: MonitorHooks | None = None) -> GateResult:
    """Add the monitor's own checks to a gate result.

    The reference must be large enough for the monitor's drift test (:meth:`RetrainConfig.monitor_floor`), and,
    with ``hooks.check_bundle``, the monitor must be able to load the bundle and test a window with it.

    Returns:
        ``gate`` with the checks ``reference_images`` (calibration images >= the floor) and, with the hook,
        ``monitor_loads`` (1 = the monitor used the bundle); a failure of either fails the gate.
    """
    hooks = hooks or MonitorHooks()
    n_ref = len(pd.read_parquet(Path(model_dir) / BUNDLE_DIR / CALIBRATION_FILE, columns=["image_id"]))
    floor = config.monitor_floor(hooks)  # what the monitor needs, whatever floor the selection used
    checks = dict(gate.checks)
    checks["reference_images"] = (float(n_ref), float(floor), n_ref >= floor)
    problems: list[str] = []
    if hooks.check_bundle is not None:
        problems = hooks.check_bundle(Path(model_dir)) if n_ref >= floor else []
        checks["monitor_loads"] = (0.0 if problems or n_ref < floor else 1.0, 1.0, not problems and n_ref >= floor)
    return _gate_result(checks, notes=[f"monitor: {p}" for p in problems])


def _register(settings: Any, config: RetrainConfig, cand: _Candidate, model_dir: Path, model_id: str,
              parent_version: str | None, *, data_digest: str, calib_digest: str,
              warm: bool) -> tuple[str, str, dict[str, float]]:
    """Step 6: log the metrics, register the version with its lineage, alias it champion or challenger.

    Returns:
        (version, alias, the logged metrics).
    """
    from pipeline import tracking

    gate = cand.gate
    metrics = {f"candidate.{k}": v for k, v in cand.metrics.items()}
    metrics |= {f"champion.{k}": v for k, v in (cand.ref_metrics or {}).items()}
    metrics |= {f"untrained.{k}": v for k, v in cand.baseline.items()}
    tracking.log_metrics(metrics)
    tracking.log_metrics({f"gate.{k}.ok": float(v[2]) for k, v in gate.checks.items()})
    info = tracking.log_checkpoint_and_register(
        model_dir,
        model_name=settings.model_name,
        tags=tracking.lineage_tags(
            data_digest=data_digest,
            calibration_digest=calib_digest,
            parent_version=None if parent_version is None else int(parent_version),
            code_version=_code_version(),
            gates={"passed": gate.passed, "reason": gate.reason[:480],
                   **{k: f"{v[0]:.4g}/{v[1]:.4g}" for k, v in gate.checks.items()}},
            **{"model_id": model_id, "warm_start": str(warm).lower(),
               "alignment.mean_abs_r": "" if cand.alignment is None else f"{cand.alignment:.4f}"},
        ),
        description=f"gate: {gate.reason}",
    )
    alias = CHAMPION if gate.passed else CHALLENGER
    why = f"gate passed ({gate.reason})" if gate.passed else f"not promoted: {gate.reason}"
    tracking.set_alias(alias, info.version, name=settings.model_name, who="linewatch-retrain", why=why,
                       event="promote" if gate.passed else "set")
    return str(info.version), alias, metrics


def _code_version() -> str:
    from pipeline.settings import code_version

    return code_version()


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, datetime):
        return obj.isoformat()
    return obj


def write_bundle(
    out_dir: Path,
    calibration: pd.DataFrame,
    z_cal: np.ndarray,
    gate: GateResult,
    cand_metrics: dict[str, float],
    ref_metrics: dict[str, float] | None,
    baseline: dict[str, float],
    alignment: dict[str, Any],
    residuals: np.ndarray | None = None,
    patches: Any = None,
    **meta: Any,
) -> Path:
    """Write the monitor's reference data next to the checkpoint (``<out_dir>/linewatch/``).

    ``calibration.parquet`` holds the calibration rows with ``z_*`` and, when given, their diffusion residuals
    ``r_*`` (the per-image detector's reference); ``gate.json`` the gate report and ``meta`` (e.g. the scoring
    recipe under ``scoring``); ``patches.npz`` the patch family when ``patches`` is given
    (``pipeline.handoff.patch_family``).
    """
    bundle = Path(out_dir) / BUNDLE_DIR
    tmp = bundle.with_name(bundle.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    keep = [c for c in ("image_id", "sha256", "line", "station", "captured_at", "store_path", "product_type", "lot",
                         "lot_id")
            if c in calibration.columns]
    ref = calibration[keep].copy()
    for i in range(z_cal.shape[1]):
        ref[f"z_{i}"] = z_cal[:, i]
    if residuals is not None:
        R = np.asarray(residuals, dtype=np.float64).reshape(len(ref), -1)
        for i in range(R.shape[1]):
            ref[f"r_{i}"] = R[:, i]
    ref.to_parquet(tmp / CALIBRATION_FILE, index=False)
    (tmp / GATE_FILE).write_text(_gate_json(gate, cand_metrics, ref_metrics, baseline, alignment, **meta))
    if patches is not None:
        from pipeline.handoff.patch_family import write_patch_family

        write_patch_family(tmp, patches)
    return atomic.replace_dir(tmp, bundle)


def write_gate_report(out_dir: Path, gate: GateResult, cand_metrics: dict[str, float],
                      ref_metrics: dict[str, float] | None, baseline: dict[str, float], alignment: dict[str, Any],
                      **meta: Any) -> Path:
    """Rewrite only the bundle's ``gate.json`` (atomically), e.g. with the monitor's checks added to the gate."""
    return atomic.write_text(Path(out_dir) / BUNDLE_DIR / GATE_FILE,
                             _gate_json(gate, cand_metrics, ref_metrics, baseline, alignment, **meta))


def _gate_json(gate: GateResult, cand_metrics: dict[str, float], ref_metrics: dict[str, float] | None,
               baseline: dict[str, float], alignment: dict[str, Any], **meta: Any) -> str:
    """The gate report's JSON: the gate's verdict and checks, the metrics compared, the alignment and ``meta``."""
    report = {
        "gate": {"passed": gate.passed, "reason": gate.reason, "checks": {k: list(v) for k, v in gate.checks.items()}},
        "candidate": cand_metrics, "champion": ref_metrics, "untrained": baseline,
        "alignment": alignment or None, **meta,
    }
    return json.dumps(report, indent=2, default=str)


def _ops_alert(settings: Any, hooks: MonitorHooks | None, message: str, *, kind: str, key: str,
               **payload: Any) -> None:
    """Send an operations alert (a model not promoted, no candidate trained); never raises.

    It is appended to ``<state>/ops_alerts.jsonl`` and, with ``hooks.notify_ops``, goes through the same delivery as
    drift alerts (the alert manager's outbox, log, ``alerts.jsonl`` and the webhook).
    """
    try:
        rec = {"at": datetime.now(UTC).isoformat(), "kind": kind, "message": message}
        rec |= {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in payload.items()}
        with open(ops_alerts_path(settings), "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")
        if hooks is not None and hooks.notify_ops is not None:
            hooks.notify_ops(kind, message, key=key, **payload)
        else:
            logger.warning("ops alert: %s", message)
    except Exception:  # noqa: BLE001 - an alert failure must not hide the retrain result
        logger.exception("could not deliver the ops alert: %s", message)


EXIT_REJECTED = 3
"""Exit status of ``linewatch retrain`` / ``linewatch nightly`` when the gate refused the candidate (champion kept)."""
EXIT_NO_CANDIDATE = 4
"""Exit status when too few healthy images were left to train a candidate (:class:`InsufficientData`; champion kept)."""

__all__ = [
    "GateConfig", "RetrainConfig", "ScoringConfig", "GateResult", "DataSelection", "RetrainResult", "retrain", "apply_gate",
    "select_training_data", "holdout_mask", "latent_quality", "mmd_to_prior", "axis_alignment", "evaluate_model",
    "perturb_weights", "write_bundle", "write_gate_report", "calibration_scores", "detector_calibration", "make_detector",
    "InsufficientData", "MonitorHooks", "monitor_gate", "EXIT_REJECTED", "EXIT_NO_CANDIDATE",
]
