"""spc_data: the chart's per-cell statistics and the lot-ordered streams with the simulator's faults (synthetic lots)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import common as C
from benchmarks import spc_data as D


def synthetic(rng: np.random.Generator, n_lots: int = 12, per_lot: int = 50) -> D.Data:
    """Lots with a lot effect on every statistic; image faults shift brightness (gain) or fine detail (blur)."""
    n = n_lots * per_lot
    lots = np.repeat(np.arange(n_lots), per_lot)
    types = np.where(lots % 3 == 0, "mono", "poly")
    k = len(D.STATS)
    base = np.repeat(rng.normal(size=(n_lots, k)), per_lot, axis=0) + 0.3 * rng.normal(size=(n, k)) + 20.0
    z = np.repeat(rng.normal(size=(n_lots, 2)), per_lot, axis=0) + 0.3 * rng.normal(size=(n, 2))
    stats, zs, scores, score = {}, {}, {}, rng.normal(size=n)
    for v in D.VARIANTS:
        s = base.copy()
        if v.startswith("gain"):
            s[:, 0] *= D.IMAGE_FAULTS[v][1]
        if v.startswith("blur"):
            s[:, D.STATS.index("detail_ratio")] += 3.0
        stats[C.slug(v)], zs[C.slug(v)], scores[C.slug(v)] = s, z, score
    defective = rng.random(n) < 0.27
    return D.Data(stats, zs, scores, lots, types, defective, {"model_id": "m0"})


def test_data_columns_and_tail_indicator():
    d = synthetic(np.random.default_rng(0))
    X = d.cells("gain x0.9", tail_threshold=0.0)
    assert X.shape == (len(d.lots), len(d.names)) and d.names[-1] == "score_tail" and d.names[len(D.STATS)] == "z_0"
    assert set(np.unique(X[:, -1])) <= {0.0, 1.0}
    assert np.allclose(X[:, 0], d.stats["clean"][:, 0] * 0.9)


def test_mix_stream_draws_lots_of_the_asked_type():
    from pipeline.analysis.spc import lot_runs

    d = synthetic(np.random.default_rng(1))
    runs = lot_runs(len(d.lots), d.lots)
    run_types = np.array([d.types[r[0]] for r in runs])
    pos = D.mix_stream(runs, run_types, 20000, 0.81, np.random.default_rng(2))
    assert len(pos) == 20000 and np.mean(d.types[pos] == "mono") == pytest.approx(0.81, abs=0.05)


def test_defect_stream_raises_the_defect_share_within_lots():
    from pipeline.analysis.spc import lot_runs, resample_stream

    d = synthetic(np.random.default_rng(3))
    runs = lot_runs(len(d.lots), d.lots)
    pos = resample_stream(runs, 6000, np.random.default_rng(4))
    out = D.defect_stream(pos, d, 0.57, np.random.default_rng(5))
    assert np.mean(d.defective[pos]) == pytest.approx(0.27, abs=0.05)
    assert np.mean(d.defective[out]) == pytest.approx(0.57, abs=0.04)
    assert np.mean(d.types[out] == d.types[pos]) == 1.0  # borrowed cells keep the lot's product type
    assert np.mean(d.lots[out] == d.lots[pos]) > 0.7  # most cells still come from their own lot


def test_fault_runs_switch_at_the_onset():
    from pipeline.analysis.spc import lot_runs

    d = synthetic(np.random.default_rng(6))
    runs = lot_runs(len(d.lots), d.lots)
    run_types = np.array([d.types[r[0]] for r in runs])
    rng = np.random.default_rng(7)
    r = D.fault_run("blur 1 px", d, runs, run_types, 5, 12, rng)
    assert r.variants == ("clean",) * 5 + ("blur 1 px",) * 7 and len(r.pos) == 12 * D.WINDOW
    assert D.fault_run("no fault", d, runs, run_types, 5, 12, rng).variants == ("clean",) * 12
    F = {C.slug(v): d.cells(v, 0.0) for v in D.VARIANTS}
    X = D.run_matrix(F, r)
    detail = D.STATS.index("detail_ratio")
    assert np.allclose(X[5 * D.WINDOW :, detail] - F["clean"][r.pos[5 * D.WINDOW :], detail], 3.0)
