"""The monitor's control chart: statistics, per-line state, the ``spc:<statistic>`` cause through the alert manager."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.axes import attribute
from pipeline.monitoring import alerts as AL
from pipeline.monitoring.causes import window_causes
from pipeline.monitoring.charts import (
    CAMERA_PATTERNS,
    FAMILY,
    ONE_SIDED_PATTERNS,
    ChartedResult,
    ChartNotReady,
    ChartSettings,
    LineCharts,
    chart_cause,
    fault_signatures,
    fit_chart,
    image_statistics,
    point_metrics,
)

SETTINGS = ChartSettings(arl0=50, window=20, n_windows=3000, n_segments=6, block=10)
NAMES = ["mean_intensity", "z_0", "z_1"]


@dataclass(frozen=True)
class QuietDrift:
    """A per-window drift result that saw nothing."""

    detected: bool = False
    per_axis: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        {"axis": [0, 1], "effect_size": [0.0, 0.0], "p_value": [0.5, 0.5], "p_adjusted": [0.9, 0.9],
         "significant": [False, False], "ks_stat": [0.0, 0.0], "psi": [0.0, 0.0], "psi_band": ["stable"] * 2,
         "rank": [0, 1]}))
    fired: tuple[str, ...] = ()
    family_p: dict = field(default_factory=dict)


def cells(rng: np.random.Generator, n_lots: int, size: int = 20, gain: float = 1.0) -> pd.DataFrame:
    """Per-image statistics of ``n_lots`` lots: brightness with a lot effect, two latent axes."""
    rows = []
    for _ in range(n_lots):
        level = 0.5 + rng.normal(0, 0.01)
        z = rng.normal(0, 1.0, 2)
        for _ in range(size):
            rows.append({"mean_intensity": gain * (level + rng.normal(0, 0.01)),
                         "z_0": z[0] + rng.normal(0, 1.0) + (gain - 1.0) * 10, "z_1": z[1] + rng.normal(0, 1.0)})
    return pd.DataFrame(rows)


@pytest.fixture()
def charts(tmp_path: Path) -> LineCharts:
    hist = cells(np.random.default_rng(0), 100)
    lots = np.repeat(np.arange(100), 20)
    return LineCharts(tmp_path / "state", "m1", {"L1": (hist, None, lots), "L2": (hist, None, lots)}, SETTINGS)


def test_image_statistics_joins_axes_quality_and_score_tail():
    q = pd.DataFrame({"noise_level": [1.0, 2.0, 3.0]}, index=["a", "b", "c"])
    out = image_statistics(np.zeros((3, 2)), ["z_0", "z_1"], q, np.array([0.1, 0.5, 0.9]), tail_threshold=0.4)
    assert list(out.columns) == ["noise_level", "z_0", "z_1", "score_tail"]
    assert out["score_tail"].tolist() == [0.0, 1.0, 1.0]
    assert out["noise_level"].tolist() == [1.0, 2.0, 3.0]


def test_quiet_in_control_then_a_gain_drop_raises_spc_brightness(charts: LineCharts):
    rng = np.random.default_rng(1)
    quiet = [charts.update("L1", f"ok{w}", cells(rng, 1)) for w in range(20)]
    assert sum(p.alarm for p in quiet) <= 2
    faulty = [charts.update("L1", f"bad{w}", cells(rng, 1, gain=0.9)) for w in range(15)]
    first = next(p for p in faulty if p.alarm)
    cause = chart_cause(first)
    assert cause is not None and cause.family == FAMILY
    assert cause.key in ("spc:mean_intensity", "spc:z_0")
    assert "persistent shift" in cause.summary
    assert chart_cause(quiet[0]) is None or quiet[0].alarm
    assert set(point_metrics(first)) == {"spc_value", "spc_limit", "spc_alarm", "spc_t2"}
    assert point_metrics(first)["spc_alarm"] == 1.0


def test_state_is_saved_per_line_and_another_model_refits(charts: LineCharts, tmp_path: Path):
    rng = np.random.default_rng(2)
    charts.update("L1", "w0", cells(rng, 1))
    state = json.loads(charts.path("L1").read_text())
    assert state["line"] == "L1" and state["model_id"] == "m1" and state["history"][-1]["window_id"] == "w0"
    again = LineCharts(tmp_path / "state", "m1", charts.phase1, SETTINGS)
    assert again.chart("L1").n_windows == 1 and not again.messages  # the saved state continues
    other = LineCharts(tmp_path / "state", "m2", charts.phase1, SETTINGS)
    assert other.chart("L1").n_windows == 0
    assert "not used" in other.messages[0] and "model 'm1'" in other.messages[0]
    charts.path("L2").parent.mkdir(parents=True, exist_ok=True)
    charts.path("L2").write_text("{broken")
    broken = LineCharts(tmp_path / "state", "m1", charts.phase1, SETTINGS)
    assert broken.chart("L2").n_windows == 0 and "not valid JSON" in broken.messages[0]


def test_the_chart_cause_goes_through_the_alert_manager_and_resolution_resets_the_chart(charts: LineCharts,
                                                                                        tmp_path: Path):
    manager = AL.AlertManager(tmp_path / "state", AL.AlertPolicy(k_consecutive=2, resolve_after=2),
                              [AL.JsonlSink(tmp_path / "alerts.jsonl")])
    rng = np.random.default_rng(3)
    opened = resolved = None
    for w in range(40):
        gain = 0.9 if 5 <= w < 25 else 1.0
        point = charts.update("L1", f"w{w}", cells(rng, 1, gain=gain))
        res = ChartedResult(QuietDrift(), chart_cause(point))
        assert [c.key for c in window_causes(res)] == ([chart_cause(point).key] if point.alarm or point.ongoing else [])
        events = manager.update("L1", f"w{w}", res, attribute(res) if res.detected else None)
        opened = opened or next((e for e in events if e.kind == "opened"), None)
        if charts.after_events("L1", events):
            resolved = w
            assert charts.chart("L1").since_reset == 0
            break
    assert opened is not None and opened.alert.family == FAMILY and opened.alert.cause.startswith("spc:")
    assert resolved is not None and resolved > 25
    sent = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert any(s["kind"] == "opened" and s["alert"]["cause"].startswith("spc:") for s in sent)


def test_the_spc_alert_of_a_short_large_fault_resolves_two_windows_after_it_ends(charts: LineCharts, tmp_path: Path):
    manager = AL.AlertManager(tmp_path / "state", AL.AlertPolicy(k_consecutive=2, resolve_after=2), [])
    rng = np.random.default_rng(4)
    kinds: dict[int, list[str]] = {}
    ids: dict[int, list[str]] = {}
    ongoing: dict[int, bool] = {}
    for w in range(14):
        gain = 0.7 if 4 <= w < 7 else 1.0  # a three-window fault
        point = charts.update("L1", f"w{w}", cells(rng, 1, gain=gain))
        res = ChartedResult(QuietDrift(), chart_cause(point))
        events = [e for e in manager.update("L1", f"w{w}", res, attribute(res) if res.detected else None)
                  if e.alert.family == FAMILY]
        kinds[w], ids[w], ongoing[w] = [e.kind for e in events], [e.alert.id for e in events], point.ongoing
        charts.after_events("L1", events)
    assert "opened" in kinds[4]  # the fault's first window: a chart alarm opens at once (no hysteresis)
    assert "resolved" in kinds[8]  # windows 7 and 8 back at the centre: the EWMA did not carry the fault over
    assert ids[8] == ids[4]
    # after the restart nothing of the fault is left: no window continues its shift, and an alert that opens later
    # is a new one, from a fresh alarm of the restarted chart (with this seed window 11; the fixture's ARL0 is 50)
    assert not any(ongoing[w] for w in range(9, 14))
    assert not set(ids[4]) & {i for w in range(9, 14) for i in ids[w]}


def test_charted_result_reads_as_the_drift_result():
    res = ChartedResult(QuietDrift(fired=("axes",), detected=True, family_p={"axes": 0.001}), None)
    assert res.detected and res.fired == ("axes",) and res.family_p == {"axes": 0.001} and res.extra_causes == ()
    assert not ChartedResult(QuietDrift(), None).detected


def test_the_chart_picture_has_dates_and_is_written(charts: LineCharts, tmp_path: Path):
    from pipeline.monitoring.charts import draw_chart

    rng = np.random.default_rng(4)
    days = pd.date_range("2026-01-01", periods=30, freq="D")
    for k, d in enumerate(days):
        charts.update("L1", d.date().isoformat(), cells(rng, 1, gain=0.9 if k >= 15 else 1.0))
    out = draw_chart(charts.chart("L1"), tmp_path / "c.png", title="brightness")
    assert out.exists() and out.stat().st_size > 5_000
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_a_charted_result_wrapped_again_keeps_both_causes():
    from pipeline.monitoring.causes import Cause

    chart = Cause("spc:z_1", "spc", ("spc",), (), (), (), "chart")
    camera = Cause("camera:mean_intensity", "camera", ("camera",), (), (1e-5,), (), "camera/optics changed")
    res = ChartedResult(ChartedResult(QuietDrift(), chart), camera)
    assert res.detected and [c.key for c in window_causes(res)] == ["spc:z_1", "camera:mean_intensity"]
    assert [c.key for c in window_causes(ChartedResult(ChartedResult(QuietDrift(), None), camera))] == \
        ["camera:mean_intensity"]


def _brightness_and_detail(images: list[np.ndarray]) -> pd.DataFrame:
    """Two per-image statistics a fault pattern can move: mean brightness (0-1) and pixel noise (sd of differences)."""
    x = np.stack([np.asarray(im, float) / 255.0 for im in images])
    return pd.DataFrame({"mean_intensity": x.mean(axis=(1, 2)),
                         "roughness": np.abs(np.diff(x, axis=2)).mean(axis=(1, 2))})


def test_fault_signatures_measure_each_camera_fault_on_the_images():
    rng = np.random.default_rng(3)
    images = [np.clip(rng.normal(150, 5, (40, 40)), 0, 255).astype(np.uint8) for _ in range(6)]
    sig = fault_signatures(images, _brightness_and_detail)
    assert set(sig) == set(CAMERA_PATTERNS)
    base = _brightness_and_detail(images)["mean_intensity"].mean()
    gain = sig["camera gain x0.9"]
    assert list(gain.index) == ["mean_intensity", "roughness"]
    assert gain["mean_intensity"] == pytest.approx(-0.1 * base, rel=0.05)  # the gain scales brightness by 0.9
    assert sig["sensor noise 3 %"]["roughness"] > 0.005  # noise roughens the image
    assert sig["defocus blur 1 px"]["roughness"] < 0  # blur smooths it
    with pytest.raises(ValueError, match="at least one"):
        fault_signatures([], _brightness_and_detail)


def test_each_pattern_draws_its_own_noise_and_the_same_draws_every_time():
    rng = np.random.default_rng(4)
    images = [np.clip(rng.normal(150, 5, (40, 40)), 0, 255).astype(np.uint8) for _ in range(4)]
    twins = {"noise a": ("noise", 0.03), "noise b": ("noise", 0.03)}  # names of one length, one fault
    sig = fault_signatures(images, _brightness_and_detail, twins)
    assert sig["noise a"]["roughness"] != sig["noise b"]["roughness"]
    again = fault_signatures(images, _brightness_and_detail, twins)
    assert all(sig[k].equals(again[k]) for k in twins)


def test_a_chart_fitted_with_signatures_watches_them_and_a_missing_statistic_counts_as_unchanged():
    hist = cells(np.random.default_rng(0), 100)
    lots = np.repeat(np.arange(100), 20)
    sig = {"camera gain x0.9": pd.Series({"mean_intensity": -0.05, "z_0": -1.0})}  # no z_1: unchanged
    chart = fit_chart("L1", "m1", hist, lots=lots, settings=SETTINGS, signatures=sig)
    assert chart.pattern_names == ("camera gain x0.9",)
    assert chart.patterns[0].tolist() == [-0.05, -1.0, 0.0]
    assert chart.pattern_one_sided.tolist() == [False]  # a gain can drop or rise
    rng = np.random.default_rng(5)
    for w in range(30):
        point = chart.update(f"bad{w}", cells(rng, 1, gain=0.9))
        if point.alarm:
            break
    assert point.alarm and point.pattern == "camera gain x0.9"


def test_line_charts_measure_signatures_once_and_go_on_without_them_when_that_fails(tmp_path: Path):
    hist = cells(np.random.default_rng(0), 100)
    lots = np.repeat(np.arange(100), 20)
    calls = []

    def measured() -> dict[str, pd.Series]:
        calls.append(1)
        return {"camera gain x0.9": pd.Series({"mean_intensity": -0.05, "z_0": -1.0})}

    ok = LineCharts(tmp_path / "a", "m1", {"L1": (hist, None, lots), "L2": (hist, None, lots)}, SETTINGS, measured)
    assert ok.chart("L1").pattern_names == ok.chart("L2").pattern_names == ("camera gain x0.9",)
    assert len(calls) == 1

    def broken() -> dict[str, pd.Series]:
        raise OSError("store unreadable")

    bad = LineCharts(tmp_path / "b", "m1", {"L1": (hist, None, lots)}, SETTINGS, broken)
    assert bad.chart("L1").pattern_names == ()
    assert "camera-fault patterns not measured (OSError: store unreadable)" in bad.messages[0]


def test_a_line_whose_reference_holds_one_lot_gets_no_chart_and_no_pattern_is_measured(tmp_path: Path):
    hist = cells(np.random.default_rng(0), 1, size=60)
    calls = []

    def measured() -> dict[str, pd.Series]:
        calls.append(1)
        return {"camera gain x0.9": pd.Series({"mean_intensity": -0.05})}

    young = LineCharts(tmp_path / "s", "m1", {"L1": (hist, None, np.zeros(60))}, SETTINGS, measured)
    for _ in range(2):  # decided once, and said the same way each time
        with pytest.raises(ChartNotReady, match="no control chart for line L1: .* holds 1 lots; .* at least 2"):
            young.update("L1", "w1", hist.iloc[:20])
    assert calls == [] and not young.path("L1").exists()


@pytest.mark.parametrize("arl0", [50.0, 200.0, 500.0, 2000.0])
def test_chart_settings_give_the_bootstrap_enough_windows_for_any_arl0(arl0):
    cfg = ChartSettings(arl0=arl0).spc_config()
    assert cfg.arl0 == arl0 and cfg.n_windows >= ChartSettings.n_windows
    assert cfg.n_windows >= 5 * arl0 * cfg.arl0_margin / (1.0 - cfg.pattern_share)  # calibrate_limit's floor


def test_blur_noise_and_vignetting_patterns_are_watched_one_way_gain_and_misalignment_both():
    hist = cells(np.random.default_rng(0), 100)
    lots = np.repeat(np.arange(100), 20)
    sig = {name: pd.Series({"mean_intensity": 0.01 * (k + 1), "z_1": 0.2}) for k, name in enumerate(CAMERA_PATTERNS)}
    chart = fit_chart("L1", "m1", hist, lots=lots, settings=SETTINGS, signatures=sig)
    one_way = dict(zip(chart.pattern_names, chart.pattern_one_sided.tolist(), strict=True))
    assert one_way == {"camera gain x0.9": False, "defocus blur 1 px": True, "sensor noise 3 %": True,
                       "fixture misalignment 2 deg": False, "vignetting 0.2": True}
    assert ONE_SIDED_PATTERNS <= set(CAMERA_PATTERNS)
