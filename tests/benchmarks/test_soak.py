"""The soak harness: its scoring on hand-made records, and the fast soak (the loop on a tiny line) end to end."""

from __future__ import annotations

import datetime as dt
import json

import pandas as pd
import pytest

from benchmarks.soak import (
    DEFAULT_SCHEDULE,
    SoakConfig,
    config_from_args,
    environment,
    parse_json_answer,
)
from benchmarks.soak_eval import (
    alert_table,
    false_alerts,
    fault_outcome,
    fill_from_state,
    harness_times,
    line_days,
    named_families,
    uptime,
    verdict_table,
)
from pipeline.line.faults import FaultSpec


def _config(tmp_path) -> SoakConfig:
    return SoakConfig(home=tmp_path, days=10, lines=("L1", "L2"), faults=(
        FaultSpec("blur", start_day=2, duration_days=2, lines=("L1",)),
        FaultSpec("product_mix", start_day=5, duration_days=2, lines=("L2",)),
    ))


def _monitor_record(day: int, windows: list[tuple[str, int, bool, str]]) -> dict:
    from pipeline.line.simulate import DEFAULT_START

    ws = [{"line": line, "window_id": (DEFAULT_START + dt.timedelta(days=d)).isoformat(), "detected": det,
           "description": desc} for line, d, det, desc in windows]
    return {"day": day, "command": "monitor", "rc": 0, "seconds": 1.0, "result": {"windows": ws}}


def _alert(tmp_path, kind, line, day, tests, summary, alert_id="a1"):
    from pipeline.line.simulate import DEFAULT_START

    path = tmp_path / "state" / "alerts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    ev = {"kind": kind, "window_id": (DEFAULT_START + dt.timedelta(days=day)).isoformat(),
          "alert": {"id": alert_id, "line": line, "tests": tests, "summary": summary}}
    with open(path, "a") as fh:
        fh.write(json.dumps(ev) + "\n")


def test_named_families_read_the_tests_and_the_text():
    assert named_families("image quality: illumination non-uniformity moved by −2.1 σ", ["quality"]) == \
        ["illumination"]
    assert named_families("axis 3 (brightness, r = 0.9) moved; image quality: noise level moved", ["axes", "quality"]) \
        == ["latent", "noise"]
    assert named_families("drift detected (scores); largest shift: axis 7", ["scores"]) == ["defect rate"]


def test_line_day_status_and_uptime(tmp_path):
    cfg = _config(tmp_path)
    days = line_days(cfg)
    st = days.set_index(["line", "day"])["status"]
    assert st[("L1", 0)] == "commissioning" and st[("L1", 2)] == "fault:blur" and st[("L1", 4)] == "recovery"
    assert st[("L1", 6)] == "healthy" and st[("L2", 5)] == "mix" and st[("L2", 7)] == "healthy"
    records = [_monitor_record(d, [("L1", d, False, ""), ("L2", d, False, "")]) for d in range(1, 10) if d != 4]
    records.append(_monitor_record(5, [("L1", 4, False, "")]))  # day 4 of L1 tested late only
    up = uptime(cfg, verdict_table(cfg, records), days)
    assert up["line_days"] == 18 and up["with_verdict"] == 16
    assert "L1 day 4 (verdict later)" in up["missing"] and "L2 day 4" in up["missing"]


def test_fault_outcomes_and_false_alerts(tmp_path):
    cfg = _config(tmp_path)
    _alert(tmp_path, "opened", "L1", 3, ["quality"], "image quality: fine-detail ratio moved by +2.9 σ")
    _alert(tmp_path, "resolved", "L1", 5, ["quality"], "image quality: fine-detail ratio moved by +2.9 σ")
    _alert(tmp_path, "opened", "L2", 6, ["axes"], "axis 2 moved", alert_id="a2")
    _alert(tmp_path, "opened", "L2", 8, ["quality"], "image quality: noise level moved", alert_id="a3")
    alerts = alert_table(cfg)
    records = [_monitor_record(d, [("L1", d, d in (2, 3), "fine-detail"), ("L2", d, d == 6, "axis 2")])
               for d in range(1, 10)]
    verdicts = verdict_table(cfg, records)
    blur = fault_outcome(cfg, cfg.faults[0], verdicts, alerts)
    assert blur["alerted_in_time"] and blur["resolved_in_time"] and blur["ok"] and blur["drift_days"] == [2, 3]
    mix = fault_outcome(cfg, cfg.faults[1], verdicts, alerts)
    assert not mix["ok"] and mix["alerts"] == 1
    fa = false_alerts(alerts, line_days(cfg))
    assert fa["false_alerts"] == 2 and fa["healthy_line_days"] == 14  # the mix alert and the day-8 one


def test_a_camera_alert_names_a_camera_fault_rightly_only_on_a_line_with_golden_cells(tmp_path):
    faults = (FaultSpec("gain", start_day=2, duration_days=2, lines=("L1",)),
              FaultSpec("defect_rate", start_day=5, duration_days=2, lines=("L1",)))
    cfg = SoakConfig(home=tmp_path, days=10, lines=("L1",), faults=faults, golden_cells=5)
    _alert(tmp_path, "opened", "L1", 2, ["camera"], "camera/optics changed: brightness -25 % on the golden cells")
    _alert(tmp_path, "opened", "L1", 5, ["camera"], "camera/optics changed: brightness -3 % on the golden cells",
           alert_id="a2")
    alerts = alert_table(cfg)
    assert alerts["families"].tolist() == [["camera"], ["camera"]]
    verdicts = verdict_table(cfg, [_monitor_record(d, [("L1", d, False, "")]) for d in range(1, 10)])
    gain, surge = (fault_outcome(cfg, f, verdicts, alerts) for f in faults)
    assert gain["alerted_in_time"] and gain["expected_family"] == "latent or camera"
    assert not surge["alerted_in_time"]  # a surge of defective cells is no camera fault
    no_golden = SoakConfig(home=tmp_path, days=10, lines=("L1",), faults=faults)
    assert not fault_outcome(no_golden, faults[0], verdicts, alerts)["alerted_in_time"]


def test_a_soak_stopped_early_is_scored_on_the_days_it_ran(tmp_path):
    from benchmarks.soak import first_days

    cfg = SoakConfig(home=tmp_path)  # the default 30-day schedule: the defect surge starts on day 21
    cut = first_days(cfg, 21)
    assert cut.days == 21 and [f.kind for f in cut.faults] == [f.kind for f in cfg.faults if f.start_day < 21]
    assert "defect_rate" not in {f.kind for f in cut.faults} and len(line_days(cut)) == 2 * 21
    with pytest.raises(ValueError, match="days must be in"):
        first_days(cfg, 31)


def test_golden_captures_are_left_out_of_the_production_truth():
    from benchmarks.soak_eval import production_truth

    truth = pd.DataFrame({"serial": ["a", "b", "c"], "sample_kind": ["production", "golden", None]})
    assert production_truth(truth)["serial"].tolist() == ["a", "c"]
    assert production_truth(truth.drop(columns="sample_kind"))["serial"].tolist() == ["a", "b", "c"]


def test_a_resolution_the_soak_could_not_see_is_not_counted_as_missed(tmp_path):
    from benchmarks.soak_eval import target_rows

    cfg = SoakConfig(home=tmp_path, days=10, lines=("L1", "L2"), faults=(
        FaultSpec("blur", start_day=2, duration_days=2, lines=("L1",)),  # ends day 4: days 4-5 to resolve
        FaultSpec("noise", start_day=7, duration_days=2, lines=("L2",)),  # ends day 9: day 10 is after the soak
    ))
    _alert(tmp_path, "opened", "L1", 2, ["quality"], "image quality: fine-detail ratio moved by +2.9 σ")
    _alert(tmp_path, "resolved", "L1", 7, ["quality"], "image quality: fine-detail ratio moved by +2.9 σ")
    _alert(tmp_path, "opened", "L2", 7, ["quality"], "image quality: noise level moved by +9 σ", alert_id="n")
    alerts = alert_table(cfg)
    verdicts = verdict_table(cfg, [_monitor_record(d, [("L1", d, 2 <= d < 7, "fine-detail"),
                                                       ("L2", d, d >= 7, "noise level")]) for d in range(1, 10)])
    blur, noise = (fault_outcome(cfg, f, verdicts, alerts) for f in cfg.faults)
    assert blur["resolved_in_time"] is False and not blur["ok"]  # resolved on day 7: too late
    assert noise["resolved_in_time"] is None and noise["ok"]  # still open on day 9, the soak's last day
    s = {"faults": [blur, noise], "uptime": {"uptime": 1.0, "with_verdict": 1, "line_days": 1},
         "false_alerts": {"per_30": 0.0, "false_alerts": 0, "healthy_line_days": 1},
         "flags": {"configured_fpr": 0.05}, "cycle": {"day_cycle_s": {"max": 1.0, "median": 1.0}}}
    row = [r for r in target_rows(s) if r.startswith("| every alert resolved")][0]
    assert "0/1 (1 more end(s) too close to the soak's end to tell)" in row and "not met" in row


def test_a_fault_never_alerted_is_missed_once_not_also_unresolved_and_a_mix_verdict_is_not_an_alert(tmp_path):
    from benchmarks.soak_eval import target_rows

    cfg = SoakConfig(home=tmp_path, days=10, lines=("L1", "L2"), faults=(
        FaultSpec("blur", start_day=2, duration_days=2, lines=("L1",)),
        FaultSpec("defect_rate", start_day=5, duration_days=2, lines=("L2",)),
        FaultSpec("product_mix", start_day=5, duration_days=2, lines=("L1",)),
    ))
    _alert(tmp_path, "opened", "L1", 2, ["quality"], "image quality: fine-detail ratio moved by +2.9 σ")
    _alert(tmp_path, "resolved", "L1", 4, ["quality"], "image quality: fine-detail ratio moved by +2.9 σ")
    alerts = alert_table(cfg)
    verdicts = verdict_table(cfg, [_monitor_record(d, [("L1", d, d in (2, 3, 5), "fine-detail"),
                                                       ("L2", d, False, "")]) for d in range(1, 10)])
    blur, surge, mix = (fault_outcome(cfg, f, verdicts, alerts) for f in cfg.faults)
    assert blur["ok"] and not surge["alerted_in_time"] and surge["resolved_in_time"] is None and not surge["ok"]
    assert mix["ok"] and mix["drift_days"] == [5] and mix["alerts"] == 0  # called drift once, never alerted
    s = {"faults": [blur, surge, mix], "uptime": {"uptime": 1.0, "with_verdict": 1, "line_days": 1},
         "false_alerts": {"per_30": 0.0, "false_alerts": 0, "healthy_line_days": 1},
         "flags": {"configured_fpr": 0.05}, "cycle": {"day_cycle_s": {"max": 1.0, "median": 1.0}}}
    rows = {r.split(" | ")[0]: r for r in target_rows(s)}
    assert "1/1 (1 fault(s) never alerted, nothing to resolve)" in rows["| every alert resolved within 2 days after "
                                                                        "its fault ends"]
    assert rows["| every fault alerted within 2 line-days, right family named"].endswith("**not met** |")
    mix_row = rows["| product-mix change not alerted"]
    assert "0 alert(s); drift verdict on 1 of 2 mix days" in mix_row and mix_row.endswith("| met |")


def test_config_from_the_command_line_and_environment(tmp_path):
    import argparse

    ns = argparse.Namespace(name="x", home=str(tmp_path), fast=False, driver=None, days=12, lines="L1",
                            per_day="100-150", code_dir=None, preset=None, steps=None, threads=None,
                            schedule=None, replay_unchanged=False, golden_cells=None)
    cfg = config_from_args(ns)
    assert cfg.days == 12 and cfg.lines == ("L1",) and cfg.per_day == (100, 150) and cfg.mirror_repeats
    assert not config_from_args(argparse.Namespace(**{**vars(ns), "replay_unchanged": True})).mirror_repeats
    assert cfg.golden_cells == 0 and config_from_args(argparse.Namespace(**{**vars(ns), "golden_cells": 5})
                                                      ).golden_cells == 5
    with pytest.raises(ValueError, match="golden_cells"):
        config_from_args(argparse.Namespace(**{**vars(ns), "golden_cells": 51}))
    assert all(f.start_day < 12 and f.lines == ("L1",) for f in cfg.faults)
    env = environment(cfg)
    assert env["LINEWATCH_HOME"] == str(tmp_path.resolve()) and env["MLFLOW_TRACKING_URI"].startswith("sqlite:///")
    assert env["OMP_NUM_THREADS"] == "1"
    assert parse_json_answer('log line\n{\n "a": 1\n}\n') == {"a": 1} and parse_json_answer("nothing") is None


def test_a_finished_soak_is_rescored_with_the_settings_it_ran_with(tmp_path):
    from benchmarks.soak import COMPACT_SCHEDULE, config_from_dict, saved_config

    cfg = SoakConfig(name="s", home=tmp_path, days=14, faults=COMPACT_SCHEDULE, code_dir=tmp_path / "code",
                     per_day=(100, 200), monitor={"lookback_days": 1.0})
    assert config_from_dict(cfg.to_dict()) == cfg
    assert saved_config(tmp_path) is None
    (tmp_path / "soak_config.json").write_text(json.dumps(cfg.to_dict()))
    assert saved_config(tmp_path) == cfg  # --report-only / --resume use it, whatever the command line says
    old = {k: v for k, v in cfg.to_dict().items() if k != "mirror_repeats"}
    assert not config_from_dict(old).mirror_repeats  # soaks saved before the option replayed cells unchanged


def test_replayed_views_are_the_captures_of_a_cell_view_the_line_showed_before():
    from benchmarks.soak_eval import replayed_views

    truth = pd.DataFrame({"elpv_index": [7, 7, 7, 8, 7], "mirror": [0, 1, 0, 0, 1],
                          "timestamp": ["2026-01-05T01:00:00+01:00", "2026-01-05T02:00:00+01:00",
                                        "2026-01-06T00:30:00+01:00", "2026-01-05T03:00:00+01:00",
                                        "2026-01-06T00:00:00+00:00"]})
    # in time order (UTC): 7/0, 7/1, 8/0, 7/0 again (00:30 local is 23:30 UTC), 7/1 again
    assert replayed_views(truth).tolist() == [False, False, True, False, True]
    assert replayed_views(truth.drop(columns="mirror")).tolist() == [False, True, True, False, True]


def test_compact_schedule_has_every_fault_kind_in_14_days(tmp_path):
    import argparse

    ns = argparse.Namespace(name="x", home=str(tmp_path), fast=False, driver=None, days=14, lines=None,
                            per_day=None, code_dir=None, preset=None, steps=None, threads=None, schedule="compact",
                            replay_unchanged=False, golden_cells=None)
    cfg = config_from_args(ns)
    assert {f.kind for f in cfg.faults} == {f.kind for f in DEFAULT_SCHEDULE}
    for line in cfg.lines:
        spans = sorted((f.start_day, f.start_day + f.duration_days) for f in cfg.faults if line in f.lines)
        assert all(end < nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))  # a healthy day between
        assert spans[-1][1] <= cfg.days
    # without --days the compact schedule runs 15 days: its last fault's end and two days to resolve
    short = config_from_args(argparse.Namespace(**{**vars(ns), "days": None}))
    assert short.days == 15 == max(f.start_day + f.duration_days for f in short.faults) + 2
    assert short.faults == cfg.faults
    assert config_from_args(argparse.Namespace(**{**vars(ns), "days": None, "schedule": None})).days == 30


@pytest.mark.slow
def test_fast_soak_keeps_monitoring_and_alerts_on_the_fault(fast_soak):
    from flows.cli import EXIT_NO_CANDIDATE

    cfg, records, s = fast_soak
    assert len(records) == 3 * cfg.days
    assert s["uptime"]["uptime"] == 1.0, s["uptime"]  # a verdict for every monitored line-day, nothing by hand
    gain = s["faults"][0]
    assert gain["first_alert_day"] in (5, 6), gain  # the fault (days 5-6) is alerted within two line-days ...
    assert gain["alerted_in_time"], gain  # ... naming the fault's family
    nightly_failures = [f for f in s["failures"] if f["command"] == "nightly"]
    assert all(f["rc"] == EXIT_NO_CANDIDATE for f in nightly_failures), nightly_failures  # the champion stays
    no_candidate = [r for r in records if r["command"] == "nightly" and r["rc"] == EXIT_NO_CANDIDATE]
    for r in no_candidate:  # the nightly still monitored with the champion; before the first one it said why not
        assert r["result"]["monitor"]["windows"] if r["day"] >= cfg.first_monitored_day else \
            r["result"]["monitor_skipped"], r


@pytest.mark.slow
def test_fast_soak_waits_for_four_line_days_and_raises_no_false_alert(fast_soak):
    cfg, records, s = fast_soak
    first = [r for r in records if r["command"] == "nightly" and (r["result"] or {}).get("retrain", {}).get(
        "promoted")][0]
    assert first["day"] == cfg.first_monitored_day == 3  # days 0-3: the reference's fourth line-day
    day2 = [r["result"]["retrain"]["reason"] for r in records if r["command"] == "nightly" and r["day"] == 2]
    assert "holds 3 line-periods" in day2[0], day2  # enough images on day 2, but only three days of them
    assert s["false_alerts"]["false_alerts"] == 0, s["false_alerts"]
    early = [r for r in records if r["command"] == "monitor" and r["day"] <= cfg.first_monitored_day]
    assert all(r["rc"] == 4 and r["result"]["skipped"].startswith("no champion yet") for r in early), early
    said = {f["message"] for f in s["failures"] if f["command"] == "monitor"}
    assert said and all(m.startswith("no champion yet") for m in said), said  # the reason, not a log line


def test_a_non_zero_exit_is_explained_by_the_answer_before_the_log():
    from benchmarks.soak_eval import why_not_zero

    skipped = {"rc": 4, "result": {"skipped": "no champion yet: x"}, "stderr_tail": "INFO prefect: Stopping"}
    assert why_not_zero(skipped) == "no champion yet: x"
    nightly = {"rc": 4, "result": {"retrain": {"status": "no_candidate", "reason": "holds 3 line-periods"},
                                   "monitor_skipped": "no champion yet"}, "stderr_tail": "INFO prefect: Stopping"}
    assert why_not_zero(nightly) == "no champion yet; holds 3 line-periods"
    crashed = {"rc": 1, "result": None, "stderr_tail": "noise\nlinewatch monitor: failed: OSError: disk\nbye\n"}
    assert why_not_zero(crashed) == "linewatch monitor: failed: OSError: disk"


def test_harness_times_read_the_progress_lines_over_midnight():
    text = ("[23:59:00] s day 0 (2026-01-05): ingest exit 0 in 1 s\n"
            "[00:01:00] s day 0 (2026-01-05): monitor exit 0 in 120 s\n"
            "[00:02:00] other day 0 (2026-01-05): nightly exit 0 in 1 s\nnoise\n")
    times = harness_times(text, "s", dt.date(2026, 12, 4))
    assert times == {(0, "ingest"): pd.Timestamp("2026-12-04 23:59:00", tz="UTC"),
                     (0, "monitor"): pd.Timestamp("2026-12-05 00:01:00", tz="UTC")}


def test_answers_the_commands_did_not_print_are_rebuilt_from_the_verdict_log(tmp_path):
    from pipeline.line.simulate import DEFAULT_START

    cfg = _config(tmp_path)
    (tmp_path / "soak_config.json").write_text("{}")
    state = tmp_path / "state"
    state.mkdir()
    t0 = pd.Timestamp("2026-12-04 10:00", tz="UTC")
    day = [(DEFAULT_START + dt.timedelta(days=d)).isoformat() for d in range(2)]
    rows = [("L1", day[0], "1", t0 + pd.Timedelta(minutes=5), False),   # day 0's nightly, v1
            ("L1", day[1], "1", t0 + pd.Timedelta(minutes=15), True),   # day 1's monitor, v1
            ("L1", day[1], "2", t0 + pd.Timedelta(minutes=25), False)]  # day 1's nightly re-test, v2
    pd.DataFrame([{"line": ln, "window_id": w, "model_version": v, "original": v == "1", "tested_at": t,
                   "detected": det, "summary": "s", "description": "", "n_images": 100, "n_tested": 100,
                   "n_anomalous": 5} for ln, w, v, t, det in rows]).to_parquet(state / "windows.parquet")
    pd.DataFrame({"image_id": ["a", "b"], "model_version": ["1", "2"], "model_id": ["m1", "m2"], "score": [0.0, 0.0],
                  "is_anomaly": [False, False], "threshold": [1.0, 1.0]}).to_parquet(state / "scores.parquet")
    done = [t0 + pd.Timedelta(minutes=m) for m in (1, 2, 10, 11, 20, 30)]
    records = [{"day": d, "command": c, "rc": 0 if (d, c) != (0, "monitor") else 1, "result": None,
                "finished_at": t.isoformat()}
               for (d, c), t in zip([(d, c) for d in (0, 1) for c in ("ingest", "monitor", "nightly")], done,
                                    strict=True)]
    got = fill_from_state(cfg, records)
    assert got[1]["result"] is None  # a failed command stays without an answer
    assert [w["window_id"] for w in got[2]["result"]["monitor"]["windows"]] == [day[0]]
    assert got[4]["result"]["model_id"] == "m1" and got[4]["result"]["windows"][0]["detected"] is True
    assert got[5]["result"]["monitor"]["model_version"] == "2"
    verdicts = verdict_table(cfg, got)
    missing = uptime(cfg, verdicts, line_days(cfg))["missing"]
    assert "L1 day 1" not in missing and "L2 day 1" in missing  # L1 day 1's verdict was made on its own day
