"""Loss terms as pure functions: the MMD prior regulariser, the Gaussian KL and prior samplers."""

from __future__ import annotations

import math

import torch

__all__ = ["rbf_kernel", "mmd", "kl_normal", "sample_prior"]


def rbf_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The reference (InfoVAE) kernel k(u, v) = exp(-mean_d (u_d - v_d)^2 / d) = exp(-||u - v||^2 / d^2).

    Args:
        a: (N, d).
        b: (M, d).

    Returns:
        (N, M) kernel matrix.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"rbf_kernel expects (N, d) and (M, d) with the same d, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    d = a.shape[1]
    sq = (a[:, None, :] - b[None, :, :]).pow(2).mean(dim=-1)
    return torch.exp(-sq / d)


def mmd(z: torch.Tensor, z_prior: torch.Tensor) -> torch.Tensor:
    """Squared MMD between two samples: biased V-statistic with the diagonals included (as in the reference).

    MMD^2 = mean K(Y, Y) + mean K(Z, Z) - 2 mean K(Y, Z). It is >= 0 and 0 iff the samples coincide as empirical
    distributions (the kernel is characteristic).

    Args:
        z: (N, d) encoder codes.
        z_prior: (M, d) samples from p(z).

    Returns:
        Scalar tensor.
    """
    return rbf_kernel(z_prior, z_prior).mean() + rbf_kernel(z, z).mean() - 2 * rbf_kernel(z_prior, z).mean()


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
