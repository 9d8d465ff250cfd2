"""The model bundle: the files a registered model folder holds for the monitor and for serving, and how it scores.

A registered model folder is a linewatch checkpoint (``weights.safetensors`` + ``config.json``, ``models.save_checkpoint``)
with a ``linewatch/`` sub-folder written by the retrain job:

* ``calibration.parquet``: the held-out calibration images (ids, capture times, products, store paths) with their
  latents ``z_*`` and diffusion residuals ``r_*``: the drift reference and the detector's fitting data;
* ``gate.json``: the gate report, the scoring recipe (``scoring``), the detector seed and false-positive target;
* ``patches.npz``: the per-image patch family fitted on the calibration cells (``pipeline.handoff.patch_family``),
  the monitor's default per-image score; a bundle written before the retrain stored it has none.

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
    z_cal: np.ndarray, fpr_target: float, seed: int = 0, *, residuals: np.ndarray | None = None, k: int = 25,
    groups: np.ndarray | None = None, flag: Any = None,
) -> tuple[float, Any]:
    """Fit and threshold the per-image detector on calibration data, and measure its false-alarm rate.

    With ``groups`` (production periods, ``pipeline.analysis.thresholds.production_groups``; what the monitor
    uses): see :func:`grouped_calibration`. Without (a reference with no capture times): the calibration images
    are split in three (seeded): fit on the first, set the threshold at ``fpr_target`` on the second, measure the
    empirical FPR on the third; the returned detector is refitted on one half and thresholded on the other. A random
    split judges each threshold image against its own lot-mates, so this threshold is too low for new lots.

    Args:
        z_cal: calibration latents (N, d).
        fpr_target: false-alarm rate of the threshold.
        seed: split seed.
        residuals: the calibration images' diffusion residuals (N, len(t_stars)); the detector is then
            ``ConditionalResidual`` on ``[z | residuals]``. None (a bundle from before residual scoring): Mahalanobis
            on z.
        k: neighbours of ``ConditionalResidual``, capped at a fifth of the fit images (at least 3).
        groups: production group of every calibration image; None: the random split.
        flag: a ``pipeline.analysis.thresholds.FlagConfig`` for the grouped calibration (None: its defaults).

    Returns:
        (empirical FPR on the held-out third, or on each left-out fold with the grouped calibration; fitted detector).

    Raises:
        ValueError: fewer than 9 calibration latents.
    """
    if len(z_cal) < 9:
        raise ValueError(f"detector calibration needs >= 9 calibration images, got {len(z_cal)}")
    X = z_cal if residuals is None else np.column_stack([z_cal, residuals])
    n_res = None if residuals is None else int(np.asarray(residuals).reshape(len(z_cal), -1).shape[1])
    if groups is not None:
        return grouped_calibration(X, n_res, fpr_target, groups, k=k, flag=flag)
    idx = np.random.default_rng(seed).permutation(len(X))
    a, b, c = np.array_split(idx, 3)
    det = make_detector(n_res, k=k, n_fit=len(a)).fit(X[a])
    _infer_threshold(det, X[b], fpr_target)
    fpr = float((det.score(X[c]) > det.threshold_).mean())
    half = len(idx) // 2
    full = make_detector(n_res, k=k, n_fit=half).fit(X[idx[:half]])
    _infer_threshold(full, X[idx[half:]], fpr_target)
    return fpr, full


def grouped_calibration(X: np.ndarray, n_res: int | None, fpr_target: float, groups: np.ndarray, *, k: int = 25,
                        flag: Any = None) -> tuple[float, Any]:
    """Fit the detector on every calibration image, thresholded on scores of periods it did not fit on.

    The production groups are dealt into folds (``pipeline.analysis.thresholds.group_folds``); each fold is scored by
    a detector fitted on the other folds, so every calibration image is judged as a cell of a new period is: against
    other lots. The threshold is set on those scores (``grouped_threshold``: far-out scores left out, a margin for the
    between-period spread when ``flag.confidence > 0.5``), and the detector the monitor uses is fitted on all of them.

    Returns:
        (mean over folds of the rate each fold's kept scores see at the threshold set on the other folds, detector).
    """
    from pipeline.analysis.thresholds import FlagConfig, grouped_threshold, heldout_rate

    flag = flag or FlagConfig()
    groups = np.asarray(groups)
    if np.unique(groups).size < 2:
        raise ValueError("grouped calibration needs at least 2 production groups")
    scores = _cross_fitted(X, n_res, k, groups, flag.max_folds)
    rate, keep = grouped_threshold(scores, groups, fpr_target, flag)
    det = make_detector(n_res, k=k, n_fit=len(X)).fit(X)
    _set_threshold_from_scores(det, scores[keep], rate)
    return heldout_rate(scores, groups, fpr_target, flag), det


def _cross_fitted(X: np.ndarray, n_res: int | None, k: int, groups: np.ndarray | None, max_folds: int,
                  seed: int = 0) -> np.ndarray:
    """Scores of every row by the detector fitted on the rows outside its fold (``cross_fit_scores``)."""
    from pipeline.analysis.thresholds import cross_fit_scores

    return cross_fit_scores(lambda fit, rows: make_detector(n_res, k=k, n_fit=len(fit)).fit(X[fit]).score(X[rows]),
                            len(X), groups=groups, max_folds=max_folds, seed=seed)


def _set_threshold_from_scores(det: Any, scores: np.ndarray, rate: float) -> None:
    """Threshold a fitted detector on precomputed out-of-sample normal scores (largest achievable rate if too few)."""
    try:
        det.set_threshold_from_scores(scores, rate)
    except ValueError:  # too few scores for that rate
        det.set_threshold_from_scores(scores, min(0.5, 1.0 / max(len(scores) - 1, 1)))


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


def calibration_scores(z_cal: np.ndarray, residuals: np.ndarray, *, k: int = 25, seed: int = 0,
                       groups: np.ndarray | None = None, max_folds: int = 10) -> np.ndarray:
    """Out-of-sample anomaly scores of every calibration image (the drift reference of the score family).

    Cross-fitting, so no image is scored by a detector that saw it: with ``groups`` (production periods, as in
    :func:`grouped_calibration`) each fold of periods is scored by the detector fitted on the others, so the scores
    are those of new lots, like a monitored window's; without, two seeded random halves score each other. Same
    detector recipe as :func:`detector_calibration`.
    """
    X = np.column_stack([z_cal, residuals])
    n_res = int(np.asarray(residuals).reshape(len(X), -1).shape[1])
    return _cross_fitted(X, n_res, k, groups, max_folds, seed)


def reference_groups(reference: pd.DataFrame, flag: Any = None) -> np.ndarray | None:
    """Production group of every calibration row (``production_groups`` on ``captured_at`` and ``line``).

    None when the rows have no capture times or form a single group: the detector then falls back to the random
    split of :func:`detector_calibration`.
    """
    from pipeline.analysis.thresholds import FlagConfig, production_groups

    if "captured_at" not in reference.columns or reference["captured_at"].isna().any() or len(reference) == 0:
        return None
    lines = reference["line"] if "line" in reference.columns else None
    groups = production_groups(reference["captured_at"], lines, flag or FlagConfig())
    return groups if np.unique(groups).size >= 2 else None


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
        patches: the patch family (``pipeline.handoff.patch_family.PatchFamily``); None when the bundle has none.
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
    patches: Any = None


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
                                  residuals=residuals, k=scoring.k if scoring else 25, groups=reference_groups(ref))
    return Bundle(model_dir, ckpt, str(ckpt.meta.get("model_id", "")), ref, z_ref, residuals, det, gate, scoring,
                  bundle_patches(model_dir, ref))


def bundle_patches(model_dir: str | Path, reference: pd.DataFrame) -> Any:
    """The bundle's patch family when it was fitted on these calibration rows, else None.

    A file that is there but unreadable, or fitted on other cells, is not used (one warning).
    """
    import logging

    from pipeline.handoff.patch_family import read_patch_family

    log = logging.getLogger(__name__)
    try:
        family = read_patch_family(Path(model_dir) / BUNDLE_DIR)
    except ValueError as exc:
        log.warning("%s: patch family not used (%s)", model_dir, exc)
        return None
    ids = reference["image_id"].astype(str) if "image_id" in reference.columns else []
    if family is not None and not family.fitted_on(ids):
        log.warning("%s: patch family not used (fitted on other calibration cells)", model_dir)
        return None
    return family


__all__ = ["BUNDLE_DIR", "CALIBRATION_FILE", "GATE_FILE", "Bundle", "ScoringConfig", "bundle_patches", "calibration_scores",
           "detector_calibration", "grouped_calibration", "load_bundle", "make_detector", "read_gate",
           "reference_groups"]
