"""Tests for pipeline.analysis.golden: paired statistics on re-imaged golden cells, bad input, persisted state."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from scipy import stats

from pipeline.analysis.golden import (
    FamilyShift,
    GoldenCapture,
    GoldenCheck,
    GoldenConfig,
    GoldenResult,
    GoldenStateMismatch,
    paired_welch,
    parse_sample_kind,
)

CELLS = ("G1", "G2", "G3", "G4", "G5")
BASE = {"mean_intensity": 0.55, "detail_ratio": 1.3, "noise_level": 0.006, "rotation_deg": 0.1}


def capture(cell: int, rng: np.random.Generator, gain: float = 1.0, rot: float = 0.0,
            z_shift: float = 0.0, dim: int = 4) -> GoldenCapture:
    """A capture of golden cell ``cell`` with 1 % re-imaging jitter; each cell has its own level."""
    level = 1.0 + 0.1 * cell
    stats = {
        "mean_intensity": BASE["mean_intensity"] * level * gain * (1 + 0.01 * rng.standard_normal()),
        "detail_ratio": BASE["detail_ratio"] * level * (1 + 0.01 * rng.standard_normal()),
        "noise_level": BASE["noise_level"] * level * (1 + 0.02 * rng.standard_normal()),
        "rotation_deg": BASE["rotation_deg"] * cell + rot + 0.05 * rng.standard_normal(),
    }
    z = np.full(dim, float(cell)) + 0.1 * rng.standard_normal(dim)
    z[1] += z_shift
    return GoldenCapture(CELLS[cell], stats, tuple(z))


def shift(rng: np.random.Generator, cells=range(5), **kw) -> list[GoldenCapture]:
    return [capture(i, rng, **kw) for i in cells]


def warmed(rng: np.random.Generator, n: int = 6, model_id: str | None = "m1", **cfg) -> GoldenCheck:
    chk = GoldenCheck("L1", CELLS, model_id=model_id, config=GoldenConfig(**cfg))
    for s in range(n):
        chk.update(f"s{s}", shift(rng))
    return chk


def test_parse_sample_kind():
    assert parse_sample_kind(None) == "production"
    assert parse_sample_kind(float("nan")) == "production"
    assert parse_sample_kind("") == "production"
    assert parse_sample_kind(" Golden ") == "golden"
    assert parse_sample_kind("production") == "production"
    with pytest.raises(ValueError, match="unknown sample_kind 'reference'.*production, golden"):
        parse_sample_kind("reference")


def test_paired_welch_by_hand():
    base = [np.array([1.0, 3.0]), np.array([2.0, 2.0, 5.0])]
    d, t, p, sd = paired_welch(base, np.array([4.0, 4.0]), resolution=0.0)
    v = np.array([2.0 * 1.5, 3.0 * (1 + 1 / 3)])
    assert d == pytest.approx(((4 - 2) + (4 - 3)) / 2)
    assert t == pytest.approx(1.5 / (np.sqrt(v.sum()) / 2))
    welch_df = v.sum() ** 2 / np.sum(v**2 / np.array([1.0, 2.0]))
    assert welch_df > 1.0  # the conservative df (the smallest baseline's n - 1) is the lower one here
    assert p == pytest.approx(2 * stats.t.sf(t, 1.0))
    _, _, p_big, _ = paired_welch([np.r_[b, b] for b in base], np.array([4.0, 4.0]), resolution=0.0)
    assert p_big < p  # more baseline captures: more degrees of freedom
    assert sd == pytest.approx(np.sqrt((2.0 + 3.0) / 2))
    assert paired_welch([np.array([2.0, 2.0]), np.array([1.0, 1.0])], np.array([2.0, 1.0]), 0.1)[3] == 0.1
    with pytest.raises(ValueError, match="two baseline captures"):
        paired_welch([np.array([1.0])], np.array([1.0]), 0.0)


@pytest.mark.parametrize("spreads", [(1.0,) * 5, (0.2, 0.5, 1.0, 2.0, 4.0)])
def test_paired_welch_is_calibrated_under_no_change(spreads):
    """Size holds also when cells differ in re-imaging spread (where a pooled sd is too light in the tail)."""
    rng = np.random.default_rng(0)
    ps = []
    for _ in range(3000):
        base = [rng.normal(i, s, size=6) for i, s in enumerate(spreads)]
        cur = np.array([rng.normal(i, s) for i, s in enumerate(spreads)])
        ps.append(paired_welch(base, cur, 0.0)[2])
    ps = np.array(ps)
    # Hsu's df: conservative under normal jitter (never above the level), yet not uselessly below it
    assert np.mean(ps <= 0.01) <= 0.015
    assert 0.01 < np.mean(ps <= 0.05) < 0.06
    assert 0.1 < np.mean(ps <= 0.2) < 0.22


def test_gain_drop_reads_as_camera_change():
    rng = np.random.default_rng(1)
    chk = warmed(rng)
    res = chk.test("fault", shift(rng, gain=0.9))
    assert res.detected
    assert res.fired[0].family == "mean_intensity"
    assert res.fired[0].shift == pytest.approx(-10, abs=1.5)
    assert re.match(r"camera/optics changed: brightness -(9|10|11) %", res.text)
    assert res.text.endswith("on the golden cells (5 of 5)")


def test_rotation_and_z_are_reported_in_their_units():
    rng = np.random.default_rng(2)
    chk = warmed(rng)
    rot = chk.test("rot", shift(rng, rot=1.0))
    assert rot.detected and rot.fired[0].family == "rotation_deg"
    assert "rotation +1.0" in rot.text
    zres = chk.test("z", shift(rng, z_shift=1.0))
    assert zres.detected and zres.fired[0].label == "latent z_01"


def test_false_alarm_rate_per_shift_stays_below_alpha():
    rng = np.random.default_rng(3)
    chk = warmed(rng, alpha=0.01)
    alarms = sum(chk.test(f"t{i}", shift(rng)).detected for i in range(1500))
    assert alarms <= 1500 * 0.01 * 1.6


def test_missing_and_unknown_cells_leave_the_rest_tested():
    rng = np.random.default_rng(4)
    chk = warmed(rng)
    caps = shift(rng, cells=[0, 1, 3, 4], gain=0.9) + [GoldenCapture("X9", {"mean_intensity": 0.5})]
    res = chk.update("s-miss", caps)
    assert res.detected
    assert res.missing == ("G3",)
    assert any("G3 missing from shift s-miss: 4 of 5 captured" in m for m in res.messages)
    assert any("unregistered cell 'X9'" in m for m in res.messages)
    assert res.text.endswith("(4 of 5)")


def test_unmeasured_statistic_is_left_out_with_a_message():
    rng = np.random.default_rng(5)
    chk = warmed(rng)
    caps = shift(rng)
    caps[0] = GoldenCapture("G1", {**caps[0].stats, "noise_level": float("nan")}, caps[0].z)
    res = chk.test("nan", caps)
    assert any("noise level not measured on golden cell(s) G1" in m for m in res.messages)
    noise = next(f for f in res.families if f.family == "noise_level")
    assert noise.cells == 4


def test_baseline_building_and_too_few_cells():
    rng = np.random.default_rng(6)
    chk = GoldenCheck("L1", CELLS, model_id=None)
    res = chk.update("s0", shift(rng))
    assert not res.detected and res.building == CELLS and not res.tested
    assert "no test" in res.text
    chk = warmed(rng, n=4, min_cells=3)
    res = chk.test("few", shift(rng, cells=[0, 1], gain=0.5))
    assert not res.detected and any("3 needed: no test" in m for m in res.messages)


def test_alarmed_shift_does_not_enter_the_baseline_and_reprocessing_is_a_no_op():
    rng = np.random.default_rng(7)
    chk = warmed(rng, n=4)
    before = chk.baseline_size("G1")
    res = chk.update("bad", shift(rng, gain=0.8))
    assert res.detected and chk.baseline_size("G1") == before
    again = chk.update("bad", shift(rng, gain=0.8))
    assert not again.detected and "already processed" in again.messages[0]
    chk.update("good", shift(rng))
    assert chk.baseline_size("G1") == before + 1
    chk.rebaseline(["G1"])
    assert chk.baseline_size("G1") == 0 and chk.baseline_size("G2") == before + 1
    with pytest.raises(ValueError, match="unknown golden cell 'G9'"):
        chk.rebaseline(["G9"])


def test_baseline_keeps_the_first_in_control_captures():
    rng = np.random.default_rng(8)
    chk = warmed(rng, n=8, max_baseline=5)
    assert chk.baseline_size("G1") == 5


def test_state_round_trip_and_refusals(tmp_path):
    rng = np.random.default_rng(9)
    chk = warmed(rng)
    caps = shift(rng, gain=0.9)
    caps[2] = GoldenCapture("G3", {**caps[2].stats, "detail_ratio": float("nan")}, caps[2].z)
    path = tmp_path / "golden" / "L1.json"
    chk.save(path)
    back = GoldenCheck.load(path, line="L1", model_id="m1")
    assert back.cells == chk.cells and back.processed == chk.processed
    assert back.test("x", caps).fired[0].shift == pytest.approx(chk.test("x", caps).fired[0].shift)
    with pytest.raises(GoldenStateMismatch, match="line 'L1' and model 'm1' cannot serve line 'L2'"):
        GoldenCheck.load(path, line="L2", model_id="m1")
    with pytest.raises(GoldenStateMismatch, match="model 'm2'"):
        GoldenCheck.load(path, line="L1", model_id="m2")
    path.write_text("{not json")
    with pytest.raises(GoldenStateMismatch, match="not valid JSON"):
        GoldenCheck.load(path, line="L1", model_id="m1")
    path.write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(GoldenStateMismatch, match="not a golden-sample state"):
        GoldenCheck.load(path, line="L1", model_id="m1")


def test_bad_construction():
    with pytest.raises(ValueError, match="distinct golden cell ids"):
        GoldenCheck("L1", ["a", "a"])
    with pytest.raises(ValueError, match="non-empty"):
        GoldenCheck("", ["a"])
    with pytest.raises(ValueError, match="min_baseline must be >= 2"):
        GoldenConfig(min_baseline=1)


def test_alert_text_gives_physical_shifts_and_names_latent_axes_without_their_jitter_scale():
    fam = [FamilyShift("brightness", "brightness", -10.2, "%", -9.0, 1e-6, 5, True),
           FamilyShift("z", "latent z_27", 573.8, "sd", 30.0, 1e-7, 5, True),
           FamilyShift("noise", "noise level", 1.0, "%", 0.5, 0.6, 5, False)]
    res = GoldenResult("L1", "s1", ("G1", "G2", "G3", "G4", "G5"), (), (), tuple(fam), True, 0.002)
    assert res.text == "camera/optics changed: brightness -10 %, latent z_27 moved on the golden cells (5 of 5)"
    only_z = GoldenResult("L1", "s1", ("G1",), (), (), (fam[1],), True, 0.002)
    assert only_z.text == ("camera/optics changed: latent z_27 +573.8 sd of re-imaging jitter "
                           "on the golden cells (1 of 1)")
