"""Reverse-process samplers with a scheduler-style API (diffusers ``step`` contract); no parameters.

Timestep convention (the same as training): a sample "at timestep t" has noise level abar_t, t in {0, ..., T-1};
the clean image has abar = 1 ("timestep -1"). The model is always queried with the timestep whose noise level the
state actually has. A sampler walks a descending grid ``timesteps`` = round(linspace(T-1, 0, steps)); step i maps the
state from level ``timesteps[i]`` to level ``timesteps[i+1]`` (to the clean image after the last entry). DDIM
inversion walks the same grid backwards, so inversion and generation agree with each other *and* with training.
(The reference queries timestep i while treating the state as level abar_{i-1}: a one-index offset, fixed here.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .diffusion import EpsFn, randn
from .schedule import NoiseSchedule

__all__ = [
    "StepOutput",
    "make_timesteps",
    "DDIMSampler",
    "DDPMSampler",
    "ddim_sample_loop",
    "ddim_invert_loop",
    "ddpm_sample_loop",
]


@dataclass(frozen=True)
class StepOutput:
    """One sampler step.

    Attributes:
        prev_sample: (B,C,H,W) the state at the next noise level of the walk.
        pred_x0: (B,C,H,W) the model's clean-image estimate at this step.
    """

    prev_sample: torch.Tensor
    pred_x0: torch.Tensor


def make_timesteps(num_timesteps: int, steps: int, t_start: int | None = None) -> torch.Tensor:
    """Descending, evenly spaced integer grid from ``t_start`` (default T-1) down to 0 (``steps`` distinct entries)."""
    top = num_timesteps - 1 if t_start is None else int(t_start)
    if not 0 <= top < num_timesteps:
        raise ValueError(f"t_start must be in [0, {num_timesteps - 1}], got {t_start}")
    if not 1 <= steps <= top + 1:
        raise ValueError(f"steps must be in [1, {top + 1}] (t_start + 1), got {steps}")
    if steps == 1:
        return torch.tensor([top], dtype=torch.long)
    grid = torch.linspace(top, 0, steps, dtype=torch.float64).round().long()
    if (
        grid.unique().numel() != steps
    ):  # pragma: no cover - linspace over integers with steps <= T is distinct
        raise ValueError(f"could not build {steps} distinct timesteps out of {num_timesteps}")
    return grid


class _GridSampler:
    """Shared grid bookkeeping: abar at each grid entry and at the level after it."""

    def __init__(self, sched: NoiseSchedule, steps: int, t_start: int | None = None) -> None:
        self.sched = sched
        self.steps = int(steps)
        self.timesteps = make_timesteps(sched.num_timesteps, self.steps, t_start)
        abar = sched.alphas_cumprod.to(torch.float64)
        self._abar = abar[self.timesteps]  # (steps,)
        self._abar_next = torch.cat(
            [self._abar[1:], torch.ones(1, dtype=torch.float64)]
        )  # level after step i

    def _levels(self, t_index: int) -> tuple[float, float]:
        if not 0 <= t_index < self.steps:
            raise IndexError(f"t_index must be in [0, {self.steps}), got {t_index}")
        return float(self._abar[t_index]), float(self._abar_next[t_index])

    def timestep_batch(self, t_index: int, batch: int, device: torch.device) -> torch.Tensor:
        """The model timestep for step ``t_index`` as a (batch,) long tensor."""
        return torch.full((batch,), int(self.timesteps[t_index]), dtype=torch.long, device=device)


class DDIMSampler(_GridSampler):
    """Strided DDIM (Song et al. 2021, eq. 12) with configurable eta; eta = 0 is deterministic.

    Args:
        sched: noise schedule.
        steps: number of model evaluations (1..T).
        eta: 0 = deterministic DDIM, 1 = DDPM-like ancestral noise.
        clip_x0: clamp the x0 estimate to [-1, 1] at every step (helps poorly trained models; off for exact
            inversion/reconstruction round trips).
        t_start: top of the grid (default T-1); a lower value starts from a partially noised image.
    """

    def __init__(
        self,
        sched: NoiseSchedule,
        steps: int = 50,
        eta: float = 0.0,
        clip_x0: bool = False,
        t_start: int | None = None,
    ) -> None:
        super().__init__(sched, steps, t_start)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self.clip_x0 = clip_x0

    def step(
        self, eps: torch.Tensor, t_index: int, x_t: torch.Tensor, generator: torch.Generator | None = None
    ) -> StepOutput:
        """One reverse step from level ``timesteps[t_index]`` to the next (less noisy) level.

        Args:
            eps: (B,C,H,W) eps_theta(x_t, timesteps[t_index]).
            t_index: position in ``timesteps``.
            x_t: (B,C,H,W) current state.
            generator: RNG for the eta > 0 noise.
        """
        a_t, a_prev = self._levels(t_index)
        pred_x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if self.clip_x0:
            pred_x0 = pred_x0.clamp(-1, 1)
            eps = (x_t - a_t**0.5 * pred_x0) / (1 - a_t) ** 0.5
        # DDIM eq. 16: sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev)
        sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        dir_xt = max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        prev = a_prev**0.5 * pred_x0 + dir_xt
        if sigma > 0:
            noise = randn(x_t.shape, generator, x_t.device, x_t.dtype)
            prev = prev + sigma * noise
        return StepOutput(prev_sample=prev, pred_x0=pred_x0)

    def inversion_query_timestep(self, t_index: int) -> int:
        """Timestep to query the model with for ``invert_step(..., t_index, x)``: the level x currently has."""
        return int(self.timesteps[t_index + 1]) if t_index + 1 < self.steps else int(self.timesteps[-1])

    def invert_step(self, eps: torch.Tensor, t_index: int, x: torch.Tensor) -> StepOutput:
        """One deterministic (eta = 0) inversion step: the exact reverse direction of ``step(..., t_index, ...)``.

        Maps x from level ``timesteps[t_index + 1]`` (the clean image when ``t_index`` is the last index) up to
        level ``timesteps[t_index]``, using eps evaluated at x's own level (``inversion_query_timestep``).
        """
        a_to, a_from = self._levels(t_index)
        pred_x0 = (x - (1 - a_from) ** 0.5 * eps) / a_from**0.5
        return StepOutput(prev_sample=a_to**0.5 * pred_x0 + (1 - a_to) ** 0.5 * eps, pred_x0=pred_x0)


class DDPMSampler(_GridSampler):
    """Ancestral DDPM sampling (Ho et al. 2020, Alg. 2), optionally on a respaced grid.

    With ``steps = T`` this is the classic 1000-step sampler with sigma_t^2 = beta_tilde_t and no noise at the final
    step. With fewer steps the betas are respaced: beta'_i = 1 - abar_{t_i} / abar_{t_{i+1}} (Nichol & Dhariwal).
    """

    def __init__(self, sched: NoiseSchedule, steps: int | None = None, clip_x0: bool = True) -> None:
        super().__init__(sched, steps or sched.num_timesteps)
        self.clip_x0 = clip_x0

    def step(
        self, eps: torch.Tensor, t_index: int, x_t: torch.Tensor, generator: torch.Generator | None = None
    ) -> StepOutput:
        """One ancestral step; see ``DDIMSampler.step`` for the arguments."""
        a_t, a_prev = self._levels(t_index)
        beta = 1 - a_t / a_prev
        pred_x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if self.clip_x0:
            pred_x0 = pred_x0.clamp(-1, 1)
        coef1 = a_prev**0.5 * beta / (1 - a_t)
        coef2 = (1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)
        mean = coef1 * pred_x0 + coef2 * x_t
        var = (1 - a_prev) / (1 - a_t) * beta
        if var > 0:
            noise = randn(x_t.shape, generator, x_t.device, x_t.dtype)
            mean = mean + var**0.5 * noise
        return StepOutput(prev_sample=mean, pred_x0=pred_x0)


def ddim_sample_loop(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    sampler: DDIMSampler | DDPMSampler,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run the sampler from x_T (level ``timesteps[0]``) to x0.

    Args:
        eps_fn: eps_theta(x_t, t) with z already bound.
        x_T: (B,C,H,W) start state.
        sampler: a ``DDIMSampler`` or ``DDPMSampler``.
        generator: RNG for stochastic steps.
    """
    x = x_T
    for i in range(sampler.steps):
        eps = eps_fn(x, sampler.timestep_batch(i, x.shape[0], x.device))
        x = sampler.step(eps, i, x, generator=generator).prev_sample
    return x


ddpm_sample_loop = ddim_sample_loop


def ddim_invert_loop(eps_fn: EpsFn, x0: torch.Tensor, sampler: DDIMSampler) -> torch.Tensor:
    """Deterministic DDIM inversion x0 -> x_T on the sampler's grid (eta = 0; ``sampler.eta`` is ignored).

    Args:
        eps_fn: eps_theta(x_t, t) with z already bound (z must be Enc(x0), held fixed).
        x0: (B,C,H,W) clean images.
        sampler: the ``DDIMSampler`` whose grid the decoding will use.

    Returns:
        (B,C,H,W) x_T at level ``timesteps[0]``.
    """
    x = x0
    for i in reversed(range(sampler.steps)):
        t = torch.full((x.shape[0],), sampler.inversion_query_timestep(i), dtype=torch.long, device=x.device)
        x = sampler.invert_step(eps_fn(x, t), i, x).prev_sample
    return x
