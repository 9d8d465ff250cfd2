"""Noise schedules: pure functions over tensors and a precomputed ``NoiseSchedule``.

Notation (Ho et al. 2020): beta_t, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s, for t in {0, ..., T-1}.
x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I). ``alpha_bar_{-1}`` = 1 (clean data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .config import DiffusionConfig

__all__ = ["linear_betas", "cosine_betas", "make_betas", "extract", "NoiseSchedule"]


def linear_betas(num_timesteps: int, beta_start: float = 1e-5, beta_end: float = 1e-2) -> torch.Tensor:
    """Linearly spaced betas (float64, shape (T,)); the reference uses 1e-5..1e-2 with T = 1000."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) pi/2).

    Returns:
        float64 tensor (T,) of betas, clipped to ``max_beta``.
    """

    def abar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """Betas (float64, (T,)) for a ``DiffusionConfig``."""
    if cfg.schedule == "linear":
        return linear_betas(cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
    return cosine_betas(cfg.num_timesteps)


def extract(arr: torch.Tensor, t: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Gather ``arr[t]`` and reshape for broadcasting against a batch of shape ``shape``.

    Args:
        arr: (T,) per-timestep values.
        t: (B,) integer timesteps.
        shape: target shape (B, ...).

    Returns:
        (B, 1, ..., 1) tensor on ``t``'s device.
    """
    out = arr.to(t.device)[t.long()]
    return out.reshape(t.shape[0], *([1] * (len(shape) - 1)))


@dataclass
class NoiseSchedule:
    """Precomputed per-timestep quantities (all float32 tensors of shape (T,)).

    Computed in float64 from ``betas`` then cast. A plain object: ``.to(device)`` returns a moved copy.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> NoiseSchedule:
        """Precompute every quantity from a (T,) beta tensor."""
        b = betas.to(torch.float64)
        if b.ndim != 1 or b.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor with >= 2 entries, got shape {tuple(b.shape)}")
        if not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        a = 1.0 - b
        ac = torch.cumprod(a, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t); beta_tilde_0 = 0 so clip the log
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        vals = {
            "betas": b,
            "alphas": a,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_logvar,
            "posterior_mean_coef1": b * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * a.sqrt() / (1.0 - ac),
        }
        return cls(**{k: v.to(torch.float32) for k, v in vals.items()})

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> NoiseSchedule:
        """Schedule for a ``DiffusionConfig``."""
        return cls.from_betas(make_betas(cfg))

    @property
    def num_timesteps(self) -> int:
        """T."""
        return int(self.betas.shape[0])

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Return a copy with every tensor on ``device``."""
        return NoiseSchedule(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def as_dict(self) -> dict[str, torch.Tensor]:
        """Name -> tensor (used to register the schedule as module buffers)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def register_schedule(module: torch.nn.Module, cfg: DiffusionConfig) -> None:
    """Keep the schedule of ``cfg`` on ``module`` as non-persistent buffers ``sched_<name>``.

    Buffers follow ``module.to(device)`` and are not saved in checkpoints (they are derived from the config).
    """
    for name, value in NoiseSchedule.from_config(cfg).as_dict().items():
        module.register_buffer(f"sched_{name}", value, persistent=False)


def schedule_from_buffers(module: torch.nn.Module) -> NoiseSchedule:
    """The ``NoiseSchedule`` view of buffers registered by :func:`register_schedule` (on the module's device)."""
    return NoiseSchedule(**{f.name: getattr(module, f"sched_{f.name}") for f in fields(NoiseSchedule)})
