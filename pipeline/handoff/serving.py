"""Score images with a registered model folder: z, anomaly score and flag, the way the monitor scores them.

:class:`BundleScorer` loads a model folder (checkpoint + ``linewatch/`` bundle, :func:`pipeline.handoff.bundle.load_bundle`)
and scores a table of images: each image is encoded to z (``pipeline.latent.encode.encode_images``) and gets the
monitor's default per-image score:

* with the bundle's **patch family** (``linewatch/patches.npz``, ``pipeline.handoff.patch_family``, written by the
  retrain): the frozen backbone of the installed weights package reads the image's patch maps
  (``pipeline.latent.features.compute_features``) and the patch detector of the calibration cells judges them,
  thresholded lot-aware at the bundle's false-positive target: the score and the flag of a monitor run with its
  defaults, before the line-day offset (a served image has no line-day);
* without it (an older bundle, or the backbone's weights package missing: one warning), the **residual family**: the
  diffusion residuals with the bundle's recipe (``ScoringConfig``) judged among the cell's z-neighbours, the score of
  a monitor run with ``MonitorConfig(fusion=False)``.

The output's ``scorer`` column says which (``"patch"`` or ``"residual"``).

MLflow loads this module as the ``loader_module`` of the ``python_function`` flavour (no pickle: the model is the
checkpoint folder plus this importable code)::

    model = mlflow.pyfunc.load_model("models:/linewatch-infodiffusion@champion")
    model.predict(pd.DataFrame({"image": [png_bytes]}))     # or {"path": ["/data/cell.png"]}
    #   z_0 ... z_{d-1}, anomaly_score, is_anomaly, threshold, scorer

``mlflow models serve -m models:/linewatch-infodiffusion@champion --env-manager local`` answers the same on
``/invocations`` (binary columns as base64 in JSON).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
"""Input column holding encoded image bytes (PNG, TIFF, JPEG ...)."""
PATH_COLUMN = "path"
"""Input column holding image file paths readable where the model runs."""
SCORE_COLUMN = "anomaly_score"
FLAG_COLUMN = "is_anomaly"
THRESHOLD_COLUMN = "threshold"
SCORER_COLUMN = "scorer"


def input_columns() -> list[tuple[str, str]]:
    """The input table's columns as ``(name, MLflow type)``; each row needs one of them."""
    return [(IMAGE_COLUMN, "binary"), (PATH_COLUMN, "string")]


def output_columns(latent_dim: int) -> list[tuple[str, str]]:
    """The output table's columns as ``(name, MLflow type)``: ``z_0 .. z_{d-1}``, score, flag, threshold, scorer."""
    from pipeline.common.schemas import latent_columns

    z = latent_columns(latent_dim) if latent_dim > 0 else []  # 0: unknown (a checkpoint without a model config)
    return [(c, "float") for c in z] + [
        (SCORE_COLUMN, "double"), (FLAG_COLUMN, "boolean"), (THRESHOLD_COLUMN, "double"), (SCORER_COLUMN, "string")]


def _cell(row: pd.Series, name: str) -> Any:
    value = row.get(name) if name in row.index else None
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value


def _decode(data: bytes, where: str) -> np.ndarray:
    """Decode image bytes with the same reader (and the same checks) as catalogued files."""
    from pipeline.common.images import read_image

    fd, tmp = tempfile.mkstemp(suffix=".img")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return read_image(tmp, channels=1)
    except ValueError as exc:
        reason = str(exc).replace(repr(tmp), "").replace(tmp, "").lstrip(": ")
        raise ValueError(f"{where}: cannot decode the image bytes: {reason}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_inputs(frame: pd.DataFrame, channels: int = 1) -> list[np.ndarray]:
    """The images of an input table, in row order (``image`` bytes, else ``path``).

    Raises:
        ValueError: the table has neither column, or a row has neither value or an undecodable image.
    """
    from pipeline.common.images import read_image

    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    if IMAGE_COLUMN not in frame.columns and PATH_COLUMN not in frame.columns:
        raise ValueError(f"input needs a column {IMAGE_COLUMN!r} (image bytes) or {PATH_COLUMN!r} (image file), "
                         f"got {list(frame.columns)}")
    out = []
    for i, (_, row) in enumerate(frame.iterrows()):
        data, path = _cell(row, IMAGE_COLUMN), _cell(row, PATH_COLUMN)
        if data is not None:
            out.append(_decode(bytes(data), f"row {i}"))
        elif path is not None:
            out.append(read_image(str(path), channels=channels))
        else:
            raise ValueError(f"row {i} has neither {IMAGE_COLUMN!r} nor {PATH_COLUMN!r}")
    return out


class BundleScorer:
    """A registered model folder, ready to score images (see the module docstring).

    Args:
        model_dir: folder with the checkpoint and its ``linewatch/`` bundle.
        batch_size: images per model call.
    """

    def __init__(self, model_dir: str | os.PathLike[str], *, batch_size: int = 64) -> None:
        from pipeline.handoff.bundle import load_bundle

        self.bundle = load_bundle(model_dir)
        self.batch_size = int(batch_size)
        self._patch: Any = None  # the patch family's thresholded detector, built on first use
        self._patch_failed_said = False  # the patch family's failure is logged once per scorer

    @property
    def latent_dim(self) -> int:
        """Number of latent axes."""
        return int(self.bundle.z_ref.shape[1])

    def score_arrays(self, arrays: Sequence[np.ndarray]) -> pd.DataFrame:
        """Score decoded images (uint8 / uint16, gray or RGB, any size): ``z_*``, score, flag, threshold, scorer."""
        from pipeline.common.schemas import latent_columns
        from pipeline.latent.encode import encode_images

        ckpt = self.bundle.checkpoint
        z = encode_images(ckpt.model, ckpt.preprocess, arrays, batch_size=self.batch_size)
        det, scorer = self._patch_scores(arrays), "patch"
        if det is None:
            det, scorer = self._residual_scores(arrays, z), "residual"
        out = pd.DataFrame(z.astype(np.float32), columns=latent_columns(z.shape[1]))
        out[SCORE_COLUMN] = np.asarray(det.scores, dtype=np.float64)
        out[FLAG_COLUMN] = np.asarray(det.is_anomaly, dtype=bool)
        out[THRESHOLD_COLUMN] = float(det.threshold)
        out[SCORER_COLUMN] = scorer
        return out

    def patch_detector(self) -> Any:
        """The bundle's patch family thresholded as the monitor does; None without a usable family.

        ``pipeline.analysis.fusion.fuse_families`` with the patch family alone, lot-aware at the bundle's
        false-positive target.
        """
        from pipeline.latent.features import BACKBONE_ID

        family = self.bundle.patches
        if self._patch is None and family is not None and family.backbone_id == BACKBONE_ID:
            from pipeline.analysis.fusion import fuse_families
            from pipeline.handoff.bundle import reference_groups

            groups = reference_groups(self.bundle.reference)
            self._patch = fuse_families(family.detector, family.ref_scores, None,
                                        float(self.bundle.gate.get("fpr_target", 0.05)), groups=groups,
                                        residual_weight=0.0)
        return self._patch

    def _patch_scores(self, arrays: Sequence[np.ndarray]) -> Any:
        """The patch family's ``DetectionResult`` of the images; None (one warning) when it cannot run."""
        from threadpoolctl import threadpool_limits

        try:
            fused = self.patch_detector()
            if fused is None:
                return None
            from pipeline.latent.features import compute_features

            patches = compute_features(list(arrays), workers=1).patches  # no worker processes inside a server
            with threadpool_limits(limits=1, user_api="blas"):
                return fused.predict(patches)
        except Exception as exc:  # noqa: BLE001 - the residual family still scores every image
            if not self._patch_failed_said:
                self._patch_failed_said = True
                logger.warning("scoring with the residual family: the patch family failed (%s: %s)",
                               type(exc).__name__, exc)
            return None

    def _residual_scores(self, arrays: Sequence[np.ndarray], z: np.ndarray) -> Any:
        """The residual family's ``DetectionResult`` of the images (``[z | residuals]`` by the bundle's detector)."""
        features = z.astype(np.float64)
        if self.bundle.scoring is not None:
            features = np.column_stack([features, self._residuals(arrays, z)])
        return self.bundle.detector.predict(features)

    def _residuals(self, arrays: Sequence[np.ndarray], z: np.ndarray) -> np.ndarray:
        import torch

        from models import to_model_input

        ckpt = self.bundle.checkpoint
        assert self.bundle.scoring is not None
        x = to_model_input(list(arrays), ckpt.preprocess)
        given = z if getattr(ckpt.model, "uses_features", False) else None  # a "pretrained" encoder's codes
        with torch.inference_mode():
            return np.asarray(self.bundle.scoring.residual_detector(ckpt.model).residuals(x, given), dtype=np.float64)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Score an input table (``image`` bytes or ``path`` per row); the ``python_function`` flavour's predict."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if len(frame) == 0 and ({IMAGE_COLUMN, PATH_COLUMN} & set(frame.columns)):
            return pd.DataFrame({c: pd.Series(dtype="float64") for c, _ in output_columns(self.latent_dim)})
        return self.score_arrays(read_inputs(frame, channels=1))


def _load_pyfunc(data_path: str) -> BundleScorer:
    """Entry point of MLflow's ``python_function`` flavour (``loader_module``): the model folder's scorer."""
    return BundleScorer(data_path)


__all__ = ["FLAG_COLUMN", "IMAGE_COLUMN", "PATH_COLUMN", "SCORER_COLUMN", "SCORE_COLUMN", "THRESHOLD_COLUMN", "BundleScorer",
           "input_columns", "output_columns", "read_inputs"]
