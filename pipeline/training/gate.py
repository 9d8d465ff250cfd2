"""The promotion gate: the thresholds a candidate model must meet, and the decision from its metrics.

``pipeline.training.retrain`` evaluates the candidate (and the champion, on the same calibration images with the same
noise), calls :func:`apply_gate`, then adds the monitor's own checks (``monitor_gate``). A candidate becomes
champion only when every check passes. ``pipeline.training.retrain`` re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GateConfig:
    """Promotion gate thresholds. A candidate becomes champion only when every check passes.

    Attributes:
        loss_tolerance: candidate denoising loss on calibration must be <= champion x (1 + tol).
        recon_tolerance: candidate reconstruction MSE must be <= champion x (1 + tol). Two nightly models of a line
            differ by more than the denoising loss shows: on the same calibration images the ratio of consecutive
            models' reconstruction MSE has a log standard deviation of 0.06-0.07 (``benchmarks.gate_replay``;
            BENCHMARKS.md, the gate row), so 0.25 (3.3-3.7 sd) refuses a candidate that reconstructs clearly worse,
            not one that drew the other side of that spread; with 0.15 a champion that drew the good side kept its
            line for days.
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
    recon_tolerance: float = 0.25
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
    return gate_result(checks)


_AT_LEAST = ("alignment", "active_axes_share", "reference_images", "monitor_loads")
"""Gate checks whose value must reach the threshold (the others must stay at or below it)."""


def gate_result(checks: dict[str, tuple[float, float, bool]], notes: list[str] | None = None) -> GateResult:
    """A gate result from its checks; the reason names every failed check with value and threshold, then ``notes``."""
    failed = [k for k, (_, _, ok) in checks.items() if not ok]
    if not failed:
        return GateResult(passed=True, checks=checks, reason="all checks passed")
    parts = []
    for k in failed:
        v, t, _ = checks[k]
        parts.append(f"{k}={v:.4g} (needs {'>=' if k in _AT_LEAST else '<='} {t:.4g})")
    return GateResult(passed=False, checks=checks, reason="failed: " + "; ".join(parts + list(notes or [])))


__all__ = ["GateConfig", "GateResult", "apply_gate", "gate_result"]
