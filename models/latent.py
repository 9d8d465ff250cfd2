"""A small DDPM on the semantic codes z (DiffAE-style latent diffusion) for unconditional z sampling.

InfoDiffusion's MMD term pulls the aggregate posterior q(z) towards the prior, but never exactly onto it; sampling z
from the prior therefore gives off-manifold codes. A latent DDPM fitted to the encoded training set samples
realistic codes instead (the reference's ``--is_latent`` FID pipeline). Differences from the reference: z is
standardised with the training mean/std (as DiffAE does; the reference does not), and the MLP is shallower by
default (6 layers instead of 10).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import DiffusionConfig, _ConfigMixin
from .diffusion import q_sample, randn
from .samplers import DDIMSampler, ddim_sample_loop
from .schedule import NoiseSchedule, register_schedule, schedule_from_buffers
from .unet import timestep_embedding

__all__ = [
    "LatentDDPMConfig",
    "LatentDenoiser",
    "LatentDDPM",
    "train_latent_ddpm",
    "save_latent_ddpm",
    "load_latent_ddpm",
]


@dataclass(frozen=True)
class LatentDDPMConfig(_ConfigMixin):
    """Latent DDPM settings.

    Attributes:
        latent_dim: d_z.
        hidden: MLP width (reference: 4 * d_z; default max(64, 4 * d_z) when 0).
        num_layers: hidden layers; from the second on, z_t is concatenated to each layer's input (skip).
        time_dim: sinusoidal embedding width.
        dropout: dropout after each hidden layer.
        diffusion: noise schedule (reference: the same linear 1e-5..1e-2 as the image model).
    """

    latent_dim: int = 32
    hidden: int = 0
    num_layers: int = 6
    time_dim: int = 64
    dropout: float = 0.0
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def __post_init__(self) -> None:
        if self.latent_dim < 1 or self.num_layers < 1 or self.time_dim < 2 or self.hidden < 0:
            raise ValueError(f"invalid LatentDDPMConfig: {self}")
        if self.hidden == 0:
            object.__setattr__(self, "hidden", max(64, 4 * self.latent_dim))


class LatentDenoiser(nn.Module):
    """eps_psi(z_t, t): MLP with LayerNorm/SiLU, multiplicative time conditioning and z_t skip inputs.

    Layer i: h <- Drop(SiLU(LN(Linear([h, z_t]) * (1 + Linear(SiLU(e_t)))))); the output layer is zero-initialised.
    """

    def __init__(self, cfg: LatentDDPMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, h = cfg.latent_dim, cfg.hidden
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, h), nn.SiLU(), nn.Linear(h, h))
        self.layers = nn.ModuleList([nn.Linear(d if i == 0 else h + d, h) for i in range(cfg.num_layers)])
        self.t_proj = nn.ModuleList([nn.Linear(h, h) for _ in range(cfg.num_layers)])
        self.norms = nn.ModuleList([nn.LayerNorm(h) for _ in range(cfg.num_layers)])
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(h + d, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, d), (B,) -> predicted noise (B, d)."""
        e_t = F.silu(self.time_mlp(timestep_embedding(t, self.cfg.time_dim)))
        h = z_t
        for i, (lin, tp, norm) in enumerate(zip(self.layers, self.t_proj, self.norms, strict=True)):
            h = lin(h if i == 0 else torch.cat([h, z_t], dim=1))
            h = self.dropout(F.silu(norm(h * (1 + tp(e_t)))))
        return self.out(torch.cat([h, z_t], dim=1))


class LatentDDPM(nn.Module):
    """Denoiser + schedule + the standardisation of z (mean/std buffers, saved with the weights)."""

    def __init__(self, cfg: LatentDDPMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = LatentDenoiser(cfg)
        self.register_buffer("z_mean", torch.zeros(cfg.latent_dim))
        self.register_buffer("z_std", torch.ones(cfg.latent_dim))
        register_schedule(self, cfg.diffusion)

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule view of the buffers."""
        return schedule_from_buffers(self)

    def loss(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """eps-MSE on standardised codes z (B, d)."""
        zn = (z - self.z_mean) / self.z_std
        gdev = generator.device if generator is not None else z.device
        t = torch.randint(
            0, self.cfg.diffusion.num_timesteps, (z.shape[0],), generator=generator, device=gdev
        )
        t = t.to(z.device)
        noise = randn(zn.shape, generator, z.device)
        return F.mse_loss(self.net(q_sample(self.schedule, zn, t, noise), t), noise)

    @torch.no_grad()
    def sample(
        self, n: int, steps: int = 50, generator: torch.Generator | None = None, eta: float = 0.0
    ) -> torch.Tensor:
        """Draw n codes (n, d) with DDIM, in the original (unstandardised) scale of z."""
        dev = self.z_mean.device
        x_T = randn((n, self.cfg.latent_dim), generator, dev)
        zn = ddim_sample_loop(self.net, x_T, DDIMSampler(self.schedule, steps, eta=eta), generator=generator)
        return zn * self.z_std + self.z_mean


def train_latent_ddpm(
    z: torch.Tensor,
    cfg: LatentDDPMConfig | None = None,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
) -> LatentDDPM:
    """Fit a latent DDPM to codes z (N, d): AdamW, cosine-decayed lr, grad clip 1.0; returns it in eval mode.

    Args:
        z: (N, d) codes from ``InfoDiffusion.encode`` over the training set.
        cfg: config (default: ``LatentDDPMConfig(latent_dim=d)``).
        steps: optimiser steps.
        batch_size: codes per step (sampled with replacement).
        lr: peak learning rate.
        seed: RNG seed.
    """
    if z.ndim != 2 or z.shape[0] < 2 or not torch.isfinite(z).all():
        raise ValueError(f"z must be a finite (N >= 2, d) tensor, got shape {tuple(z.shape)}")
    cfg = cfg or LatentDDPMConfig(latent_dim=z.shape[1])
    if cfg.latent_dim != z.shape[1]:
        raise ValueError(f"cfg.latent_dim={cfg.latent_dim} but z has {z.shape[1]} dims")
    torch.manual_seed(seed)
    model = LatentDDPM(cfg).to(z.device)
    model.z_mean.copy_(z.mean(0))
    model.z_std.copy_(z.std(0).clamp_min(1e-6))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator(device=z.device).manual_seed(seed)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, z.shape[0], (batch_size,), generator=g, device=z.device)
        loss = model.loss(z[idx], generator=g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def save_latent_ddpm(model: LatentDDPM, out_dir: str | Path, name: str = "latent_ddpm") -> Path:
    """Write ``<name>.safetensors`` + ``<name>.json`` into ``out_dir`` (e.g. next to the image checkpoint)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        str(out / f"{name}.safetensors"),
    )
    (out / f"{name}.json").write_text(json.dumps(model.cfg.to_dict(), indent=2, sort_keys=True))
    return out


def load_latent_ddpm(out_dir: str | Path, name: str = "latent_ddpm", map_location: str = "cpu") -> LatentDDPM:
    """Load what ``save_latent_ddpm`` wrote (strict keys and shapes)."""
    from safetensors.torch import load_file

    from .checkpoint import load_state_strict

    d = Path(out_dir)
    for f in (d / f"{name}.json", d / f"{name}.safetensors"):
        if not f.exists():
            raise FileNotFoundError(f"latent DDPM file {f} does not exist")
    model = LatentDDPM(LatentDDPMConfig.from_dict(json.loads((d / f"{name}.json").read_text())))
    load_state_strict(model, load_file(str(d / f"{name}.safetensors")), str(d))
    return model.to(map_location).eval()
