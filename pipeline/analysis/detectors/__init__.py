"""Per-image anomaly detectors: one small sklearn-shaped protocol (see :mod:`pipeline.analysis.detectors.base`).

Latent detectors work on z (N, d); ``DiffusionResidual`` works on images and uses the diffusion model itself;
``PatchDetector`` works on a frozen backbone's patch maps (N, C, H, W) and gives an anomaly map;
``ConditionalResidual`` judges precomputed residuals against the reference images nearest in z. ``DiffusionResidual`` is
imported lazily, so the latent detectors and ``pipeline.analysis.drift`` do not pull in torch and ``models``.
"""

from typing import Any

from pipeline.analysis.detectors.base import (
    BaseDetector,
    DetectionResult,
    Detector,
    NotFittedError,
    conformal_threshold,
)
from pipeline.analysis.detectors.conditional import ConditionalResidual
from pipeline.analysis.detectors.ensemble import Ensemble
from pipeline.analysis.detectors.outlier import IsolationForestDetector, KNNDistance, Mahalanobis
from pipeline.analysis.detectors.patch import PatchDetector

__all__ = [
    "BaseDetector",
    "ConditionalResidual",
    "DetectionResult",
    "Detector",
    "DiffusionResidual",
    "Ensemble",
    "IsolationForestDetector",
    "KNNDistance",
    "Mahalanobis",
    "NotFittedError",
    "PatchDetector",
    "conformal_threshold",
]


def __getattr__(name: str) -> Any:
    if name == "DiffusionResidual":
        from pipeline.analysis.detectors.diffusion import DiffusionResidual

        return DiffusionResidual
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
