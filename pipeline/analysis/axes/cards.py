"""Axis cards: for each latent axis, a traversal strip of decoded reference images and what the axis correlates with.

:func:`axis_cards` DDIM-inverts a few reference images once, decodes them with one axis set to its reference
quantiles (or a span of reference sd), and writes ``axis_XX.png`` + ``axis_XX.json`` per axis and an overview
``axes.json`` (readable by the group and others: :data:`CARD_FILE_MODE`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.analysis.axes.describe import (
    MIN_ABS_R,
    AxisDescription,
    _json_float,
    axis_correlations,
    describe_axes,
)
from pipeline.common import atomic
from pipeline.common.figures import write_png
from pipeline.common.schemas import as_latent_matrix

if TYPE_CHECKING:
    import torch

__all__ = ["CARD_FILE_MODE", "AxisCard", "axis_cards"]

#: Axis-card files are readable by the group and others (a team server may run as another user).
CARD_FILE_MODE = 0o644


@dataclass(frozen=True)
class AxisCard:
    """One axis card: the traversal strip and what the axis correlates with.

    Attributes:
        axis: latent axis.
        description: the axis description.
        quantiles: reference quantile levels of the strip's columns.
        values: the axis values at those quantiles (absolute replacement of z_axis).
        png_path: the strip image.
        json_path: the card's JSON.
        strip: decoded images (n_images, V, C, H, W) in [-1, 1].
    """

    axis: int
    description: AxisDescription
    quantiles: tuple[float, ...]
    values: tuple[float, ...]
    png_path: Path
    json_path: Path
    strip: np.ndarray = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (without the pixels)."""
        return {
            "axis": self.axis,
            "description": self.description.text,
            "property": self.description.property,
            "r": _json_float(self.description.r),
            "quantiles": list(self.quantiles),
            "values": list(self.values),
            "png": str(self.png_path),
            "json": str(self.json_path),
        }


def _atomic_write_text(path: Path, text: str) -> None:
    atomic.write_text(path, text, mode=CARD_FILE_MODE)  # cards are read by the team's servers


def _save_strip_png(
    path: Path,
    strip: np.ndarray,
    col_titles: Sequence[str],
    title: str,
    row_labels: Sequence[str],
) -> None:
    """Render an (R, V, C, H, W) strip in [-1, 1] as a labelled grid (rows = images, columns = axis values)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_cols = strip.shape[:2]
    fig = Figure(figsize=(1.4 * n_cols + 0.6, 1.4 * n_rows + 0.9), dpi=100)
    FigureCanvasAgg(fig)
    axs = fig.subplots(n_rows, n_cols, squeeze=False)
    for i in range(n_rows):
        for j in range(n_cols):
            img = strip[i, j]
            ax = axs[i][j]
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=-1.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(
                    np.clip((np.moveaxis(img[:3], 0, -1) + 1.0) / 2.0, 0.0, 1.0), interpolation="nearest"
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_titles[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    write_png(fig, path, dpi=fig.dpi, tight=False, mode=CARD_FILE_MODE)


def _column_values(
    Z: np.ndarray, axes: Sequence[int], quantiles: tuple[float, ...], span_sd: float | None, sd_floor: float = 0.0
) -> tuple[dict[int, tuple[float, ...]], dict[int, tuple[float, ...]], dict[int, list[str]]]:
    """Each axis's column values, their reference quantile levels and the column titles of its strip.

    With ``span_sd`` the columns are ``mean + k * max(sd, sd_floor)`` for ``len(quantiles)`` values of k evenly
    spaced in ``[-span_sd, +span_sd]``, titled with z and its distance from the mean in reference sd; otherwise the
    reference quantiles.
    """
    values, levels, titles = {}, {}, {}
    for a in axes:
        col = Z[:, a]
        if span_sd is None:
            values[a] = tuple(float(v) for v in np.quantile(col, quantiles))
            levels[a] = quantiles
            titles[a] = [f"q{lv:.2f}\nz={v:+.2f}" for lv, v in zip(levels[a], values[a], strict=True)]
            continue
        mean, sd = float(col.mean()), float(col.std())
        unit = max(sd, sd_floor)
        values[a] = tuple(mean + k * unit for k in np.linspace(-span_sd, span_sd, len(quantiles)))
        levels[a] = tuple(float((col <= v).mean()) for v in values[a])
        titles[a] = [f"z={v:+.2f}\n{(v - mean) / sd if sd > 0 else 0.0:+.1f} ref. sd" for v in values[a]]
    return values, levels, titles


@dataclass(frozen=True)
class _CardJob:
    """What the cards of one :func:`axis_cards` call share: the checked arguments and each axis's columns."""

    Z: np.ndarray
    quantiles: tuple[float, ...]
    axes: list[int]
    idx: list[int]
    span_sd: float | None
    sd_floor: float
    steps: int
    batch_size: int
    model_id: str | None
    out: Path
    corr: pd.DataFrame
    descs: dict[int, AxisDescription]
    values: dict[int, tuple[float, ...]]
    levels: dict[int, tuple[float, ...]]
    titles: dict[int, list[str]]


def axis_cards(
    model: Any, ref_images: torch.Tensor, Z_ref: Any, props_df: pd.DataFrame, out_dir: str | os.PathLike[str], *,
    axes: Sequence[int] | None = None, n_images: int = 3, image_indices: Sequence[int] | None = None,
    quantiles: Sequence[float] = (0.02, 0.16, 0.5, 0.84, 0.98), span_sd: float | None = None,
    sd_floor: float = 0.0, steps: int = 20, batch_size: int = 32, model_id: str | None = None,
    min_abs_r: float = MIN_ABS_R, progress: bool = True,
) -> list[AxisCard]:
    """Write an axis card (traversal strip PNG + JSON) for each latent axis, and an ``axes.json`` overview.

    Each of a few reference images is DDIM-inverted once (x_T with its own z), then decoded with z_axis set to the
    axis's reference quantiles (absolute replacement), all other coordinates of its z kept.

    Args:
        model: an ``InfoDiffusion`` (``encode``, ``ddim_invert``, ``ddim_sample``).
        ref_images: (N_img, C, H, W) float tensor in [-1, 1] at the model's size (``models.to_model_input``).
        Z_ref: reference latents (N, d) under the same model (for the quantiles and correlations). For a
            ``"pretrained"`` encoder (it reads backbone features, not these images) row ``i`` must be the code of
            ``ref_images[i]``.
        props_df: image properties of the N reference images, same order as ``Z_ref``.
        out_dir: where ``axis_XX.png``, ``axis_XX.json`` and ``axes.json`` go.
        axes: which axes (default: all).
        n_images: rows of each strip (ignored when ``image_indices`` is given).
        image_indices: which rows of ``ref_images`` to show (default: the first ``n_images``).
        quantiles: reference quantile levels, the strip's columns.
        span_sd: instead of quantiles, as many columns evenly spaced from ``mean - span_sd * sd`` to
            ``mean + span_sd * sd`` of the axis on the reference (e.g. 3.0: -3, -1.5, 0, +1.5, +3 sd), a range wide
            enough to see what the axis does; the JSON's ``quantiles`` are then those values' reference levels.
        sd_floor: with ``span_sd``, the unit of the span is at least this: ``1.0`` spans at least +-3 in the units of
            the model's N(0, I) prior, for a model whose latents are narrower than its prior (the columns then lie
            beyond the reference, and their titles say by how many reference sd).
        steps: DDIM steps for inversion and decoding.
        batch_size: images per decoder call.
        model_id: recorded in the JSON (default: ``model.model_id`` when it exists).
        min_abs_r: |r| needed to name a property in the description.
        progress: tqdm bar over axes (also off when stderr is not a TTY).

    Returns:
        One :class:`AxisCard` per axis.

    Raises:
        ValueError: bad quantiles, axes, indices or shapes.
    """
    Z = as_latent_matrix(Z_ref, "Z_ref")
    q, axes_list, idx = _check_card_args(model, ref_images, Z, axes, n_images, image_indices, quantiles, span_sd,
                                         steps, batch_size)
    corr = axis_correlations(Z, props_df)
    descs = {x.axis: x for x in describe_axes(corr, min_abs_r=min_abs_r, axes=axes_list)}
    values, levels, titles = _column_values(Z, axes_list, q, span_sd, sd_floor)
    job = _CardJob(Z, q, axes_list, idx, span_sd, sd_floor, steps, batch_size,
                   model_id if model_id is not None else getattr(model, "model_id", None), Path(out_dir), corr,
                   descs, values, levels, titles)
    job.out.mkdir(parents=True, exist_ok=True)
    cards = _traverse_axes(model, ref_images, job, progress)
    _write_overview(job, cards)
    return cards


def _check_card_args(
    model: Any, ref_images: torch.Tensor, Z: np.ndarray, axes: Sequence[int] | None, n_images: int,
    image_indices: Sequence[int] | None, quantiles: Sequence[float], span_sd: float | None, steps: int,
    batch_size: int,
) -> tuple[tuple[float, ...], list[int], list[int]]:
    """(quantile levels, axes, image rows) of an :func:`axis_cards` call, its arguments checked."""
    import torch

    d = Z.shape[1]
    q = tuple(float(v) for v in quantiles)
    if not q or any(not 0.0 <= v <= 1.0 for v in q):
        raise ValueError(f"quantiles must be a non-empty list of levels in [0, 1], got {quantiles}")
    if span_sd is not None and not span_sd > 0:
        raise ValueError(f"span_sd must be > 0, got {span_sd}")
    axes_list = list(range(d)) if axes is None else [int(a) for a in axes]
    bad = [a for a in axes_list if not 0 <= a < d]
    if bad or not axes_list:
        raise ValueError(f"axes {bad or axes_list} out of range [0, {d})")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if not isinstance(ref_images, torch.Tensor) or ref_images.ndim != 4:
        raise ValueError("ref_images must be a (N, C, H, W) float tensor in [-1, 1] (models.to_model_input)")
    idx = (
        list(range(min(n_images, len(ref_images))))
        if image_indices is None
        else [int(i) for i in image_indices]
    )
    if not idx or any(not 0 <= i < len(ref_images) for i in idx):
        raise ValueError(f"image indices {idx} out of range [0, {len(ref_images)}) (or n_images < 1)")
    latent_dim = getattr(getattr(model, "cfg", None), "latent_dim", d)
    if latent_dim != d:
        raise ValueError(
            f"Z_ref has {d} axes but the model's latent_dim is {latent_dim}; use latents of this model"
        )
    return q, axes_list, idx


def _traverse_axes(model: Any, ref_images: torch.Tensor, job: _CardJob, progress: bool) -> list[AxisCard]:
    """Inverts the reference rows once, then decodes and writes each axis's strip (model left in its mode)."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device if hasattr(model, "parameters") else torch.device("cpu")
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    cards: list[AxisCard] = []
    try:
        with torch.no_grad():
            x0 = ref_images[job.idx].to(device=device, dtype=torch.float32)
            z0 = _row_codes(model, x0, job)
            x_T = model.ddim_invert(x0, z0, job.steps)
            it = tqdm(
                job.axes, desc="axis cards", unit="axis", disable=not (progress and sys.stderr.isatty())
            )
            for a in it:
                strip = _decode_strip(model, x0, z0, x_T, a, job, device)
                cards.append(_write_card(job, a, strip))
    finally:
        if was_training and hasattr(model, "train"):
            model.train(True)
    return cards


def _row_codes(model: Any, x0: torch.Tensor, job: _CardJob) -> torch.Tensor:
    """The shown rows' codes: Enc(x0), or their ``Z_ref`` rows for a ``"pretrained"`` encoder (it reads features)."""
    import torch

    if not getattr(model, "uses_features", False):
        return model.encode(x0)
    return torch.as_tensor(job.Z[job.idx], dtype=torch.float32, device=x0.device)


def _decode_strip(model: Any, x0: torch.Tensor, z0: torch.Tensor, x_T: torch.Tensor, a: int, job: _CardJob,
                  device: torch.device) -> np.ndarray:
    """(rows, values, C, H, W): each inverted row decoded with z_a set to each of the axis's column values."""
    import torch

    n_r, n_v, batch_size = len(job.idx), len(job.quantiles), job.batch_size
    zs = z0.repeat_interleave(n_v, dim=0).clone()  # (n_r * n_v, d): image-major, value-minor
    zs[:, a] = torch.tensor(job.values[a], dtype=zs.dtype, device=device).repeat(n_r)
    xs = x_T.repeat_interleave(n_v, dim=0)
    decoded = [
        model.ddim_sample(xs[s : s + batch_size], zs[s : s + batch_size], job.steps, eta=0.0)
        for s in range(0, len(zs), batch_size)
    ]
    return torch.cat(decoded).float().cpu().numpy().reshape(n_r, n_v, *x0.shape[1:])


def _write_card(job: _CardJob, a: int, strip: np.ndarray) -> AxisCard:
    """Writes ``axis_XX.png`` and ``axis_XX.json`` of axis ``a`` and returns its card."""
    desc = job.descs[a]
    png = job.out / f"axis_{a:02d}.png"
    jpath = job.out / f"axis_{a:02d}.json"
    _save_strip_png(png, strip, job.titles[a], desc.text, [f"ref #{i}" for i in job.idx])
    rows = job.corr[job.corr["axis"] == a]
    card_json = {
        "axis": a,
        "description": desc.text,
        "property": desc.property,
        "label": desc.label,
        "r": _json_float(desc.r),
        "second_best": desc.to_dict()["second_best"],
        "method": desc.method,
        "correlations": {
            str(r.property): {
                "pearson": _json_float(r.pearson),
                "spearman": _json_float(r.spearman),
            }
            for r in rows.itertuples()
        },
        "quantiles": list(job.levels[a]),
        "span_sd": job.span_sd,
        "sd_floor": job.sd_floor,
        "reference_sd": float(job.Z[:, a].std()),
        "values": list(job.values[a]),
        "image_indices": job.idx,
        "steps": job.steps,
        "n_ref": len(job.Z),
        "model_id": job.model_id,
        "png": png.name,
    }
    _atomic_write_text(jpath, json.dumps(card_json, indent=2))
    return AxisCard(a, desc, job.levels[a], job.values[a], png, jpath, strip)


def _write_overview(job: _CardJob, cards: list[AxisCard]) -> None:
    """Writes ``axes.json``: the call's settings and one entry per card."""
    overview = {
        "model_id": job.model_id,
        "n_ref": len(job.Z),
        "quantiles": list(job.quantiles),
        "span_sd": job.span_sd,
        "sd_floor": job.sd_floor,
        "steps": job.steps,
        "image_indices": job.idx,
        "axes": [
            {
                "axis": c.axis,
                "description": c.description.text,
                "text": c.description.text,
                "property": c.description.property,
                "r": _json_float(c.description.r),
                "png": c.png_path.name,
                "json": c.json_path.name,
            }
            for c in cards
        ],
    }
    _atomic_write_text(job.out / "axes.json", json.dumps(overview, indent=2))

