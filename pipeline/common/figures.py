"""Figures shared by the commands and jobs: labelled image grids, latent traversal grids.

Images are shown on the fixed display range (a tensor in [-1, 1] maps to [0, 1]); nothing is re-stretched per
image, so a darker image looks darker. Figures are built without pyplot state (``Figure`` + Agg canvas).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
    if title:
        fig.suptitle(title, fontsize=9)
    out = output_png(out, "grid.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    return out


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
