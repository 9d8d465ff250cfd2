"""Tests of the anomaly heatmap overlays."""

import numpy as np
import pytest

from pipeline.common.figures import save_heatmap_overlay, save_heatmap_overlays


def test_heatmap_overlay_png_written(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    amap = np.zeros((8, 8))
    amap[2, 5] = 3.0
    path = save_heatmap_overlay(img, amap, tmp_path / "cell", title="cell 1")
    assert path.suffix == ".png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        save_heatmap_overlay(img, np.zeros(8), tmp_path / "bad.png")


def test_top_flagged_cells_written_highest_first(tmp_path):
    rng = np.random.default_rng(1)
    imgs = [rng.uniform(-1, 1, (32, 32)) for _ in range(5)]
    maps = rng.uniform(0, 1, (5, 4, 4))
    scores = np.array([0.1, 5.0, 0.3, 2.0, 0.2])
    paths = save_heatmap_overlays(imgs, maps, scores, ["a", "b/c.png", "d", "e", "f"], tmp_path / "hm", top=2)
    assert [p.name for p in paths] == ["01_c.png.png", "02_e.png"]
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths)
    assert save_heatmap_overlays(imgs, maps, scores, list("abcde"), tmp_path / "none", top=0) == []


def test_write_png_writes_a_readable_png_and_leaves_no_temporary(tmp_path):
    import os
    import stat

    from matplotlib.figure import Figure

    from pipeline.common.figures import write_png

    fig = Figure(figsize=(2, 1))
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    out = write_png(fig, tmp_path / "sub" / "chart.png", dpi=50)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert os.listdir(out.parent) == ["chart.png"]
