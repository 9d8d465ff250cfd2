import math

import pytest
import torch

from models import DiffusionConfig, NoiseSchedule
from models.schedule import cosine_betas, extract, linear_betas


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.from_config(DiffusionConfig())


def test_linear_endpoints_and_cumprod(sched):
    assert sched.num_timesteps == 1000
    assert sched.betas[0].item() == pytest.approx(1e-5, rel=1e-5)
    assert sched.betas[-1].item() == pytest.approx(1e-2, rel=1e-5)
    assert sched.alphas_cumprod[0].item() == pytest.approx(1 - 1e-5, abs=1e-7)
    # closed form: prod_t (1 - beta_t), reported in the spec as ~0.0066 and abar_500 ~ 0.285
    expect_T = math.prod(1 - b for b in linear_betas(1000, 1e-5, 1e-2).tolist())
    assert sched.alphas_cumprod[-1].item() == pytest.approx(expect_T, rel=1e-4)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(0.0066, abs=2e-4)
    assert sched.alphas_cumprod[500].item() == pytest.approx(0.285, abs=2e-3)


def test_derived_quantities(sched):
    ac, acp = sched.alphas_cumprod.double(), sched.alphas_cumprod_prev.double()
    assert acp[0] == 1.0 and torch.allclose(acp[1:], ac[:-1])
    assert torch.allclose(sched.sqrt_alphas_cumprod.double() ** 2, ac, rtol=1e-5)
    b64 = linear_betas(1000, 1e-5, 1e-2)  # float64 reference (1 - abar is tiny near t = 0)
    ac64 = torch.cumprod(1 - b64, 0)
    acp64 = torch.cat([torch.ones(1, dtype=torch.float64), ac64[:-1]])
    pv = b64 * (1 - acp64) / (1 - ac64)
    assert torch.allclose(sched.posterior_variance.double(), pv, rtol=1e-4)
    assert sched.posterior_variance[0] == 0.0
    assert torch.isfinite(sched.posterior_log_variance_clipped).all()
    # coef1 + coef2 * sqrt(abar_t) / sqrt(abar_{t-1}) ... posterior mean of a noiseless x_t = sqrt(abar) x0 is x0 * sqrt(abar_prev)
    c = sched.posterior_mean_coef1.double() + sched.posterior_mean_coef2.double() * ac.sqrt()
    assert torch.allclose(c, acp.sqrt(), rtol=1e-4)
    assert (torch.diff(sched.alphas_cumprod) < 0).all()


def test_cosine_schedule_is_monotone_and_ends_near_zero():
    s = NoiseSchedule.from_config(DiffusionConfig(schedule="cosine"))
    assert (torch.diff(s.alphas_cumprod) < 0).all()
    assert s.alphas_cumprod[-1] < 1e-3
    assert (cosine_betas(50) <= 0.999).all()


def test_extract_shape():
    arr = torch.arange(10, dtype=torch.float32)
    t = torch.tensor([1, 7, 3])
    out = extract(arr, t, (3, 2, 4, 4))
    assert out.shape == (3, 1, 1, 1) and out.flatten().tolist() == [1.0, 7.0, 3.0]


def test_to_device_returns_copy(sched):
    moved = sched.to("cpu")
    assert moved is not sched and torch.equal(moved.betas, sched.betas)


def test_bad_betas_raise():
    with pytest.raises(ValueError):
        NoiseSchedule.from_betas(torch.tensor([0.1, 1.5]))
