"""The demo end to end on the tiny preset with few images (the main job's wiring, not its model quality)."""

from __future__ import annotations

import pytest

from pipeline.demo import DemoConfig, run_demo, summary_text


def test_demo_config_validation():
    with pytest.raises(ValueError, match="fault_day"):
        DemoConfig(fault_day=1)
    with pytest.raises(ValueError, match="train_days"):
        DemoConfig(train_days=6, fault_day=7)
    with pytest.raises(ValueError, match="4 line-days the monitor's reference needs"):
        DemoConfig(train_days=3, fault_day=7)


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path, monkeypatch):
    from pipeline import tracking

    for key in ("LINEWATCH_HOME", "MLFLOW_TRACKING_URI", "LINEWATCH_TIMEZONE"):
        monkeypatch.setenv(key, "")  # restored after the test (the demo sets them)
    tracking.reset()
    lines: list[str] = []
    # a stronger fault than the real demo's (x0.6 instead of x0.9): the tiny model after 80 steps is a weak encoder
    cfg = DemoConfig(home=tmp_path / "demo", preset="tiny", days=7, per_day=40, fault_day=6, train_days=4,
                     gain_severity=1.6, steps_first=80, steps_second=30, batch_size=16, min_window=15, holdout_share=0.4,
                     gate={"recon_images": 4, "recon_steps": 4, "eval_repeats": 1, "fpr_tolerance": 0.3, "axis_std_floor": 0.005},
                     progress=False)
    res = run_demo(cfg, out=lines.append)
    text = "\n".join(lines)
    assert res.ok, summary_text(res)
    assert res.v1["promoted"] and res.v2["parent_version"] == res.v1["version"]
    assert res.v2["excluded"]["alert_window"] > 0  # the faulty days were kept out of the second training
    assert "mlflow ui --backend-store-uri sqlite:///" in text and "linewatch ui" in text
    assert (tmp_path / "demo" / "mlflow.db").exists()
