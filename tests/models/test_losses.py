import json
import math

import pytest
import torch

from models import InfoDiffusionConfig, LossConfig, get_preset, kl_normal, mmd, rbf_kernel, sample_prior
from models.losses import kernel_denominator


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


# --- MMD kernel bandwidth (LossConfig.mmd_bandwidth) ------------------------------------------------------------
def test_dim_bandwidth_closed_form_and_default_is_reference():
    a = torch.tensor([[0.0, 0.0]])
    b = torch.tensor([[1.0, 2.0]])
    # ||a - b||^2 = 5, d = 2: reference c = d^2 = 4, dim c = 2 d = 4 (they coincide at d = 2)
    assert rbf_kernel(a, b, "dim").item() == pytest.approx(math.exp(-5 / 4))
    a32, b32 = torch.zeros(1, 32), torch.ones(1, 32)  # ||a - b||^2 = 32
    assert rbf_kernel(a32, b32).item() == pytest.approx(math.exp(-32 / 32**2))
    assert rbf_kernel(a32, b32, "reference").item() == rbf_kernel(a32, b32).item()
    assert rbf_kernel(a32, b32, "dim").item() == pytest.approx(math.exp(-32 / 64))
    assert kernel_denominator(32, "reference") == 1024.0 and kernel_denominator(32, "dim") == 64.0


def test_unknown_bandwidth_is_rejected():
    with pytest.raises(ValueError, match="bandwidth.*reference.*dim"):
        rbf_kernel(torch.zeros(2, 3), torch.zeros(2, 3), "median")
    with pytest.raises(ValueError, match="bandwidth"):
        mmd(torch.zeros(2, 3), torch.zeros(2, 3), bandwidth="wide")


def test_dim_bandwidth_sees_a_collapsed_code_the_reference_kernel_misses():
    g = torch.Generator().manual_seed(0)
    d, n = 32, 256
    collapsed = 0.05 * torch.randn(n, d, generator=g)
    prior = torch.randn(n, d, generator=g)
    prior2 = torch.randn(n, d, generator=g)
    ref_c, dim_c = mmd(collapsed, prior).item(), mmd(collapsed, prior, "dim").item()
    ref_p, dim_p = mmd(prior2, prior).item(), mmd(prior2, prior, "dim").item()
    # population values: reference ~0.001, dim ~0.155 (see LossConfig's docstring)
    assert ref_c < 0.005
    assert dim_c > 0.1
    assert dim_c > 50 * ref_c
    # two prior samples: near 0 with both kernels, and the collapsed code is clearly worse with "dim"
    assert 0 <= dim_p < 0.02 and 0 <= ref_p < 0.005
    assert dim_c > 5 * dim_p


def test_reference_v_statistic_prefers_collapse_at_batch_32_dim_does_not():
    # The failure the option fixes: averaged over many batches of 32 (the training batch), the biased V-statistic
    # with the reference kernel is lower for a collapsed code than for codes drawn from the prior itself.
    g = torch.Generator().manual_seed(1)
    d, n, reps = 32, 32, 200
    sums = {(bw, kind): 0.0 for bw in ("reference", "dim") for kind in ("collapsed", "prior")}
    for _ in range(reps):
        prior = torch.randn(n, d, generator=g)
        codes = {"collapsed": 0.06 * torch.randn(n, d, generator=g), "prior": torch.randn(n, d, generator=g)}
        for (bw, kind) in sums:
            sums[(bw, kind)] += mmd(codes[kind], prior, bw).item() / reps
    assert sums[("reference", "collapsed")] < sums[("reference", "prior")]
    assert sums[("dim", "collapsed")] > 3 * sums[("dim", "prior")]


def test_loss_config_bandwidth_validation_and_backward_compatible_json():
    assert LossConfig().mmd_bandwidth == "reference"
    assert LossConfig(mmd_bandwidth="dim").mmd_bandwidth == "dim"
    with pytest.raises(ValueError, match="mmd_bandwidth.*reference.*dim.*'sigma'"):
        LossConfig(mmd_bandwidth="sigma")
    with pytest.raises(ValueError, match="mmd_bandwidth"):
        LossConfig().replace(mmd_bandwidth="")
    # a config.json written before the field existed loads with the reference kernel
    old = json.loads(json.dumps(get_preset("cpu").model.to_dict()))
    del old["loss"]["mmd_bandwidth"]
    cfg = InfoDiffusionConfig.from_dict(old)
    assert cfg.loss.mmd_bandwidth == "reference" and cfg == get_preset("cpu").model
    new = cfg.replace(loss=cfg.loss.replace(mmd_bandwidth="dim"))
    assert InfoDiffusionConfig.from_dict(json.loads(json.dumps(new.to_dict()))).loss.mmd_bandwidth == "dim"


def test_old_checkpoint_without_the_field_loads(tmp_path):
    from models import InfoDiffusion, load_checkpoint, save_checkpoint

    cfg = get_preset("tiny").model
    torch.manual_seed(0)
    save_checkpoint(InfoDiffusion(cfg), tmp_path / "ckpt", preprocess=get_preset("tiny").preprocess)
    cfg_path = tmp_path / "ckpt" / "config.json"
    doc = json.loads(cfg_path.read_text())
    del doc["model"]["loss"]["mmd_bandwidth"]
    cfg_path.write_text(json.dumps(doc))
    assert load_checkpoint(tmp_path / "ckpt").config.loss.mmd_bandwidth == "reference"


def test_infodiffusion_loss_uses_the_configured_bandwidth():
    from models import InfoDiffusion

    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vals = {}
    for bw in ("reference", "dim"):
        cfg = get_preset("tiny").model
        cfg = cfg.replace(loss=LossConfig(mmd_bandwidth=bw))
        torch.manual_seed(0)
        m = InfoDiffusion(cfg)
        vals[bw] = m.loss(x, generator=torch.Generator().manual_seed(1)).mmd.item()
    # same weights, same prior batch: only the kernel differs (d = 8 for tiny: c = 64 vs 16, so "dim" is larger)
    assert vals["dim"] > vals["reference"] > 0
