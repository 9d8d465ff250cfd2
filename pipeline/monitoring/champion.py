"""The champion as the monitor uses it: the registered model, its bundle's reference and the refitted detector.

:func:`load_champion` downloads the model the ``champion`` alias points at; :func:`load_bundle` rebuilds, from a model
folder's ``linewatch/`` bundle, the per-image detector exactly as the retrain's gate fitted it (same seed and split)
and the reference's cross-fitted anomaly scores. The retrain's gate loads a candidate the same way before it may be
promoted, so a bundle the monitor cannot load never becomes champion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.handoff.bundle import (
    BUNDLE_DIR,
    CALIBRATION_FILE,
    ScoringConfig,
    calibration_scores,
    reference_groups,
)
from pipeline.handoff.state import CHAMPION

logger = logging.getLogger(__name__)


@dataclass
class Champion:
    """A loaded champion: checkpoint, bundle reference latents and the fitted detector."""

    version: str
    path: Path
    checkpoint: Any
    model_id: str
    reference: pd.DataFrame
    z_ref: np.ndarray
    detector: Any
    gate: dict[str, Any]
    scoring: ScoringConfig | None = None
    """The residual recipe of the bundle; None for a bundle from before residual scoring (Mahalanobis on z)."""
    ref_scores: np.ndarray | None = None
    """Out-of-sample anomaly scores of the reference images (cross-fitted), for the drift test's score family."""
    patches: Any = None
    """The bundle's patch family (``pipeline.handoff.patch_family.PatchFamily``); None when the bundle has none."""


NO_CHAMPION_YET = "no champion yet: the line is monitored from its first promoted model on"
"""Why a monitor pass on a line without a champion (a new line, before its first nightly promotion) is skipped."""


def champion_version(settings: Any) -> str | None:
    """The registered champion's version, or None while the line has none (before its first model)."""
    from pipeline import tracking

    tracking.configure(settings)
    version = tracking.get_alias_version(CHAMPION, name=settings.model_name)
    return None if version is None else str(version)


def load_champion(settings: Any, *, fpr: float = 0.05, seed: int = 0) -> Champion:
    """Download the champion and rebuild its detector from the bundle's calibration latents.

    Raises:
        ValueError: no champion is registered yet, or the registered folder has no linewatch bundle.
    """
    from pipeline import tracking

    version = champion_version(settings)
    if version is None:
        raise ValueError(
            f"no '{CHAMPION}' model is registered under {settings.model_name!r}: run the nightly retrain first "
            "(linewatch nightly / the retrain flow)"
        )
    path = tracking.download_model(version, Path(settings.checkpoints_dir) / f"registry-v{version}",
                                   name=settings.model_name)
    return load_bundle(path, str(version), fpr=fpr, seed=seed)


def load_bundle(path: str | Path, version: str, *, fpr: float = 0.05, seed: int = 0) -> Champion:
    """Load a model folder (checkpoint + ``linewatch/`` bundle) the way the monitor uses it.

    The bundle is read by :func:`pipeline.handoff.bundle.load_bundle` (the detector refitted from the calibration
    latents and residuals with the retrain gate's seed and split); the reference's anomaly scores are cross-fitted
    here. The retrain's gate calls this on a candidate before it may become champion, so a bundle the monitor cannot
    load is never promoted.

    Raises:
        ValueError: the folder has no linewatch bundle, or its reference is too small for the detector.
    """
    from pipeline.handoff.bundle import load_bundle as read_bundle

    if not (Path(path) / BUNDLE_DIR / CALIBRATION_FILE).exists():
        raise ValueError(f"model v{version} has no {BUNDLE_DIR}/{CALIBRATION_FILE}: register it with the retrain job")
    b = read_bundle(path, fpr=fpr, seed=seed)
    ref_scores = None
    if b.scoring is None:
        logger.warning("model v%s has no residual scoring in its bundle: scoring images with Mahalanobis on z "
                       "(retrain to get the residual detector)", version)
    else:
        ref_scores = calibration_scores(b.z_ref, b.residuals, k=b.scoring.k, seed=int(b.gate.get("detector_seed", seed)),
                                        groups=reference_groups(b.reference))
    return Champion(str(version), Path(path), b.checkpoint, b.model_id, b.reference, b.z_ref, b.detector, b.gate,
                    b.scoring, ref_scores, b.patches)
