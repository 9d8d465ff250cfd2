"""Tests of bench_patch's patch embedding (the patch map recipe) and its metrics."""

import numpy as np

from benchmarks import bench_patch as B


def _features(tmp_path, monkeypatch, n=6):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "f256_bf16_b10.npy", rng.normal(size=(n, 112, 16, 16)).astype(np.float16))
    np.save(tmp_path / "f256_bf16_b15.npy", rng.normal(size=(n, 320, 8, 8)).astype(np.float16))
    monkeypatch.setenv("LINEWATCH_BENCH_FEATURES", str(tmp_path))


def test_patch_embed_shape_and_order(tmp_path, monkeypatch):
    _features(tmp_path, monkeypatch)
    idx = np.array([4, 1, 3])
    E = B.patch_embed(256, (10, 15), idx).numpy()
    assert E.shape == (3, 432, 8, 8)
    single = B.patch_embed(256, (10, 15), np.array([1])).numpy()
    np.testing.assert_allclose(E[1], single[0], rtol=1e-6)  # rows follow idx, not sorted order
    fine = B.patch_embed(256, (10, 15), idx, fine=True, dim=64).numpy()
    assert fine.shape == (3, 64, 16, 16)


def test_metrics_and_bootstrap():
    y = np.r_[np.zeros(30), np.ones(10)].astype(int)
    types = np.array(["mono", "poly"] * 20)
    s = y + np.random.default_rng(1).normal(0, 0.3, 40)
    m = B.metrics(y, types, s, B._boot_idx(y, reps=50))
    assert 0.9 < m["auroc"] <= 1.0 and m["ci"][0] <= m["auroc"] <= m["ci"][1] and len(m["boot"]) == 50
