"""benchmarks.alert_replay: a soak's stored verdicts replayed through the alert manager under another policy."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmarks.alert_replay import cause_of, replay
from pipeline.monitoring.alerts import AlertPolicy


def test_cause_keys_map_to_their_families() -> None:
    assert [cause_of(k).family for k in ("axes:z_3", "mmd", "quality:noise_level", "scores", "spc:z_0")] == [
        "latent", "latent", "quality", "scores", "spc"]


def test_the_cooldown_decides_whether_a_later_surge_is_alerted(tmp_path: Path) -> None:
    days = ["scores", "", "", "", "", "scores", "scores"]
    w = pd.DataFrame({"line": "L2", "window_id": [f"2026-01-{18 + i}" for i in range(7)], "causes": days,
                      "original": True})
    w = pd.concat([w, w.assign(original=False, causes="scores")])  # later models' re-evaluations are ignored
    long = replay(w, AlertPolicy(cooldown_windows=6), tmp_path / "six")
    assert long["kind"].tolist() == ["opened", "resolved", "suppressed", "suppressed"]
    short = replay(w, AlertPolicy(cooldown_windows=2), tmp_path / "two")
    assert short["kind"].tolist() == ["opened", "resolved", "opened"]
    assert short["window_id"].tolist()[-1] == "2026-01-23" and set(short["key"]) == {"L2|scores"}


def test_a_chart_alarm_opens_at_once_unless_the_policy_waits_for_two_windows(tmp_path: Path) -> None:
    from benchmarks.alert_replay import main

    w = pd.DataFrame({"line": "L2", "window_id": ["2026-01-13", "2026-01-14", "2026-01-15", "2026-01-16"],
                      "causes": ["", "", "spc:detail_ratio", ""], "original": True})
    assert replay(w, AlertPolicy(), tmp_path / "now")["kind"].tolist() == ["opened"]
    assert replay(w, AlertPolicy(immediate_families=("camera", "scores")), tmp_path / "k2").empty
    assert main(["--name", "no_such_soak", "--immediate", "camera"]) == 2
