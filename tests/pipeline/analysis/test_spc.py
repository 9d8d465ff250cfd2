"""Tests for pipeline.analysis.spc: the lot bootstrap, EWMA run lengths, limits calibrated to an ARL0, the chart and its state."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.spc import (
    ChartNotReady,
    ChartStateMismatch,
    SpcChart,
    SpcConfig,
    calibrate_limit,
    change_point,
    ewma,
    lot_runs,
    resample_stream,
    run_alarms,
    stat_label,
    window_means,
)

NAMES = ["mean_intensity", "rotation_deg", "z_3"]
CFG = SpcConfig(arl0=50, n_windows=4000, n_segments=8, window=20, block=10)


def lots_data(rng: np.random.Generator, n_lots: int, size: int = 15, shift: np.ndarray | None = None) -> pd.DataFrame:
    """Cells of ``n_lots`` lots: a lot effect (sd 1) plus cell noise (sd 1) on each statistic; two products."""
    rows = []
    for lot in range(n_lots):
        prod = "mono" if lot % 3 == 0 else "poly"
        level = np.array([0.5, 0.0, 0.0]) + (0.1 if prod == "mono" else 0.0)
        effect = rng.normal(0, [0.02, 1.0, 1.0])
        cells = level + effect + rng.normal(0, [0.02, 1.0, 1.0], size=(size, 3))
        if shift is not None:
            cells = cells + shift
        rows += [{"lot": lot, "product": prod, **dict(zip(NAMES, c, strict=True))} for c in cells]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def fitted() -> tuple[SpcChart, pd.DataFrame]:
    rng = np.random.default_rng(0)
    hist = lots_data(rng, 120)
    chart = SpcChart("L1", "m1", CFG).fit(hist[NAMES], strata=hist["product"], lots=hist["lot"],
                                          signatures={"camera gain x0.9": [-0.05, 0.0, -0.5]})
    return chart, hist


def test_lot_runs_and_blocks():
    runs = lot_runs(7, [3, 3, 1, 1, 1, 3, 2])
    assert [r.tolist() for r in runs] == [[0, 1], [2, 3, 4], [5], [6]]
    assert [r.tolist() for r in lot_runs(5, None, block=2)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="lots has 2 labels for 5 rows"):
        lot_runs(5, [1, 2])


def test_resample_stream_is_made_of_whole_runs():
    runs = lot_runs(12, [0] * 5 + [1] * 4 + [2] * 3)
    pos = resample_stream(runs, 40, np.random.default_rng(1))
    assert len(pos) == 40
    starts = {0: 5, 5: 4, 9: 3}
    i = 0
    while i + 5 <= 35:  # every run starts at a lot start and runs to its end
        n = starts[int(pos[i])]
        assert pos[i : i + n].tolist() == list(range(pos[i], pos[i] + n))
        i += n


def test_window_means_and_ewma():
    D = np.arange(10, dtype=float)[:, None]
    assert window_means(D, np.arange(10), 4).ravel().tolist() == [1.5, 5.5]
    V = np.random.default_rng(2).normal(size=(30, 2))
    E = ewma(V, 0.3)
    e = np.zeros(2)
    for t in range(30):
        e = 0.7 * e + 0.3 * V[t]
    assert np.allclose(E[-1], e)


def test_run_alarms_equals_a_chart_that_restarts():
    rng = np.random.default_rng(3)
    V = rng.normal(size=(3000, 2))
    lam, h = 0.2, 1.0

    def stat(E):
        return np.sum(E * E, axis=-1) * (2 - lam) / lam / 4

    naive, e = [], np.zeros(2)
    for t in range(len(V)):
        e = (1 - lam) * e + lam * V[t]
        if stat(e) > h:
            naive.append(t)
            e = np.zeros(2)
    assert run_alarms(ewma(V, lam), stat, h, lam, chunk=97) == naive
    assert len(naive) > 10


def test_calibrated_limit_holds_its_arl_on_fresh_data():
    rng = np.random.default_rng(4)
    lam = 0.2

    def stat(E):
        return np.abs(E[..., 0])

    h, arl = calibrate_limit([(ewma(rng.normal(size=(40000, 1)), lam), stat)], lam, 100)
    assert arl == pytest.approx(100, rel=0.1)
    fresh = ewma(rng.normal(size=(40000, 1)), lam)
    assert 40000 / len(run_alarms(fresh, stat, h, lam)) == pytest.approx(100, rel=0.25)
    with pytest.raises(ValueError, match="cannot calibrate an ARL0 of 100"):
        calibrate_limit([(fresh[:100], stat)], lam, 100)


def test_change_point_finds_the_step():
    rng = np.random.default_rng(5)
    errors = []
    for _ in range(40):
        V = rng.normal(size=(60, 8))
        V[35:, 0] += 1.5
        errors.append(abs(change_point(V, np.eye(8)[0]) - 35))
    assert np.median(errors) <= 2 and np.mean(np.array(errors) <= 5) >= 0.8
    V = np.zeros((20, 2))
    V[12:, 0] = -1.0  # a step against the direction is not a step along it
    assert change_point(V, np.array([-1.0, 0.0])) == 12 and change_point(V, np.array([1.0, 0.0])) == 0


def test_stat_labels():
    assert stat_label("mean_intensity").label == "brightness"
    assert stat_label("z_3").label == "latent z_03" and stat_label("z07").unit == "sd"
    assert stat_label("something").label == "something"


def test_fit_calibrates_the_arl_and_stays_quiet_in_control(fitted):
    chart, _ = fitted
    assert chart.arl0_fit == pytest.approx(CFG.arl0 * CFG.arl0_margin, rel=0.15)  # the bootstrap target
    rng = np.random.default_rng(6)
    fresh = lots_data(rng, 300)
    alarms = 0
    for w in range(len(fresh) // CFG.window):
        part = fresh.iloc[w * CFG.window : (w + 1) * CFG.window]
        point = chart.update(f"w{w}", part[NAMES], strata=part["product"])
        if point.alarm:
            alarms += 1
            chart.reset()
    n_windows = len(fresh) // CFG.window
    assert alarms <= 3 * n_windows / CFG.arl0  # an ARL near 50 gives about 4-5 alarms in 225 windows


def test_a_persistent_gain_drop_is_found_named_and_matched(fitted):
    chart, _ = fitted
    chart = SpcChart.from_dict(chart.to_dict(), line="L1", model_id="m1")
    chart.reset()
    rng = np.random.default_rng(7)
    faulty = lots_data(rng, 40, shift=np.array([-0.05, 0.0, -0.5]))
    for w in range(len(faulty) // CFG.window):
        part = faulty.iloc[w * CFG.window : (w + 1) * CFG.window]
        point = chart.update(f"f{w}", part[NAMES], strata=part["product"])
        if point.alarm:
            break
    assert point.alarm and point.since_reset <= 8
    assert point.top.name == "mean_intensity" and -14 < point.top.value < -6  # a 10 % step, estimated
    assert point.text.startswith("persistent shift since window f")
    assert ": brightness -" in point.text
    assert point.pattern == "camera gain x0.9" and 0.5 < point.pattern_size < 1.6
    assert "matches camera gain x0.9" in point.text
    assert point.change_window == chart.shift_since == "f0"
    assert chart.since_reset == 0 and not chart.ewma_state.any()  # restarted after the alarm, the shift kept
    assert chart.shift is not None and chart.shift[0] < 0


def windows_of(data: pd.DataFrame) -> list[pd.DataFrame]:
    return [data.iloc[w * CFG.window : (w + 1) * CFG.window] for w in range(len(data) // CFG.window)]


def test_a_shift_that_ends_stops_at_its_first_clean_window(fitted):
    chart, _ = fitted
    chart = SpcChart.from_dict(chart.to_dict(), line="L1", model_id="m1")
    rng = np.random.default_rng(11)
    big = windows_of(lots_data(rng, 4, size=20, shift=np.array([-0.15, 3.0, 3.0])))[:3]
    points = [chart.update(f"f{w}", part[NAMES], strata=part["product"]) for w, part in enumerate(big)]
    assert all(p.alarm for p in points)  # a large shift alarms in every window, the EWMA restarted after each
    clean = windows_of(lots_data(rng, 30, size=20))
    after = [chart.update(f"c{w}", part[NAMES], strata=part["product"]) for w, part in enumerate(clean)]
    assert not after[0].alarm and not after[0].ongoing  # without the restart its EWMA would still alarm
    assert chart.shift is None
    assert sum(p.alarm for p in after) <= 3  # in control again (ARL0 50)


def test_a_small_shift_that_goes_on_stays_ongoing_between_its_alarms(fitted):
    chart, _ = fitted
    chart = SpcChart.from_dict(chart.to_dict(), line="L1", model_id="m1")
    rng = np.random.default_rng(12)
    small = windows_of(lots_data(rng, 60, shift=np.array([-0.05, 0.0, -0.5])))
    points = [chart.update(f"s{w}", part[NAMES], strata=part["product"]) for w, part in enumerate(small)]
    first = next(i for i, p in enumerate(points) if p.alarm)
    later = points[first:]
    assert sum(p.alarm for p in later) < len(later)  # the restarted chart does not alarm in every window ...
    firing = [p.alarm or p.ongoing for p in later]
    assert sum(firing) >= 0.9 * len(later)  # ... but the shift is followed in (nearly) all of them
    assert not any(a is b is False for a, b in zip(firing, firing[1:], strict=False))  # never two quiet in a row
    held = next(p for p in later if p.ongoing)
    assert held.text.startswith("persistent shift since window s") and "goes on" in held.text
    assert held.change_window is not None and held.shifts


def test_return_llr_weighs_a_window_between_the_shift_and_the_centre():
    from pipeline.analysis.spc import return_llr

    P, d = np.eye(2), np.array([2.0, 0.0])
    assert return_llr(d, d, P) == pytest.approx(2.0)  # at the shift: + |d|^2 / 2
    assert return_llr(np.zeros(2), d, P) == pytest.approx(-2.0)  # at the centre: - |d|^2 / 2
    assert return_llr(d / 2, d, P) == pytest.approx(0.0)  # half way


def test_product_mix_alone_is_not_a_shift(fitted):
    chart, _ = fitted
    chart = SpcChart.from_dict(chart.to_dict(), line="L1", model_id="m1")
    rng = np.random.default_rng(8)
    mono = lots_data(rng, 200)
    mono = mono[mono["product"] == "mono"].reset_index(drop=True)
    alarms = 0
    for w in range(len(mono) // CFG.window):
        part = mono.iloc[w * CFG.window : (w + 1) * CFG.window]
        if chart.update(f"m{w}", part[NAMES], strata=part["product"]).alarm:
            alarms += 1
            chart.reset()
    assert alarms <= 3  # about 50 windows at an ARL0 of 50


def test_bad_window_input_gives_messages(fitted):
    chart, _ = fitted
    chart = SpcChart.from_dict(chart.to_dict(), line="L1", model_id="m1")
    rng = np.random.default_rng(9)
    part = lots_data(rng, 2)[NAMES].iloc[:20].copy()
    part["rotation_deg"] = np.nan
    point = chart.update("bad", part, strata=["cigs"] * 20)
    assert any("stratum cigs not in the chart's in-control history" in m for m in point.messages)
    assert any("rotation missing in every cell" in m for m in point.messages)
    with pytest.raises(ValueError, match=r"statistics \['z_3'\] missing"):
        chart.update("bad2", part.drop(columns=["z_3"]))


def test_update_is_idempotent_and_reset_restarts(fitted):
    chart, hist = fitted
    chart = SpcChart.from_dict(chart.to_dict(), line="L1", model_id="m1")
    part = hist.iloc[:20]
    first = chart.update("same", part[NAMES], strata=part["product"])
    n = chart.n_windows
    again = chart.update("same", part[NAMES], strata=part["product"])
    assert again == first and chart.n_windows == n
    chart.reset()
    assert chart.since_reset == 0 and not chart.ewma_state.any()


def test_state_round_trip_and_refusals(fitted, tmp_path):
    chart, hist = fitted
    chart = SpcChart.from_dict(chart.to_dict(), line="L1", model_id="m1")
    part = hist.iloc[20:40]
    chart.update("a", part[NAMES], strata=part["product"])
    path = tmp_path / "spc" / "L1.json"
    chart.save(path)
    back = SpcChart.load(path, line="L1", model_id="m1")
    nxt = hist.iloc[40:60]
    assert back.update("b", nxt[NAMES], strata=nxt["product"]) == chart.update("b", nxt[NAMES], strata=nxt["product"])
    with pytest.raises(ChartStateMismatch, match="line 'L1' and model 'm1' cannot serve line 'L1' and model 'm2'"):
        SpcChart.load(path, line="L1", model_id="m2")
    with pytest.raises(ChartStateMismatch, match="cannot serve line 'L9'"):
        SpcChart.load(path, line="L9", model_id="m1")
    path.write_text("[1, 2")
    with pytest.raises(ChartStateMismatch, match="not valid JSON"):
        SpcChart.load(path, line="L1", model_id="m1")
    path.write_text(json.dumps({"kind": "other"}))
    with pytest.raises(ChartStateMismatch, match="not a control-chart state"):
        SpcChart.load(path, line="L1", model_id="m1")


def test_the_kept_shift_survives_the_state_and_old_states_have_none(fitted, tmp_path):
    chart, _ = fitted
    chart = SpcChart.from_dict(chart.to_dict(), line="L1", model_id="m1")
    rng = np.random.default_rng(13)
    for w, part in enumerate(windows_of(lots_data(rng, 2, size=20, shift=np.array([-0.15, 3.0, 3.0])))):
        chart.update(f"f{w}", part[NAMES], strata=part["product"])
    assert chart.shift is not None
    chart.save(tmp_path / "L1.json")
    back = SpcChart.load(tmp_path / "L1.json", line="L1", model_id="m1")
    assert np.allclose(back.shift, chart.shift) and back.shift_since == chart.shift_since and back.back == chart.back
    old = {k: v for k, v in chart.to_dict().items() if k not in ("shift", "shift_since", "back")}
    assert SpcChart.from_dict(old, line="L1", model_id="m1").shift is None
    back.reset()
    assert back.shift is None and back.shift_since is None
    with pytest.raises(ValueError, match="back_limit must be > 0"):
        SpcConfig(back_limit=0)


def test_bad_configuration_and_history():
    with pytest.raises(ValueError, match="arl0 must be >= 2"):
        SpcConfig(arl0=1)
    with pytest.raises(ValueError, match="lam must be in"):
        SpcConfig(lam=0)
    with pytest.raises(ValueError, match="n_windows"):
        SpcConfig(arl0=200, n_windows=100)
    with pytest.raises(ValueError, match="needs at least 40"):
        SpcChart("L1", config=CFG).fit(np.zeros((10, 1)), names=["x"])
    with pytest.raises(RuntimeError, match="not fitted"):
        SpcChart("L1").update("w", np.zeros((3, 1)))
    with pytest.raises(ValueError, match="non-empty"):
        SpcChart("")
    with pytest.raises(ValueError, match="min_lots must be >= 1"):
        SpcConfig(min_lots=0)


def test_a_history_of_too_few_lots_carries_no_chart():
    hist = lots_data(np.random.default_rng(1), 3, size=20)  # 60 rows: enough rows, too few lots
    with pytest.raises(ChartNotReady, match="holds 1 lots; a chart needs at least 2"):
        SpcChart("L1", config=CFG).fit(hist[NAMES], lots=np.zeros(len(hist)))
    with pytest.raises(ChartNotReady, match="holds 3 lots; a chart needs at least 5"):
        SpcChart("L1", config=replace(CFG, min_lots=5)).fit(hist[NAMES], lots=hist["lot"])
    assert SpcChart("L1", config=CFG).fit(hist[NAMES]).is_fitted  # without lot labels: 6 blocks of 10 rows
    with pytest.raises(ChartNotReady, match="holds 6 blocks of 10 images; a chart needs at least 7"):
        SpcChart("L1", config=replace(CFG, min_lots=7)).fit(hist[NAMES])


def test_clipping_bounds_each_window_and_held_out_lots_or_a_refitted_covariance_widen_the_limit():
    rng = np.random.default_rng(11)
    hist = lots_data(rng, 80)
    cfg = SpcConfig(arl0=50, n_windows=3000, n_segments=6, window=20, block=10, refit_covariance=False,
                    arl0_margin=1.5)
    plain = SpcChart("L1", "m1", cfg).fit(hist[NAMES], lots=hist["lot"])
    clipped = SpcChart("L1", "m1", SpcConfig(**{**cfg.__dict__, "clip_quantile": 0.9})).fit(hist[NAMES],
                                                                                             lots=hist["lot"])
    V = rng.normal(0, 5, size=(50, 3))
    lengths = np.sqrt(np.einsum("ti,ij,tj->t", clipped.clipped(V), clipped.precision, clipped.clipped(V)))
    assert lengths.max() <= clipped.estimate.clip + 1e-9 and np.isfinite(clipped.estimate.clip)
    assert np.array_equal(plain.clipped(V), V)  # off by default
    again = SpcChart.from_dict(json.loads(json.dumps(clipped.to_dict())), line="L1", model_id="m1")
    assert again.estimate.clip == pytest.approx(clipped.estimate.clip)
    held = SpcChart("L1", "m1", SpcConfig(**{**cfg.__dict__, "holdout": 0.3})).fit(hist[NAMES], lots=hist["lot"])
    assert held.t2_limit > plain.t2_limit  # lots the chart never saw look further away than its own lots
    refit = SpcChart("L1", "m1", SpcConfig(**{**cfg.__dict__, "refit_covariance": True})).fit(hist[NAMES],
                                                                                              lots=hist["lot"])
    assert refit.t2_limit > plain.t2_limit  # the covariance's own estimation error is allowed for
    assert SpcConfig().refit_covariance and SpcConfig().arl0_margin == 1.15


def test_a_shift_against_a_pattern_is_not_named_as_that_fault(fitted):
    chart, _ = fitted
    chart = SpcChart.from_dict(chart.to_dict(), line="L1", model_id="m1")
    chart.reset()
    rng = np.random.default_rng(9)
    brighter = lots_data(rng, 40, shift=np.array([0.05, 0.0, 0.5]))  # a gain rise: the gain drop's opposite
    for w in range(len(brighter) // CFG.window):
        part = brighter.iloc[w * CFG.window : (w + 1) * CFG.window]
        point = chart.update(f"b{w}", part[NAMES], strata=part["product"])
        if point.alarm:
            break
    assert point.alarm and point.top.name == "mean_intensity" and point.top.value > 0
    assert point.pattern is None and "matches" not in point.text


def test_a_one_sided_pattern_alarms_only_its_own_way_and_gets_a_lower_limit(fitted):
    _, hist = fitted
    blur = {"defocus blur 1 px": [0.0, 0.0, 0.8]}
    fit = {"strata": hist["product"], "lots": hist["lot"], "signatures": blur}
    both = SpcChart("L1", "m1", CFG).fit(hist[NAMES], **fit)
    one = SpcChart("L1", "m1", CFG).fit(hist[NAMES], **fit, one_sided={"defocus blur 1 px"})
    assert one.pattern_one_sided.tolist() == [True] and both.pattern_one_sided.tolist() == [False]
    assert one.pattern_limit < both.pattern_limit  # one direction to watch instead of two
    along = 1.5 * np.array(blur["defocus blur 1 px"]) * CFG.lam
    for E in (along, -along):  # the pattern's way and the opposite way
        u = both.pattern_scores(E)[0]
        assert both.statistic(E) == pytest.approx(max(both.t2(E) / both.t2_limit, abs(u) / both.pattern_limit))
    assert one.statistic(along) == pytest.approx(max(one.t2(along) / one.t2_limit,
                                                     one.pattern_scores(along)[0] / one.pattern_limit))
    assert one.statistic(-along) == pytest.approx(one.t2(-along) / one.t2_limit)  # only the MEWMA sees it
    back = SpcChart.from_dict(json.loads(json.dumps(one.to_dict())), line="L1", model_id="m1")
    assert back.pattern_one_sided.tolist() == [True] and back.statistic(-along) == pytest.approx(one.statistic(-along))
    old = {k: v for k, v in one.to_dict().items() if k != "pattern_one_sided"}  # a state from before: both ways
    assert SpcChart.from_dict(old, line="L1", model_id="m1").pattern_one_sided.tolist() == [False]
