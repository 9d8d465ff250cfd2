"""benchmarks.flag_contamination: the calibration cells' defect share and the flag rates with and without the offset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks.flag_contamination import calibration_rows, calibration_scores, day_rates, day_rule_rates


def test_day_rates_count_each_cell_once_under_its_first_model() -> None:
    scores = pd.DataFrame({"image_id": ["a", "b", "c", "d", "a"], "model_id": ["m1"] * 4 + ["m2"],
                           "score": [2.0, 0.5, 2.0, 3.0, 0.0], "threshold": 1.0, "day_offset": [1.5, 0, 0, 0, 0]})
    truth = pd.DataFrame({"image_id": list("abcd"), "prob": [0.0, 0.0, 1 / 3, 1.0], "line": "L1", "day": [1, 1, 2, 2]})
    r = day_rates(scores, truth)
    assert r["cells"] == 4  # "a" counted under m1 only
    assert r["healthy_without_offset"] == 2 / 3 and r["healthy_with_offset"] == 1 / 3  # a's offset clears it
    assert r["recall_with_offset"] == r["recall_without_offset"] == 1.0
    days = pd.DataFrame({"line": "L1", "day": [1, 2], "status": ["healthy", "fault:blur"]})
    assert day_rates(scores, truth, days)["cells"] == 2


def test_calibration_rows_report_the_defect_share_and_the_healthy_rate(tmp_path: Path) -> None:
    folder = tmp_path / "state" / "patches" / "m1"
    folder.mkdir(parents=True)
    raw = np.exp(np.array([0.0, 0.1, 0.2, 0.3, 3.0]))
    np.savez(folder / "bb.reference.npz", image_id=np.array(list("abcde")), scores=raw)
    truth = pd.DataFrame({"image_id": list("abcde"), "prob": [0, 0, 0, 0, 1.0], "line": "L1", "day": 1})
    (row,) = calibration_rows(tmp_path, pd.DataFrame({"model_id": ["m1"], "threshold": [1.0]}), truth)
    assert row["cells"] == 5 and row["p1_share"] == 0.2
    assert row["healthy_flagged"] == 0.0  # only the defective cell is far out
    assert calibration_rows(tmp_path, pd.DataFrame({"model_id": ["other"], "threshold": [1.0]}), truth) == []


def test_calibration_scores_come_from_bundles_first_and_from_monitor_caches_of_older_models(tmp_path: Path) -> None:
    bundle = tmp_path / "mlartifacts" / "exp" / "models" / "m-1" / "artifacts" / "data" / "checkpoint" / "linewatch"
    bundle.mkdir(parents=True)
    (bundle / "gate.json").write_text(json.dumps({"model_id": "m1"}))
    np.savez(bundle / "patches.npz", image_id=np.array(list("abc")), ref_scores=np.array([1.0, 2.0, 3.0]))
    for model, first in (("m1", 9.0), ("m0", 5.0)):  # m1's cache is shadowed by its bundle; m0 has only a cache
        folder = tmp_path / "state" / "patches" / model
        folder.mkdir(parents=True)
        np.savez(folder / "bb.reference.npz", image_id=np.array(list("xy")), scores=np.array([first, 1.0]))
    kept = calibration_scores(tmp_path)
    assert sorted(kept) == ["m0", "m1"]
    assert kept["m1"][0].tolist() == list("abc") and kept["m1"][1].tolist() == [1.0, 2.0, 3.0]
    assert kept["m0"][1].tolist() == [5.0, 1.0]


def test_day_rule_rates_judge_each_day_against_its_own_median_and_spread(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "state" / "patches" / "m1"
    folder.mkdir(parents=True)
    cal_ids = [f"c{i}" for i in range(200)]
    raw = np.exp(rng.normal(size=200))  # four calibration periods of 50 healthy cells
    np.savez(folder / "bb.reference.npz", image_id=np.array(cal_ids), scores=raw)
    ids = [f"x{i}" for i in range(120)]
    s = np.r_[rng.normal(size=60) + 3.0, rng.normal(size=60) - 3.0]  # a day far above, a day far below
    bad = np.zeros(120, dtype=bool)
    bad[[0, 60]] = True
    s[bad] += 20.0  # one defective cell on each day
    scores = pd.DataFrame({"image_id": ids, "model_id": "m1", "score": s, "threshold": 1.6, "day_offset": 0.0})
    truth = pd.DataFrame({"image_id": cal_ids + ids, "prob": [0.0] * 200 + list(bad.astype(float)), "line": "L1",
                          "day": [i // 50 for i in range(200)] + [10] * 60 + [11] * 60})
    r = day_rule_rates(tmp_path, scores, truth)
    assert r["cells"] == 120 and r["recall_day_rule"] == 1.0
    assert 0.0 < r["healthy_day_rule"] < 0.15  # against the calibration threshold alone: about half
    # a smaller period fence leaves more calibration cells out as defective: the unit threshold falls, more flags
    tight, loose = day_rule_rates(tmp_path, scores, truth, fence=0.5), day_rule_rates(tmp_path, scores, truth, fence=3)
    assert tight["healthy_day_rule"] > loose["healthy_day_rule"]


def test_a_bad_fence_list_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.flag_contamination import main

    assert main(["--name", "no_such_soak", "--fences", "1.5,x"]) == 2
    assert capsys.readouterr().out.count("\n") == 1
