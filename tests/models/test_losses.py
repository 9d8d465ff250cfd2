import math

import pytest
import torch

from models import kl_normal, mmd, rbf_kernel, sample_prior


def test_rbf_kernel_closed_form():
    a = torch.tensor([[0.0, 0.0]])
    b = torch.tensor([[1.0, 2.0]])
    # exp(-mean((0-1)^2, (0-2)^2) / d) = exp(-2.5 / 2)
    assert rbf_kernel(a, b).item() == pytest.approx(math.exp(-1.25))
    assert rbf_kernel(a, a).item() == 1.0


def test_rbf_kernel_shape_check():
    with pytest.raises(ValueError):
        rbf_kernel(torch.zeros(3, 2), torch.zeros(3, 4))


def test_mmd_zero_for_identical_and_small_for_same_distribution():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 8, generator=g)
    assert mmd(z, z).abs().item() < 1e-6
    same = mmd(torch.randn(256, 8, generator=g), torch.randn(256, 8, generator=g)).item()
    shifted = mmd(torch.randn(256, 8, generator=g) + 1.0, torch.randn(256, 8, generator=g)).item()
    assert 0 <= same < 0.01
    assert shifted > 10 * same and shifted > 0.02


def test_mmd_is_differentiable():
    z = torch.randn(16, 4, requires_grad=True)
    mmd(z, torch.randn(16, 4)).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_kl_normal_values_and_batch_average():
    mu, logvar = torch.zeros(4, 3), torch.zeros(4, 3)
    assert kl_normal(mu, logvar).item() == 0.0
    mu = torch.ones(1, 3)
    assert kl_normal(mu, torch.zeros(1, 3)).item() == pytest.approx(1.5)  # 0.5 * sum(mu^2)
    # averaged over the batch: duplicating the batch does not change it (the reference's sum would double)
    assert kl_normal(mu.repeat(5, 1), torch.zeros(5, 3)).item() == pytest.approx(1.5)


def test_sample_prior():
    g = torch.Generator().manual_seed(0)
    z = sample_prior(1000, 6, "gaussian", generator=g)
    assert z.shape == (1000, 6) and abs(z.std().item() - 1) < 0.1
    m = sample_prior(500, 4, "mixture", generator=g)
    r = m.reshape(500, 2, 2).norm(dim=-1)
    assert m.shape == (500, 4) and abs(r.mean().item() - 1.4) < 0.2
    with pytest.raises(ValueError, match="even"):
        sample_prior(4, 3, "mixture")
    with pytest.raises(ValueError, match="unknown prior"):
        sample_prior(4, 3, "laplace")
