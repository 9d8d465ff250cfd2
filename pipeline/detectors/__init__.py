"""Per-image anomaly detectors: one small sklearn-shaped protocol (see :mod:`pipeline.detectors.base`).

Latent detectors work on z (N, d); :class:`DiffusionResidual` works on images and uses the diffusion model itself.
"""

from pipeline.detectors.base import (
    BaseDetector,
    DetectionResult,
    Detector,
    NotFittedError,
    conformal_threshold,
)
from pipeline.detectors.diffusion import DiffusionResidual
from pipeline.detectors.ensemble import Ensemble
from pipeline.detectors.outlier import IsolationForestDetector, KNNDistance, Mahalanobis

__all__ = [
    "BaseDetector",
    "DetectionResult",
    "Detector",
    "DiffusionResidual",
    "Ensemble",
    "IsolationForestDetector",
    "KNNDistance",
    "Mahalanobis",
    "NotFittedError",
    "conformal_threshold",
]
