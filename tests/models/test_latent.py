import pytest
import torch

from models import mmd
from models.latent import LatentDDPMConfig, load_latent_ddpm, save_latent_ddpm, train_latent_ddpm


def _two_clusters(n=512, d=4):
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[2.0] * d, [-2.0] * d])
    lab = torch.randint(0, 2, (n,), generator=g)
    return centres[lab] + 0.3 * torch.randn(n, d, generator=g) + 1.0


def test_latent_ddpm_learns_a_bimodal_code_distribution(tmp_path):
    z = _two_clusters()
    model = train_latent_ddpm(
        z, LatentDDPMConfig(latent_dim=4, num_layers=3), steps=400, batch_size=128, seed=0
    )
    s = model.sample(256, steps=20, generator=torch.Generator().manual_seed(1))
    assert s.shape == (256, 4) and torch.isfinite(s).all()
    gauss = torch.randn(256, 4, generator=torch.Generator().manual_seed(2)) * z.std(0) + z.mean(0)
    assert mmd(s, z[:256]) < 0.5 * mmd(gauss, z[:256])
    # both modes are populated
    side = (s.mean(1) > 1.0).float().mean().item()
    assert 0.2 < side < 0.8
    save_latent_ddpm(model, tmp_path)
    back = load_latent_ddpm(tmp_path)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(back.sample(4, steps=5, generator=g1), model.sample(4, steps=5, generator=g2))


def test_latent_ddpm_input_checks():
    with pytest.raises(ValueError):
        train_latent_ddpm(torch.zeros(1, 4), steps=1)
    with pytest.raises(ValueError, match="latent_dim"):
        train_latent_ddpm(torch.zeros(8, 4), LatentDDPMConfig(latent_dim=3), steps=1)
