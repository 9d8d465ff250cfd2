"""Tests for pipeline.line.simulate and the ``linewatch simulate`` command."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.line.elpv import load_elpv, pool_indices
from pipeline.line.simulate import (
    BREAK_MIN,
    HANDOVER_MIN,
    MES_COLUMNS,
    SHIFTS,
    FaultSpec,
    capture_times,
    default_truth_path,
    simulate_line,
)

START = dt.date(2026, 11, 27)


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def gain_run(tmp_path_factory):
    """Two lines, 3 days x 12 captures, gain fault ramping from day 1 over 1 day, on L2 only."""
    out = tmp_path_factory.mktemp("gain") / "drop"
    spec = FaultSpec("gain", start_day=1, severity=1.0, ramp_days=1.0, lines=("L2",))
    res = simulate_line(out, days=3, per_day=12, lines=("L1", "L2"), start=START, seed=3, fault=spec, progress=False)
    return res, pd.read_parquet(res.truth_path)


def test_layout_and_mes_export(gain_run):
    res, truth = gain_run
    assert res.n_images == 72 == len(res.paths) and len(res.metadata_files) == 6
    for p in res.paths:
        rel = p.relative_to(res.out)
        assert re.fullmatch(r"L[12]/2026-11-(27|28|29)/L[12]-202611(27|28|29)-\d{6}\.png", rel.as_posix())
        assert rel.parts[0] == rel.name[:2] and rel.parts[1].replace("-", "") == rel.name[3:11]
    img = read(res.paths[0])
    assert img.shape == (300, 300) and img.dtype == np.uint8
    mes = pd.read_csv(res.metadata_files[0])
    assert tuple(mes.columns) == MES_COLUMNS
    assert len(mes) == 12 and mes["serial"].is_unique
    stamps = [dt.datetime.fromisoformat(s) for s in mes["timestamp"]]
    assert all(s.tzinfo is not None and s.date() == START for s in stamps)
    assert stamps == sorted(stamps)
    assert set(mes["station"]) <= {"L1-EL1", "L1-EL2"} and set(mes["line"]) == {"L1"}
    assert set(mes["product_type"]) <= {"mono", "poly"}
    # no labels, no hidden files, no truth inside the drop
    assert not {"prob", "label", "lot", "defect"} & set(mes.columns)
    assert not [p for p in res.out.rglob("*") if p.is_file() and p.suffix not in (".png", ".csv")]
    assert not [p for p in res.out.rglob(".*")]


def test_truth_outside_drop_and_consistent(gain_run):
    res, truth = gain_run
    assert res.truth_path == default_truth_path(res.out)
    assert res.out.resolve() not in res.truth_path.resolve().parents
    assert len(truth) == 72 and truth["serial"].is_unique
    for col in ("serial", "path", "elpv_index", "prob", "type", "lot", "fault_kind", "fault_value", "day"):
        assert col in truth.columns
    mes = pd.concat([pd.read_csv(f) for f in res.metadata_files])
    merged = mes.merge(truth, on="serial")
    assert len(merged) == 72
    assert (merged["product_type"] == merged["type"]).all()
    data = load_elpv()
    assert np.array_equal(truth["lot"], data.lot[truth["elpv_index"]])
    assert set(truth["elpv_index"]) <= set(pool_indices("heldout"))
    assert all((res.out / p).is_file() for p in truth["path"])


def test_fault_applied_per_ramp_only_on_its_line(gain_run):
    res, truth = gain_run
    data = load_elpv()
    l1, l2 = truth[truth["line"] == "L1"], truth[truth["line"] == "L2"]
    assert (l1["fault_kind"] == "none").all() and (l1["fault_severity"] == 0).all()
    assert (l2.loc[l2["day"] == 0, "fault_severity"] == 0).all()
    day1 = l2[l2["day"] == 1]
    assert ((day1["fault_severity"] > 0) & (day1["fault_severity"] < 1)).all()  # ramping
    assert (l2.loc[l2["day"] == 2, "fault_severity"] == 1).all()
    assert np.allclose(l2["fault_value"], 1 - 0.25 * l2["fault_severity"])
    # every image's mean is the source cell's mean x the recorded gain factor (capture noise averages out)
    for row in truth.itertuples():
        src = data.images[row.elpv_index].astype(float)
        if np.mean(src > 250) > 0.001:
            continue
        factor = row.fault_value if row.line == "L2" else 1.0
        assert read(res.out / row.path).mean() / src.mean() == pytest.approx(factor, abs=0.01)


def test_deterministic_for_a_seed(tmp_path):
    kw = dict(days=2, per_day=4, lines=("L1",), start=START, seed=11, progress=False,
              fault=FaultSpec("noise", start_day=1, severity=0.5))
    a = simulate_line(tmp_path / "a" / "drop", **kw)
    b = simulate_line(tmp_path / "b" / "drop", **kw)
    c = simulate_line(tmp_path / "c" / "drop", **{**kw, "seed": 12})
    for pa, pb in zip(a.paths + a.metadata_files, b.paths + b.metadata_files, strict=True):
        assert pa.read_bytes() == pb.read_bytes()
    assert pd.read_parquet(a.truth_path).equals(pd.read_parquet(b.truth_path))
    assert a.paths[0].read_bytes() != c.paths[0].read_bytes()


def test_line_stream_independent_of_other_lines(tmp_path):
    kw = dict(days=1, per_day=3, start=START, seed=5, progress=False)
    a = simulate_line(tmp_path / "a", lines=("L2",), **kw)
    b = simulate_line(tmp_path / "b", lines=("L1", "L2"), **kw)
    assert [p.read_bytes() for p in a.paths] == [p.read_bytes() for p in b.paths if p.parts[-3] == "L2"]


def test_exact_replay_without_capture_noise(tmp_path):
    res = simulate_line(tmp_path / "d", days=1, per_day=3, start=START, capture_noise_dn=0, progress=False)
    truth = pd.read_parquet(res.truth_path)
    data = load_elpv()
    for row in truth.itertuples():
        assert np.array_equal(read(res.out / row.path), data.images[row.elpv_index])


def test_lot_order_preserves_adjacency_shuffled_does_not(tmp_path):
    data = load_elpv()
    means = data.images.reshape(len(data), -1).mean(axis=1)

    def adjacent_corr(order: str) -> tuple[float, int]:
        res = simulate_line(tmp_path / order, days=1, per_day=150, start=START, order=order, pool="all",
                            capture_noise_dn=0, progress=False)
        truth = pd.read_parquet(res.truth_path)
        m = means[truth["elpv_index"].to_numpy()]
        return float(np.corrcoef(m[:-1], m[1:])[0, 1]), truth["lot"].nunique()

    lot_corr, lot_lots = adjacent_corr("lot")
    shuf_corr, shuf_lots = adjacent_corr("shuffled")
    assert lot_corr > 0.5 and abs(shuf_corr) < 0.3
    assert lot_lots <= 4 < shuf_lots


def test_product_mix_shifts_mono_share(tmp_path):
    heldout = pool_indices("heldout")
    base = float(np.mean(load_elpv().types[heldout] == "mono"))
    res = simulate_line(tmp_path / "d", days=2, per_day=100, start=START, order="shuffled", capture_noise_dn=0,
                        fault=FaultSpec("product_mix", start_day=1, severity=1.0), progress=False)
    truth = pd.read_parquet(res.truth_path)
    share = truth.groupby("day")["type"].apply(lambda s: float(np.mean(s == "mono")))
    assert truth.loc[truth["day"] == 1, "fault_value"].iloc[0] == pytest.approx(base + 0.4)
    assert share[1] - share[0] > 0.2
    assert share[1] == pytest.approx(base + 0.4, abs=0.13)


@pytest.mark.parametrize("order", ["lot", "shuffled"])
def test_defect_rate_fault_and_flag_raise_share_of_p1_cells(tmp_path, order):
    res = simulate_line(tmp_path / "d", days=2, per_day=100, start=START, order=order, capture_noise_dn=0,
                        fault=FaultSpec("defect_rate", start_day=1, severity=1.5), progress=False)
    truth = pd.read_parquet(res.truth_path)
    p1 = truth.groupby("day")["prob"].apply(lambda p: float(np.mean(p == 1.0)))
    target = truth.loc[truth["day"] == 1, "fault_value"].iloc[0]
    assert p1[1] - p1[0] > 0.2
    assert p1[1] == pytest.approx(target, abs=0.13)
    flag = simulate_line(tmp_path / "f", days=1, per_day=100, start=START, order=order, defect_rate=0.05,
                         capture_noise_dn=0, progress=False)
    assert float(np.mean(pd.read_parquet(flag.truth_path)["prob"] == 1.0)) < 0.12


def test_capture_times_respect_shifts_and_breaks():
    t = capture_times(3000, np.random.default_rng(0)) / 3600.0
    assert np.all(np.diff(t) >= 0) and t.min() >= 0 and t.max() < 24
    for _, h0, h1 in SHIFTS:
        assert not np.any((t >= h0) & (t < h0 + HANDOVER_MIN / 60))
        mid = (h0 + h1) / 2
        assert not np.any((t > mid - BREAK_MIN / 120) & (t < mid + BREAK_MIN / 120))
    assert np.allclose(t * 3600 * 1000, np.round(t * 3600 * 1000), atol=1e-3)


def test_continuing_a_drop_extends_truth_and_refuses_same_dates(tmp_path):
    out = tmp_path / "drop"
    simulate_line(out, days=1, per_day=2, start=START, progress=False)
    second = simulate_line(out, days=1, per_day=2, start=START + dt.timedelta(days=1), progress=False)
    assert len(pd.read_parquet(second.truth_path)) == 4
    with pytest.raises(ValueError, match="already holds a simulation"):
        simulate_line(out, days=2, per_day=2, start=START + dt.timedelta(days=1), progress=False)
    with pytest.raises(ValueError, match="already describes"):
        simulate_line(tmp_path / "other", days=1, per_day=2, start=START, truth=second.truth_path, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"days": 0}, "days must be a positive integer"),
        ({"per_day": 0}, "per_day must be a positive integer"),
        ({"fault": FaultSpec("blur", start_day=5)}, "outside the simulated days"),
        ({"lines": ("L1/x",)}, "bad line name"),
        ({"lines": ("L1", "L1")}, "duplicate"),
        ({"order": "random"}, "unknown order"),
        ({"pool": "test"}, "unknown pool"),
        ({"defect_rate": 1.5}, "defect rate"),
        ({"truth": "INSIDE"}, "outside the drop folder"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    out = tmp_path / "drop"
    if kwargs.get("truth") == "INSIDE":
        kwargs = {**kwargs, "truth": out / "truth.parquet"}
    args = {"days": 2, "per_day": 2, "start": START, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        simulate_line(out, **args)
    assert not out.exists() or not any(out.rglob("*.png"))


def test_cli_end_to_end(tmp_path, capsys):
    out, truth = tmp_path / "drop", tmp_path / "eval" / "truth.parquet"
    rc = main(["simulate", "--out", str(out), "--days", "2", "--per-day", "3", "--lines", "L1,L2",
               "--start", "2026-11-27", "--seed", "4", "--fault", "vignetting", "--fault-start", "2026-11-28",
               "--severity", "0.5", "--ramp-days", "0", "--pool", "calibration", "--order", "shuffled",
               "--truth", str(truth), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_images"] == 12 and summary["lines"] == ["L1", "L2"]
    assert summary["dates"] == ["2026-11-27", "2026-11-28"]
    t = pd.read_parquet(truth)
    assert set(t["pool"]) == {"calibration"}
    assert np.allclose(t.loc[t["day"] == 1, "fault_value"], 0.2)
    assert (t.loc[t["day"] == 0, "fault_severity"] == 0).all()
    assert len(list(out.rglob("*.png"))) == 12 and len(list(out.rglob("mes_export.csv"))) == 4


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--fault", "smudge"], "unknown fault 'smudge'"),
        (["--days", "0"], "days must be a positive integer"),
        (["--fault", "blur", "--fault-start", "7"], "outside the simulated days"),
        (["--fault", "blur", "--fault-start", "2026-11-20"], "outside the simulated days"),
        (["--severity", "1"], "without --fault"),
        (["--start", "27/11/2026"], "bad date"),
    ],
)
def test_cli_bad_arguments_exit_2_with_message(tmp_path, capsys, extra, match):
    argv = ["simulate", "--out", str(tmp_path / "drop"), "--days", "2", "--per-day", "2", "--start", "2026-11-27"]
    assert main(argv + extra) == 2
    assert re.search(match, capsys.readouterr().err)


def test_cli_refuses_existing_dates(tmp_path, capsys):
    argv = ["simulate", "--out", str(tmp_path / "drop"), "--days", "1", "--per-day", "2", "--json"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    assert "already holds a simulation" in capsys.readouterr().err


def test_cli_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "--fault gain" in text and "mes_export.csv" in text


def test_fault_schedule_per_day_counts_and_defect_shares(tmp_path):
    faults = (FaultSpec("gain", start_day=1, severity=1.0, duration_days=1, lines=("L1",)),
              FaultSpec("illumination", start_day=2, severity=1.0, duration_days=1, lines=("L2",)),
              FaultSpec("defect_rate", start_day=2, severity=1.0, duration_days=1, lines=("L1",)))
    res = simulate_line(tmp_path / "d", days=4, per_day=(20, 40), lines=("L1", "L2"), start=START, seed=1,
                        defect_rate=[0.0, 0.05, 0.05, 0.5], faults=faults, order="shuffled", pool="all",
                        capture_noise_dn=0, progress=False)
    t = pd.read_parquet(res.truth_path)
    counts = t.groupby(["line", "day"]).size()
    assert counts.between(20, 40).all() and counts.nunique() > 1
    kind = t.groupby(["line", "day"])["fault_kind"].agg(lambda s: "/".join(sorted(set(s))))
    assert kind[("L1", 1)] == "gain" and kind[("L1", 2)] == "defect_rate" and kind[("L2", 2)] == "illumination"
    assert not t.loc[(t["line"] == "L1") & (t["day"].isin([0, 3])), "fault_active"].any()  # repaired after 1 day
    p1 = t.assign(d=t["prob"] == 1).groupby(["line", "day"])["d"].mean()
    assert p1[("L2", 0)] == 0.0 and p1[("L2", 3)] > 0.3 and p1[("L1", 2)] > 0.2  # per-day share, surge on top
    data = load_elpv()
    for row in t[(t["line"] == "L1") & (t["day"] == 1)].head(3).itertuples():
        src = data.images[row.elpv_index].astype(float)
        assert read(res.out / row.path).mean() == pytest.approx(0.75 * src.mean(), abs=2)
    with pytest.raises(ValueError, match="overlap"):
        simulate_line(tmp_path / "e", days=3, per_day=2, start=START, progress=False,
                      faults=(FaultSpec("product_mix", start_day=0), FaultSpec("product_mix", start_day=1)))
    with pytest.raises(ValueError, match="one share per day"):
        simulate_line(tmp_path / "f", days=3, per_day=2, start=START, defect_rate=[0.1, 0.2], progress=False)
    with pytest.raises(ValueError, match="range"):
        simulate_line(tmp_path / "g", days=3, per_day=(5, 2), start=START, progress=False)


def test_cli_schedule_file_per_day_range_and_fault_days(tmp_path, capsys):
    sched = tmp_path / "faults.csv"
    sched.write_text("kind,start,days,severity,lines\nblur,1,1,1.0,L2\nnoise,2026-11-29,1,0.5,\n")
    out, truth = tmp_path / "drop", tmp_path / "truth.parquet"
    rc = main(["simulate", "--out", str(out), "--days", "3", "--per-day", "4-6", "--lines", "L1,L2", "--start",
               "2026-11-27", "--schedule", str(sched), "--defect-rate", "0.1,0.1,0.2", "--truth", str(truth),
               "--fault", "gain", "--fault-start", "0", "--fault-days", "1", "--json"])
    assert rc == 0, capsys.readouterr().err
    t = pd.read_parquet(truth)
    active = t[t["fault_active"]].groupby(["line", "day"])["fault_kind"].first().to_dict()
    assert active == {("L1", 0): "gain", ("L2", 0): "gain", ("L2", 1): "blur", ("L1", 2): "noise",
                      ("L2", 2): "noise"}
    assert t.groupby(["line", "day"]).size().between(4, 6).all()
    sched.write_text("kind,start,days,severity\nsmudge,1,1,1\n")
    assert main(["simulate", "--out", str(tmp_path / "x"), "--days", "3", "--per-day", "2", "--start", "2026-11-27",
                 "--schedule", str(sched)]) == 2
    assert "row 1: unknown fault 'smudge'" in capsys.readouterr().err
    assert main(["simulate", "--out", str(tmp_path / "y"), "--days", "3", "--per-day", "2x", "--start",
                 "2026-11-27"]) == 2
    assert "bad --per-day" in capsys.readouterr().err


# ---- golden samples ------------------------------------------------------------------------------------------------
def test_golden_cells_are_imaged_each_shift_through_the_faulty_camera_and_leave_production_unchanged(tmp_path):
    spec = FaultSpec("gain", start_day=1, severity=1.0)  # gain x0.75 from day 1
    kw = dict(days=2, per_day=6, lines=("L1",), start=START, seed=5, fault=spec, progress=False)
    plain = simulate_line(tmp_path / "plain", truth=tmp_path / "plain.parquet", **kw)
    gold = simulate_line(tmp_path / "gold", truth=tmp_path / "gold.parquet", golden_cells=3, **kw)
    # a line without golden cells is exactly as before; golden captures do not disturb the production stream
    assert tuple(pd.read_csv(plain.metadata_files[0]).columns) == MES_COLUMNS
    prod = [p for p in gold.paths if "G0" not in p.name]
    assert [p.relative_to(gold.out) for p in prod] == [p.relative_to(plain.out) for p in plain.paths]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(prod, plain.paths, strict=True))
    assert gold.n_images == 2 * (6 + 3 * 3)

    mes = pd.concat([pd.read_csv(m, keep_default_na=False) for m in gold.metadata_files], ignore_index=True)
    assert tuple(mes.columns) == (*MES_COLUMNS, "sample_kind", "golden_cell")
    g = mes[mes["sample_kind"] == "golden"]
    assert len(g) == 18 and set(mes.loc[mes["sample_kind"] != "golden", "sample_kind"]) == {"production"}
    assert set(g["golden_cell"]) == {"G01", "G02", "G03"} and (mes.loc[mes["sample_kind"] != "golden",
                                                                         "golden_cell"] == "").all()
    local = [dt.datetime.fromisoformat(t) for t in g["timestamp"]]
    assert all(t.hour in (0, 8, 16) and t.minute < HANDOVER_MIN for t in local)  # in the hand-over of each shift
    stamps = [dt.datetime.fromisoformat(t) for t in pd.read_csv(gold.metadata_files[0])["timestamp"]]
    assert stamps == sorted(stamps)

    truth = pd.read_parquet(gold.truth_path)
    gt = truth[truth["sample_kind"] == "golden"]
    assert gt.groupby("golden_cell")["elpv_index"].nunique().eq(1).all()  # the same physical cell every time
    assert (gt["prob"] == 0).all() and gt["elpv_index"].nunique() == 3
    # the gain fault applies to the golden captures of day 1 (x0.75), not day 0
    bright = gt.assign(m=[read(gold.out / p).mean() for p in gt["path"]]).groupby(["golden_cell", "day"])["m"].mean()
    ratio = bright.xs(1, level="day") / bright.xs(0, level="day")
    assert ratio.between(0.72, 0.78).all(), ratio
    assert gt["fault_active"].tolist() == [d == 1 for d in gt["day"]]


def test_golden_cells_argument_is_checked(tmp_path):
    with pytest.raises(ValueError, match="golden_cells"):
        simulate_line(tmp_path / "d", days=1, per_day=2, golden_cells=-1, progress=False)
    assert main(["simulate", "--out", str(tmp_path / "c"), "--days", "1", "--per-day", "2", "--golden-cells", "2",
                 "--json"]) == 0
    mes = pd.read_csv(tmp_path / "c" / "L1" / "2026-01-05" / "mes_export.csv")
    assert (mes["sample_kind"] == "golden").sum() == 6


def test_mirror_repeats_show_each_replay_of_a_cell_in_its_next_view(tmp_path):
    from pipeline.line.simulate import MIRRORS, mirrored

    kw = dict(days=1, per_day=300, start=START, seed=2, capture_noise_dn=0, order="shuffled", defect_rate=1.0,
              progress=False)
    res = simulate_line(tmp_path / "m", mirror_repeats=True, **kw)
    truth = pd.read_parquet(res.truth_path).sort_values("timestamp")
    data = load_elpv()
    assert truth["elpv_index"].value_counts().max() >= 2  # the pool's p = 1 cells are replayed
    seen: dict[int, int] = {}
    for row in truth.itertuples():
        assert row.mirror == seen.get(row.elpv_index, 0) % MIRRORS
        seen[row.elpv_index] = seen.get(row.elpv_index, 0) + 1
        assert np.array_equal(read(res.out / row.path), mirrored(data.images[row.elpv_index], row.mirror))
    first_views = truth.groupby("elpv_index").head(MIRRORS)
    assert len({(res.out / p).read_bytes() for p in first_views["path"]}) == len(first_views)  # no capture twice
    plain = pd.read_parquet(simulate_line(tmp_path / "p", **kw).truth_path)
    assert (plain["mirror"] == 0).all() and plain["elpv_index"].tolist() == truth["elpv_index"].tolist()


def test_mirrored_views():
    from pipeline.line.simulate import mirrored

    img = np.arange(6).reshape(2, 3)
    assert np.array_equal(mirrored(img, 0), img) and np.array_equal(mirrored(img, 4), img)
    assert np.array_equal(mirrored(img, 1), np.rot90(img, 2))
    assert np.array_equal(mirrored(img, 2), img[:, ::-1]) and np.array_equal(mirrored(img, 3), img[::-1])
