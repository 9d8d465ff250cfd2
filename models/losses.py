"""Loss terms as pure functions: the MMD prior regulariser, the Gaussian KL and prior samplers."""

from __future__ import annotations

import functools
import math

import torch

from .config import MMD_BANDWIDTHS

__all__ = ["kernel_denominator", "rbf_kernel", "mmd", "kl_normal", "sample_prior"]


def kernel_denominator(d: int, bandwidth: str = "reference") -> float:
    """The denominator c of the RBF kernel k(u, v) = exp(-||u - v||^2 / c) for codes of dimension d.

    Args:
        d: latent dimension (>= 1).
        bandwidth: ``"reference"`` -> c = d^2 (the InfoVAE / InfoDiffusion reference code);
            ``"dim"`` -> c = 2 d (a Gaussian kernel with sigma^2 = d, the scale of ||u - v||^2 / 2 under N(0, I)).

    Returns:
        c as a float.
    """
    if d < 1:
        raise ValueError(f"kernel_denominator needs d >= 1, got {d}")
    if bandwidth == "reference":
        return float(d * d)
    if bandwidth == "dim":
        return float(2 * d)
    raise ValueError(f"unknown MMD kernel bandwidth {bandwidth!r}; choose one of {MMD_BANDWIDTHS}")


def rbf_kernel(a: torch.Tensor, b: torch.Tensor, bandwidth: str = "reference") -> torch.Tensor:
    """RBF kernel matrix k(u, v) = exp(-||u - v||^2 / c), c = ``kernel_denominator(d, bandwidth)``.

    ``"reference"`` (default) is the reference (InfoVAE) kernel exp(-mean_d (u_d - v_d)^2 / d) =
    exp(-||u - v||^2 / d^2); ``"dim"`` is exp(-||u - v||^2 / (2 d)), a Gaussian kernel with sigma^2 = d.

    Args:
        a: (N, d).
        b: (M, d).
        bandwidth: ``"reference"`` or ``"dim"`` (see ``LossConfig.mmd_bandwidth`` for why both exist).

    Returns:
        (N, M) kernel matrix.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"rbf_kernel expects (N, d) and (M, d) with the same d, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    d = a.shape[1]
    per_dim = kernel_denominator(d, bandwidth) / d  # ||u - v||^2 / c = mean_d (u_d - v_d)^2 / (c / d); exact: d or 2
    sq = (a[:, None, :] - b[None, :, :]).pow(2).mean(dim=-1)
    return torch.exp(-sq / per_dim)


def mmd(z: torch.Tensor, z_prior: torch.Tensor, bandwidth: str = "reference") -> torch.Tensor:
    """Squared MMD between two samples: biased V-statistic with the diagonals included (as in the reference).

    MMD^2 = mean K(Y, Y) + mean K(Z, Z) - 2 mean K(Y, Z). It is >= 0 and 0 iff the samples coincide as empirical
    distributions (the kernel is characteristic).

    Args:
        z: (N, d) encoder codes.
        z_prior: (M, d) samples from p(z).
        bandwidth: kernel bandwidth, ``"reference"`` (default) or ``"dim"``; see ``rbf_kernel``.

    Returns:
        Scalar tensor.
    """
    k = functools.partial(rbf_kernel, bandwidth=bandwidth)
    return k(z_prior, z_prior).mean() + k(z, z).mean() - 2 * k(z_prior, z).mean()


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)), summed over dimensions and **averaged** over the batch.

    (The reference's main-branch InfoDiff sums over the batch, which makes the weight batch-size dependent.)

    Args:
        mu: (B, d).
        logvar: (B, d).

    Returns:
        Scalar tensor.
    """
    return (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)).sum(dim=1).mean()


def sample_prior(
    n: int,
    d: int,
    kind: str = "gaussian",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw n samples from the prior p(z).

    Args:
        n: number of samples.
        d: latent dimension.
        kind: ``"gaussian"`` = N(0, I); ``"mixture"`` = the reference's ``10mix``: on every consecutive pair of
            dimensions, one of 10 components chosen uniformly, a point (1.4 + 0.5 e1, 0.1 e2) rotated by 2 pi k / 10
            (d must be even).
        generator: torch RNG (on ``device``).
        device: output device.

    Returns:
        (n, d) float32 tensor.
    """
    gdev = generator.device if generator is not None else device  # draw where the generator lives, then move
    if kind == "gaussian":
        return torch.randn(n, d, generator=generator, device=gdev).to(device)
    if kind == "mixture":
        if d % 2:
            raise ValueError(f"the mixture prior needs an even d, got {d}")
        pairs = d // 2
        k = torch.randint(0, 10, (n, pairs), generator=generator, device=gdev).float()
        e = torch.randn(n, pairs, 2, generator=generator, device=gdev)
        x = 1.4 + 0.5 * e[..., 0]
        y = 0.1 * e[..., 1]
        ang = 2 * math.pi * k / 10
        xr = x * torch.cos(ang) - y * torch.sin(ang)
        yr = x * torch.sin(ang) + y * torch.cos(ang)
        return torch.stack([xr, yr], dim=-1).reshape(n, d).to(device)
    raise ValueError(f"unknown prior {kind!r}; choose 'gaussian' or 'mixture'")
