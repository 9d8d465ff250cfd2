"""pipeline.tracking.monitoring: a monitoring run as a quality engineer reads it (names, times, table, sentence, links)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline import tracking
from tests.pipeline.tracking.conftest import DAY, client, register, windows_of


def test_window_metrics_are_named_test_or_axis_first(two_windows) -> None:
    healthy, moved = windows_of(two_windows)
    assert not healthy.detected and moved.detected and "axes" in moved.fired
    names = tracking.window_metrics(moved)
    assert {"drift/detected", "drift/moved_axes", "drift/top_axis", "drift/top_effect", "drift/fired_axes",
            "drift/fired_mmd", "axes/p", "mmd/p", "mmd/stat", "window/n_images", "window/anomalous_share",
            "alert/active"} <= set(names)
    assert {f"axis_0{a}/{s}" for a in range(4) for s in ("effect", "ks", "p", "psi")} <= set(names)
    assert names["drift/top_axis"] == 2 and names["drift/top_effect"] == pytest.approx(
        float(two_windows[1].per_axis.set_index("axis").loc[2, "effect_size"]))
    assert names["drift/fired_axes"] == 1.0 and names["drift/moved_axes"] >= 1
    assert "drift/top_axis" not in tracking.window_metrics(healthy)
    assert not [k for k in names if k.startswith("drift.") or "." in k.split("/")[0]]  # no dotted names left


def test_monitoring_run_reads_like_the_alert(lw_env, tmp_path: Path, two_windows) -> None:
    v = register(tmp_path, "m")
    windows = windows_of(two_windows)
    report = tmp_path / "drift_L1_2026-01-13_v1.png"
    report.write_bytes(b"\x89PNG fake")
    frame = pd.DataFrame({"image_id": ["a", "b", "c"], "sha256": ["1" * 64, "2" * 64, "3" * 64], "line": "L1",
                          "captured_at": pd.date_range("2026-01-12", periods=3, freq="h", tz="UTC")})
    with tracking.start_monitoring_run("monitor L1 2026-01-12..2026-01-13") as rid:
        uri = tracking.link_model_version(lw_env.model_name, v.version)
        digest = tracking.log_monitored_images(frame, name="L1 2026-01-12..2026-01-13")
        uploaded = tracking.log_monitoring_windows(windows, model_name=lw_env.model_name, model_version=v.version,
                                                   reports={"2026-01-13": str(report)})
    s = tracking.run_summary(rid)
    # the alert in one sentence, the model as a link and a URI
    note = s.tags["mlflow.note.content"]
    assert note.startswith("Drift on line L1, window 2026-01-13 (alert open): axis 2 (sharpness, r = -0.62) moved")
    assert "tests that fired: latent axes (KS)" in note and "(1 of 2 windows drifted)" in note
    assert f"(`models:/{lw_env.model_name}/1`)" in note and "versions/1?workflowType=machine_learning" in note
    assert uploaded == ["reports/drift_L1_2026-01-13.png"] and "`reports/drift_L1_2026-01-13.png`" in note
    assert s.tags["alert.active"] == "true" and s.tags["alert.moved_axes"] == "axis_02"
    # linked to the model version and to the monitored images
    assert uri == s.tags["linewatch.model_uri"] == f"models:/{lw_env.model_name}/1"
    assert s.model_inputs == (v.model_id,)
    (ds,) = s.datasets
    assert (ds.context, ds.name, ds.digest) == ("monitoring", "L1 2026-01-12..2026-01-13", digest)
    from pipeline.catalog.tables import snapshot_digest

    assert digest == snapshot_digest([("a", "1" * 64), ("b", "2" * 64), ("c", "3" * 64)])
    # every metric at the window's start, step = window index
    for key in ("drift/detected", "axis_02/effect", "alert/active", "window/n_images"):
        hist = tracking.get_metric_history(key, run_id=rid, with_timestamps=True)
        assert [(st, t) for st, t, _ in hist] == [(i, int((DAY + dt.timedelta(days=i)).timestamp() * 1000))
                                                  for i in range(2)], key
    # one table: a row per window and axis
    c = client(lw_env)
    table = json.loads(Path(c.download_artifacts(rid, "drift/windows.json", str(tmp_path / "t"))).read_text())
    assert table["columns"] == list(tracking.TABLE_COLUMNS) and len(table["data"]) == 8
    rows = pd.DataFrame(table["data"], columns=table["columns"])
    hit = rows[(rows["window"] == "2026-01-13") & (rows["axis"] == 2)].iloc[0]
    assert hit["significant"] and hit["label"] == "sharpness (r = -0.62)" and hit["effect"] > 1
    assert json.loads(s.tags["mlflow.loggedArtifacts"]) == [{"path": "drift/windows.json", "type": "table"}]


def test_a_quiet_run_says_no_drift(two_windows) -> None:
    healthy = windows_of(two_windows[:1])
    assert tracking.alert_sentence(healthy) == "No drift on line L1 in 1 window(s), 2026-01-12."
    assert tracking.alert_sentence([]) == "No window was tested."
    assert tracking.report_artifact("L1", "2026/01/13") == "reports/drift_L1_2026-01-13.png"
