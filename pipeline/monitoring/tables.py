"""The monitor's tables under the state folder, per image and per model.

Per image: latents, image-quality channels, diffusion residuals, scores; per model: axis descriptions and cards. Each is computed once per image (and model, where the model matters), kept in one Parquet file with a single writer
(the monitor pass), and read back by image id. Parallel workers write part files that the pass folds in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.common import atomic
from pipeline.handoff.state import scores_table_path, state_dir  # noqa: F401 - re-exported


def _upsert(path: Path, new: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Replace rows with the same keys and write atomically."""
    if path.exists():
        old = pd.read_parquet(path)
        merged = pd.concat([old, new], ignore_index=True).drop_duplicates(keys, keep="last")
    else:
        merged = new
    atomic.write_parquet(path, merged)
    return merged


def axis_descriptions(settings: Any, champ: Any) -> list[Any]:
    """Describe every axis of the champion by the image property it correlates with (cached per model id)."""
    from pipeline.analysis.axes import AxisDescription, axis_correlations, describe_axes
    from pipeline.catalog.tables import resolve_store_path
    from pipeline.common.images import read_images
    from pipeline.latent.properties import measure

    cache = state_dir(settings) / "axes" / champ.model_id / "descriptions.json"
    if cache.exists():
        raw = json.loads(cache.read_text())
        return [AxisDescription(**{**d, "second_best": tuple(d["second_best"]) if d["second_best"] else None})
                for d in raw]
    paths = [resolve_store_path(settings.catalog_root, p) for p in champ.reference["store_path"]]
    images = read_images(paths, channels=1)
    props = measure(np.stack([np.asarray(im).squeeze() for im in images]))
    desc = describe_axes(axis_correlations(champ.z_ref, props))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps([d.to_dict() for d in desc], indent=1))
    return desc


CARD_SPAN_SD = 3.0
CARD_SD_FLOOR = 1.0
"""Axis cards span +-3 sd of the axis on the reference, and at least +-3 in the units of the model's N(0, I) prior:
wide enough to see what the axis does (``benchmarks/results/axis_card_range.md``)."""


def axis_card_paths(settings: Any, champ: Any, axes: list[int], descriptions: list[Any],
                    progress: bool = False) -> dict[int, str]:
    """Axis-card strips (PNG) for ``axes``, rendered once per model and cached under the state folder."""
    from pipeline.analysis.axes import axis_cards
    from pipeline.catalog.tables import resolve_store_path
    from pipeline.common.images import load_batch, read_images
    from pipeline.latent.properties import measure

    out_dir = state_dir(settings) / "axes" / champ.model_id
    todo = [a for a in axes if not (out_dir / f"axis_{a:02d}.png").exists()]
    if todo:
        rows = champ.reference.head(256)
        paths = [resolve_store_path(settings.catalog_root, p) for p in rows["store_path"]]
        x = load_batch(paths, champ.checkpoint.preprocess)
        props = measure(np.stack([np.asarray(im).squeeze() for im in read_images(paths, channels=1)]))
        axis_cards(champ.checkpoint.model, x, champ.z_ref[: len(rows)], props, out_dir, axes=todo, steps=10,
                   span_sd=CARD_SPAN_SD, sd_floor=CARD_SD_FLOOR, model_id=champ.model_id, progress=progress)
    return {a: str(out_dir / f"axis_{a:02d}.png") for a in axes if (out_dir / f"axis_{a:02d}.png").exists()}


def latents_table_path(settings: Any) -> Path:
    """The resumable latents table of the monitor (every model's latents, one row per image and model)."""
    return state_dir(settings) / "latents.parquet"


def quality_table_path(settings: Any) -> Path:
    """Per-image image properties (``image_id`` + ``pipeline.latent.properties.MONITOR_CHANNELS``), model-free."""
    return state_dir(settings) / "quality.parquet"


def quality_channels(settings: Any, rows: pd.DataFrame, progress: bool = False) -> pd.DataFrame:
    """Image-quality channels of ``rows`` (``image_id``, ``store_path``), indexed by image id.

    Measured at full resolution once per image and kept in :func:`quality_table_path`; only images not measured
    before are read.
    """
    from tqdm.auto import tqdm

    from pipeline.catalog.tables import resolve_store_path
    from pipeline.common.images import read_images
    from pipeline.latent.properties import MONITOR_CHANNELS, measure_each

    channels = list(MONITOR_CHANNELS)
    path = quality_table_path(settings)
    have = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=["image_id", *channels])
    if not set(channels) <= set(have.columns):  # another channel set: measure again
        have = pd.DataFrame(columns=["image_id", *channels])
    rows = rows.drop_duplicates("image_id")
    todo = rows[~rows["image_id"].astype(str).isin(set(have["image_id"].astype(str)))]
    if len(todo):
        values = []
        batch = 64
        for i in tqdm(range(0, len(todo), batch), desc="image quality", unit="batch", disable=not progress):
            part = todo.iloc[i : i + batch]
            images = read_images([resolve_store_path(settings.catalog_root, p) for p in part["store_path"]],
                                 channels=1)
            values.append(measure_each(images, channels))
        new = pd.concat(values, ignore_index=True)
        new.insert(0, "image_id", todo["image_id"].astype(str).to_numpy())
        have = _upsert(path, new, ["image_id"])
    table = have.assign(image_id=have["image_id"].astype(str)).set_index("image_id")[channels].astype(np.float64)
    return table.loc[~table.index.duplicated(keep="last")]


def residuals_table_path(settings: Any) -> Path:
    """Per-image diffusion residuals (``image_id, model_id, r_0 .. r_{m-1}``), computed once per image and model."""
    return state_dir(settings) / "residuals.parquet"


def residual_parts_dir(settings: Any) -> Path:
    """Where parallel workers drop residual part files (:func:`residual_chunk`) for the monitor pass to fold in."""
    return state_dir(settings) / "residual_parts"


def residual_frame(settings: Any, model: Any, spec: Any, scoring: Any, model_id: str,
                   rows: pd.DataFrame) -> pd.DataFrame:
    """Diffusion residuals of ``rows`` under ``model`` with the ``scoring`` recipe (``image_id, model_id, r_*``)."""
    from pipeline.analysis.detectors.conditional import residual_columns
    from pipeline.catalog.tables import resolve_store_path
    from pipeline.common.images import load_batch
    from pipeline.latent.encode import stored_latents

    x = load_batch([resolve_store_path(settings.catalog_root, p) for p in rows["store_path"]], spec)
    R = scoring.residual_detector(model).residuals(x, stored_latents(model, settings.catalog_root, rows))
    new = pd.DataFrame(R, columns=residual_columns(len(scoring.t_stars)))
    new.insert(0, "model_id", model_id)
    new.insert(0, "image_id", rows["image_id"].astype(str).to_numpy())
    return new


def _fold_residual_parts(settings: Any) -> None:
    """Fold the workers' residual part files into :func:`residuals_table_path` (single writer), then remove them."""
    parts = sorted(residual_parts_dir(settings).glob("*.parquet"))
    if not parts:
        return
    _upsert(residuals_table_path(settings), pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True),
            ["image_id", "model_id"])
    for p in parts:
        p.unlink(missing_ok=True)


def pending_residuals(settings: Any, model_id: str, rows: pd.DataFrame, n_residuals: int) -> pd.DataFrame:
    """Rows (``image_id``, ``store_path``) whose residuals under ``model_id`` are neither in the table nor in a part."""
    from pipeline.analysis.detectors.conditional import residual_columns

    cols = residual_columns(n_residuals)
    done: set[str] = set()
    path = residuals_table_path(settings)
    for f in [path, *sorted(residual_parts_dir(settings).glob("*.parquet"))]:
        if f.exists():
            have = pd.read_parquet(f)
            if set(cols) <= set(have.columns):
                done |= set(have.loc[have["model_id"].astype(str) == model_id, "image_id"].astype(str))
    rows = rows.drop_duplicates("image_id")
    return rows[~rows["image_id"].astype(str).isin(done)]


def residual_table(settings: Any, champ: Any, rows: pd.DataFrame, progress: bool = False,
                   chunk: int = 512) -> pd.DataFrame:
    """Diffusion residuals of ``rows`` (``image_id``, ``store_path``) under the champion, indexed by image id.

    Folds in the part files of parallel workers (:func:`residual_chunk`), then computes, with the bundle's recipe
    (``ScoringConfig``), the images still missing from :func:`residuals_table_path`, in chunks (a crash keeps the
    finished chunks). The forward noise is one shared field, so an image's residual does not depend on which other
    images it was computed with.
    """
    from tqdm.auto import tqdm

    from pipeline.analysis.detectors.conditional import residual_columns

    if champ.scoring is None:
        raise ValueError(f"model v{champ.version} has no residual scoring recipe in its bundle")
    _fold_residual_parts(settings)
    cols = residual_columns(len(champ.scoring.t_stars))
    todo = pending_residuals(settings, champ.model_id, rows, len(cols))
    for i in tqdm(range(0, len(todo), chunk), desc="diffusion residuals", unit="chunk", disable=not progress):
        new = residual_frame(settings, champ.checkpoint.model, champ.checkpoint.preprocess, champ.scoring,
                              champ.model_id, todo.iloc[i : i + chunk])
        _upsert(residuals_table_path(settings), new, ["image_id", "model_id"])
    path = residuals_table_path(settings)
    have = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=["image_id", "model_id", *cols])
    mine = have[have["model_id"].astype(str) == champ.model_id]
    table = mine.assign(image_id=mine["image_id"].astype(str)).set_index("image_id")[cols].astype(np.float64)
    return table.loc[~table.index.duplicated(keep="last")]


__all__ = [
    "axis_card_paths", "axis_descriptions", "latents_table_path", "pending_residuals", "quality_channels", "quality_table_path", "residual_frame",
    "residual_parts_dir", "residual_table", "residuals_table_path", "scores_table_path", "state_dir",
]
