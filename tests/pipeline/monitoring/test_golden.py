"""The monitor's golden-sample check: rounds, persisted per-line state, the camera cause through the alert manager."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.axes import attribute
from pipeline.analysis.golden import GoldenCapture, GoldenCheck
from pipeline.monitoring import alerts as AL
from pipeline.monitoring.causes import window_causes
from pipeline.monitoring.charts import ChartedResult
from pipeline.monitoring.golden import (
    FAMILY,
    LineGolden,
    MonitorGolden,
    camera_cause,
    captures_of,
    golden_rounds,
    rebaseline,
    round_metrics,
    split_golden,
)

TZ = "Europe/Berlin"
CELLS = ("G01", "G02", "G03", "G04", "G05")
BASE = {c: 0.40 + 0.05 * i for i, c in enumerate(CELLS)}  # each golden cell has its own brightness


@dataclass(frozen=True)
class QuietDrift:
    detected: bool = False
    fired: tuple[str, ...] = ()
    family_p: dict = field(default_factory=dict)
    per_axis: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        {"axis": [0], "effect_size": [0.0], "p_adjusted": [1.0], "significant": [False]}))


def rows_of(day: int, hour: int, gain: float = 1.0, rng=None, cells=CELLS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One round of golden captures (catalog rows) at ``hour`` on January ``day``, and their statistics."""
    rng = rng or np.random.default_rng(day * 100 + hour)
    t0 = pd.Timestamp(f"2026-01-{day:02d}T{hour:02d}:01", tz=TZ).tz_convert("UTC")
    rows = pd.DataFrame({"image_id": [f"d{day}h{hour}{c}" for c in cells], "line": "L1",
                         "captured_at": [t0 + pd.Timedelta(minutes=i) for i in range(len(cells))],
                         "sample_kind": "golden", "golden_cell": list(cells)})
    stats = pd.DataFrame({
        "mean_intensity": [BASE[c] * gain * np.exp(rng.normal(0, 0.003)) for c in cells],
        "detail_ratio": [0.2 * np.exp(rng.normal(0, 0.01)) for _ in cells],
        "noise_level": [0.01 * np.exp(rng.normal(0, 0.02)) for _ in cells],
        "rotation_deg": [rng.normal(0, 0.02) for _ in cells]}, index=rows["image_id"].to_numpy())
    return rows, stats


def test_split_and_rounds():
    a, _ = rows_of(6, 0)
    b, _ = rows_of(6, 8)
    c, _ = rows_of(6, 16, cells=("G01", "G02"))
    prod = pd.DataFrame({"image_id": ["p1", "p2"], "line": "L1", "sample_kind": [None, "production"],
                         "golden_cell": None, "captured_at": [pd.Timestamp("2026-01-06T09:00Z")] * 2})
    both = pd.concat([prod, c, a, b], ignore_index=True)
    production, golden = split_golden(both)
    assert list(production["image_id"]) == ["p1", "p2"] and len(golden) == 12
    rounds = golden_rounds(golden, TZ)
    assert [r.round_id for r in rounds] == ["2026-01-06T00:01", "2026-01-06T08:01", "2026-01-06T16:01"]
    assert [len(r.frame) for r in rounds] == [5, 5, 2]
    # a cell imaged twice without a gap starts a new round
    twice = pd.concat([a, a.assign(image_id=a["image_id"] + "x",
                                   captured_at=a["captured_at"] + pd.Timedelta(minutes=6))], ignore_index=True)
    assert [len(r.frame) for r in golden_rounds(twice, TZ)] == [5, 5]
    assert golden_rounds(golden.iloc[:0], TZ) == []
    assert split_golden(prod.drop(columns=["sample_kind"]))[1].empty


def feed(mg: MonitorGolden, days: range, gain_from: int | None = None, factor: float = 0.9) -> list:
    out = []
    for d in days:
        for h in (0, 8, 16):
            rows, stats = rows_of(d, h, factor if gain_from is not None and d >= gain_from else 1.0)
            mg.rounds.setdefault("L1", []).extend(golden_rounds(rows, TZ))
            mg.stats = pd.concat([mg.stats, stats])
        out.append(mg.window("L1", pd.Timestamp(f"2026-01-{d + 1:02d}T00:00", tz=TZ)))
    return out


def test_a_gain_drop_fires_on_its_first_round_and_never_enters_the_baseline(tmp_path: Path):
    mg = MonitorGolden(LineGolden(tmp_path, "m1"), {}, pd.DataFrame())
    days = feed(mg, range(5, 10), gain_from=9)
    healthy = [r for day in days[:4] for r in day]
    assert len(healthy) == 12 and not any(r.detected for r in healthy)
    assert [r.tested for r in healthy[:3]] == [(), (), ()]  # the baselines build first (3 captures per cell)
    fault = days[4]
    assert all(r.detected for r in fault), [r.text for r in fault]
    assert fault[0].text == "camera/optics changed: brightness -10 % on the golden cells (5 of 5)"
    cause = camera_cause(fault[0])
    assert cause.key == "camera:mean_intensity" and cause.family == FAMILY and cause.summary == fault[0].text
    assert camera_cause(healthy[-1]) is None
    m = round_metrics(fault)
    assert m["golden_alarm"] == 1.0 and m["golden_rounds"] == 3 and -11 < m["golden_mean_intensity"] < -9
    assert round_metrics(healthy[:3]) == {} and round_metrics(healthy[3:6])["golden_alarm"] == 0.0
    # the faulty rounds stayed out of the baselines, and the state is on disk
    chk = GoldenCheck.load(tmp_path / "golden" / "L1.json", line="L1", model_id="m1")
    assert all(chk.baseline_size(c) == 12 for c in CELLS) and len(chk.processed) == 15
    # a round not yet due waits for a later window
    rows, stats = rows_of(10, 8)
    mg.rounds["L1"] = golden_rounds(rows, TZ)
    mg.stats = pd.concat([mg.stats, stats])
    assert mg.window("L1", pd.Timestamp("2026-01-10T08:00", tz=TZ)) == [] and len(mg.rounds["L1"]) == 1


def test_state_of_another_line_or_model_and_new_cells(tmp_path: Path):
    mg = MonitorGolden(LineGolden(tmp_path, "m1"), {}, pd.DataFrame())
    feed(mg, range(5, 7))
    src = tmp_path / "golden" / "L1.json"
    # another model: the pixel statistics keep their baselines, z restarts, with a message
    other = LineGolden(tmp_path, "m2")
    chk = other.check("L1", CELLS)
    assert chk.model_id == "m2" and chk.baseline_size("G01") == 6 and "carried over" in other.messages[0]
    # another line's state is refused: new baselines, a message, no crash
    (tmp_path / "golden" / "L2.json").write_text(src.read_text())
    l2 = LineGolden(tmp_path, "m1")
    assert l2.check("L2", CELLS).baseline_size("G01") == 0 and "not used" in l2.messages[0]
    (tmp_path / "golden" / "L3.json").write_text("{broken")
    l3 = LineGolden(tmp_path, "m1")
    assert l3.check("L3", CELLS).baseline_size("G01") == 0 and "L3" in l3.messages[0]
    # a golden cell seen for the first time is registered and builds its own baseline
    lg = LineGolden(tmp_path, "m1")
    assert "G06" in lg.check("L1", (*CELLS, "G06")).cells and "new golden cell(s) G06" in lg.messages[0]


def test_rebaseline_after_a_deliberate_camera_change(tmp_path: Path):
    mg = MonitorGolden(LineGolden(tmp_path, "m1"), {}, pd.DataFrame())
    feed(mg, range(5, 7))
    assert "restarted" in rebaseline(tmp_path, "L1")
    chk = GoldenCheck.load(tmp_path / "golden" / "L1.json", line="L1", model_id="m1")
    assert all(chk.baseline_size(c) == 0 for c in CELLS)
    with pytest.raises(ValueError, match="no golden-sample state"):
        rebaseline(tmp_path, "L9")
    with pytest.raises(ValueError, match="unknown golden cell"):
        rebaseline(tmp_path, "L1", ["G99"])


def test_a_capture_without_a_cell_id_is_left_out_with_a_message():
    rows, stats = rows_of(6, 8)
    rows.loc[1, "golden_cell"] = None
    caps, messages = captures_of(rows, stats.reset_index(drop=True))
    assert [c.cell for c in caps] == ["G01", "G03", "G04", "G05"] and "without a golden_cell id" in messages[0]
    assert isinstance(caps[0], GoldenCapture) and caps[0].z is None


def test_the_camera_cause_opens_its_alert_at_the_first_window_beside_the_chart(tmp_path: Path):
    mg = MonitorGolden(LineGolden(tmp_path, "m1"), {}, pd.DataFrame())
    days = feed(mg, range(5, 10), gain_from=9)
    manager = AL.AlertManager(tmp_path / "state", AL.AlertPolicy(), [AL.JsonlSink(tmp_path / "alerts.jsonl")])
    kinds = []
    for w, results in enumerate(days):
        fired = [r for r in results if r.detected]
        res = ChartedResult(QuietDrift(), None)
        res = ChartedResult(res, camera_cause(fired[0]) if fired else None)
        assert [c.key for c in window_causes(res)] == (["camera:mean_intensity"] if fired else [])
        kinds.append([e.kind for e in manager.update("L1", f"w{w}", res, attribute(res))])
    assert kinds == [[], [], [], [], ["opened"]]  # the default policy's hysteresis does not delay the camera
    sent = [json.loads(x) for x in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert sent[0]["alert"]["family"] == "camera" and sent[0]["alert"]["summary"].startswith("camera/optics changed")
