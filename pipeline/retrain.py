"""The nightly retrain job: select data, train a candidate, evaluate it, register it, promote it only through a gate.

Plain functions with frozen configs and results; ``flows/retrain.py`` wraps them in Prefect tasks. The steps:

1. **Select** the training window from the catalog (last ``window_days`` days), minus images in windows that were
   under an active drift alert and minus images the champion flagged anomalous, so a fault is never learned away.
2. **Split** the selection deterministically (hash of the image id) into a training snapshot and a held-out
   calibration snapshot; both are frozen with ``catalog.snapshot`` and their digests recorded.
3. **Train** InfoDiffusion, warm-started from the current champion (from scratch on the first night or on request).
4. **Evaluate** candidate (and champion, on the same calibration images, same noise): denoising loss,
   reconstruction error, latent quality (active axes, MMD to the prior), detector calibration (empirical FPR on a
   held-out half), axis alignment to the champion.
5. **Register** the version with its lineage and **promote** it to ``champion`` only if every gate check passes;
   otherwise it is aliased ``challenger`` and an ops alert says which check failed.

The model directory that is registered holds the checkpoint plus a ``linewatch/`` folder with what the monitor
needs: the calibration latents (drift reference), the fitted detector and the gate report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
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

logger = logging.getLogger(__name__)

BUNDLE_DIR = "linewatch"
"""Sub-folder of a registered model directory holding the monitor's reference data."""
CALIBRATION_FILE = "calibration.parquet"
GATE_FILE = "gate.json"
CHAMPION = "champion"
CHALLENGER = "challenger"


# --------------------------------------------------------------------------------------------------------------
# Configs and results
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateConfig:
    """Promotion gate thresholds. A candidate becomes champion only when every check passes.

    Attributes:
        loss_tolerance: candidate denoising loss on calibration must be <= champion x (1 + tol).
        recon_tolerance: candidate reconstruction MSE must be <= champion x (1 + tol).
        first_night_improvement: with no champion, the candidate's loss must beat an untrained model of the same
            preset by this fraction (so a model that learned nothing cannot pass).
        fpr_target: detector threshold is set at this false-positive rate on half of the calibration latents.
        fpr_tolerance: the empirical FPR on the other half must be <= target + tolerance.
        axis_std_floor: an axis is "active" when its std on the calibration latents exceeds this.
        min_active_share: share of active axes required (latent not collapsed).
        max_mmd: ceiling on the MMD^2 between calibration latents and prior samples.
        min_alignment: mean |r| of the matched axes between champion and candidate latents (when a champion exists).
        recon_images: calibration images used for the reconstruction check (it is the slow one).
        recon_steps: DDIM steps of the reconstruction.
        eval_repeats: passes over the calibration images (fresh noise each) to average the denoising loss.
    """

    loss_tolerance: float = 0.10
    recon_tolerance: float = 0.15
    first_night_improvement: float = 0.05
    fpr_target: float = 0.05
    fpr_tolerance: float = 0.10
    axis_std_floor: float = 0.05
    min_active_share: float = 0.5
    max_mmd: float = 0.5
    min_alignment: float = 0.5
    recon_images: int = 16
    recon_steps: int = 10
    eval_repeats: int = 2

    def __post_init__(self) -> None:
        for name in ("loss_tolerance", "recon_tolerance", "fpr_tolerance", "first_night_improvement"):
            if getattr(self, name) < 0:
                raise ValueError(f"GateConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.fpr_target < 1:
            raise ValueError(f"GateConfig.fpr_target must be in (0, 1), got {self.fpr_target}")
        if not 0 <= self.min_active_share <= 1:
            raise ValueError(f"GateConfig.min_active_share must be in [0, 1], got {self.min_active_share}")
        if self.recon_images < 1 or self.recon_steps < 1 or self.eval_repeats < 1:
            raise ValueError("GateConfig.recon_images, recon_steps and eval_repeats must be >= 1")


@dataclass(frozen=True)
class ScoringConfig:
    """How the monitor scores each image for anomalies; recorded in the model bundle so it travels with the model.

    The per-image score is the diffusion residual (``pipeline.detectors.DiffusionResidual``: noise to t*, denoise
    with the image's own z, mean squared residual) judged against the ``k`` calibration images nearest in z
    (``pipeline.detectors.ConditionalResidual``). On the ELPV benchmark's lot-level split, with the 10,000-step cpu
    model, this ranks p = 1 cells above functional ones at AUROC 0.82 with three noise fields (0.81 with one; 0.78
    with one and the 3000-step model), where Mahalanobis on z (the previous default) was at 0.38-0.40: z describes
    the module, not the crack.

    Attributes:
        t_stars: noise levels of the residual.
        steps: DDIM steps from t* back to 0.
        seeds: seeds of the shared forward-noise fields; the residual is averaged over them. Each costs one pass
            (about 24 ms per image on one core at the cpu preset); three cut the score's noise (AUROC 0.807 -> 0.823
            on the benchmark, 0.766 -> 0.777 for the DiffAE ablation).
        k: neighbours in z (capped at a fifth of the detector's fit images, at least 3).
    """

    t_stars: tuple[int, ...] = (100, 250)
    steps: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    k: int = 25

    def __post_init__(self) -> None:
        if not self.t_stars or not self.seeds or self.steps < 1 or self.k < 3:
            raise ValueError(f"ScoringConfig needs t_stars, seeds, steps >= 1 and k >= 3, got {self}")

    def residual_detector(self, model: Any, *, progress: bool = False) -> Any:
        """The ``DiffusionResidual`` that computes this recipe's residuals with ``model``."""
        from pipeline.detectors import DiffusionResidual

        return DiffusionResidual(model, t_stars=self.t_stars, steps=self.steps, seeds=self.seeds, reduce="mse",
                                 context="z", k=self.k, batch_size=64, progress=progress)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ScoringConfig | None:
        """From the bundle's ``gate.json`` entry (None when the bundle predates residual scoring).

        A bundle written with a single ``seed`` (before ``seeds``) reads as ``seeds=(seed,)``.
        """
        if not d:
            return None
        seeds = d["seeds"] if "seeds" in d else [d["seed"]]
        return cls(t_stars=tuple(int(t) for t in d["t_stars"]), steps=int(d["steps"]),
                   seeds=tuple(int(x) for x in seeds), k=int(d["k"]))


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
        min_train_images: fewer selected training images than this is an error (nothing is registered).
        seed: training / evaluation seed.
        device: torch device for training and evaluation.
        inject_weight_noise: fault injection for tests and demos: add N(0, s * std(w)) noise to every weight of the
            trained candidate before evaluation (a deliberately regressed model). 0 = off.
        gate: promotion gate.
        scoring: the per-image anomaly score the monitor will use with this model (residual recipe).
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
    min_train_images: int = 16
    seed: int = 0
    device: str = "cpu"
    inject_weight_noise: float = 0.0
    gate: GateConfig = field(default_factory=GateConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
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


@dataclass(frozen=True)
class GateResult:
    """Outcome of the promotion gate.

    Attributes:
        passed: every check passed.
        checks: name -> (value, threshold, ok).
        reason: one line: "all checks passed" or the failed checks with values and thresholds.
    """

    passed: bool
    checks: dict[str, tuple[float, float, bool]]
    reason: str


@dataclass(frozen=True)
class DataSelection:
    """Which catalog images a retrain uses.

    Attributes:
        train: catalog rows of the training snapshot.
        calibration: catalog rows of the held-out calibration snapshot.
        excluded: reason -> number of images dropped (``alert_window``; ``anomalous``: flagged images kept out of
            the training part).
        window: (start, end) of the training window, UTC.
    """

    train: pd.DataFrame
    calibration: pd.DataFrame
    excluded: dict[str, int]
    window: tuple[datetime, datetime]


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
# Pure helpers
# --------------------------------------------------------------------------------------------------------------
def holdout_mask(image_ids: pd.Series | list[str], share: float, salt: str = "calibration") -> np.ndarray:
    """Deterministic hold-out: True for ids whose salted sha256 falls in the first ``share`` of the hash space.

    The same image is always on the same side, whatever else is in the window, so a model never trains on an
    image it was calibrated on across nights.
    """
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    out = np.empty(len(image_ids), dtype=bool)
    for i, image_id in enumerate(image_ids):
        h = hashlib.sha256(f"{salt}:{image_id}".encode()).digest()
        out[i] = int.from_bytes(h[:8], "big") / 2**64 < share
    return out


def select_training_data(
    catalog: pd.DataFrame,
    *,
    window_days: int,
    end: datetime | None = None,
    alert_windows: pd.DataFrame | None = None,
    anomalous_ids: set[str] | frozenset[str] = frozenset(),
    holdout_share: float = 0.25,
    exclude_alerts: bool = True,
    exclude_anomalous: bool = True,
) -> DataSelection:
    """Apply the data-selection rules to catalog rows.

    Args:
        catalog: rows with at least ``image_id``, ``captured_at`` (tz-aware UTC) and ``line``.
        window_days: keep the last N days before ``end``.
        end: exclusive end of the window; None = 1 us after the newest ``captured_at``.
        alert_windows: intervals under an active alert: columns ``line`` (None/NaN = every line), ``start``,
            ``end`` (UTC). Images captured inside one are dropped when ``exclude_alerts``.
        anomalous_ids: image ids flagged anomalous by the champion; dropped from the training part when
            ``exclude_anomalous`` (the calibration part keeps them: it stands for normal production).
        holdout_share: calibration share (hash of the image id).
        exclude_alerts: apply the alert-window rule.
        exclude_anomalous: apply the anomalous-image rule.

    Returns:
        The selection (train / calibration rows, exclusion counts, the window).

    Raises:
        ValueError: the catalog lacks required columns or is empty.
    """
    missing = {"image_id", "captured_at"} - set(catalog.columns)
    if missing:
        raise ValueError(f"catalog rows lack columns {sorted(missing)}; pass rows from pipeline.catalog.read_catalog")
    if catalog.empty:
        raise ValueError("the catalog is empty: ingest images first (linewatch ingest / the ingest flow)")
    ts = pd.to_datetime(catalog["captured_at"], utc=True)
    end_ts = pd.Timestamp(end).tz_convert("UTC") if end is not None and pd.Timestamp(end).tzinfo else None
    if end is not None and end_ts is None:
        end_ts = pd.Timestamp(end).tz_localize("UTC")
    if end_ts is None:
        end_ts = ts.max() + pd.Timedelta(microseconds=1)
    start_ts = end_ts - pd.Timedelta(days=window_days)
    in_window = (ts >= start_ts) & (ts < end_ts)
    df = catalog.loc[in_window.to_numpy()].copy()
    df_ts = ts[in_window]
    excluded = {"alert_window": 0, "anomalous": 0}
    if exclude_alerts and alert_windows is not None and len(alert_windows):
        drop = np.zeros(len(df), dtype=bool)
        lines = df["line"].astype(str).to_numpy() if "line" in df.columns else np.full(len(df), "", dtype=object)
        for row in alert_windows.itertuples(index=False):
            a_start = pd.Timestamp(row.start)
            a_start = a_start.tz_localize("UTC") if a_start.tzinfo is None else a_start
            a_end = pd.Timestamp(row.end) if row.end is not None and not pd.isna(row.end) else end_ts
            a_end = a_end.tz_localize("UTC") if a_end.tzinfo is None else a_end
            hit = np.array((df_ts >= a_start) & (df_ts < a_end), dtype=bool)
            line = getattr(row, "line", None)
            if line is not None and not (isinstance(line, float) and math.isnan(line)):
                hit = hit & (lines == str(line))
            drop |= hit
        excluded["alert_window"] = int(drop.sum())
        df, df_ts = df.loc[~drop], df_ts[~drop]
    calib = holdout_mask(df["image_id"].tolist(), holdout_share)
    # flagged images never train a model (a defect must not be learned away), but the calibration snapshot keeps
    # them: it is the monitor's picture of normal production, defective cells at their usual share included, and a
    # reference without its top-scoring cells would set the per-image threshold and the score test too low
    flagged = df["image_id"].isin(anomalous_ids).to_numpy() if exclude_anomalous and anomalous_ids else \
        np.zeros(len(df), dtype=bool)
    excluded["anomalous"] = int((flagged & ~calib).sum())
    return DataSelection(
        train=df.loc[~calib & ~flagged].reset_index(drop=True),
        calibration=df.loc[calib].reset_index(drop=True),
        excluded=excluded,
        window=(start_ts.to_pydatetime(), end_ts.to_pydatetime()),
    )


def mmd_to_prior(z: np.ndarray, seed: int = 0, max_n: int = 512) -> float:
    """Squared MMD between latents and as many N(0, I) samples, with the training loss's kernel."""
    from models.losses import mmd

    if z.ndim != 2 or len(z) < 2:
        raise ValueError(f"mmd_to_prior needs (N >= 2, d) latents, got shape {z.shape}")
    rng = np.random.default_rng(seed)
    if len(z) > max_n:
        z = z[rng.choice(len(z), max_n, replace=False)]
    prior = rng.standard_normal(z.shape).astype(np.float32)
    return float(mmd(torch.as_tensor(z, dtype=torch.float32), torch.as_tensor(prior)))


def latent_quality(z: np.ndarray, floor: float, seed: int = 0) -> dict[str, float]:
    """Latent-collapse indicators: share of axes with std > floor, min/median std, MMD^2 to the prior."""
    std = z.std(axis=0)
    return {
        "active_axes_share": float((std > floor).mean()),
        "axis_std_min": float(std.min()),
        "axis_std_median": float(np.median(std)),
        "mmd_to_prior": mmd_to_prior(z, seed=seed),
    }


def axis_alignment(z_prev: np.ndarray, z_new: np.ndarray) -> tuple[float, dict[str, Any]]:
    """Match the candidate's axes to the champion's on the same calibration images (``pipeline.axes.align_axes``).

    Returns:
        (mean |r| of the matched pairs, the alignment as a JSON-safe dict with its one-line ``text``).
    """
    from pipeline.axes import align_axes

    al = align_axes(z_prev, z_new)
    return float(al.mean_abs_corr), al.to_dict()


def apply_gate(
    candidate: dict[str, float], reference: dict[str, float] | None, gate: GateConfig, *, baseline: dict[str, float]
) -> GateResult:
    """Decide promotion from evaluation metrics.

    Args:
        candidate: the candidate's metrics (``eps_mse``, ``recon_mse``, ``detector_fpr``, ``active_axes_share``,
            ``mmd_to_prior`` and, with a champion, ``alignment``).
        reference: the champion's metrics on the same calibration images, or None on the first night.
        gate: thresholds.
        baseline: an untrained model's ``eps_mse`` (same preset, same calibration images and noise), the reference
            on the first night; the reconstruction is then only reported (there is nothing to compare it with).

    Returns:
        The gate result; a non-finite candidate metric fails its check.
    """
    checks: dict[str, tuple[float, float, bool]] = {}

    def check(name: str, value: float, threshold: float, le: bool = True) -> None:
        ok = bool(np.isfinite(value) and (value <= threshold if le else value >= threshold))
        checks[name] = (float(value), float(threshold), ok)

    if reference is not None:
        check("eps_mse", candidate["eps_mse"], reference["eps_mse"] * (1 + gate.loss_tolerance))
        check("recon_mse", candidate["recon_mse"], reference["recon_mse"] * (1 + gate.recon_tolerance))
        check("alignment", candidate.get("alignment", float("nan")), gate.min_alignment, le=False)
    else:
        check("eps_mse", candidate["eps_mse"], baseline["eps_mse"] * (1 - gate.first_night_improvement))
    check("detector_fpr", candidate["detector_fpr"], gate.fpr_target + gate.fpr_tolerance)
    check("active_axes_share", candidate["active_axes_share"], gate.min_active_share, le=False)
    check("mmd_to_prior", candidate["mmd_to_prior"], gate.max_mmd)
    failed = [k for k, (_, _, ok) in checks.items() if not ok]
    if not failed:
        reason = "all checks passed"
    else:
        parts = []
        for k in failed:
            v, t, _ = checks[k]
            op = ">=" if k in ("alignment", "active_axes_share") else "<="
            parts.append(f"{k}={v:.4g} (needs {op} {t:.4g})")
        reason = "failed: " + "; ".join(parts)
    return GateResult(passed=not failed, checks=checks, reason=reason)


# --------------------------------------------------------------------------------------------------------------
# Model-level evaluation
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_tensor(model: Any, x: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Encode a (N, C, H, W) tensor in batches to a float32 (N, d) array (eval mode)."""
    model.eval()
    out = [model.encode(x[i : i + batch_size]).detach().cpu().float() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


@torch.no_grad()
def denoising_loss(model: Any, x: torch.Tensor, *, seed: int, repeats: int = 2, batch_size: int = 32) -> float:
    """Mean epsilon-prediction MSE on ``x`` with seeded timesteps and noise (the same for every model compared)."""
    model.eval()
    total, n = 0.0, 0
    for r in range(repeats):
        for i in range(0, len(x), batch_size):
            gen = torch.Generator(device=x.device).manual_seed(seed * 1000 + r * 97 + i)
            xb = x[i : i + batch_size]
            if len(xb) < 2:  # the MMD term inside the loss needs a batch
                xb = x[max(0, len(x) - 2) :]
            out = model.loss(xb, generator=gen)
            total += float(out.eps_mse) * len(xb)
            n += len(xb)
    return total / max(n, 1)


@torch.no_grad()
def reconstruction_error(model: Any, x: torch.Tensor, *, steps: int, seed: int) -> float:
    """Mean squared error of the deterministic DDIM reconstruction of ``x`` (in model-input units)."""
    model.eval()
    torch.manual_seed(seed)
    rec = model.reconstruct(x, steps=steps)
    return float(((rec - x) ** 2).mean())


def detector_calibration(
    z_cal: np.ndarray, fpr_target: float, seed: int = 0, *, residuals: np.ndarray | None = None, k: int = 25
) -> tuple[float, Any]:
    """Fit and threshold the per-image detector on calibration data, and measure its false-alarm rate.

    The calibration images are split in three (seeded): fit on the first, set the threshold at ``fpr_target`` on
    the second, measure the empirical FPR on the third. The returned detector is refitted on one half and
    thresholded on the other (all of it used; deterministic for a given seed).

    Args:
        z_cal: calibration latents (N, d).
        fpr_target: false-alarm rate of the threshold.
        seed: split seed.
        residuals: the calibration images' diffusion residuals (N, len(t_stars)); the detector is then
            ``ConditionalResidual`` on ``[z | residuals]``. None (a bundle from before residual scoring): Mahalanobis
            on z.
        k: neighbours of ``ConditionalResidual``, capped at a fifth of the fit images (at least 3).

    Returns:
        (empirical FPR on the held-out third, fitted detector).

    Raises:
        ValueError: fewer than 9 calibration latents.
    """
    if len(z_cal) < 9:
        raise ValueError(f"detector calibration needs >= 9 calibration images, got {len(z_cal)}")
    X = z_cal if residuals is None else np.column_stack([z_cal, residuals])
    n_res = None if residuals is None else int(np.asarray(residuals).reshape(len(z_cal), -1).shape[1])
    idx = np.random.default_rng(seed).permutation(len(X))
    a, b, c = np.array_split(idx, 3)
    det = make_detector(n_res, k=k, n_fit=len(a)).fit(X[a])
    _infer_threshold(det, X[b], fpr_target)
    fpr = float((det.score(X[c]) > det.threshold_).mean())
    half = len(idx) // 2
    full = make_detector(n_res, k=k, n_fit=half).fit(X[idx[:half]])
    _infer_threshold(full, X[idx[half:]], fpr_target)
    return fpr, full


def calibration_scores(z_cal: np.ndarray, residuals: np.ndarray, *, k: int = 25, seed: int = 0) -> np.ndarray:
    """Out-of-sample anomaly scores of every calibration image (the drift reference of the score family).

    Two-fold cross-fitting: the residual detector fitted on one (seeded) half scores the other, and the other way
    round, so no image is scored by a detector that saw it. Same detector recipe as :func:`detector_calibration`.
    """
    X = np.column_stack([z_cal, residuals])
    idx = np.random.default_rng([seed, 1]).permutation(len(X))
    a, b = np.array_split(idx, 2)
    out = np.empty(len(X))
    n_res = int(np.asarray(residuals).reshape(len(X), -1).shape[1])
    for fit, score in ((a, b), (b, a)):
        out[score] = make_detector(n_res, k=k, n_fit=len(fit)).fit(X[fit]).score(X[score])
    return out


def make_detector(n_residuals: int | None = None, *, k: int = 25, n_fit: int | None = None) -> Any:
    """The per-image detector the monitor scores with.

    ``ConditionalResidual`` (the residual judged against the ``k`` fit images nearest in z; ``k`` capped at
    ``n_fit // 5``, at least 3) when residuals are available, else Mahalanobis on z (bundles from before residual
    scoring).
    """
    from pipeline.detectors import ConditionalResidual, Mahalanobis

    if n_residuals is None:
        return Mahalanobis()
    if n_fit is not None:
        k = max(3, min(k, n_fit // 5))
    return ConditionalResidual(n_residuals=n_residuals, k=k)


def _infer_threshold(det: Any, z: np.ndarray, fpr: float) -> None:
    """Threshold ``det`` at ``fpr`` on held-out ``z`` (``pipeline.thresholds.set_flag_threshold``).

    Far-out scores (defective cells of normal production) are left out, so ``fpr`` is the rate on healthy cells.
    With too few images for that rate the largest achievable one is used, so small demo runs still work
    (recorded in ``det.fpr_``).
    """
    from pipeline.thresholds import set_flag_threshold

    set_flag_threshold(det, z, fpr)


def evaluate_model(
    model: Any, x_cal: torch.Tensor, gate: GateConfig, *, seed: int, with_detector: bool = True,
    residuals: np.ndarray | None = None, k: int = 25,
) -> tuple[dict[str, float], np.ndarray, Any]:
    """Evaluate one model on calibration images: loss, reconstruction, latent quality, detector calibration.

    Args:
        model: the model to evaluate.
        x_cal: calibration images (model input, [-1, 1]).
        gate: the gate's settings (repeats, reconstruction images and steps, FPR target, axis floor).
        seed: noise and split seed.
        with_detector: also fit and calibrate the per-image detector.
        residuals: the calibration images' diffusion residuals under this model (``ScoringConfig``); the detector is
            then the residual one (``ConditionalResidual``), else Mahalanobis on z.
        k: neighbours of the residual detector.

    Returns:
        (metrics, calibration latents (N, d), fitted detector or None).
    """
    metrics: dict[str, float] = {}
    metrics["eps_mse"] = denoising_loss(model, x_cal, seed=seed, repeats=gate.eval_repeats)
    metrics["recon_mse"] = reconstruction_error(model, x_cal[: gate.recon_images], steps=gate.recon_steps, seed=seed)
    z = encode_tensor(model, x_cal)
    metrics.update(latent_quality(z, gate.axis_std_floor, seed=seed))
    det = None
    if with_detector:
        metrics["detector_fpr"], det = detector_calibration(z, gate.fpr_target, seed=seed, residuals=residuals, k=k)
    return metrics, z, det


def perturb_weights(model: torch.nn.Module, scale: float, seed: int = 0) -> None:
    """Add N(0, scale * std(w)) noise to every floating parameter in place (a deliberately regressed model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g).to(p) * scale * (p.std() + 1e-8))


# --------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------
def state_dir(settings: Any) -> Path:
    """Folder for the jobs' own state (locks, scores, window log, ops alerts)."""
    p = Path(settings.state_dir)
    p.mkdir(parents=True, exist_ok=True)
    return p


def scores_path(settings: Any) -> Path:
    """Parquet table of per-image anomaly flags written by the monitor (read by the retrain's selection)."""
    return state_dir(settings) / "scores.parquet"


def anomalous_ids(settings: Any) -> set[str]:
    """Image ids the monitor flagged anomalous (any model version)."""
    path = scores_path(settings)
    if not path.exists():
        return set()
    df = pd.read_parquet(path, columns=["image_id", "is_anomaly"])
    return set(df.loc[df["is_anomaly"].astype(bool), "image_id"].astype(str))


def alert_windows(settings: Any) -> pd.DataFrame:
    """Windows to keep out of training, from the monitor's window log: drifted, or under an active alert.

    A drifted window counts even before the alert policy's hysteresis opened the alert (the first faulty day).

    Returns:
        Columns ``line, start, end`` (UTC).
    """
    path = state_dir(settings) / "windows.parquet"
    if not path.exists():
        return pd.DataFrame(columns=["line", "start", "end"])
    df = pd.read_parquet(path)
    df = df.loc[df["alert_active"].astype(bool) | df["detected"].astype(bool)]
    return df[["line", "start", "end"]].reset_index(drop=True)


def load_images(settings: Any, rows: pd.DataFrame, spec: Any) -> torch.Tensor:
    """Read the catalog rows' stored images into one model-input tensor."""
    from pipeline.images import load_batch

    return load_batch([resolve_store_path(settings, p) for p in rows["store_path"]], spec)


def resolve_store_path(settings: Any, store_path: str) -> Path:
    """Absolute path of a catalog ``store_path`` (relative to the catalog root)."""
    from pipeline.catalog import resolve_store_path as _resolve

    return _resolve(settings.catalog_root, store_path)


def _read_catalog(settings: Any, lines: tuple[str, ...] | None) -> pd.DataFrame:
    from pipeline.catalog import read_catalog

    return read_catalog(settings.catalog_root, lines=list(lines) if lines else None)


def _snapshot(settings: Any, df: pd.DataFrame, name: str) -> str:
    from pipeline.catalog import snapshot

    return str(snapshot(df, name, settings.catalog_root).digest)


def retrain(
    settings: Any,
    config: RetrainConfig,
    *,
    progress: bool = False,
    train_fn: Callable[..., Any] | None = None,
    on_step: Callable[[dict[str, float]], bool | None] | None = None,
) -> RetrainResult:
    """Run one retrain: select, snapshot, train, evaluate, register, gate.

    Args:
        settings: ``pipeline.settings.get_settings()``.
        config: what to do.
        progress: show training progress.
        train_fn: replacement for ``models.train`` (tests inject crashes); same signature.
        on_step: forwarded to the trainer.

    Returns:
        The result; ``promoted`` says whether the version is now the champion.

    Raises:
        ValueError: too few images after the selection rules.
        pipeline.tracking.TrackingUnavailable: MLflow cannot be reached (nothing is registered then).
    """
    from filelock import FileLock

    lock = FileLock(str(state_dir(settings) / "retrain.lock"), timeout=config.lock_timeout_s)
    with lock:
        return _retrain_locked(settings, config, progress=progress, train_fn=train_fn, on_step=on_step)


def _retrain_locked(
    settings: Any,
    config: RetrainConfig,
    *,
    progress: bool,
    train_fn: Callable[..., Any] | None,
    on_step: Callable[[dict[str, float]], bool | None] | None,
) -> RetrainResult:
    from models.checkpoint import load_checkpoint
    from models.presets import get_preset
    from models.train import train as models_train
    from pipeline import tracking

    torch.set_num_threads(min(2, torch.get_num_threads()))
    train_fn = train_fn or models_train
    model_name = settings.model_name
    tracking.configure(settings)

    # 1. selection ---------------------------------------------------------------------------------------------
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
    )
    # the calibration snapshot is the monitor's drift reference: grown to three day windows so whole windows are
    # tested (pipeline.reference)
    from pipeline.reference import extend_calibration, needed_for

    sel = extend_calibration(sel, catalog, need=needed_for(catalog, sel.window, settings.timezone),
                             holdout_share=config.holdout_share,
                             alert_windows=alert_windows(settings) if config.exclude_alerts else None)
    if len(sel.train) < config.min_train_images:
        raise ValueError(
            f"only {len(sel.train)} training images after the selection rules (window {config.window_days} days, "
            f"excluded {sel.excluded}); need >= {config.min_train_images}: ingest more or widen window_days"
        )
    if len(sel.calibration) < 8:
        raise ValueError(
            f"only {len(sel.calibration)} calibration images; need >= 8: raise holdout_share or widen window_days"
        )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    data_digest = _snapshot(settings, sel.train, f"train-{stamp}")
    calib_digest = _snapshot(settings, sel.calibration, f"calibration-{stamp}")
    logger.info("retrain: %d train / %d calibration images, excluded %s", len(sel.train), len(sel.calibration),
                sel.excluded)

    # 2. champion ----------------------------------------------------------------------------------------------
    parent = None if config.from_scratch else tracking.get_alias_version(CHAMPION, name=model_name)
    parent_version = None if parent is None else str(parent)
    champion_dir = None
    if parent is not None:
        champion_dir = tracking.download_model(parent, Path(settings.checkpoints_dir) / f"registry-v{parent}",
                                               name=model_name)
    preset = get_preset(config.preset)
    if champion_dir is not None:
        champ = load_checkpoint(champion_dir)
        spec = champ.preprocess
    else:
        champ = None
        spec = preset.preprocess

    x_train = load_images(settings, sel.train, spec)
    x_cal = load_images(settings, sel.calibration, spec)

    # 3. train -------------------------------------------------------------------------------------------------
    # The candidate folder is a pure function of what is trained, so a retry after a crash resumes its checkpoint.
    key = json.dumps([data_digest, parent_version, config.preset, config.steps, config.batch_size, config.seed,
                      config.inject_weight_noise], default=str)
    work_dir = Path(settings.checkpoints_dir) / f"candidate-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    out_dir = work_dir / "train"  # the trainer's folder (with resume state)
    model_dir = work_dir / "model"  # what is registered: weights + config + linewatch/ bundle, no pickles
    kwargs: dict[str, Any] = {
        "steps": config.steps,
        "batch_size": config.batch_size or preset.train.batch_size,
        "resume": True,
        "device": config.device,
        "progress": progress,
        "seed": config.seed,
    }
    resuming = (out_dir / "train_state.pt").exists()
    if champion_dir is not None and not resuming:
        kwargs["init_from"] = champion_dir
    if on_step is not None:
        kwargs["on_step"] = on_step
    snap_cols = [c for c in ("image_id", "sha256", "line", "date") if c in sel.train.columns]
    with tracking.start_training_run(
        f"retrain-{stamp}",
        tags={"lineage.parent_version": parent_version or "none", "warm_start": str(champion_dir is not None).lower(),
              "preset": config.preset},
        description=f"Nightly retrain on {len(sel.train)} images ({config.window_days} days), "
        f"{'warm start from v' + parent_version if parent_version else 'from scratch'}.",
    ) as run_id:
        tracking.log_params_flat(
            {"retrain": _plain(dataclasses.asdict(config)), "n_train": len(sel.train), "n_calibration":
             len(sel.calibration), "excluded": sel.excluded, "parent_version": parent_version or "none"}
        )
        tracking.log_dataset(sel.train[snap_cols], name="train", digest=data_digest,
                             source=str(Path(settings.catalog_root) / "snapshots" / f"{data_digest}.json"),
                             context="training")
        tracking.log_dataset(sel.calibration[snap_cols], name="calibration", digest=calib_digest,
                             source=str(Path(settings.catalog_root) / "snapshots" / f"{calib_digest}.json"),
                             context="calibration")
        t0 = time.perf_counter()
        result = train_fn(preset, x_train, out_dir, **kwargs)
        train_seconds = time.perf_counter() - t0
        tracking.log_history(result.history)
        cand = result.model
        if config.inject_weight_noise > 0:
            perturb_weights(cand, config.inject_weight_noise, seed=config.seed)

        # 4. evaluate ----------------------------------------------------------------------------------------
        gate_cfg = config.gate
        r_cand = config.scoring.residual_detector(cand, progress=progress).residuals(x_cal)
        cand_metrics, z_cand, detector = evaluate_model(cand, x_cal, gate_cfg, seed=config.seed, residuals=r_cand,
                                                        k=config.scoring.k)
        ref_metrics = None
        alignment = None
        pairs: dict[str, Any] = {}
        baseline: dict[str, float] = {}
        if champ is not None:
            ref_metrics, z_champ, _ = evaluate_model(champ.model, x_cal, gate_cfg, seed=config.seed,
                                                     with_detector=False)
            alignment, pairs = axis_alignment(z_champ, z_cand)
            cand_metrics["alignment"] = alignment
        else:
            from models.infodiffusion import InfoDiffusion

            torch.manual_seed(config.seed + 1)
            untrained = InfoDiffusion(preset.model)
            baseline["eps_mse"] = denoising_loss(untrained, x_cal, seed=config.seed, repeats=gate_cfg.eval_repeats)
        gate = apply_gate(cand_metrics, ref_metrics, gate_cfg, baseline=baseline)

        # 5. bundle + register -------------------------------------------------------------------------------
        from models.checkpoint import save_checkpoint

        # the registered weights are exactly the evaluated ones (a clean folder: no resume state, no pickles)
        save_checkpoint(cand, model_dir, preprocess=spec,
                        meta={"preset": config.preset, "step": int(result.step), "parent_version": parent_version})
        model_id = str(load_checkpoint(model_dir).meta.get("model_id", ""))
        write_bundle(model_dir, sel.calibration, z_cand, gate, cand_metrics, ref_metrics, baseline, pairs,
                     residuals=r_cand, scoring=dataclasses.asdict(config.scoring),
                     model_id=model_id, parent_version=parent_version, data_digest=data_digest,
                     calibration_digest=calib_digest, detector_seed=config.seed, fpr_target=gate_cfg.fpr_target)
        metrics = {f"candidate.{k}": v for k, v in cand_metrics.items()}
        metrics |= {f"champion.{k}": v for k, v in (ref_metrics or {}).items()}
        metrics |= {f"untrained.{k}": v for k, v in baseline.items()}
        tracking.log_metrics(metrics)
        tracking.log_metrics({f"gate.{k}.ok": float(v[2]) for k, v in gate.checks.items()})
        info = tracking.log_checkpoint_and_register(
            model_dir,
            model_name=model_name,
            tags=tracking.lineage_tags(
                data_digest=data_digest,
                calibration_digest=calib_digest,
                parent_version=parent,
                code_version=_code_version(),
                gates={"passed": gate.passed, "reason": gate.reason[:480],
                       **{k: f"{v[0]:.4g}/{v[1]:.4g}" for k, v in gate.checks.items()}},
                **{"model_id": model_id, "warm_start": str(champion_dir is not None).lower(),
                   "alignment.mean_abs_r": "" if alignment is None else f"{alignment:.4f}"},
            ),
            description=f"gate: {gate.reason}",
        )
        version = str(info.version)
        alias = CHAMPION if gate.passed else CHALLENGER
        why = f"gate passed ({gate.reason})" if gate.passed else f"not promoted: {gate.reason}"
        tracking.set_alias(alias, info.version, name=model_name, who="linewatch-retrain", why=why,
                           event="promote" if gate.passed else "set")

    if not gate.passed:
        _ops_alert(settings, f"model v{version} not promoted ({gate.reason})", version=version, gate=gate)
    logger.info("retrain: v%s %s (%s)", version, alias, gate.reason)
    return RetrainResult(
        version=version, promoted=gate.passed, gate=gate, parent_version=parent_version, data_digest=data_digest,
        calibration_digest=calib_digest, alignment=alignment, model_dir=model_dir, model_id=model_id,
        metrics=metrics, n_train=len(sel.train), n_calibration=len(sel.calibration), excluded=sel.excluded,
        run_id=run_id, train_seconds=train_seconds, alias=alias,
    )


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
    **meta: Any,
) -> Path:
    """Write the monitor's reference data next to the checkpoint (``<out_dir>/linewatch/``).

    ``calibration.parquet`` holds the calibration rows with ``z_*`` and, when given, their diffusion residuals
    ``r_*`` (the per-image detector's reference); ``gate.json`` the gate report and ``meta`` (e.g. the scoring
    recipe under ``scoring``).
    """
    bundle = Path(out_dir) / BUNDLE_DIR
    tmp = bundle.with_name(bundle.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    keep = [c for c in ("image_id", "line", "station", "captured_at", "store_path", "product_type", "lot", "lot_id")
            if c in calibration.columns]
    ref = calibration[keep].copy()
    for i in range(z_cal.shape[1]):
        ref[f"z_{i}"] = z_cal[:, i]
    if residuals is not None:
        R = np.asarray(residuals, dtype=np.float64).reshape(len(ref), -1)
        for i in range(R.shape[1]):
            ref[f"r_{i}"] = R[:, i]
    ref.to_parquet(tmp / CALIBRATION_FILE, index=False)
    report = {
        "gate": {"passed": gate.passed, "reason": gate.reason, "checks": {k: list(v) for k, v in gate.checks.items()}},
        "candidate": cand_metrics, "champion": ref_metrics, "untrained": baseline,
        "alignment": alignment or None, **meta,
    }
    (tmp / GATE_FILE).write_text(json.dumps(report, indent=2, default=str))
    shutil.rmtree(bundle, ignore_errors=True)
    tmp.rename(bundle)
    return bundle


def _ops_alert(settings: Any, message: str, **payload: Any) -> None:
    """Record an operations alert (promotion refused) in the alert outbox; never raises."""
    try:
        path = state_dir(settings) / "ops_alerts.jsonl"
        rec = {"at": datetime.now(UTC).isoformat(), "kind": "model.not_promoted", "message": message}
        rec |= {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in payload.items()}
        with open(path, "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")
        logger.warning("ops alert: %s", message)
    except Exception:  # noqa: BLE001 - an alert failure must not hide the retrain result
        logger.exception("could not record the ops alert")


__all__ = [
    "GateConfig", "RetrainConfig", "ScoringConfig", "GateResult", "DataSelection", "RetrainResult", "retrain", "apply_gate",
    "select_training_data", "holdout_mask", "latent_quality", "mmd_to_prior", "axis_alignment", "evaluate_model",
    "perturb_weights", "write_bundle", "calibration_scores", "detector_calibration", "make_detector",
]
