import torch

from models import DiffusionConfig, NoiseSchedule
from models.diffusion import (
    p_mean_variance,
    predict_eps_from_x0,
    predict_x0_from_eps,
    q_posterior_mean_variance,
    q_sample,
)


def _setup(b=64):
    g = torch.Generator().manual_seed(0)
    sched = NoiseSchedule.from_config(DiffusionConfig())
    x0 = torch.rand(b, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    return sched, x0, noise, t


def test_q_sample_round_trip():
    sched, x0, noise, t = _setup()
    x_t = q_sample(sched, x0, t, noise)
    assert torch.allclose(predict_x0_from_eps(sched, x_t, t, noise), x0, atol=2e-3)
    assert torch.allclose(predict_eps_from_x0(sched, x_t, t, x0), noise, atol=2e-3)


def test_q_sample_marginal_statistics():
    sched = NoiseSchedule.from_config(DiffusionConfig())
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    t = torch.full((20000,), 500)
    x_t = q_sample(sched, x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
    ab = sched.alphas_cumprod[500].item()
    assert abs(x_t.mean().item() - 0.5 * ab**0.5) < 0.02
    assert abs(x_t.var().item() - (1 - ab)) < 0.03


def test_posterior_mean_equals_ddpm_mu_formula():
    sched, x0, noise, t = _setup()
    t = t.clamp(min=1)
    x_t = q_sample(sched, x0, t, noise)
    x0_hat = predict_x0_from_eps(sched, x_t, t, noise)
    mean, var, logvar = q_posterior_mean_variance(sched, x0_hat, x_t, t)
    a = sched.alphas[t].view(-1, 1, 1, 1)
    b = sched.betas[t].view(-1, 1, 1, 1)
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    mu = (x_t - b / (1 - ab).sqrt() * noise) / a.sqrt()  # DDPM eq. 11
    assert torch.allclose(mean, mu, atol=1e-4)
    assert var.shape == (x0.shape[0], 1, 1, 1) and torch.allclose(var.log(), logvar, atol=1e-4)


def test_p_mean_variance_with_oracle_eps():
    sched, x0, noise, t = _setup()
    x_t = q_sample(sched, x0, t, noise)
    out = p_mean_variance(lambda x, tt: noise, sched, x_t, t, clip_x0=True)
    assert torch.allclose(out.pred_x0, x0, atol=2e-3)
    assert out.eps is noise and out.mean.shape == x0.shape
