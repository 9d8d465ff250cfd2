"""bench_spc: the chart replayed on a fault stream, summaries and golden captures (synthetic lots, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import bench_spc as B
from benchmarks import common as C
from benchmarks import spc_data as D
from tests.benchmarks.test_spc_data import synthetic


def test_replay_finds_a_gain_drop_and_names_brightness():
    from pipeline.analysis.spc import SpcChart, SpcConfig, lot_runs, resample_stream

    d = synthetic(np.random.default_rng(8), n_lots=30)
    runs = lot_runs(len(d.lots), d.lots)
    run_types = np.array([d.types[r[0]] for r in runs])
    rng = np.random.default_rng(9)
    p1 = resample_stream(runs, 60 * D.WINDOW, rng)
    F = {C.slug(v): d.cells(v, 0.0) for v in D.VARIANTS}
    chart = SpcChart("t", "m0", SpcConfig(arl0=50, n_windows=3000, n_segments=6)).fit(
        F["clean"][p1], names=d.names, strata=d.types[p1], lots=d.lots[p1])
    rep = B.Rep(0, p1, F, chart, runs, run_types, 0.0)
    out = B.replay(rep, d, D.fault_run("gain x0.9", d, runs, run_types, 10, 40, rng), 10, "t")
    assert out["delay"] is not None and out["delay"] <= 10
    assert out["top"] == "mean_intensity" and "brightness -" in out["text"]


def test_summaries():
    s = B.delay_summary([1, 2, 3, None])
    assert s["median"] == 2.5 and s["within_2"] == 0.5 and s["detected"] == 0.75 and s["p90"] == np.inf
    a = B.arl_summary(1000, 4, [100, 300, 200, 250])
    assert a["arl"] == 250 and a["q50"] == 225 and a["share_below_50"] == 0.0
    assert B.arl_summary(100, 0, [])["arl"] == np.inf


def test_golden_capture_jitter_and_faults():
    img = np.full((64, 64), 120, np.uint8)
    img[20:44, 20:44] = 200
    clean = [B.golden_capture(img, "clean", np.random.default_rng(i)).mean() for i in range(20)]
    gain = [B.golden_capture(img, "gain x0.9", np.random.default_rng(i)).mean() for i in range(20)]
    assert 0.003 < np.std(clean) / np.mean(clean) < 0.03  # excitation jitter of about 1 %
    assert np.mean(gain) / np.mean(clean) == pytest.approx(0.9, abs=0.01)



def test_peer_erts_option_takes_positive_numbers_only():
    import argparse

    import pytest

    assert B._erts("200,600") == (200.0, 600.0)
    for bad in ("", "200,x", "0", "-5,200"):
        with pytest.raises(argparse.ArgumentTypeError):
            B._erts(bad)
