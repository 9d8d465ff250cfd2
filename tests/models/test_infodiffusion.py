import pytest
import torch
import torch.nn.functional as F

from models import InfoDiffusion, LossConfig, get_preset
from models.diffusion import q_sample


def _model(**loss_kw):
    cfg = get_preset("tiny").model
    if "stochastic" in loss_kw:
        cfg = cfg.replace(encoder=cfg.encoder.replace(stochastic=loss_kw.pop("stochastic")))
    cfg = cfg.replace(loss=LossConfig(**loss_kw))
    torch.manual_seed(0)
    m = InfoDiffusion(cfg)
    torch.nn.init.normal_(m.unet.out_conv.weight, std=0.05)  # non-zero eps so the terms are not trivial
    return m


def _batch(b=8):
    return torch.rand(b, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_schedule_is_buffers_not_parameters():
    m = _model()
    names = {n for n, _ in m.named_parameters()}
    assert not any(n.startswith("sched_") for n in names)
    assert not any(k.startswith("sched_") for k in m.state_dict())  # rebuilt from the config, not saved
    assert m.schedule.alphas_cumprod.shape == (1000,)


def test_loss_output_fields():
    m = _model()
    out = m.loss(_batch(), generator=torch.Generator().manual_seed(1))
    for name in ("total", "eps_mse", "mmd", "kl", "rec"):
        v = getattr(out, name)
        assert v.ndim == 0 and torch.isfinite(v)
    assert out.total.requires_grad
    assert out.total.item() == pytest.approx(out.eps_mse.item() + 0.1 * out.mmd.item(), rel=1e-5)
    out.total.backward()
    assert m.encoder.fc.weight.grad is not None and m.encoder.fc.weight.grad.abs().sum() > 0


def test_lambda_zeta_zero_is_exactly_the_diffae_loss():
    m = _model(lambda_mmd=0.0, zeta=0.0)
    x = _batch()
    t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(2))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    out = m.loss(x, t=t, noise=noise)
    z = m.encoder(x).z
    plain = F.mse_loss(m.unet(q_sample(m.schedule, x, t, noise), t, z), noise)
    assert out.total.item() == pytest.approx(plain.item(), rel=1e-6)
    assert torch.equal(out.total, out.eps_mse) and out.kl.item() == 0.0
    assert out.mmd.item() > 0 and not out.mmd.requires_grad  # monitored, not optimised


def test_stochastic_head_adds_weighted_kl():
    x = _batch()
    t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(2))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    m = _model(lambda_mmd=0.1, zeta=0.25, stochastic=True)
    out = m.loss(x, t=t, noise=noise, generator=torch.Generator().manual_seed(4))
    assert out.kl.item() > 0
    expect = out.eps_mse + 0.1 * out.mmd + 0.75 * out.kl
    assert out.total.item() == pytest.approx(expect.item(), rel=1e-6)
    m1 = _model(lambda_mmd=0.1, zeta=1.0, stochastic=True)
    out1 = m1.loss(x, t=t, noise=noise, generator=torch.Generator().manual_seed(4))
    assert out1.total.item() == pytest.approx((out1.eps_mse + 0.1 * out1.mmd).item(), rel=1e-6)


def test_rec_term_is_optional_and_tiny():
    x = _batch()
    t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(2))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    m = _model(use_rec_term=True)
    out = m.loss(x, t=t, noise=noise, generator=torch.Generator().manual_seed(4))
    assert out.rec.item() > 0
    assert out.total.item() == pytest.approx((out.eps_mse + 0.1 * out.mmd + out.rec / 1000).item(), rel=1e-5)
    assert out.rec.item() / 1000 < 1e-6


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(0, 1, 16, 16), "empty"),
        (torch.full((2, 1, 16, 16), float("nan")), "NaN"),
        (torch.zeros(2, 3, 16, 16), "channels"),
        (torch.zeros(2, 4, 16, 16), "channels"),
        (torch.zeros(2, 1, 32, 32), "image_size"),
    ],
)
def test_bad_inputs_raise(x, match):
    m = _model()
    with pytest.raises(ValueError, match=match):
        m.encode(x)
    with pytest.raises(ValueError, match=match):
        m.loss(x)


def test_encode_is_deterministic_and_gradient_free_by_default():
    m = _model(stochastic=True).train()
    x = _batch(4)
    z1, z2 = m.encode(x), m.encode(x)
    assert z1.shape == (4, 8) and torch.equal(z1, z2) and not z1.requires_grad
    assert m.encode(x, grad=True).requires_grad


def test_wrong_z_shape_raises():
    m = _model()
    with pytest.raises(ValueError, match="z must be"):
        m.ddim_sample(torch.randn(2, 1, 16, 16), torch.randn(2, 5), steps=2)


# ---------------------------------------------------------------- with the briefly trained tiny model


def _mse(a, b):
    return ((a - b) ** 2).mean().item()


def test_training_reduced_the_loss(trained_tiny):
    h = trained_tiny.history
    assert h[-1]["step"] == 300 and h[-1]["loss"] < 0.5 * h[0]["loss"]


def test_inversion_reconstructs_much_better_than_random_noise(trained_tiny, elpv16):
    m, x = trained_tiny.model, elpv16[:16]
    z = m.encode(x)
    rec = m.reconstruct(x, steps=20)
    rnd = m.ddim_sample(torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), z, steps=20)
    assert _mse(rec, x) < 0.2 * _mse(rnd, x)
    assert _mse(rec, x) < 0.2 * x.var().item()


def test_z_is_used_own_code_beats_another_images_code(trained_tiny, elpv16):
    m, x = trained_tiny.model, elpv16[:16]
    z = m.encode(x)
    x_T = m.ddim_invert(x, z, steps=20)
    own = m.ddim_sample(x_T, z, steps=20)
    other = m.ddim_sample(x_T, z.roll(1, dims=0), steps=20)
    assert _mse(own, x) < 0.5 * _mse(other, x)
    # and with z alone (fresh noise), the own code still wins on average
    g = torch.Generator().manual_seed(0)
    a = m.partial_denoise(x, 600, 10, generator=g)
    g = torch.Generator().manual_seed(0)
    b = m.partial_denoise(x, 600, 10, z=z.roll(1, dims=0), generator=g)
    assert _mse(a, x) < _mse(b, x)


def test_ddim_eta0_is_deterministic_on_the_model(trained_tiny):
    m = trained_tiny.model
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(m.ddim_sample(x_T, z, steps=5), m.ddim_sample(x_T, z, steps=5))


def test_inference_helpers_shapes(trained_tiny, elpv16):
    m, x = trained_tiny.model, elpv16[:2]
    tr = m.traverse(x[:1], [0, 3], torch.linspace(-1.5, 1.5, 4), steps=5)
    assert tr.shape == (2, 4, 1, 16, 16)
    # setting z_k changes the picture
    assert _mse(tr[0, 0], tr[0, -1]) > 0
    it = m.interpolate(x[:1], x[1:2], n=5, steps=10)
    assert it.shape == (5, 1, 16, 16)
    assert _mse(it[0], m.reconstruct(x[:1], steps=10)[0]) < 1e-6  # e = 0 is the first image's reconstruction
    s = m.sample(3, steps=5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, 1, 16, 16) and s.min() >= -1 and s.max() <= 1
    d = m.ddpm_sample(torch.randn(2, 8), steps=10, generator=torch.Generator().manual_seed(0))
    assert d.shape == (2, 1, 16, 16)
    pd_low = m.partial_denoise(x, 20, 5, generator=torch.Generator().manual_seed(0))
    assert _mse(pd_low, x) < 0.01  # barely noised -> nearly unchanged
    with pytest.raises(ValueError, match="one image"):
        m.traverse(x, [0], torch.tensor([0.0]))
    with pytest.raises(ValueError, match="out of range"):
        m.traverse(x[:1], [8], torch.tensor([0.0]))
