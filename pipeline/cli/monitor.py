"""Monitoring-facing ``linewatch`` sub-commands: ``score`` (per-image anomaly flags) and ``drift`` (window tests).

Both need a **reference**: normal images the model did *not* train on (a calibration split), given as an image folder
(encoded on the fly) or as a latents Parquet file written by ``linewatch encode`` / the encode stage with the same
model (latents of another model are refused: they are not comparable).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.cli import CLIError

DETECTORS = ("auto", "patch", "fused", "residual", "mahalanobis", "knn", "iforest", "ensemble")


@dataclass(frozen=True)
class LatentSource:
    """Latents loaded from a folder (encoded now) or a Parquet file.

    Attributes:
        frame: the latents table (``z_*`` columns, plus ``path``/``image_id``, ``sha256``, ``model_id`` when known).
        kind: ``"images"`` or ``"parquet"``.
        origin: the path given on the command line.
    """

    frame: pd.DataFrame
    kind: str
    origin: str

    @property
    def Z(self) -> np.ndarray:
        """The (N, d) latent matrix."""
        from pipeline.common.schemas import latent_matrix

        return latent_matrix(self.frame)

    def labels(self) -> list[str]:
        """One display label per row: the path, else the image id, else the row number."""
        for col in ("path", "image_id"):
            if col in self.frame.columns:
                return self.frame[col].astype(str).tolist()
        return [str(i) for i in range(len(self.frame))]


def _is_parquet(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in (".parquet", ".pq")


def load_latent_source(
    source: str, ckpt: Any, *, what: str, batch_size: int = 256, progress: bool = False
) -> LatentSource:
    """Encode an image folder (or one image) with ``ckpt``, or read a latents Parquet file of the same model.

    Args:
        source: folder, image file or ``.parquet`` file.
        ckpt: the loaded checkpoint.
        what: the option name, for messages (``--reference``).
        batch_size: encode batch size.
        progress: progress bar while encoding.

    Raises:
        CLIError: missing path, or a Parquet file of another model / without latents.
    """
    from pipeline.common.images import find_images
    from pipeline.common.schemas import z_columns
    from pipeline.latent.encode import encode_paths, model_id_of, read_latents

    path = Path(source)
    if not path.exists():
        raise CLIError(f"{what} {source!r} does not exist (give an image folder or a latents .parquet file)")
    model_id = model_id_of(ckpt)
    if _is_parquet(path):
        try:
            df = read_latents(path, model_id=model_id)
        except ValueError as exc:
            raise CLIError(f"{what}: {exc}") from exc
        d = len(z_columns(df))
        if d != int(ckpt.config.latent_dim):
            raise CLIError(f"{what}: {source!r} has {d}-d latents, the model gives {ckpt.config.latent_dim}-d")
        return LatentSource(df.reset_index(drop=True), "parquet", source)
    try:
        paths = find_images(path)
    except ValueError as exc:
        raise CLIError(f"{what}: {exc}") from exc
    df = encode_paths(ckpt, paths, batch_size=batch_size, progress=progress)
    return LatentSource(df, "images", source)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def _require_reference(args: argparse.Namespace, command: str) -> None:
    if not args.reference:
        raise CLIError(
            f"--reference is required: {command} compares against latents of normal images the model did not "
            "train on (a calibration split); give an image folder or a latents .parquet file of the same model"
        )


# --- score -------------------------------------------------------------------------------------------------------
SCORE_EPILOG = """\
examples:
  linewatch score --model ckpt/v1 --images today/ --reference calib/
  linewatch score --model ckpt/v1 --images today/ --reference calib_latents.parquet --fpr 0.005 --json
  linewatch score --model ckpt/v1 --images suspicious.png --reference calib/ --detector knn

Images registered in the catalog ($LINEWATCH_CATALOG / $LINEWATCH_HOME) are named by their MES serial (matched by
content), others by their path.

Detectors: "patch" (the monitor's default: the frozen EfficientNet-Lite0's patch maps judged against the
reference's at each place of the cell; needs image folders), "fused" (the patch maps fused with the residual below,
as `linewatch monitor --residual-weight 1`), "residual" (the diffusion residual, noised to t* = 100 and 250 and
denoised with the image's own z, judged against the reference images nearest in z; needs image folders, or latents
files with r_* residual columns), "mahalanobis", "knn", "iforest" and "ensemble" on z alone. "auto" (default) takes
"patch" when both sources are image folders, "residual" when both can give residuals, else "mahalanobis", and says
which.

The reference (normal images the model did not train on) is split at random into two halves: the detector is fit on
one, and the flag threshold is the conformal (1 - fpr) quantile of the scores of the other, so the false-alarm rate
on normal images is at most --fpr. That needs at least 1/fpr - 1 images in the threshold half (99 at 1 %, so about
200 reference images). Each image gets a score (higher = more unusual), a conformal p-value and a flag.
"""


def latent_detector(name: str) -> Any:
    """Build a latent detector by CLI name (``DETECTORS``)."""
    from pipeline.analysis.detectors import Ensemble, IsolationForestDetector, KNNDistance, Mahalanobis

    if name == "mahalanobis":
        return Mahalanobis()
    if name == "knn":
        return KNNDistance()
    if name == "iforest":
        return IsolationForestDetector()
    if name == "ensemble":
        return Ensemble([Mahalanobis(), KNNDistance()])
    raise CLIError(f"unknown detector {name!r}; choose from {DETECTORS}")


def split_reference(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random split of ``n`` reference rows into (fit, threshold) index arrays; ``share`` goes to the threshold."""
    if not 0.0 < share < 1.0:
        raise CLIError(f"--calibration-share must be in (0, 1), got {share}")
    n_val = int(round(n * share))
    if n_val < 1 or n - n_val < 2:
        raise CLIError(f"reference has {n} images: too few to split into a fit part and a threshold part")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _has_residuals(source: LatentSource, n: int) -> bool:
    from pipeline.common.schemas import residual_columns

    return source.kind == "images" or set(residual_columns(n)) <= set(source.frame.columns)


def source_residuals(source: LatentSource, ckpt: Any, scoring: Any, *, what: str, progress: bool) -> np.ndarray:
    """Diffusion residuals (N, len(t_stars)) of a source: computed from its images, or its ``r_*`` columns."""
    from pipeline.common.images import load_batch
    from pipeline.common.schemas import residual_columns

    cols = residual_columns(len(scoring.t_stars))
    if not _has_residuals(source, len(cols)):
        raise CLIError(f"{what}: {source.origin!r} has no residual columns {cols}; the residual detector needs "
                       "an image folder (or use --detector mahalanobis on latents)")
    if source.kind != "images":
        return source.frame[cols].to_numpy(np.float64)
    x = load_batch(source.frame["path"].tolist(), ckpt.preprocess)
    z = source.Z if getattr(ckpt.model, "uses_features", False) else None  # a "pretrained" encoder's codes
    return scoring.residual_detector(ckpt.model, progress=progress).residuals(x, z)


def catalog_serials(frame: pd.DataFrame) -> list[str]:
    """The MES serial of each row whose bytes are registered in the catalog (``""`` for the others).

    Images are matched by content (``sha256``), so a copy of a registered image anywhere on disk, or the store
    object itself, is named by the serial a person finds on the line.
    """
    from pipeline.catalog.tables import serials_by_sha256
    from pipeline.settings import get_settings

    if "sha256" not in frame.columns:
        return [""] * len(frame)
    known = serials_by_sha256(get_settings().catalog_root, frame["sha256"].astype(str))
    return [known.get(str(d), "") for d in frame["sha256"]]


def write_heatmaps(ref: LatentSource, cur: LatentSource, res: Any, labels: list[str], out_dir: str,
                   top: int) -> list[Path]:
    """Heatmap overlays (PNG) of the ``top`` highest-scoring flagged images.

    The anomaly map comes from a :class:`~pipeline.analysis.detectors.patch.PatchDetector` fitted on the reference
    images' backbone patch maps (``pipeline.latent.features``), so it shows where an image differs from the
    reference cells at the same place of the cell.
    """
    from pipeline.analysis.detectors.patch import PatchDetector
    from pipeline.common.figures import save_heatmap_overlays
    from pipeline.common.images import read_images

    try:
        from pipeline.latent.features import compute_features
    except ImportError as exc:
        raise CLIError(f"--heatmaps needs the backbone features (pipeline.latent.features): {exc}") from exc
    for src, what in ((ref, "--reference"), (cur, "--images")):
        if "path" not in src.frame.columns:
            raise CLIError(f"--heatmaps needs image files: {what} {src.origin!r} has no image paths")
    flagged = np.flatnonzero(res.is_anomaly)
    if top < 1 or len(flagged) == 0:
        return []
    chosen = flagged[np.argsort(-res.scores[flagged], kind="stable")[:top]]
    ref_imgs = read_images(ref.frame["path"].tolist())
    cur_imgs = read_images(cur.frame["path"].iloc[chosen].tolist())
    det = PatchDetector().fit(compute_features(ref_imgs).patches)
    maps = det.anomaly_map(compute_features(cur_imgs).patches)
    return save_heatmap_overlays(cur_imgs, maps, res.scores[chosen], [labels[i] for i in chosen], out_dir, top=top)


def cmd_score(args: argparse.Namespace) -> int:
    """Run ``linewatch score``: fit a detector on the reference, threshold it, flag the images."""
    from pipeline.cli.model import load_model

    _require_reference(args, "score")
    if not 0.0 < args.fpr < 1.0:
        raise CLIError(f"--fpr must be in (0, 1), got {args.fpr}")
    ckpt = load_model(args.model, args.device)
    progress = _progress(args)
    ref = load_latent_source(args.reference, ckpt, what="--reference", batch_size=args.batch_size, progress=progress)
    cur = load_latent_source(args.images, ckpt, what="--images", batch_size=args.batch_size, progress=progress)
    fit_idx, val_idx = split_reference(len(ref.frame), args.calibration_share, args.seed)
    name, res = _score_with_detector(args, ckpt, ref, cur, fit_idx, val_idx, progress)
    serials = catalog_serials(cur.frame)
    labels = [s or label for s, label in zip(serials, cur.labels(), strict=True)]
    heatmaps = (write_heatmaps(ref, cur, res, labels, args.heatmaps, args.heatmap_top)
                if args.heatmaps else [])
    info = {"model_id": str(ckpt.meta.get("model_id")), "detector": name, "n_fit": len(fit_idx),
            "n_threshold": len(val_idx)}
    if args.json:
        print(json.dumps(_jsonable(_score_doc(info, res, cur, labels, serials, heatmaps)), indent=2))
    else:
        _print_scores(info, res, labels, heatmaps, args.heatmaps)
    return 0


def _score_with_detector(args: argparse.Namespace, ckpt: Any, ref: Any, cur: Any, fit_idx: np.ndarray,
                         val_idx: np.ndarray, progress: bool) -> tuple[str, Any]:
    """Fit the chosen detector on the reference's fit part, threshold it on the rest; (its name, the prediction)."""
    from pipeline.handoff.bundle import ScoringConfig
    from pipeline.handoff.bundle import make_detector as residual_detector

    scoring = ScoringConfig()
    name = args.detector
    if name == "auto":
        n = len(scoring.t_stars)
        name = ("patch" if ref.kind == cur.kind == "images" else
                "residual" if _has_residuals(ref, n) and _has_residuals(cur, n) else "mahalanobis")
    X_ref, X_cur = ref.Z, cur.Z
    if name == "fused":
        return name, _fused_prediction(args, ckpt, ref, cur, fit_idx, val_idx, progress)
    if name == "patch":
        return name, _patch_prediction(args, ref, cur, fit_idx, val_idx)
    if name == "residual":
        det = residual_detector(len(scoring.t_stars), k=scoring.k, n_fit=len(fit_idx))
        _check_reference_size(det, len(fit_idx), name, len(X_ref), args.calibration_share)  # before the costly part
        X_ref, X_cur = _residual_inputs(ckpt, ref, cur, scoring, progress)
    else:
        det = latent_detector(name)
        _check_reference_size(det, len(fit_idx), name, len(X_ref), args.calibration_share)
    det.fit(X_ref[fit_idx])
    try:
        det.infer_threshold(X_ref[val_idx], fpr=args.fpr)
    except ValueError as exc:
        raise CLIError(f"{exc} (reference: {len(X_ref)} images, {len(val_idx)} used for the threshold)") from exc
    return name, det.predict(X_cur)


def _residual_inputs(ckpt: Any, ref: Any, cur: Any, scoring: Any, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """The residual detector's inputs of both sources: z with the per-step denoising residuals beside it."""
    X_ref = np.column_stack([ref.Z, source_residuals(ref, ckpt, scoring, what="--reference", progress=progress)])
    X_cur = np.column_stack([cur.Z, source_residuals(cur, ckpt, scoring, what="--images", progress=progress)])
    return X_ref, X_cur


def _fused_prediction(args: argparse.Namespace, ckpt: Any, ref: Any, cur: Any, fit_idx: np.ndarray,
                      val_idx: np.ndarray, progress: bool) -> Any:
    """The monitor's fused score: residual and patch detectors fitted on the fit part, the fusion on the rest."""
    from pipeline.analysis.detectors.patch import PatchDetector
    from pipeline.analysis.fusion import FAMILIES, ScoreFusion
    from pipeline.handoff.bundle import ScoringConfig, make_detector

    scoring = ScoringConfig()
    _require_image_folders("fused", ref, cur)
    res_det = make_detector(len(scoring.t_stars), k=scoring.k, n_fit=len(fit_idx))
    _check_reference_size(res_det, len(fit_idx), "fused", len(ref.frame), args.calibration_share)
    X_ref, X_cur = _residual_inputs(ckpt, ref, cur, scoring, progress)
    P_ref, P_cur = _patch_maps(ref, "--reference"), _patch_maps(cur, "--images")
    patch = PatchDetector().fit(P_ref[fit_idx])
    res_det.fit(X_ref[fit_idx])
    S_val = np.column_stack([patch.score(P_ref[val_idx]), res_det.score(X_ref[val_idx])])
    fusion = ScoreFusion(FAMILIES, log=(True, False)).fit(S_val)
    try:
        fusion.infer_threshold(S_val, fpr=args.fpr)
    except ValueError as exc:
        raise CLIError(f"{exc} (reference: {len(X_ref)} images, {len(val_idx)} used for the threshold)") from exc
    return fusion.predict(np.column_stack([patch.score(P_cur), res_det.score(X_cur)]))


def _require_image_folders(name: str, ref: Any, cur: Any) -> None:
    """One clear error when a source holds latents where the detector needs the images."""
    for src, what in ((ref, "--reference"), (cur, "--images")):
        if src.kind != "images":
            raise CLIError(f"the {name} detector needs image folders: {what} {src.origin!r} holds latents "
                           "(use --detector residual or mahalanobis)")


def _patch_prediction(args: argparse.Namespace, ref: Any, cur: Any, fit_idx: np.ndarray, val_idx: np.ndarray) -> Any:
    """The monitor's default score: a patch detector fitted on the fit part's patch maps, thresholded on the rest."""
    from pipeline.analysis.detectors.patch import PatchDetector

    _require_image_folders("patch", ref, cur)
    det = PatchDetector()
    _check_reference_size(det, len(fit_idx), "patch", len(ref.frame), args.calibration_share)
    P_ref, P_cur = _patch_maps(ref, "--reference"), _patch_maps(cur, "--images")
    det.fit(P_ref[fit_idx])
    try:
        det.infer_threshold(P_ref[val_idx], fpr=args.fpr)
    except ValueError as exc:
        raise CLIError(f"{exc} (reference: {len(P_ref)} images, {len(val_idx)} used for the threshold)") from exc
    return det.predict(P_cur)


def _patch_maps(source: LatentSource, what: str) -> np.ndarray:
    """Backbone patch maps of a source's image files (one clear error when the weights package is missing)."""
    from pipeline.common.images import read_images

    try:
        from pipeline.latent.features import compute_features

        return compute_features(read_images(source.frame["path"].tolist())).patches
    except ImportError as exc:
        raise CLIError(f"the patch maps need the backbone weights ({what}): {exc}") from exc


def _score_doc(info: dict[str, Any], res: Any, cur: Any, labels: list[str], serials: list[str],
               heatmaps: list[Any]) -> dict[str, Any]:
    """The JSON answer of ``linewatch score``."""
    paths = cur.labels()
    sha = cur.frame["sha256"].astype(str).tolist() if "sha256" in cur.frame.columns else [None] * len(labels)
    return {
        "heatmaps": [str(p) for p in heatmaps], "model_id": info["model_id"], "detector": info["detector"],
        "fpr_target": res.fpr_target, "fpr_ci": list(res.fpr_ci), "threshold": res.threshold,
        "threshold_ci": list(res.threshold_ci), "n_reference_fit": int(info["n_fit"]),
        "n_reference_threshold": int(info["n_threshold"]), "n_images": len(labels), "n_flagged": res.n_anomalies,
        "images": [{"image": labels[i], "serial": serials[i] or None, "path": paths[i], "sha256": sha[i],
                    "score": float(res.scores[i]), "p_value": float(res.p_values[i]),
                    "flagged": bool(res.is_anomaly[i])} for i in range(len(labels))],
    }


def _print_scores(info: dict[str, Any], res: Any, labels: list[str], heatmaps: list[Any], folder: Any) -> None:
    """The plain answer of ``linewatch score``: threshold with its CIs, one line per image, the count flagged."""
    print(
        f"model {info['model_id']}, detector {info['detector']}: threshold {res.threshold:.4g} "
        f"(95% CI {res.threshold_ci[0]:.4g}..{res.threshold_ci[1]:.4g}) for fpr {res.fpr_target:g} "
        f"(true false-alarm rate 95% CI {res.fpr_ci[0]:.2%}..{res.fpr_ci[1]:.2%}); "
        f"reference {info['n_fit']} fit + {info['n_threshold']} threshold images"
    )
    width = min(max(len(s) for s in labels), 80)
    print(f"{'image':<{width}}  {'score':>10}  {'p_value':>8}  flag")
    for i, label in enumerate(labels):
        flag = "ANOMALY" if res.is_anomaly[i] else "ok"
        print(f"{label:<{width}}  {res.scores[i]:>10.4g}  {res.p_values[i]:>8.4f}  {flag}")
    print(f"{res.n_anomalies} of {len(labels)} flagged")
    if folder:
        print(f"{len(heatmaps)} heatmap(s) of flagged images written to {folder}")


def _check_reference_size(det: Any, n_fit: int, name: str, n_ref: int, share: float) -> None:
    """Too few reference images for the detector's fit half: a message about reference images, not internals."""
    need = int(getattr(det, "_min_fit_samples", 1) or 1)
    if n_fit < need:
        total = math.ceil(need / (1.0 - share))
        raise CLIError(
            f"--reference has {n_ref} reference images: the {name} detector is fit on {n_fit} of them (the rest "
            f"set the threshold) and needs at least {need}; give at least {total} reference images"
        )


# --- drift -------------------------------------------------------------------------------------------------------
DRIFT_EPILOG = """\
examples:
  linewatch drift --model ckpt/v1 --reference calib/ --current line1/2024-05-01/
  linewatch drift --model ckpt/v1 --reference calib_latents.parquet --current today_latents.parquet --json
  linewatch drift --model ckpt/v1 --reference calib/ --current shift2/ --null lot --alpha 0.01
  linewatch drift --model ckpt/v1 --reference calib/ --current shift2/ --quality   # blur, sensor noise

Prints whether the current window drifted from the reference: the multivariate MMD^2 statistic and p-value, and for
every latent axis its KS statistic, p-value (BH-adjusted too), effect size (shift in reference standard deviations),
PSI and rank (significant axes by |effect| first). --null lot compares against how much windows of consecutive
reference images (whole lots) normally differ, which avoids false alarms from lot-to-lot variation; it needs the
reference in production order and at least twice as many reference images as the window.
"""


def cmd_drift(args: argparse.Namespace) -> int:
    """Run ``linewatch drift``."""
    res, model_id, n_given = _run_drift(args)
    if args.json:
        print(json.dumps(_jsonable(_drift_doc(res, args.alpha, model_id, n_given)), indent=2))
        return 0
    _print_drift(res, model_id, n_given)
    return 0


def _run_drift(args: argparse.Namespace) -> tuple[Any, str, int]:
    """(drift result, model id, images given as current) of the reference and current window of ``args``."""
    from pipeline.analysis.drift import DriftDetector
    from pipeline.cli.model import load_model
    from pipeline.monitoring.config import DEFAULT_QUALITY_DIRECTIONS, DEFAULT_QUALITY_FLOORS

    _require_reference(args, "drift")
    ckpt = load_model(args.model, args.device)
    progress = _progress(args)
    ref = load_latent_source(args.reference, ckpt, what="--reference", batch_size=args.batch_size, progress=progress)
    cur = load_latent_source(args.current, ckpt, what="--current", batch_size=args.batch_size, progress=progress)
    model_id = str(ckpt.meta.get("model_id"))
    det = DriftDetector(
        alpha=args.alpha,
        null=args.null,
        min_window=args.min_window,
        n_permutations=args.permutations,
        quality_floors=dict(DEFAULT_QUALITY_FLOORS),
        quality_directions=dict(DEFAULT_QUALITY_DIRECTIONS),
        random_state=args.seed,
        progress=progress,
    )
    q_ref = q_cur = None
    if args.quality:
        q_ref = _quality_of(ref, "--reference", progress)
        q_cur = _quality_of(cur, "--current", progress)
    det.fit(ref.Z, model_id=model_id, ref_quality=q_ref)
    n_given = len(cur.Z)
    keep = det.rows_to_test(n_given)  # the lot null's guard band: at most a third of the reference
    res = det.test(cur.Z[keep], model_id=model_id, cur_quality=None if q_cur is None else q_cur.iloc[keep])
    return res, model_id, n_given


def _drift_doc(res: Any, alpha: float, model_id: str, n_given: int) -> dict[str, Any]:
    """The ``--json`` document of a drift result."""
    return {
        "model_id": model_id,
        "detected": res.detected,
        "fired": list(res.fired),
        "null": res.null,
        "alpha": alpha,
        "family_alpha": res.family_alpha,
        "family_p": res.family_p,
        "multivariate": {"test": "mmd2", "statistic": res.mmd_stat, "p_value": res.mmd_p},
        "n_reference": res.n_ref,
        "n_current": res.n_cur,
        "n_current_given": n_given,
        "top_axis": res.top_axis,
        "top_share": res.top_share,
        "axes": [
            {
                "axis": int(r.axis),
                "statistic": float(r.ks_stat),
                "p_value": float(r.p_value),
                "p_adjusted": float(r.p_adjusted),
                "effect_size": float(r.effect_size),
                "psi": float(r.psi),
                "psi_band": str(r.psi_band),
                "significant": bool(r.significant),
                "rank": int(r.rank),
            }
            for r in res.per_axis.itertuples(index=False)
        ],
        "quality": None if res.per_channel is None else {
            "statistic": res.quality_stat,
            "p_value": res.quality_p,
            "channels": [
                {"channel": str(r.channel), "statistic": float(r.ks_stat), "p_value": float(r.p_value),
                 "effect_size": float(r.effect_size), "significant": bool(r.significant)}
                for r in res.per_channel.itertuples(index=False)
            ],
        },
        "summary": res.summary(),
    }


def _print_drift(res: Any, model_id: str, n_given: int) -> None:
    """Prints a drift result as text: the verdict, the MMD test, one row per axis, the image-quality channels."""
    print(f"detected: {res.detected}" + (f" (fired: {', '.join(res.fired)})" if res.fired else ""))
    print(
        f"multivariate MMD^2: {res.mmd_stat:.4g}, p = {res.mmd_p:.4g} ({res.null} null, each family at "
        f"alpha {res.family_alpha:.3g}); reference {res.n_ref} vs current {res.n_cur} images, model {model_id}"
    )
    if res.n_cur < n_given:
        print(f"current subsampled evenly from {n_given} to {res.n_cur} images (the lot null tests windows of at "
              f"most a third of the reference)")
    print(res.summary())
    print(f"{'rank':>4}  {'axis':>5}  {'KS':>6}  {'p_value':>9}  {'p_adj':>9}  {'effect':>7}  {'PSI':>6}  band  sig")
    for r in res.per_axis.itertuples(index=False):
        print(
            f"{r.rank:>4}  z_{r.axis:<3}  {r.ks_stat:>6.3f}  {r.p_value:>9.3g}  {r.p_adjusted:>9.3g}  "
            f"{r.effect_size:>+7.2f}  {r.psi:>6.3f}  {r.psi_band}  {'*' if r.significant else ''}"
        )
    if res.per_channel is not None:
        print(f"image quality (full resolution): largest median shift {res.quality_stat:.2f} robust sd, "
              f"p = {res.quality_p:.4g}")
        for r in res.per_channel.itertuples(index=False):
            print(f"  {r.channel:<14}  KS {r.ks_stat:.3f}  p {r.p_value:.3g}  effect {r.effect_size:+.2f} sd"
                  f"  {'*' if r.significant else ''}")


def _quality_of(src: LatentSource, what: str, progress: bool) -> Any:
    """Full-resolution image-quality channels of the images of an image-folder source."""
    from pipeline.common.images import read_images
    from pipeline.latent.properties import QUALITY_CHANNELS, measure_each

    if src.kind != "images":
        raise CLIError(f"--quality measures the images themselves: give {what} as an image folder, not a Parquet file")
    return measure_each(read_images(list(src.frame["path"]), channels=1), QUALITY_CHANNELS)


# --- registration ------------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="CKPT_DIR", help="checkpoint folder written by train")
    p.add_argument(
        "--reference",
        default=None,
        metavar="DIR_OR_PARQUET",
        help="required: normal images the model did not train on (folder) or their latents (.parquet, same model)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.add_argument("--batch-size", type=int, default=256, help="encode batch size (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: Any) -> None:
    """Add ``score`` and ``drift`` to the ``linewatch`` parser."""
    p = subparsers.add_parser(
        "score",
        help="per-image anomaly scores and flags against a reference",
        description="Score images with an anomaly detector calibrated on reference images.",
        epilog=SCORE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.add_argument("--images", required=True, metavar="DIR", help="images to score (folder, recursive, or one file)")
    p.add_argument("--detector", default="auto", choices=DETECTORS,
                   help="default auto: patch with image folders, else residual or mahalanobis (see below)")
    p.add_argument("--fpr", type=float, default=0.01, help="target false-alarm rate on normal images (default 0.01)")
    p.add_argument(
        "--calibration-share", type=float, default=0.5, help="share of the reference used for the threshold (0.5)"
    )
    p.add_argument("--heatmaps", metavar="DIR", default=None,
                   help="write anomaly-map overlays (PNG) of the top flagged images to DIR")
    p.add_argument("--heatmap-top", type=int, default=8, help="how many flagged images get a heatmap (default 8)")
    p.set_defaults(func=cmd_score)

    p = subparsers.add_parser(
        "drift",
        help="test a window of images for drift against a reference",
        description="Per-axis and multivariate drift tests of the current latents against the reference latents.",
        epilog=DRIFT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.add_argument("--current", required=True, metavar="DIR_OR_PARQUET", help="the window: image folder or latents")
    p.add_argument("--alpha", type=float, default=0.05, help="false-alarm rate per window (default 0.05)")
    p.add_argument("--null", choices=("iid", "lot"), default="iid", help="null hypothesis (default iid)")
    p.add_argument("--min-window", type=int, default=30, help="smallest window accepted (default 30)")
    p.add_argument("--permutations", type=int, default=200, help="MMD permutations, iid null (default 200)")
    p.add_argument("--quality", action="store_true",
                   help="also test full-resolution image-quality channels (fine detail, noise, rotation, illumination; "
                        "as in the monitor, a pixel-noise move under 0.002 of full scale is not reported, nor a fall "
                        "of fine detail or noise or a rise of the border / centre ratio); needs image folders for "
                        "--reference and --current")
    p.set_defaults(func=cmd_drift)
