"""Fast checks of the peer baselines of the evidence benchmarks on tiny synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import baselines as B
from benchmarks.bench_drift_faults import Strata, make_window


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: small nets run faster and never spin on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _images(n: int, seed: int, size: int = 32, defect: bool = False) -> np.ndarray:
    """Smooth bright cells; defects carry a dark line."""
    rng = np.random.default_rng(seed)
    base = 150 + 20 * np.sin(np.linspace(0, 3, size))[None, :] + rng.normal(0, 3, (n, size, size))
    if defect:
        base[:, size // 2, 4:-4] = 20
    return np.clip(base, 0, 255).astype(np.uint8)


def test_downsample_shape_and_range():
    x = B.downsample(_images(3, 0, 40), 8)
    assert x.shape == (3, 64) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    with pytest.raises(ValueError):
        B.downsample(np.zeros((2, 3, 4, 5), np.uint8), 8)


@pytest.mark.parametrize("kind", ["mahalanobis", "reconstruction"])
def test_pixel_pca_ranks_defects_higher(kind):
    train = B.downsample(_images(60, 0), 16)
    ok, bad = B.downsample(_images(20, 1), 16), B.downsample(_images(20, 2, defect=True), 16)
    pca = B.PixelPCA(8, kind).fit(train)
    s_ok, s_bad = pca.score(ok), pca.score(bad)
    assert s_bad.min() > np.median(s_ok)
    assert pca.transform(ok).shape == (20, 8)


def test_pixel_pca_validation():
    with pytest.raises(ValueError, match="n_components"):
        B.PixelPCA(0)
    with pytest.raises(ValueError, match="score"):
        B.PixelPCA(2, "nope")
    with pytest.raises(ValueError, match="N > n_components"):
        B.PixelPCA(8).fit(np.zeros((5, 10)))
    with pytest.raises(RuntimeError, match="fit"):
        B.PixelPCA(2).score(np.zeros((2, 4)))


def test_conv_ae_learns_and_scores_defects_higher():
    ae = B.ConvAE(size=16, channels=8, latent=8, steps=80, batch_size=32, seed=0).fit(_images(64, 0))
    assert ae.losses_[-1] < ae.losses_[0]
    s_ok, s_bad = ae.score(_images(16, 1)), ae.score(_images(16, 2, defect=True))
    assert s_bad.mean() > s_ok.mean()
    assert ae.n_parameters() > 0
    with pytest.raises(ValueError):
        B.ConvAE(size=12)


def test_greedy_coreset_covers_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    X = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    idx = B.greedy_coreset(X, 3, proj_dim=2, seed=1)
    assert len(set(idx.tolist())) == 3
    assert sorted({int(i) // 50 for i in idx}) == [0, 1, 2]  # one point per cluster
    with pytest.raises(ValueError):
        B.greedy_coreset(X, 0)


def test_patchcore_scores_novel_patch():
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (10, 4, 3, 3)).astype(np.float16)
    test = rng.normal(0, 1, (4, 4, 3, 3)).astype(np.float16)
    test[2, :, 1, 1] = 25.0  # one far-away patch
    pc = B.PatchCore(coreset=None).fit(train)
    s = pc.score(test)
    assert s.shape == (4,) and int(np.argmax(s)) == 2
    assert pc.patch_scores(test).shape == (4, 3, 3)
    # an image from the bank is at distance 0
    assert pc.score(train[:1])[0] == pytest.approx(0.0, abs=1e-2)
    small = B.PatchCore(coreset=20).fit(train)
    assert small.bank_.shape == (20, 4)


def test_drift_tests_power_and_null():
    ref = np.random.default_rng(10).normal(0, 1, (300, 4))
    same = np.random.default_rng(11).normal(0, 1, (100, 4))
    shifted = np.random.default_rng(12).normal(0, 1, (100, 4)) + np.array([1.0, 0, 0, 0])
    assert B.ks_bh_test(ref, shifted).p < 1e-4
    assert B.ks_bh_test(ref, same).p > 0.01
    assert B.ks_test_1d(ref[:, 0], shifted[:, 0]).stat > B.ks_test_1d(ref[:, 0], same[:, 0]).stat
    m_shift, m_same = B.mmd_test(ref, shifted, n_permutations=50), B.mmd_test(ref, same, n_permutations=50)
    assert m_shift.p <= 1 / 51 + 1e-9 and m_same.p > 0.05
    assert m_shift.stat > m_same.stat


def test_make_window_strata_shares():
    strata = Strata(mono=np.arange(0, 10), poly=np.arange(10, 30), defect=np.arange(30, 35))
    rng = np.random.default_rng(0)
    w = make_window(rng, strata, 20, 0.5, 0.25, "iid")
    assert len(w) == 20
    assert np.isin(w, strata.defect).sum() == 5 and np.isin(w, strata.mono).sum() == 8  # round(0.5 * 15)
    lot = make_window(rng, strata, 40, 0.9, 0.0, "lot")  # 36 mono from 10: wraps around in file order
    mono = lot[np.isin(lot, strata.mono)]
    assert len(mono) == 36 and np.all(np.diff(mono) % 10 == 1)
    with pytest.raises(ValueError):
        make_window(rng, strata, 10, 0.5, 0.0, "nope")
