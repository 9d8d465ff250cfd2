"""The model bundle: the files a registered model folder holds for the monitor and for serving, and how it scores.

A registered model folder is a linewatch checkpoint (``weights.safetensors`` + ``config.json``, ``models.save_checkpoint``)
with a ``linewatch/`` sub-folder written by the retrain job:

* ``calibration.parquet``: the held-out calibration images (ids, capture times, products, store paths) with their
  latents ``z_*`` and diffusion residuals ``r_*``: the drift reference and the detector's fitting data;
* ``gate.json``: the gate report, the scoring recipe (``scoring``), the detector seed and false-positive target.

:func:`load_bundle` reads it back and rebuilds the per-image detector exactly as the monitor does (same split, same
seed), so an image scores the same in the monitor, in ``linewatch score`` and behind ``mlflow models serve``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

BUNDLE_DIR = "linewatch"
"""Sub-folder of a registered model directory holding the monitor's reference data."""
CALIBRATION_FILE = "calibration.parquet"
GATE_FILE = "gate.json"


@dataclass(frozen=True)
class ScoringConfig:
    """How the monitor scores each image for anomalies; recorded in the model bundle so it travels with the model.

    The per-image score is the diffusion residual (``pipeline.analysis.detectors.DiffusionResidual``: noise to t*, denoise
    with the image's own z, mean squared residual) judged against the ``k`` calibration images nearest in z
    (``pipeline.analysis.detectors.ConditionalResidual``). The score is a residual, not a distance in z: z describes
    the module, not the crack (a Mahalanobis distance on z ranks defective cells as more normal; figures in
    BENCHMARKS.md, ``bench_anomaly``).

    Attributes:
        t_stars: noise levels of the residual.
        steps: DDIM steps from t* back to 0.
        seeds: seeds of the shared forward-noise fields; the residual is averaged over them. Each costs one
            partial-denoising pass per image; more fields average out the forward noise's randomness (cost and gain
            in BENCHMARKS.md, ``bench_anomaly`` and ``bench_stages``).
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
        from pipeline.analysis.detectors import DiffusionResidual

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


def make_detector(n_residuals: int | None = None, *, k: int = 25, n_fit: int | None = None) -> Any:
    """The per-image detector the monitor scores with.

    ``ConditionalResidual`` (the residual judged against the ``k`` fit images nearest in z; ``k`` capped at
    ``n_fit // 5``, at least 3) when residuals are available, else Mahalanobis on z (bundles from before residual
    scoring).
    """
    from pipeline.analysis.detectors import ConditionalResidual, Mahalanobis

    if n_residuals is None:
        return Mahalanobis()
    if n_fit is not None:
        k = max(3, min(k, n_fit // 5))
    return ConditionalResidual(n_residuals=n_residuals, k=k)


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


def _infer_threshold(det: Any, z: np.ndarray, fpr: float) -> None:
    """Threshold ``det`` at ``fpr`` on held-out ``z`` (``pipeline.analysis.thresholds.set_flag_threshold``).

    Far-out scores (defective cells of normal production) are left out, so ``fpr`` is the rate on healthy cells.
    With too few images for that rate the largest achievable one is used, so small demo runs still work
    (recorded in ``det.fpr_``).
    """
    from pipeline.analysis.thresholds import set_flag_threshold

    set_flag_threshold(det, z, fpr)


@dataclass(frozen=True)
class Bundle:
    """A model folder read back: the checkpoint, its calibration reference and the fitted detector.

    Attributes:
        path: the model folder (checkpoint + ``linewatch/``).
        checkpoint: the loaded ``models.Checkpoint``.
        model_id: the checkpoint's stable id.
        reference: the calibration rows (``z_*``, ``r_*`` and catalog columns).
        z_ref: calibration latents (N, d).
        residuals: calibration residuals (N, len(t_stars)), None without a scoring recipe.
        detector: the per-image detector (fitted and thresholded).
        gate: the gate report (``gate.json``).
        scoring: the residual recipe; None for a bundle from before residual scoring (Mahalanobis on z).
    """

    path: Path
    checkpoint: Any
    model_id: str
    reference: pd.DataFrame
    z_ref: np.ndarray
    residuals: np.ndarray | None
    detector: Any
    gate: dict[str, Any]
    scoring: ScoringConfig | None


def read_gate(model_dir: str | Path) -> dict[str, Any]:
    """The bundle's gate report (``{}`` when the folder has none)."""
    path = Path(model_dir) / BUNDLE_DIR / GATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def load_bundle(model_dir: str | Path, *, fpr: float = 0.05, seed: int = 0) -> Bundle:
    """Load a registered model folder and rebuild its detector from the calibration reference.

    Args:
        model_dir: folder with the checkpoint and its ``linewatch/`` bundle.
        fpr: false-positive target when the bundle does not record one.
        seed: detector split seed when the bundle does not record one.

    Raises:
        ValueError: the folder has no ``linewatch/calibration.parquet``.
    """
    from models.checkpoint import load_checkpoint
    from pipeline.common.schemas import residual_columns, z_columns

    model_dir = Path(model_dir)
    calib = model_dir / BUNDLE_DIR / CALIBRATION_FILE
    if not calib.exists():
        raise ValueError(f"{model_dir} has no {BUNDLE_DIR}/{CALIBRATION_FILE}: register it with the retrain job")
    ckpt = load_checkpoint(model_dir)
    ref = pd.read_parquet(calib)
    z_ref = ref[z_columns(ref)].to_numpy(np.float64)
    gate = read_gate(model_dir)
    scoring = ScoringConfig.from_dict(gate.get("scoring"))
    residuals = None if scoring is None else ref[residual_columns(len(scoring.t_stars))].to_numpy(np.float64)
    _, det = detector_calibration(z_ref, gate.get("fpr_target", fpr), seed=int(gate.get("detector_seed", seed)),
                                  residuals=residuals, k=scoring.k if scoring else 25)
    return Bundle(model_dir, ckpt, str(ckpt.meta.get("model_id", "")), ref, z_ref, residuals, det, gate, scoring)


__all__ = ["BUNDLE_DIR", "CALIBRATION_FILE", "GATE_FILE", "Bundle", "ScoringConfig", "detector_calibration",
           "load_bundle", "make_detector", "read_gate"]
