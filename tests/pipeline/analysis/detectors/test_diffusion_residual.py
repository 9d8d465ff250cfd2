"""DiffusionResidual: the detector logic with a known denoiser, and the real (tiny, untrained) InfoDiffusion API."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.analysis.detectors import (
    DetectionResult,
    DiffusionResidual,
    Ensemble,
    Mahalanobis,
    NotFittedError,
)


class SmoothingDenoiser(torch.nn.Module):
    """Stand-in model whose "denoiser" knows that normal images are smooth.

    partial_denoise adds forward noise of level t and removes it with a 5x5 box filter: smooth images come back
    almost unchanged, high-frequency content (noise, a scratch) is "healed" away, so it shows in the residual.
    """

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(
            in_channels=1, image_size=size, diffusion=SimpleNamespace(num_timesteps=1000)
        )
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def encode(self, x):
        return x.mean(dim=(1, 2, 3))[:, None]

    def partial_denoise(self, x0, t_start, steps, z=None, generator=None, noise=None):
        self.calls += 1
        sigma = t_start / 1000.0
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        x_t = x0 + sigma * noise.expand_as(x0)
        return F.avg_pool2d(F.pad(x_t, (2, 2, 2, 2), mode="replicate"), 5, stride=1).clamp(-1, 1)


def smooth_images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(n, 1, 4, 4, generator=g), size=size, mode="bicubic", align_corners=False)
    return (0.4 * x).clamp(-1, 1)


def add_noise(x: torch.Tensor, sd: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sd * torch.randn(x.shape, generator=g)).clamp(-1, 1)


@pytest.mark.parametrize("reduce", ["mse", "l1", "q99"])
def test_separates_noisy_from_clean(reduce):
    det = DiffusionResidual(SmoothingDenoiser(), t_stars=(50, 150), steps=5, seeds=(0, 1), reduce=reduce)
    det.fit(smooth_images(64, 0)).infer_threshold(smooth_images(100, 1), fpr=0.05)
    clean, noisy = smooth_images(40, 2), add_noise(smooth_images(40, 2), 0.25, 3)
    s_clean, s_noisy = det.score(clean), det.score(noisy)
    auroc = (s_noisy[:, None] > s_clean[None, :]).mean()
    assert auroc > 0.95
    res = det.predict(noisy)
    assert isinstance(res, DetectionResult) and res.is_anomaly.mean() > 0.8
    assert det.predict(clean).is_anomaly.mean() <= 0.2


def test_local_defect_q99_beats_mean():
    clean = smooth_images(40, 5)
    scratched = clean.clone()
    scratched[:, :, 8, 3:9] = 1.0  # a short bright line: 6 of 256 pixels
    sep = {}
    for reduce in ("mse", "q99"):
        det = DiffusionResidual(SmoothingDenoiser(), t_stars=(50,), steps=2, reduce=reduce).fit(
            smooth_images(64, 6)
        )
        sep[reduce] = (det.score(scratched)[:, None] > det.score(clean)[None, :]).mean()
    assert sep["q99"] >= sep["mse"] and sep["q99"] > 0.9


def test_shapes_batching_determinism_and_errors():
    model = SmoothingDenoiser()
    det = DiffusionResidual(model, t_stars=(50, 150, 300), steps=3, batch_size=7, progress=False)
    with pytest.raises(NotFittedError, match="DiffusionResidual has not been fit"):
        det.score(smooth_images(4, 0))
    X = smooth_images(20, 0)
    det.fit(X)
    assert det.n_features_in_ == (1, 16, 16) and det.ref_residuals_.shape == (20, 3)
    assert model.calls == 3 * 3  # 3 batches x 3 t*
    assert det.residuals(X).shape == (20, 3)
    a = det.score(X[:9])
    np.testing.assert_array_equal(a, det.score(X[:9]))  # seeded generators
    other = DiffusionResidual(
        model, t_stars=(50, 150, 300), steps=3, batch_size=7, seeds=(1,), progress=False
    )
    assert not np.array_equal(a, other.fit(X).score(X[:9]))
    np.testing.assert_allclose(det.score(X[:9].numpy()), a)  # numpy float input
    with pytest.raises(ValueError, match="to_model_input"):
        det.score((X[:4].numpy() * 127 + 128).astype(np.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        det.score(X[:4] * 5)
    bad = X[:4].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        det.score(bad)
    with pytest.raises(ValueError, match="16"):
        det.score(torch.zeros(2, 1, 8, 8))
    for kw in ({"t_stars": (0,)}, {"t_stars": (1000,)}, {"steps": 0}, {"reduce": "max"}, {"seeds": ()}):
        with pytest.raises(ValueError):
            DiffusionResidual(model, **kw)
    with pytest.raises(ValueError, match="partial_denoise"):
        DiffusionResidual(object())
    assert det.get_params()["model"] == "SmoothingDenoiser"


def test_in_ensemble_with_latent_detector():
    det = DiffusionResidual(SmoothingDenoiser(), t_stars=(100,), steps=2).fit(smooth_images(64, 0))
    rng = np.random.default_rng(0)
    Z_ref = rng.normal(size=(64, 3))
    lat = Mahalanobis().fit(Z_ref)
    val_imgs, Z_val = smooth_images(100, 1), rng.normal(size=(100, 3))
    ens = Ensemble(["diffusion", "mahalanobis"]).fit_scores(
        np.column_stack([det.reference_scores_, lat.score(Z_ref)])
    )
    ens.infer_threshold_from_matrix(np.column_stack([det.score(val_imgs), lat.score(Z_val)]), fpr=0.05)
    noisy = add_noise(smooth_images(20, 2), 0.3, 1)
    res = ens.predict_from_matrix(np.column_stack([det.score(noisy), lat.score(rng.normal(size=(20, 3)))]))
    assert res.is_anomaly.mean() > 0.8


def test_real_tiny_infodiffusion_runs():
    models = pytest.importorskip("models")
    torch.manual_seed(0)
    model = models.InfoDiffusion(models.get_preset("tiny").model)
    det = DiffusionResidual(model, t_stars=(20, 60), steps=2, batch_size=4, progress=False)
    X = smooth_images(8, 0)
    det.fit(X)
    s = det.score(X[:4])
    assert s.shape == (4,) and np.isfinite(s).all()
    np.testing.assert_array_equal(s, det.score(X[:4]))  # deterministic given the seeds
    assert model.training  # the detector restores the model's mode


def two_kinds_of_images(n: int, seed: int) -> torch.Tensor:
    """Half smooth dark images, half brighter ones with a fine texture that is normal for them (like poly cells)."""
    x = smooth_images(n, seed)
    kind1 = torch.arange(n) % 2 == 1
    x[~kind1] = (x[~kind1] - 0.4).clamp(-1, 1)
    x[kind1] = add_noise((x[kind1] + 0.4).clamp(-1, 1), 0.2, seed + 100)
    return x


def test_context_z_judges_residuals_against_similar_images():
    ref, normal = two_kinds_of_images(120, 0), two_kinds_of_images(60, 1)
    # defective smooth cells: noise weaker than the normal texture of the other kind
    defect = add_noise(two_kinds_of_images(60, 2)[0::2], 0.15, 7)
    normal_kind0, normal_kind1 = normal[0::2], normal[1::2]
    y = np.r_[np.zeros(60), np.ones(30)]
    auroc = {}
    for context in ("z", "none"):
        det = DiffusionResidual(SmoothingDenoiser(), t_stars=(50,), steps=2, context=context, k=15, progress=False)
        det.fit(ref)
        s = np.r_[det.score(normal_kind0), det.score(normal_kind1), det.score(defect)]
        auroc[context] = roc_auc(y, s)
    assert auroc["z"] > 0.95 and auroc["none"] < 0.7


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    return float((pos[:, None] > neg[None, :]).mean())


def test_residuals_do_not_depend_on_the_batch():
    X = smooth_images(12, 0)
    a = DiffusionResidual(SmoothingDenoiser(), t_stars=(50, 150), steps=2, batch_size=5, progress=False)
    b = DiffusionResidual(SmoothingDenoiser(), t_stars=(50, 150), steps=2, batch_size=12, progress=False)
    np.testing.assert_allclose(a.residuals(X)[3:9], b.residuals(X[3:9]), rtol=1e-6)
    Z, R = a.latents_and_residuals(X)
    assert Z.shape == (12, 1) and R.shape == (12, 2)
    a.fit(X)
    np.testing.assert_allclose(a.score_residuals(Z, R), a.score(X))
    for kw in ({"context": "lot"}, {"k": 2}):
        with pytest.raises(ValueError):
            DiffusionResidual(SmoothingDenoiser(), **kw)


def test_given_codes_replace_the_encoder():
    X = smooth_images(10, 1)
    model = SmoothingDenoiser()
    det = DiffusionResidual(model, t_stars=(50, 150), steps=2, batch_size=4, progress=False)
    Z, R = det.latents_and_residuals(X)
    Zg, Rg = det.latents_and_residuals(X, Z)  # the encoder's own codes, given: the same residuals
    np.testing.assert_allclose(Zg, Z)
    np.testing.assert_allclose(Rg, R, rtol=1e-6)
    seen = []
    model.partial_denoise = lambda x0, t_start, steps, z=None, noise=None: seen.append(z.clone()) or x0
    det.residuals(X, np.full((10, 1), 7.0))  # a "pretrained" encoder's codes reach the denoiser as given
    assert seen and all(bool((z == 7.0).all()) for z in seen)
    for bad in (np.zeros((9, 1)), np.zeros(10), np.full((10, 1), np.nan)):
        with pytest.raises(ValueError, match="Z"):
            det.residuals(X, bad)
