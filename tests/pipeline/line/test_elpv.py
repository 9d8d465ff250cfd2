"""Tests for pipeline.line.elpv: loading, lots, and the deterministic pools."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.line.elpv import (
    POOLS,
    PROB_LEVELS,
    assign_lots,
    derive_lots,
    load_elpv,
    pool_indices,
    split_pools,
)


@pytest.fixture(scope="module")
def elpv():
    return load_elpv()


@pytest.fixture(scope="module")
def means(elpv):
    return elpv.images.reshape(len(elpv), -1).mean(axis=1)


def test_load_shapes_and_read_only(elpv):
    assert elpv.images.shape == (2624, 300, 300) and elpv.images.dtype == np.uint8
    assert set(np.unique(elpv.types)) == {"mono", "poly"}
    assert np.allclose(np.unique(elpv.probs), PROB_LEVELS)
    assert np.array_equal(elpv.index, np.arange(2624))
    assert load_elpv() is elpv  # cached
    with pytest.raises(ValueError):
        elpv.images[0, 0, 0] = 1


def test_lots_are_44_contiguous_single_type_blocks(elpv):
    lot = elpv.lot
    assert lot[0] == 0 and lot.max() == 43
    assert np.all(np.diff(lot) >= 0) and np.all(np.diff(lot) <= 1)
    sizes = np.bincount(lot)
    assert sizes.min() >= 48 and sizes.max() <= 72
    for lt in range(44):
        assert len(set(elpv.types[lot == lt])) == 1


def test_derive_lots_synthetic():
    types = ["a"] * 130 + ["b"] * 20 + ["a"] * 95
    lot = derive_lots(types, lot_size=60)
    # 130 = 60 + 70 (remainder 10 < 30 joins); 20 -> one lot; 95 = 60 + 35 (35 >= 30: own lot)
    assert np.bincount(lot).tolist() == [60, 70, 20, 60, 35]
    with pytest.raises(ValueError, match="lot_size"):
        derive_lots(types, lot_size=0)


def test_file_order_correlation_adjacent_high_random_low(elpv, means):
    adjacent = np.corrcoef(means[:-1], means[1:])[0, 1]
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(means))
    random_pairs = np.corrcoef(means[perm[:-1]], means[perm[1:]])[0, 1]
    assert adjacent > 0.7
    assert abs(random_pairs) < 0.1


def test_pools_disjoint_cover_all_and_whole_lots():
    table = split_pools()
    assert list(table.columns) == ["index", "prob", "type", "lot", "pool"]
    assert len(table) == 2624 and table["index"].is_unique
    assert set(table["pool"].astype(str)) == set(POOLS)
    assert (table.groupby("lot", observed=True)["pool"].nunique() == 1).all()
    parts = [pool_indices(p) for p in POOLS]
    assert sum(len(p) for p in parts) == 2624
    assert len(np.unique(np.concatenate(parts))) == 2624
    assert np.array_equal(pool_indices("all"), np.arange(2624))


def test_pools_fractions_and_stratification():
    table = split_pools()
    share = table["pool"].value_counts(normalize=True)
    for name, target in zip(POOLS, (0.6, 0.2, 0.2), strict=True):
        assert abs(share[name] - target) < 0.04, (name, share[name])
    for name in POOLS:
        sub = table[table["pool"] == name]
        for typ in ("mono", "poly"):
            levels = sub.loc[sub["type"] == typ, "prob"].round(6).unique()
            assert len(levels) == 4, (name, typ, levels)


def test_pools_deterministic_and_seeded():
    a, b = split_pools(seed=0), split_pools(seed=0)
    assert a.equals(b)
    c = split_pools(seed=1)
    assert not a["pool"].equals(c["pool"])
    a.loc[0, "pool"] = "train" if a.loc[0, "pool"] != "train" else "heldout"  # copies: cache not mutated
    assert split_pools(seed=0).equals(b)


def test_pool_indices_filters(elpv):
    idx = pool_indices("heldout", functional_only=True)
    assert len(idx) > 0 and np.all(elpv.probs[idx] == 0)
    idx = pool_indices("calibration", probs=[1.0], types=["mono"])
    assert len(idx) > 0 and np.all(elpv.probs[idx] == 1) and np.all(elpv.types[idx] == "mono")
    both = pool_indices(["calibration", "heldout"])
    assert np.array_equal(both, np.sort(np.concatenate([pool_indices("calibration"), pool_indices("heldout")])))
    assert np.array_equal(pool_indices("calibration,heldout"), both)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pool": "test"}, "unknown pool"),
        ({"pool": "train", "types": ["cigs"]}, "unknown cell type"),
    ],
)
def test_pool_indices_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pool_indices(**kwargs)


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.7, 0.2, 0.2), (0.8, 0.3, -0.1)])
def test_split_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        split_pools(fractions=fractions)


def test_assign_lots_pure_function():
    rng = np.random.default_rng(3)
    lot = np.repeat(np.arange(20), 10)
    types = np.where(lot < 10, "mono", "poly")
    probs = rng.choice(PROB_LEVELS, size=lot.size)
    m1 = assign_lots(lot, probs, types, seed=5)
    assert m1 == assign_lots(lot, probs, types, seed=5)
    counts = {p: sum(v == p for v in m1.values()) for p in POOLS}
    assert counts == {"train": 12, "calibration": 4, "heldout": 4}
