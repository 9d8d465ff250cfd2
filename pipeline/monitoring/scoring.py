"""The monitor's per-image step: which images a pass monitors, their latents and residuals, scores and flags.

:func:`monitored_rows` picks the catalog rows of the monitored period (whole plant days); :func:`score_images`
encodes them with the champion (resumable latents table), scores them (by default the backbone's patch maps judged
against the calibration cells'; optionally fused with the diffusion residual judged in z-context, whose residuals
are then computed once per image and model), moves each line-day by its offset (``MonitorConfig.recentre``) and
writes the flags to the scores table.
:func:`encoding_plan`, :func:`encode_chunk` and :func:`residual_chunk` spread the encoding and the residuals over a
flow's workers; the pass then folds their part files into the tables as their single writer.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.handoff.bundle import ScoringConfig
from pipeline.monitoring.champion import Champion, load_champion
from pipeline.monitoring.tables import (
    _upsert,
    latents_table_path,
    pending_residuals,
    residual_frame,
    residual_parts_dir,
    residual_table,
    scores_table_path,
)

if TYPE_CHECKING:
    from pipeline.monitoring.config import MonitorConfig

logger = logging.getLogger(__name__)


def local_time(ts: pd.Series, tz: str) -> pd.Series:
    """Timestamps as local time in ``tz`` (plant days and shifts are cut there)."""
    return pd.to_datetime(ts, utc=True).dt.tz_convert(tz)


def monitored_rows(settings: Any, config: MonitorConfig) -> pd.DataFrame:
    """Catalog rows of the monitored period, whole plant days unless ``config.start`` is given.

    Without ``start`` the period begins at the plant midnight of the day ``lookback_days`` before the newest image,
    so each day's cells are scored and judged together (``MonitorConfig.recentre``).
    """
    from pipeline.catalog.tables import read_catalog

    lines = list(config.lines) if config.lines else None
    start = config.start
    if start is None:
        newest = read_catalog(settings.catalog_root, lines=lines, end=config.end, columns=["captured_at"])
        if newest.empty:
            return newest
        back = pd.Timestamp(newest["captured_at"].max()) - pd.Timedelta(days=config.lookback_days)
        back = back.tz_localize("UTC") if back.tzinfo is None else back
        start = back.tz_convert(settings.timezone).normalize().to_pydatetime()
    return read_catalog(settings.catalog_root, lines=lines, start=start, end=config.end)


def encoding_plan(settings: Any, config: MonitorConfig, chunk_size: int = 1024) -> dict[str, Any]:
    """The champion's folder and the monitored images it has not encoded yet, in chunks for parallel workers.

    A flow maps :func:`encode_chunk` over ``chunks`` (e.g. on Dask workers); the monitor pass then folds the part
    files into the latents table and encodes nothing twice.

    Returns:
        ``{"checkpoint": str, "model_id": str, "chunks": [[{"image_id", "store_path"}, ...], ...],
        "scoring": dict | None, "residual_chunks": [...]}``: ``residual_chunks`` (images without diffusion
        residuals under this model, for :func:`residual_chunk`) is empty when the bundle has no scoring recipe or
        the per-image score does not read residuals (:func:`needs_residuals`).
    """
    from pipeline.latent.encode import pending_images

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    champ = load_champion(settings, fpr=config.fpr, seed=config.seed)
    rows = monitored_rows(settings, config)
    plan: dict[str, Any] = {"checkpoint": str(champ.path), "model_id": champ.model_id, "chunks": [],
                            "scoring": asdict(champ.scoring) if champ.scoring else None, "residual_chunks": []}
    if rows.empty:
        return plan

    def chunked(todo: pd.DataFrame) -> list[list[dict[str, str]]]:
        records = todo[["image_id", "store_path"]].astype(str).to_dict("records")
        return [records[i : i + chunk_size] for i in range(0, len(records), chunk_size)]

    plan["chunks"] = chunked(pending_images(champ.checkpoint, rows[["image_id", "store_path"]],
                                            latents_table_path(settings)))
    if champ.scoring is not None and needs_residuals(config):  # golden captures are never scored
        from pipeline.monitoring.golden import split_golden

        plan["residual_chunks"] = chunked(pending_residuals(settings, champ.model_id, split_golden(rows)[0],
                                                            len(champ.scoring.t_stars)))
    return plan


def encode_chunk(settings: Any, checkpoint_dir: str, records: list[dict[str, str]]) -> str:
    """Encode one chunk of :func:`encoding_plan` into a part file next to the latents table; returns its path."""
    import torch

    from pipeline.latent.encode import encode_part

    torch.set_num_threads(1)  # one core per chunk: the chunks are the parallelism
    return str(encode_part(checkpoint_dir, pd.DataFrame(records), latents_table_path(settings),
                           root=settings.catalog_root, workers=1))


def residual_chunk(settings: Any, checkpoint_dir: str, scoring: dict[str, Any], records: list[dict[str, str]]) -> str:
    """Compute the residuals of one chunk of :func:`encoding_plan` into a part file; returns its path.

    The part is named by the model id and a digest of the chunk's image ids and written atomically, so a retried
    chunk rewrites the same file. The monitor pass folds the parts into the residuals table.
    """
    import torch

    from models.checkpoint import load_checkpoint
    from pipeline.latent.encode import part_file, write_parquet_atomic

    torch.set_num_threads(1)  # one core per chunk: the chunks are the parallelism
    rows = pd.DataFrame(records)
    if rows.empty:
        raise ValueError("residual_chunk got an empty chunk")
    ckpt = load_checkpoint(checkpoint_dir)
    model_id = str(ckpt.meta.get("model_id", ""))
    sc = ScoringConfig.from_dict(scoring)
    if sc is None:
        raise ValueError("residual_chunk needs the bundle's scoring recipe")
    df = residual_frame(settings, ckpt.model, ckpt.preprocess, sc, model_id, rows)
    return str(write_parquet_atomic(df, part_file(residual_parts_dir(settings), model_id, df["image_id"])))


def needs_residuals(config: MonitorConfig) -> bool:
    """Whether the per-image score reads the diffusion residuals (the residual family alone, or fused at a weight)."""
    return not config.fusion or config.residual_weight > 0


def score_images(settings: Any, champ: Champion, rows: pd.DataFrame,
                 config: MonitorConfig) -> tuple[pd.DataFrame, Any, np.ndarray | None]:
    """Encode (resumable), score and flag every monitored image; the flags go to the scores table.

    The flag's score is the patch family (fused with the residual family at ``config.residual_weight``), or the
    residual family's when fusion is off or the patch family cannot run; residuals are computed (once per image and
    model) only when that score reads them.

    Returns:
        The catalog rows with their ``z_*`` columns, ``score`` (the flag's score, before the line-day offset),
        ``day_offset`` and ``is_anomaly``; the pass's patch family (``ChampionPatches``, also when fusion is off:
        the heatmaps use it); the out-of-period scores of the calibration cells on the same scale (what the drift
        test's score family and the chart's ``score_tail`` compare the windows with; None without them).
    """
    from pipeline.analysis.thresholds import judged
    from pipeline.latent.encode import encode_catalog, z_columns
    from pipeline.monitoring.patches import ChampionPatches

    latents = encode_catalog(champ.checkpoint, rows, latents_table_path(settings),
                             root=settings.catalog_root, progress=config.progress)
    latents = latents[latents["model_id"] == champ.model_id]
    zc = z_columns(latents)
    df = rows.merge(latents[["image_id", *zc]], on="image_id", how="inner")
    patches = ChampionPatches(settings, champ)
    det, scorer, ref_scores = _flag_scores(settings, champ, df, patches, config)
    # a cell of a product the calibration snapshot does not know is not judged (pipeline.analysis.thresholds.judged)
    known = judged(champ.reference["product_type"], df["product_type"]) if {"product_type"} <= \
        set(champ.reference.columns) & set(df.columns) else np.ones(len(df), dtype=bool)
    offset = _day_offsets(settings, champ, df, det, ref_scores, config)
    df["score"], df["day_offset"] = det.scores, offset
    df["is_anomaly"] = (np.asarray(det.scores) - offset > det.threshold) & known
    _upsert(scores_table_path(settings), pd.DataFrame({
        "image_id": df["image_id"].astype(str), "model_version": champ.version, "model_id": champ.model_id,
        "score": df["score"].astype(float), "is_anomaly": df["is_anomaly"].astype(bool),
        "threshold": float(det.threshold), "scorer": scorer, "day_offset": df["day_offset"].astype(float),
    }), ["image_id", "model_id"])
    return df, patches, ref_scores


def _flag_scores(settings: Any, champ: Champion, df: pd.DataFrame, patches: Any,
                 config: MonitorConfig) -> tuple[Any, str, np.ndarray | None]:
    """The flag's ``DetectionResult``, the scorer's name and the calibration cells' scores on its scale."""
    residual: Any = None
    if needs_residuals(config):
        residual = _residual_detection(settings, champ, df, config)
    if config.fusion and (champ.ref_scores is not None or config.residual_weight == 0):
        fused = _fused_scores(patches, df, None if residual is None else residual.scores, config)
        if fused is not None:
            scorer = "fused" if config.residual_weight > 0 else "patch"
            return fused, scorer, patches.fused(config.fpr, residual_weight=config.residual_weight).ref_scores
    if residual is None:  # the patch family failed: the residual family alone still scores every cell
        residual = _residual_detection(settings, champ, df, config)
    return residual, "residual", champ.ref_scores


def _residual_detection(settings: Any, champ: Champion, df: pd.DataFrame, config: MonitorConfig) -> Any:
    """The residual family's scores and flags of the cells (z, and the diffusion residuals with a scoring recipe)."""
    from pipeline.latent.encode import z_columns

    Z = df[z_columns(df)].to_numpy(np.float64)
    if champ.scoring is not None:
        R = residual_table(settings, champ, df, progress=config.progress).loc[df["image_id"].astype(str)]
        Z = np.column_stack([Z, R.to_numpy(np.float64)])
    return champ.detector.predict(Z)


def _day_offsets(settings: Any, champ: Champion, df: pd.DataFrame, det: Any, ref_scores: Any,
                 config: MonitorConfig) -> np.ndarray:
    """How far each cell's line-day moves its flag threshold (``pipeline.analysis.thresholds.day_thresholds``).

    The threshold in robust period units comes from the calibration cells' out-of-period scores and their own
    line-days (the champion's reference rows, in the same order); a day's median and spread come from its cells
    outside the calibration snapshot (the patch detector was fitted on those). 0 when the rule is off or cannot be set.
    """
    from pipeline.analysis.thresholds import day_thresholds, period_threshold

    ref = champ.reference
    if not config.recentre or ref_scores is None or df.empty or not {"captured_at"} <= set(ref.columns) \
            or len(ref) != len(ref_scores):
        return np.zeros(len(df))
    unit = period_threshold(ref_scores, _line_days(settings, ref), config.fpr)
    own = df["image_id"].astype(str).isin(set(ref["image_id"].astype(str))).to_numpy() \
        if {"image_id"} <= set(ref.columns) & set(df.columns) else np.zeros(len(df), dtype=bool)
    thr = day_thresholds(det.scores, _line_days(settings, df), float(det.threshold), unit,
                         min_cells=config.min_window, basis=~own)
    return thr - float(det.threshold)


def _line_days(settings: Any, rows: pd.DataFrame) -> np.ndarray:
    """Each row's line and plant day (``"<line>|<YYYY-MM-DD>"`` in the configured time zone)."""
    day = local_time(rows["captured_at"], settings.timezone).dt.strftime("%Y-%m-%d")
    line = rows["line"].astype(str) if "line" in rows.columns else pd.Series("", index=rows.index)
    return (line + "|" + day).to_numpy()


def _fused_scores(patches: Any, df: pd.DataFrame, residual_scores: np.ndarray | None, config: MonitorConfig) -> Any:
    """The patch family's (fused) scores and flags (``DetectionResult``) of the cells; None (one warning) on failure."""
    try:
        return patches.predict(df, residual_scores, config.fpr, residual_weight=config.residual_weight)
    except Exception as exc:  # noqa: BLE001 - the residual family alone still scores every cell
        logger.warning("per-image scores from the residual family alone: the patch family failed (%s: %s)",
                       type(exc).__name__, exc)
        return None
