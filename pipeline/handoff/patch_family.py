"""The bundle's patch family: the per-image patch detector of a model's calibration cells, stored with the model.

The monitor flags cells by the backbone's patch maps judged against the calibration cells
(``pipeline.monitoring.patches``). The retrain fits that detector once, on the calibration cells it chose, and writes
it into the bundle (``linewatch/patches.npz``), so every reader of the model folder scores a cell the same way: the
monitor, ``linewatch score`` and a model served by MLflow on a machine without the catalog.

The file holds plain arrays (``allow_pickle=False``): the Gaussian patch detector (its means and whitening matrices
in float16, about 24 MB), the calibration cells' out-of-period patch scores (each production-group fold scored by a
fit on the others, what the lot-aware threshold is set on), their image ids and the backbone id.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common import atomic

PATCH_FILE = "patches.npz"
"""The patch family's file in the bundle folder."""
STORE_DTYPE = np.float16
"""The detector's arrays on disk (half the bytes of float32; scores move by about 1e-3 of their value)."""

__all__ = ["PATCH_FILE", "PatchFamily", "fit_patch_family", "read_patch_family", "write_patch_family"]


@dataclass(frozen=True)
class PatchFamily:
    """A model's patch family (see the module docstring).

    Attributes:
        detector: the Gaussian ``PatchDetector`` fitted on every calibration cell.
        ref_scores: the calibration cells' out-of-period patch scores, in the bundle's calibration order.
        image_ids: the calibration cells' image ids (the same order).
        backbone_id: the backbone whose patch maps the detector reads (``pipeline.latent.features.BACKBONE_ID``).
    """

    detector: Any
    ref_scores: np.ndarray
    image_ids: np.ndarray
    backbone_id: str

    def fitted_on(self, image_ids: Any) -> bool:
        """Whether this family was fitted on these calibration cells (same ids, same order)."""
        ids = np.asarray([str(i) for i in image_ids], dtype=str)
        return ids.shape == self.image_ids.shape and bool((ids == self.image_ids).all())

    def matches(self, image_ids: Any, backbone_id: str) -> bool:
        """Whether this family was fitted on these calibration cells with this backbone."""
        return self.backbone_id == backbone_id and self.fitted_on(image_ids)


def fit_patch_family(patches: Any, image_ids: Any, backbone_id: str, *, groups: Any = None,
                     flag: Any = None) -> PatchFamily:
    """Fit the patch detector on the calibration cells' patch maps and cross-fit their out-of-period scores.

    Args:
        patches: the calibration cells' patch maps (N, C, h, w).
        image_ids: their image ids.
        backbone_id: the backbone that made the maps.
        groups: production group per cell (``pipeline.handoff.bundle.reference_groups``), or None.
        flag: ``pipeline.analysis.thresholds.FlagConfig`` (its fold count), or None for the default.
    """
    from threadpoolctl import threadpool_limits

    from pipeline.analysis.detectors.patch import PatchDetector
    from pipeline.analysis.fusion import patch_reference_scores

    P = np.asarray(patches)
    ids = np.asarray([str(i) for i in image_ids], dtype=str)
    if len(ids) != len(P):
        raise ValueError(f"fit_patch_family: {len(P)} patch maps but {len(ids)} image ids")
    # one BLAS thread: many small covariances run faster than with BLAS's own threads (pipeline.monitoring.patches)
    with threadpool_limits(limits=1, user_api="blas"):
        detector = PatchDetector().fit(P)
        ref = patch_reference_scores(P, groups=groups, flag=flag)
    return PatchFamily(detector, np.asarray(ref, np.float64), ids, str(backbone_id))


def write_patch_family(folder: str | Path, family: PatchFamily) -> Path:
    """Write the family into a bundle folder (``<folder>/patches.npz``, atomically); the file."""
    from pipeline.analysis.detectors.patch import detector_arrays

    buf = io.BytesIO()
    np.savez(buf, **detector_arrays(family.detector, STORE_DTYPE), ref_scores=family.ref_scores,
             image_id=family.image_ids, backbone_id=np.asarray(family.backbone_id))
    path = Path(folder) / PATCH_FILE
    atomic.write_bytes(path, buf.getvalue())
    return path


def read_patch_family(folder: str | Path) -> PatchFamily | None:
    """The family of a bundle folder; None when it has none (a bundle written before the retrain stored it).

    Raises:
        ValueError: the file exists but cannot be read as a patch family.
    """
    from pipeline.analysis.detectors.patch import detector_from_arrays

    path = Path(folder) / PATCH_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return PatchFamily(detector_from_arrays(z), z["ref_scores"].astype(np.float64),
                               z["image_id"].astype(str), str(z["backbone_id"]))
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable patch family ({type(exc).__name__}: {exc})") from exc
