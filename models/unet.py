"""The conditional denoiser eps_theta(x_t, t, z): a DDPM U-Net with adaptive GroupNorm on t and z.

Network only: it knows nothing about the noise schedule. Building blocks (``ResBlock``, ``AttnBlock``,
``Downsample``, ``Upsample``) are shared with the encoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNetConfig

__all__ = ["timestep_embedding", "ResBlock", "AttnBlock", "Downsample", "Upsample", "UNet"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al.) of integer timesteps.

    Args:
        t: (B,) timesteps (any numeric dtype).
        dim: embedding width.
        max_period: the lowest frequency's period.

    Returns:
        (B, dim) float32 embedding [cos | sin].
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a module's parameters (stable start: the block is the identity at init)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with adaptive GroupNorm (InfoDiffusion main-branch form).

    h = conv1(SiLU(GN(x)));  h = [GN(h)(1 + s_t) + b_t](1 + s_z) + b_z;  h = conv2(Drop(SiLU(h)));  out = h + skip(x)

    with (s_t, b_t) = Linear(SiLU(e_t)) and (s_z, b_z) = Linear(SiLU(e_z)). Without embeddings (the encoder) the
    modulation is skipped. ``conv2`` is zero-initialised.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        emb_dim: width of e_t (0 = no time conditioning).
        z_emb_dim: width of e_z (0 = no z conditioning).
        dropout: dropout before the second conv.
        num_groups: GroupNorm groups.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int = 0,
        z_emb_dim: int = 0,
        dropout: float = 0.0,
        num_groups: int = 8,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, out_ch)
        self.t_proj = nn.Linear(emb_dim, 2 * out_ch) if emb_dim else None
        self.z_proj = nn.Linear(z_emb_dim, 2 * out_ch) if z_emb_dim else None
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(
        self, x: torch.Tensor, e_t: torch.Tensor | None = None, e_z: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Apply the block.

        Args:
            x: (B, in_ch, H, W).
            e_t: (B, emb_dim) time embedding (required iff the block has time conditioning).
            e_z: (B, z_emb_dim) latent embedding (required iff the block has z conditioning).

        Returns:
            (B, out_ch, H, W).
        """
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.t_proj is not None:
            s, b = self.t_proj(F.silu(e_t))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + s) + b
        if self.z_proj is not None:
            s, b = self.z_proj(F.silu(e_z))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + s) + b
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class AttnBlock(nn.Module):
    """Spatial self-attention with a residual connection; the output projection is zero-initialised.

    Args:
        ch: channels.
        num_groups: GroupNorm groups.
        head_dim: channels per head (heads = max(1, ch // head_dim)).
    """

    def __init__(self, ch: int, num_groups: int = 8, head_dim: int = 32) -> None:
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = nn.GroupNorm(num_groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Downsample by 2."""
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample by 2."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """DDPM U-Net; with ``time_cond`` it is the denoiser eps_theta(x_t, t, z), without it a plain image-to-map net.

    Structure: head conv -> per level ``num_res_blocks`` ResBlocks (+ attention at ``attn_resolutions``) and a
    stride-2 downsample (except the last level) -> middle Res/Attn/Res -> up path with ``num_res_blocks + 1``
    ResBlocks per level on skip concatenations and nearest x2 upsampling -> GN/SiLU/conv (zero-initialised).
    Time embedding: sinusoidal(ch) -> Linear(ch, 4ch) -> SiLU -> Linear(4ch, 4ch); z embedding:
    e_z = Linear(d_z, 4ch)(z) (no nonlinearity before it, as in the reference).

    Args:
        cfg: widths, depth, attention, dropout.
        image_size: input H = W (to place attention by resolution).
        in_channels: input channels.
        out_channels: output channels.
        latent_dim: d_z (0 = no z conditioning).
        time_cond: condition on t (False for the reference-style encoder).
        zero_out: zero-initialise the output conv (True for the denoiser).
    """

    def __init__(
        self,
        cfg: UNetConfig,
        image_size: int,
        in_channels: int,
        out_channels: int,
        latent_dim: int = 0,
        time_cond: bool = True,
        zero_out: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.base_channels
        g = cfg.num_groups
        self.latent_dim = latent_dim
        tdim = 4 * ch if time_cond else 0
        zdim = tdim if (latent_dim and time_cond) else (4 * ch if latent_dim else 0)
        self.time_embed = (
            nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim)) if time_cond else None
        )
        self.z_embed = nn.Linear(latent_dim, zdim) if latent_dim else None

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, tdim, zdim, cfg.dropout, g)

        self.head = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs = [ch]
        cur, res_px = ch, image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                out = ch * mult
                layer = nn.ModuleList([res(cur, out)])
                if res_px in cfg.attn_resolutions:
                    layer.append(AttnBlock(out, g))
                self.down.append(layer)
                cur = out
                skip_chs.append(cur)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skip_chs.append(cur)
                res_px //= 2
        self.mid = nn.ModuleList([res(cur, cur), AttnBlock(cur, g), res(cur, cur)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for j in range(cfg.num_res_blocks + 1):
                out = ch * mult
                layer = nn.ModuleList([res(cur + skip_chs.pop(), out)])
                if res_px in cfg.attn_resolutions:
                    layer.append(AttnBlock(out, g))
                cur = out
                if level != 0 and j == cfg.num_res_blocks:
                    layer.append(Upsample(cur))
                    res_px *= 2
                self.up.append(layer)
        self.out_norm = nn.GroupNorm(g, cur)
        self.out_conv = nn.Conv2d(cur, out_channels, 3, padding=1)
        if zero_out:
            _zero(self.out_conv)

    def _run_layer(
        self, layer: nn.ModuleList, h: torch.Tensor, e_t: torch.Tensor | None, e_z: torch.Tensor | None
    ):
        for m in layer:
            h = m(h, e_t, e_z) if isinstance(m, ResBlock) else m(h)
        return h

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | None = None, z: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the U-Net.

        Args:
            x: (B, C_in, H, W) noisy images x_t.
            t: (B,) integer timesteps (required with ``time_cond``).
            z: (B, d_z) semantic code (required when ``latent_dim > 0``).

        Returns:
            (B, C_out, H, W); for the denoiser, the predicted noise eps.
        """
        e_t = e_z = None
        if self.time_embed is not None:
            if t is None:
                raise ValueError("this UNet is time-conditioned: pass t (B,)")
            e_t = self.time_embed(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))
        if self.z_embed is not None:
            if z is None or z.ndim != 2 or z.shape[1] != self.latent_dim:
                got = None if z is None else tuple(z.shape)
                raise ValueError(
                    f"this UNet is z-conditioned: pass z of shape (B, {self.latent_dim}), got {got}"
                )
            e_z = self.z_embed(z)
        h = self.head(x)
        hs = [h]
        for layer in self.down:
            h = self._run_layer(layer, h, e_t, e_z)
            hs.append(h)
        h = self._run_layer(self.mid, h, e_t, e_z)
        for layer in self.up:
            h = torch.cat([h, hs.pop()], dim=1)
            h = self._run_layer(layer, h, e_t, e_z)
        return self.out_conv(F.silu(self.out_norm(h)))
