"""Parameter-free Gaussian diffusion maths (Ho et al. 2020), as pure functions over tensors.

The network is passed in as an argument (``eps_model(x_t, t) -> eps``); nothing here owns parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .schedule import NoiseSchedule, extract

__all__ = [
    "EpsFn",
    "randn",
    "PMeanVar",
    "q_sample",
    "predict_x0_from_eps",
    "predict_eps_from_x0",
    "q_posterior_mean_variance",
    "p_mean_variance",
]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""eps_theta(x_t (B,C,H,W), t (B,) long) -> eps (B,C,H,W); z, if any, is bound by the caller."""


def randn(
    shape: torch.Size | tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise on ``device`` drawn from ``generator`` (which may live on another device, e.g. CPU)."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def q_sample(sched: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (DDPM eq. 4).

    Args:
        sched: noise schedule.
        x0: (B, C, H, W) clean images.
        t: (B,) integer timesteps in [0, T).
        noise: (B, C, H, W) standard normal noise.
    """
    return (
        extract(sched.sqrt_alphas_cumprod, t, x0.shape) * x0
        + extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
    )


def predict_x0_from_eps(
    sched: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (
        extract(sched.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
        - extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
    )


def predict_eps_from_x0(
    sched: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
) -> torch.Tensor:
    """Eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) (inverse of ``predict_x0_from_eps``)."""
    return (extract(sched.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0) / extract(
        sched.sqrt_recipm1_alphas_cumprod, t, x_t.shape
    )


def q_posterior_mean_variance(
    sched: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7).

    Returns:
        (mean (B,C,H,W), variance (B,1,1,1), log_variance (B,1,1,1)).
    """
    mean = (
        extract(sched.posterior_mean_coef1, t, x_t.shape) * x0
        + extract(sched.posterior_mean_coef2, t, x_t.shape) * x_t
    )
    var = extract(sched.posterior_variance, t, x_t.shape)
    logvar = extract(sched.posterior_log_variance_clipped, t, x_t.shape)
    return mean, var, logvar


@dataclass(frozen=True)
class PMeanVar:
    """Output of ``p_mean_variance``: the reverse-step Gaussian p_theta(x_{t-1} | x_t).

    Attributes:
        mean: (B,C,H,W) mean.
        variance: (B,1,1,1) fixed variance beta_tilde_t.
        log_variance: (B,1,1,1) clipped log variance.
        pred_x0: (B,C,H,W) predicted clean image.
        eps: (B,C,H,W) predicted noise.
    """

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor
    eps: torch.Tensor


def p_mean_variance(
    eps_model: EpsFn, sched: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, *, clip_x0: bool = True
) -> PMeanVar:
    """p_theta(x_{t-1} | x_t) with the eps-parameterisation and the fixed small variance beta_tilde_t.

    mu_theta = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) equals the posterior mean evaluated at
    x0_hat = predict_x0_from_eps(...); with ``clip_x0`` the x0 prediction is clamped to [-1, 1] first.

    Args:
        eps_model: eps_theta(x_t, t).
        sched: noise schedule.
        x_t: (B,C,H,W) current sample.
        t: (B,) timesteps.
        clip_x0: clamp the x0 prediction to the data range.
    """
    eps = eps_model(x_t, t)
    pred_x0 = predict_x0_from_eps(sched, x_t, t, eps)
    if clip_x0:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
    mean, var, logvar = q_posterior_mean_variance(sched, pred_x0, x_t, t)
    return PMeanVar(mean=mean, variance=var, log_variance=logvar, pred_x0=pred_x0, eps=eps)
