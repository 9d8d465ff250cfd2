"""The semantic encoder q_phi(z | x0). Network only: no diffusion knowledge."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig, UNetConfig
from .diffusion import randn
from .unet import Downsample, ResBlock, UNet

__all__ = ["EncoderOutput", "Encoder", "FeatureHead"]


@dataclass(frozen=True)
class EncoderOutput:
    """Encoder result.

    Attributes:
        z: (B, d_z) the code that conditions the decoder (the reparameterised sample in training with the
            stochastic head; mu at eval; the deterministic code otherwise).
        mu: (B, d_z) posterior mean, or None for the deterministic encoder.
        logvar: (B, d_z) posterior log-variance, or None for the deterministic encoder.
    """

    z: torch.Tensor
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None


class FeatureHead(nn.Module):
    """The trainable head of the ``"pretrained"`` encoder: pooled backbone features (B, F) -> z (B, d_z).

    z = P s(f) + MLP(s(f)), with s the per-feature standardisation (buffers), P a linear map and MLP = Linear ->
    SiLU -> Linear whose last layer starts at zero. :meth:`init_from_features` sets s from training features and
    P to their whitened top-``d_z`` principal directions, so training starts from a unit-variance code that already
    holds the backbone's main factors (cell type, defects); the InfoDiffusion objective then shapes it.

    Args:
        feature_dim: F.
        latent_dim: d_z.
        hidden: MLP width.
    """

    def __init__(self, feature_dim: int, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("feat_mean", torch.zeros(feature_dim))
        self.register_buffer("feat_scale", torch.ones(feature_dim))
        self.proj = nn.Linear(feature_dim, latent_dim)
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.SiLU(), nn.Linear(hidden, latent_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    @torch.no_grad()
    def init_from_features(self, f: torch.Tensor) -> None:
        """Data-dependent initialisation from training features (N, F): standardisation and whitened PCA."""
        f = f.double()
        if f.ndim != 2 or f.shape[1] != self.feat_mean.shape[0] or f.shape[0] < 2:
            raise ValueError(f"init_from_features needs (N >= 2, {self.feat_mean.shape[0]}) features, got "
                             f"{tuple(f.shape)}")
        mean, std = f.mean(0), f.std(0)
        scale = torch.where(std > 1e-6, std, torch.ones_like(std))
        fs = (f - mean) / scale
        _, s, vt = torch.linalg.svd(fs, full_matrices=False)
        d = min(self.proj.out_features, vt.shape[0])
        sd = (s[:d] / (fs.shape[0] - 1) ** 0.5).clamp_min(1e-6)
        w = torch.zeros_like(self.proj.weight, dtype=torch.float64)
        w[:d] = vt[:d] / sd[:, None]
        self.feat_mean.copy_(mean.float())
        self.feat_scale.copy_(scale.float())
        self.proj.weight.copy_(w.float())
        self.proj.bias.zero_()

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """(B, F) pooled features -> (B, d_z)."""
        fs = (f.float() - self.feat_mean) / self.feat_scale
        return self.proj(fs) + self.mlp(fs)


class Encoder(nn.Module):
    """q_phi(z | x0), two architectures (see ``EncoderConfig.kind``).

    * ``"down"``: head conv -> per level ResBlocks and stride-2 downsampling -> GN/SiLU -> global average pool ->
      Linear(C -> d_z). Cost ~ the U-Net's down half, no time input (DiffAE-style; much cheaper than ``"unet"``).
    * ``"unet"``: the reference's full U-Net without time input -> 1-channel full-resolution map -> flatten ->
      Linear(H*W -> d_z).
    * ``"pretrained"``: :class:`FeatureHead` on the pooled features of a frozen backbone (``models.backbone``);
      its input is the feature vector (B, F), not the image: the backbone runs outside the model (once per image,
      cached), so training touches only the head and the decoder.

    With ``stochastic`` a Gaussian head follows: mu = Linear(d, d)(a), logvar = Linear(d, d)(a).

    Args:
        cfg: encoder config.
        image_size: input H = W.
        in_channels: input channels.
        latent_dim: d_z.
    """

    def __init__(self, cfg: EncoderConfig, image_size: int, in_channels: int, latent_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.latent_dim = latent_dim
        if cfg.kind == "pretrained":
            from .backbone import get_backbone_spec

            self.head = FeatureHead(get_backbone_spec(cfg.backbone).pooled_dim, latent_dim, cfg.head_hidden)
        elif cfg.kind == "down":
            ch, g = cfg.base_channels, cfg.num_groups
            layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 3, padding=1)]
            cur = ch
            for level, mult in enumerate(cfg.channel_mult):
                for _ in range(cfg.num_res_blocks):
                    layers.append(ResBlock(cur, ch * mult, dropout=cfg.dropout, num_groups=g))
                    cur = ch * mult
                if level != len(cfg.channel_mult) - 1:
                    layers.append(Downsample(cur))
            self.body = nn.ModuleList(layers)
            self.out_norm = nn.GroupNorm(g, cur)
            self.fc = nn.Linear(cur, latent_dim)
        else:
            ucfg = UNetConfig(
                base_channels=cfg.base_channels,
                channel_mult=cfg.channel_mult,
                num_res_blocks=cfg.num_res_blocks,
                attn_resolutions=cfg.attn_resolutions,
                dropout=cfg.dropout,
                num_groups=cfg.num_groups,
            )
            self.unet = UNet(ucfg, image_size, in_channels, 1, latent_dim=0, time_cond=False, zero_out=False)
            self.fc = nn.Linear(image_size * image_size, latent_dim)
        if cfg.stochastic:
            self.mu_head = nn.Linear(latent_dim, latent_dim)
            self.logvar_head = nn.Linear(latent_dim, latent_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic code a: (B, C, H, W) images (or (B, F) backbone features for ``"pretrained"``) -> (B, d_z)."""
        if self.cfg.kind == "pretrained":
            return self.head(x)
        if self.cfg.kind == "down":
            h = x
            for m in self.body:
                h = m(h)
            h = F.silu(self.out_norm(h)).mean(dim=(2, 3))
            return self.fc(h)
        return self.fc(self.unet(x).flatten(1))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> EncoderOutput:
        """Encode images.

        Args:
            x: (B, C, H, W) images in [-1, 1], or (B, F) pooled backbone features for the ``"pretrained"`` kind.
            generator: RNG for the reparameterisation noise (stochastic head, training mode only).

        Returns:
            ``EncoderOutput``; z is (B, d_z).
        """
        a = self.features(x)
        if not self.cfg.stochastic:
            return EncoderOutput(z=a)
        mu, logvar = self.mu_head(a), self.logvar_head(a)
        if self.training:
            noise = randn(mu.shape, generator, mu.device, mu.dtype)
            z = mu + torch.exp(0.5 * logvar) * noise
        else:
            z = mu
        return EncoderOutput(z=z, mu=mu, logvar=logvar)
