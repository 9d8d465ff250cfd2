"""Model-level evaluation for the retrain's gate and the monitor's detector.

Denoising loss and reconstruction error with seeded noise (the same for every model compared), latent quality
(active axes, MMD to the prior), axis alignment between two models, and the per-image detector's calibration on the
held-out calibration images. ``pipeline.training.retrain`` re-exports these names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.handoff.bundle import calibration_scores, detector_calibration, make_detector  # noqa: F401
from pipeline.latent.quality import latent_health, mmd_to_prior  # noqa: F401


def latent_quality(z: np.ndarray, floor: float, seed: int = 0) -> dict[str, float]:
    """The gate's latent-collapse indicators under their metric names.

    Share of axes with std > ``floor``, min/median std and MMD^2 to the prior, as computed by
    :func:`pipeline.latent.quality.latent_health` (the one collapse metric).
    """
    health = latent_health(z, std_floor=floor, seed=seed)
    return {
        "active_axes_share": float(health["active_share"]),
        "axis_std_min": health["axis_std_min"],
        "axis_std_median": health["axis_std_median"],
        "mmd_to_prior": health["mmd_to_prior"],
    }


def axis_alignment(z_prev: np.ndarray, z_new: np.ndarray) -> tuple[float, dict[str, Any]]:
    """Match the candidate's axes to the champion's on the same calibration images (``pipeline.analysis.axes.align_axes``).

    Returns:
        (mean |r| of the matched pairs, the alignment as a JSON-safe dict with its one-line ``text``).
    """
    from pipeline.analysis.axes import align_axes

    al = align_axes(z_prev, z_new)
    return float(al.mean_abs_corr), al.to_dict()


def _rows(features: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    return None if features is None else features[lo:hi]


@torch.no_grad()
def encode_tensor(model: Any, x: torch.Tensor, batch_size: int = 64, *,
                  features: torch.Tensor | None = None) -> np.ndarray:
    """Encode a (N, C, H, W) tensor in batches to a float32 (N, d) array (eval mode).

    ``features``: the images' pooled backbone features (N, F), which a ``"pretrained"`` encoder reads instead.
    """
    model.eval()
    out = [model.encode(x[i : i + batch_size], features=_rows(features, i, i + batch_size)).detach().cpu().float()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


@torch.no_grad()
def denoising_loss(model: Any, x: torch.Tensor, *, seed: int, repeats: int = 2, batch_size: int = 32,
                   features: torch.Tensor | None = None) -> float:
    """Mean epsilon-prediction MSE on ``x`` with seeded timesteps and noise (the same for every model compared)."""
    model.eval()
    total, n = 0.0, 0
    for r in range(repeats):
        for i in range(0, len(x), batch_size):
            gen = torch.Generator(device=x.device).manual_seed(seed * 1000 + r * 97 + i)
            lo, hi = i, i + batch_size
            if len(x) - lo < 2:  # the MMD term inside the loss needs a batch
                lo = max(0, len(x) - 2)
            xb = x[lo:hi]
            out = model.loss(xb, generator=gen, features=_rows(features, lo, hi))
            total += float(out.eps_mse) * len(xb)
            n += len(xb)
    return total / max(n, 1)


def _reconstruct(model: Any, x: torch.Tensor, steps: int, seed: int, features: torch.Tensor | None) -> torch.Tensor:
    """The deterministic DDIM reconstruction of ``x`` with its own z (model in eval mode, seeded)."""
    model.eval()
    torch.manual_seed(seed)
    return model.reconstruct(x, steps=steps, z=model.encode(x, features=features))


@torch.no_grad()
def reconstruction_error(model: Any, x: torch.Tensor, *, steps: int, seed: int,
                         features: torch.Tensor | None = None) -> float:
    """Mean squared error of the deterministic DDIM reconstruction of ``x`` (in model-input units)."""
    rec = _reconstruct(model, x, steps, seed, features)
    return float(((rec - x) ** 2).mean())


@torch.no_grad()
def reconstruction_errors(model: Any, x: torch.Tensor, *, steps: int, seed: int,
                          features: torch.Tensor | None = None) -> np.ndarray:
    """Each image's mean squared reconstruction error (:func:`reconstruction_error` per image), shape (N,)."""
    rec = _reconstruct(model, x, steps, seed, features)
    return ((rec - x) ** 2).flatten(1).mean(1).double().numpy()


def evaluate_model(
    model: Any, x_cal: torch.Tensor, gate: Any, *, seed: int, with_detector: bool = True,
    residuals: np.ndarray | None = None, k: int = 25, groups: np.ndarray | None = None,
    features: torch.Tensor | None = None,
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
        groups: production periods of the calibration images (``pipeline.handoff.bundle.reference_groups``): the
            detector is calibrated as the monitor calibrates it; None: the random split.
        features: the calibration images' pooled backbone features (N, F), for a ``"pretrained"`` encoder.

    Returns:
        (metrics, calibration latents (N, d), fitted detector or None).
    """
    metrics: dict[str, float] = {}
    metrics["eps_mse"] = denoising_loss(model, x_cal, seed=seed, repeats=gate.eval_repeats, features=features)
    n_rec = gate.recon_images
    metrics["recon_mse"] = reconstruction_error(model, x_cal[:n_rec], steps=gate.recon_steps, seed=seed,
                                                features=_rows(features, 0, n_rec))
    z = encode_tensor(model, x_cal, features=features)
    metrics.update(latent_quality(z, gate.axis_std_floor, seed=seed))
    det = None
    if with_detector:
        metrics["detector_fpr"], det = detector_calibration(z, gate.fpr_target, seed=seed, residuals=residuals, k=k,
                                                            groups=groups)
    return metrics, z, det


def perturb_weights(model: torch.nn.Module, scale: float, seed: int = 0) -> None:
    """Add N(0, scale * std(w)) noise to every floating parameter in place (a deliberately regressed model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g).to(p) * scale * (p.std() + 1e-8))



__all__ = [
    "axis_alignment", "calibration_scores", "denoising_loss", "detector_calibration", "encode_tensor",
    "evaluate_model", "latent_quality", "make_detector", "mmd_to_prior", "perturb_weights", "reconstruction_error",
    "reconstruction_errors",
]
