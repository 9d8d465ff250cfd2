"""``linewatch demo``'s default path: the same demo with every step run as a Prefect flow (tiny preset)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_demo_through_prefect_flows(tmp_path, monkeypatch, prefect_harness):
    from flows.cli import FlowRunner
    from pipeline import tracking
    from pipeline.demo import DemoConfig, run_demo, summary_text

    for key in ("LINEWATCH_HOME", "MLFLOW_TRACKING_URI", "LINEWATCH_TIMEZONE"):
        monkeypatch.setenv(key, "")
    tracking.reset()
    cfg = DemoConfig(home=tmp_path / "demo", preset="tiny", days=7, per_day=40, fault_day=6, train_days=4,
                     gain_severity=1.6, steps_first=80, steps_second=30, batch_size=16, min_window=15,
                     holdout_share=0.4, progress=False,
                     gate={"recon_images": 4, "recon_steps": 4, "eval_repeats": 1, "fpr_tolerance": 0.3,
                           "axis_std_floor": 0.005})
    lines: list[str] = []
    res = run_demo(cfg, FlowRunner(), out=lines.append)
    assert res.ok, summary_text(res)
    assert res.v2["parent_version"] == res.v1["version"]
    assert res.monitor["events_emitted"] >= 1  # the alert went out as a Prefect event too
