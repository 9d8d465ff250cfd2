"""Flows: retry policy, schedules, automation, CLI wiring, tasks via ``.fn()``, and end-to-end runs (slow)."""

from __future__ import annotations

import uuid

import pandas as pd
import pytest

from flows import StepFailed, is_retryable, retry_delays, use_local_prefect_home
from tests.flows.world import PER_DAY, make_world, monitor_params, set_env, tiny_retrain_params


def test_retry_policy_retries_transient_errors_only(monkeypatch):
    from pipeline.catalog.tables import CatalogLockedError
    from pipeline.tracking import TrackingUnavailable

    assert is_retryable(TrackingUnavailable("down")) and is_retryable(CatalogLockedError("busy"))
    assert is_retryable(TimeoutError()) and is_retryable(OSError("disk"))
    assert not is_retryable(ValueError("too few images")) and not is_retryable(None)
    monkeypatch.setenv("LINEWATCH_RETRY_DELAY_S", "2")
    assert retry_delays() == [2.0, 6.0, 18.0]
    err = StepFailed("retrain", TrackingUnavailable("mlflow down"))
    assert "step 'retrain' failed: TrackingUnavailable: mlflow down" in str(err)


def test_prefect_home_goes_under_linewatch_home(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert use_local_prefect_home(tmp_path) == tmp_path / "prefect"
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect:4200/api")
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    use_local_prefect_home(tmp_path / "other")
    assert "PREFECT_HOME" not in __import__("os").environ  # a configured server is left alone


def test_deployments_have_the_cron_schedules():
    from flows.deploy import build_deployments

    deps = {d.name: d for d in build_deployments("Europe/Berlin")}
    assert set(deps) == {"nightly", "monitor", "ingest", "retrain"}
    crons = {n: [(s.schedule.cron, s.schedule.timezone) for s in d.schedules] for n, d in deps.items()}
    assert crons["nightly"] == [("0 2 * * *", "Europe/Berlin")]
    assert crons["monitor"] == [("*/15 * * * *", "Europe/Berlin")]
    assert crons["ingest"] == [("*/10 * * * *", "Europe/Berlin")]
    assert crons["retrain"] == []


def test_drift_alert_automation_calls_a_webhook_on_the_alert_event():
    from flows.deploy import drift_alert_automation
    from flows.monitor import ALERT_EVENT

    block = uuid.uuid4()
    auto = drift_alert_automation(block)
    assert auto.trigger.expect == {ALERT_EVENT}
    assert auto.trigger.threshold == 1
    (action,) = auto.actions
    assert action.type == "call-webhook" and action.block_document_id == block
    assert "{{ event.payload.description }}" in action.payload


def test_cli_registers_the_flow_commands():
    import argparse

    from flows.cli import register

    parser = argparse.ArgumentParser(prog="linewatch")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--preset", "tiny", "--per-day", "20", "--no-prefect"])
    assert args.func.__name__ == "cmd_demo" and args.per_day == 20 and args.no_prefect
    assert parser.parse_args(["nightly", "--from-scratch"]).func.__name__ == "cmd_nightly"
    assert parser.parse_args(["monitor", "--lookback-days", "1"]).func.__name__ == "cmd_monitor"
    mon = parser.parse_args(["monitor", "--no-quality", "--no-scores", "--encode-chunk-size", "256"])
    assert mon.no_quality and mon.no_scores and mon.encode_chunk_size == 256
    from flows.cli import _monitor_params

    assert _monitor_params(parser.parse_args(["monitor", "--no-heatmaps"]))["heatmaps"] is False
    assert "heatmaps" not in _monitor_params(parser.parse_args(["monitor"]))
    assert _monitor_params(parser.parse_args(["monitor", "--no-fusion"]))["fusion"] is False
    assert "fusion" not in _monitor_params(parser.parse_args(["monitor"]))
    assert _monitor_params(parser.parse_args(["monitor"]))["residual_weight"] == 0.0  # the patch family alone
    assert _monitor_params(parser.parse_args(["monitor", "--residual-weight", "1"]))["residual_weight"] == 1.0
    assert _monitor_params(parser.parse_args(["monitor", "--no-recentre"]))["recentre"] is False
    assert "recentre" not in _monitor_params(parser.parse_args(["monitor"]))
    assert parser.parse_args(["monitor"]).encode_chunk_size is None
    assert parser.parse_args(["serve", "--timezone", "UTC"]).func.__name__ == "cmd_serve"
    assert parser.parse_args(["retrain"]).func.__name__ == "cmd_retrain"


def test_ingest_task_fn_registers_the_drop_folder(tmp_path, monkeypatch):
    from flows.ingest import ingest_task
    from pipeline.line.simulate import simulate_line
    from pipeline.settings import ensure_dirs, get_settings

    set_env(monkeypatch, tmp_path)
    s = ensure_dirs(get_settings())
    simulate_line(s.drop_dir, days=1, per_day=8, seed=0, truth=tmp_path / "truth.parquet", progress=False)
    out = ingest_task.fn()
    assert out["registered"] == 8
    assert ingest_task.fn()["registered"] == 0  # exactly once


def test_alert_events_are_emitted_for_new_alerts_only(monkeypatch):
    import prefect.events

    from flows.monitor import ALERT_EVENT, emit_alert_events

    sent = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kw: sent.append(kw))
    result = {"model_version": "3", "windows": [
        {"line": "L1", "window_id": "d1", "detected": True, "events": [], "top_axis": 1},
        {"line": "L1", "window_id": "d2", "detected": True, "events": [{"kind": "opened"}], "top_axis": 4,
         "description": "axis 4: brightness (r = 0.93)", "effect": -2.1, "summary": "drift", "attribution": "a4"},
    ]}
    assert emit_alert_events(result) == 1
    assert sent[0]["event"] == ALERT_EVENT and sent[0]["resource"]["prefect.resource.id"] == "linewatch.line.L1"
    assert sent[0]["payload"]["top_axis"] == 4 and sent[0]["payload"]["window_id"] == "d2"


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_nightly_flow_end_to_end(tmp_path, monkeypatch, prefect_harness):
    from flows.nightly import nightly_flow
    from pipeline import tracking

    settings = make_world(tmp_path / "home", monkeypatch)
    out = nightly_flow(ingest=True, retrain=tiny_retrain_params(), monitor=monitor_params())
    assert out["ingest"]["registered"] == 0  # already ingested by the world; the step ran
    assert out["retrain"]["promoted"] and out["retrain"]["version"] == "1"
    assert len(out["monitor"]["windows"]) == 3
    tracking.configure(settings)
    assert tracking.get_alias_version("champion") == 1


@pytest.mark.slow
def test_unreachable_mlflow_retries_then_fails_naming_the_step(tmp_path, monkeypatch, prefect_harness,
                                                               fast_retries):
    import socket

    import pipeline.training.retrain as R
    from flows.nightly import nightly_flow
    from pipeline import tracking
    from pipeline.catalog.tables import read_catalog

    settings = make_world(tmp_path / "home", monkeypatch)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    set_env(monkeypatch, tmp_path / "home", tracking_uri=f"http://127.0.0.1:{port}")
    tracking.reset()
    calls = []
    real = R.retrain
    monkeypatch.setattr(R, "retrain", lambda *a, **k: calls.append(1) or real(*a, **k))
    before = read_catalog(settings.catalog_root)
    with pytest.raises(StepFailed, match="step 'retrain' failed: TrackingUnavailable") as info:
        nightly_flow(ingest=False, retrain=tiny_retrain_params(), monitor={"skip": True})
    assert isinstance(info.value.cause, tracking.TrackingUnavailable)
    assert len(calls) == 3  # the first try and two retries
    after = read_catalog(settings.catalog_root)
    pd.testing.assert_frame_equal(before, after)  # catalog intact
    assert not (settings.state_dir / "alerts" / "lines").exists() or not any(
        (settings.state_dir / "alerts" / "lines").iterdir())  # no alert state touched
    assert not list(settings.checkpoints_dir.glob("candidate-*/model"))  # nothing prepared for registration
    assert len(before) == 6 * PER_DAY


# ------------------------------------------------------------------------------------------------ nightly, CLI
def _fake_steps(monkeypatch, retrain, champion=True):
    """Replace the nightly's sub-flows: ``retrain(params)`` returns or raises; the monitor records its call."""
    import flows.nightly as N

    calls = {}

    def fake_retrain(**params):
        calls["retrain"] = params
        return retrain(params)

    def fake_monitor(**params):
        calls["monitor"] = params
        return {"windows": [], "model_version": "1", "n_encoded": 0}

    monkeypatch.setattr(N, "retrain_flow", fake_retrain)
    monkeypatch.setattr(N, "monitor_flow", fake_monitor)
    monkeypatch.setattr(N, "with_task_runner", lambda f: f)
    monkeypatch.setattr(N, "skip_reason", lambda: None if champion else N.NO_CHAMPION_YET)
    return calls


def _rejected(params):
    return {"promoted": False, "version": "7", "parent_version": "6", "alias": "challenger",
            "gate": {"reason": "failed: reference_images=54 (needs >= 60)"}, "n_train": 100, "n_calibration": 54,
            "excluded": {}, "lookback_days": 7}


def test_nightly_keeps_monitoring_with_the_champion_when_the_candidate_is_refused(monkeypatch):
    from flows.nightly import nightly_flow
    from pipeline.training.retrain import InsufficientData

    calls = _fake_steps(monkeypatch, _rejected)
    out = nightly_flow.fn(ingest=False, retrain={"steps": 5}, monitor={"min_window": 20, "lookback_days": 1.0})
    assert out["status"] == "rejected" and "monitor" in calls
    assert calls["retrain"]["monitor"] == {"min_window": 20, "lookback_days": 1.0}  # the gate checks this monitor

    def none_left(params):
        raise InsufficientData("only 12 calibration images (floor 60)")

    calls = _fake_steps(monkeypatch, none_left)
    out = nightly_flow.fn(ingest=False, retrain={}, monitor={})
    assert out["status"] == "no_candidate" and "monitor" in calls and "floor 60" in out["retrain"]["reason"]

    calls = _fake_steps(monkeypatch, none_left, champion=False)  # a new line: nothing to monitor with yet
    out = nightly_flow.fn(ingest=False, retrain={}, monitor={})
    assert out["status"] == "no_candidate" and "monitor" not in calls and "monitor" not in out
    assert out["monitor_skipped"].startswith("no champion yet")
    calls = _fake_steps(monkeypatch, _rejected, champion=False)  # a refused first candidate: the same
    assert "monitor_skipped" in nightly_flow.fn(ingest=False, retrain={}, monitor={}) and "monitor" not in calls

    def crash(params):
        raise RuntimeError("out of memory")

    calls = _fake_steps(monkeypatch, crash)
    with pytest.raises(StepFailed, match="step 'retrain' failed: RuntimeError: out of memory"):
        nightly_flow.fn(ingest=False, retrain={}, monitor={})
    assert "monitor" in calls  # the champion kept watching before the failure was raised


@pytest.mark.parametrize(("status", "code"), [("promoted", 0), ("rejected", 3), ("no_candidate", 4)])
def test_nightly_and_retrain_exit_codes(tmp_path, monkeypatch, capsys, status, code):
    import flows.nightly as N
    import flows.retrain as RF
    from pipeline.cli import main
    from pipeline.training.retrain import InsufficientData

    set_env(monkeypatch, tmp_path)
    from pipeline import tracking

    monkeypatch.setattr(tracking, "check_reachable", lambda: None)  # the flows are faked: no server behind the URI
    res = {**_rejected({}), "promoted": status == "promoted", "status": status, "reason": "too few"}
    monkeypatch.setattr(N, "nightly_flow", lambda **kw: {"retrain": res, "status": status})
    assert main(["nightly", "--no-ingest", "--no-monitor"]) == code

    def fake_retrain(**params):
        if status == "no_candidate":
            raise InsufficientData("only 12 calibration images (floor 60)")
        return res

    monkeypatch.setattr(RF, "retrain_flow", fake_retrain)
    assert main(["retrain"]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([x for x in err.splitlines() if x.startswith("linewatch")]) <= 1


def test_nightly_on_a_new_line_says_why_it_did_not_monitor(tmp_path, monkeypatch, capsys):
    import flows.nightly as N
    from pipeline import tracking
    from pipeline.cli import main

    set_env(monkeypatch, tmp_path)
    monkeypatch.setattr(tracking, "check_reachable", lambda: None)
    res = {"status": "no_candidate", "promoted": False, "reason": "the reference holds 3 line-periods"}
    monkeypatch.setattr(N, "nightly_flow", lambda **kw: {"retrain": res, "status": "no_candidate",
                                                         "monitor_skipped": N.NO_CHAMPION_YET})
    assert main(["nightly", "--no-ingest"]) == 4
    out = capsys.readouterr().out
    assert "retrain: no new model (no_candidate)" in out and "monitor: skipped (no champion yet" in out


def test_monitor_on_a_new_line_is_skipped_with_exit_4_not_failed(tmp_path, monkeypatch, capsys):
    import json

    import flows.runners as R
    from flows.monitor import monitor_flow
    from pipeline import tracking
    from pipeline.cli import main

    set_env(monkeypatch, tmp_path)  # an empty registry: the line has no champion yet
    out = monitor_flow.fn()
    assert out["skipped"].startswith("no champion yet") and out["windows"] == []
    monkeypatch.setattr(tracking, "check_reachable", lambda: None)
    monkeypatch.setattr(R, "with_task_runner", lambda f: f.fn)  # the flow's body, without a Prefect API
    capsys.readouterr()
    assert main(["monitor"]) == 4
    captured = capsys.readouterr()
    assert "monitor: skipped (no champion yet" in captured.out and "Traceback" not in captured.err
    assert main(["monitor", "--json"]) == 4
    text = capsys.readouterr().out
    assert json.loads(text[text.index("{"):])["skipped"].startswith("no champion yet")


def test_help_texts_show_every_default_and_the_exit_codes(capsys):
    import argparse

    from pipeline.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("nightly", "retrain", "monitor"):
        p = sub.choices[name]
        formatter = p._get_formatter()
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert "%(default)" in formatter._get_help_string(action), (name, action.option_strings)
                described = (action.help or "").replace("(default: %(default)s)", "").strip()
                assert len(described) >= 10, (name, action.option_strings, action.help)  # says what it does
        text = p.format_help()
        assert "(default: 30)" in text  # --min-window
    assert "3  the candidate was refused" in sub.choices["nightly"].format_help()
    assert "4  too few healthy images" in sub.choices["retrain"].format_help()


@pytest.mark.parametrize("argv", [["monitor", "--start", "yesterday"], ["retrain", "--preset", "huge"],
                                  ["nightly", "--window-days", "0"], ["retrain", "--steps", "many"],
                                  ["monitor", "--window-by", "week"]])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv):
    from pipeline.cli import main

    set_env(monkeypatch, tmp_path)
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("linewatch") and "error" in err[0], err
