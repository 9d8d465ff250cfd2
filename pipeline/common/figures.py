"""Figures shared by the commands and jobs: labelled image grids, latent traversal grids, anomaly heatmaps.

Images are shown on the fixed display range (a tensor in [-1, 1] maps to [0, 1]); nothing is re-stretched per
image, so a darker image looks darker. Figures are built without pyplot state (``Figure`` + Agg canvas).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common import atomic

TRAVERSE_VALUES = (-2.0, -1.0, 0.0, 1.0, 2.0)
MAX_TRAVERSE_AXES = 8


def to_display(x: Any) -> np.ndarray:
    """(C, H, W) tensor in [-1, 1] -> (H, W) or (H, W, 3) float array in [0, 1] for ``imshow``."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    return arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))


def _show(ax: Any, img: np.ndarray | None, title: str | None = None, ylabel: str | None = None) -> None:
    if img is not None:
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.set_facecolor("white")
    ax.set_xticks([])
    ax.set_yticks([])
    if img is None:
        for spine in ax.spines.values():
            spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)


def output_png(out: str | os.PathLike[str], default_name: str) -> Path:
    """Where a figure goes: ``out`` itself, ``out/<default_name>`` for an existing folder, ``.png`` added if no suffix."""
    path = Path(out)
    if path.is_dir():
        return path / default_name
    return path if path.suffix else path.with_name(path.name + ".png")


def write_png(fig: Any, path: str | os.PathLike[str], *, dpi: float = 100, tight: bool = True,
              mode: int = 0o644) -> Path:
    """Write a matplotlib figure as PNG to ``path`` atomically (folder created; ``mode`` so a team server can read it).

    ``tight`` crops the canvas to what is drawn (titles included). The figure stays open: its owner closes it.
    """
    with atomic.atomic_path(path, mode=mode) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return Path(path)


def _save_png(fig: Any, out: str | os.PathLike[str], default_name: str, title: str | None) -> Path:
    """Titles ``fig`` (when ``title``) and writes it as PNG to :func:`output_png` of ``out``; returns the path."""
    if title:
        fig.suptitle(title, fontsize=9)
    return write_png(fig, output_png(out, default_name))


def save_grid(
    cells: Sequence[Sequence[np.ndarray | None]],
    out: str | os.PathLike[str],
    *,
    col_titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    cell_inches: float = 1.1,
) -> Path:
    """Save a labelled image grid (rows x columns of display images; None leaves a cell blank) as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_cols = len(cells), max(len(r) for r in cells)
    fig = Figure(figsize=(cell_inches * n_cols + 0.6, cell_inches * n_rows + (0.5 if title else 0.2)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i, row in enumerate(cells):
        for j in range(n_cols):
            img = row[j] if j < len(row) else None
            ct = col_titles[j] if (col_titles and i == 0) else None
            rl = row_labels[i] if (row_labels and j == 0) else None
            _show(axes[i][j], img, ct, rl)
    return _save_png(fig, out, "grid.png", title)


def traversal_grid(model: Any, x0: Any, out: Path, *, steps: int = 10, title: str = "",
                   values: Sequence[float] = TRAVERSE_VALUES, max_axes: int = MAX_TRAVERSE_AXES,
                   z0: Any = None) -> Path:
    """Save a traversal grid of one image: one row per axis (at most ``max_axes``), z_k set to each of ``values``.

    ``z0`` (1, d) is the image's code; default ``model.encode(x0)`` (a ``"pretrained"`` encoder needs it given).
    """
    import torch

    d = int(model.cfg.latent_dim)
    axes = list(range(min(d, max_axes)))
    with torch.inference_mode():
        grid_t = model.traverse(x0, axes, torch.tensor(tuple(values)), steps=steps, z=z0)
        z = (model.encode(x0) if z0 is None else z0)[0]
    cells = []
    for i in range(len(axes)):
        front = [to_display(x0[0])] if i == 0 else [None]
        cells.append(front + [to_display(grid_t[i, j]) for j in range(len(values))])
    return save_grid(
        cells,
        out,
        col_titles=["original"] + [f"{v:+g}" for v in values],
        row_labels=[f"z_{a} (own {float(z[a]):+.2f})" for a in axes],
        title=title,
        cell_inches=0.9,
    )


def _gray_display(image: Any, value_range: tuple[float, float] | None) -> np.ndarray:
    """2-D gray image -> float (H, W) in [0, 1] on a fixed range (uint8: 0-255, float: -1..1 unless given)."""
    arr = np.asarray(image)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
    if arr.ndim != 2:
        raise ValueError(f"a heatmap needs a 2-D gray image, got shape {arr.shape}")
    lo, hi = value_range or ((0.0, 255.0) if arr.dtype == np.uint8 else (-1.0, 1.0))
    return np.clip((arr.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)


def save_heatmap_overlay(
    image: Any,
    amap: np.ndarray,
    out: str | os.PathLike[str],
    *,
    title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    value_range: tuple[float, float] | None = None,
) -> Path:
    """Save a cell and its anomaly map overlaid on it (two panels, colour bar) as PNG.

    The map (h, w), e.g. ``PatchDetector.anomaly_map`` of one image, is stretched over the whole image with bilinear
    interpolation; ``vmin`` / ``vmax`` fix the colour scale (pass the same values for every cell of a report so the
    colours compare; default: the map's own range).

    Args:
        image: 2-D gray image (uint8 0-255, or float on ``value_range``, default -1..1).
        amap: anomaly map (h, w), higher = more anomalous.
        out: PNG path (or an existing folder: ``heatmap.png`` inside).
        title: figure title.
        vmin: colour-scale minimum.
        vmax: colour-scale maximum.
        value_range: display range of a float image.

    Returns:
        The written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img = _gray_display(image, value_range)
    amap = np.asarray(amap, dtype=np.float64)
    if amap.ndim != 2:
        raise ValueError(f"the anomaly map must be 2-D (h, w), got shape {amap.shape}")
    fig = Figure(figsize=(6.4, 3.2))
    FigureCanvasAgg(fig)
    ax0, ax1 = fig.subplots(1, 2)
    extent = (0, img.shape[1], img.shape[0], 0)
    _show(ax0, img, "cell")
    _show(ax1, img, "anomaly map")
    shown = ax1.imshow(amap, cmap="jet", alpha=0.45, extent=extent, interpolation="bilinear",
                       vmin=float(amap.min()) if vmin is None else vmin,
                       vmax=float(amap.max()) if vmax is None else vmax)
    fig.colorbar(shown, ax=ax1, fraction=0.046, pad=0.04)
    return _save_png(fig, out, "heatmap.png", title)


def save_heatmap_overlays(
    images: Sequence[Any],
    maps: np.ndarray,
    scores: np.ndarray,
    names: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    top: int = 8,
) -> list[Path]:
    """Write heatmap overlays of the ``top`` highest-scoring cells to ``out_dir`` (one PNG each, on one colour scale).

    Files are named ``<rank>_<name>.png`` (rank 1 = highest score; the name made file-safe).

    Returns:
        The written paths, highest score first.
    """
    scores = np.asarray(scores, dtype=np.float64)
    maps = np.asarray(maps, dtype=np.float64)
    if not len(images) == len(maps) == len(scores) == len(names):
        raise ValueError("images, maps, scores and names must have the same length")
    order = np.argsort(-scores, kind="stable")[: max(0, int(top))]
    if len(order) == 0:
        return []
    vmin, vmax = float(maps[order].min()), float(maps[order].max())
    out = Path(out_dir)
    paths = []
    for rank, i in enumerate(order, start=1):
        safe = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in Path(str(names[i])).name)
        paths.append(save_heatmap_overlay(images[i], maps[i], out / f"{rank:02d}_{safe}.png",
                                          title=f"{names[i]}  score {scores[i]:.3g}", vmin=vmin, vmax=vmax))
    return paths
