"""A small hyper-parameter sweep over (lambda, zeta, latent dimension), tracked as nested MLflow runs.

``linewatch sweep`` (:mod:`pipeline.cli.sweep`) trains one InfoDiffusion model per grid point on the same images
with the same seed and budget, scores each model's code z with :mod:`pipeline.latent.quality`, and lays the results
side by side, so the regularisation strength and the latent size can be chosen by looking rather than guessing.

MLflow layout (training experiment)::

    sweep-<stamp>                          parent run: grid params, comparison table (CSV + markdown), summary figure
      sweep-<stamp>/lam0.1_zeta1_d8        child run (tag mlflow.parentRunId): params, loss curves, final losses,
      sweep-<stamp>/lam1_zeta1_d16         latent quality, disentanglement, probes, traversal grid PNG
      ...

What each child measures, on the *evaluation images* (default: the training images; pass held-out images, e.g. an
ELPV calibration pool, to measure generalisation):

* ``final.loss`` / ``final.eps_mse`` / ``final.mmd``: the last logged training losses;
* ``quality.mmd_to_prior``, ``quality.active_axes``, ``quality.active_share``, ``quality.axis_std_min``: collapse
  indicators (:func:`pipeline.latent.quality.latent_health`);
* ``disentanglement.total`` and ``disentanglement.<property>.gap``: the TAD-like indicator;
* ``probe.<name>.accuracy_mean`` / ``probe.<name>.auroc_mean`` (+ ``_std``) for every label vector given in
  ``probe_labels`` (e.g. ELPV cell type, defective vs functional).

A grid point whose training fails (e.g. a non-finite loss) ends as a FAILED child run and a ``failed`` row of the
table; the other points still run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import logging
import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.common.figures import traversal_grid, write_png
from pipeline.latent.quality import DEFAULT_PROPERTIES, disentanglement_indicator, latent_health, linear_probe

__all__ = [
    "TABLE_COLUMNS",
    "GridPoint",
    "default_out_dir",
    "SweepResult",
    "grid",
    "load_snapshot_images",
    "elpv_probe_set",
    "preset_for",
    "summary_figure",
    "sweep",
    "table_markdown",
]

log = logging.getLogger(__name__)

TABLE_COLUMNS: tuple[str, ...] = (
    "point",
    "lambda_mmd",
    "zeta",
    "latent_dim",
    "status",
    "final_loss",
    "final_eps_mse",
    "mmd_to_prior",
    "active_axes",
    "disentanglement",
)


@dataclass(frozen=True)
class GridPoint:
    """One model of the sweep.

    Attributes:
        lambda_mmd: weight of the MMD prior term.
        zeta: mutual-information weight; (1 - zeta) weights the per-sample KL (needs the stochastic encoder head,
            switched on automatically when zeta < 1).
        latent_dim: size of z.
    """

    lambda_mmd: float
    zeta: float
    latent_dim: int

    @property
    def name(self) -> str:
        """Short id, e.g. ``lam0.1_zeta1_d8``."""
        return f"lam{self.lambda_mmd:g}_zeta{self.zeta:g}_d{self.latent_dim}"


@dataclass(frozen=True)
class SweepResult:
    """What :func:`sweep` returns.

    Attributes:
        table: one row per grid point (``TABLE_COLUMNS`` first, then probe columns, ``seconds``, ``run_id``,
            ``checkpoint``, ``error``).
        parent_run_id: the MLflow parent run.
        child_run_ids: one child run per grid point, in grid order.
        out_dir: where the checkpoints, traversal grids, table and figure were written.
        seconds: wall time of the whole sweep.
    """

    table: pd.DataFrame
    parent_run_id: str
    child_run_ids: tuple[str, ...]
    out_dir: Path
    seconds: float = 0.0

    def markdown(self) -> str:
        """The comparison table as markdown (see :func:`table_markdown`)."""
        return table_markdown(self.table)


def grid(lambdas: Sequence[float], zetas: Sequence[float], latent_dims: Sequence[int]) -> list[GridPoint]:
    """The full grid (cartesian product, lambda slowest ... latent dim fastest), duplicates removed.

    Raises:
        ValueError: an empty axis, a negative lambda, a zeta outside [0, 1] or a latent dim < 1.
    """
    lambdas, zetas, dims = list(lambdas), list(zetas), list(latent_dims)
    if not lambdas or not zetas or not dims:
        raise ValueError("the grid needs at least one lambda, one zeta and one latent dimension")
    bad = [x for x in lambdas if not (math.isfinite(x) and x >= 0)]
    if bad:
        raise ValueError(f"lambda values must be finite and >= 0, got {bad}")
    bad = [x for x in zetas if not 0.0 <= x <= 1.0]
    if bad:
        raise ValueError(f"zeta values must be in [0, 1] (the KL weight is 1 - zeta), got {bad}")
    bad = [x for x in dims if int(x) != x or x < 1]
    if bad:
        raise ValueError(f"latent dimensions must be integers >= 1, got {bad}")
    points = [GridPoint(float(a), float(b), int(c)) for a, b, c in itertools.product(lambdas, zetas, dims)]
    return list(dict.fromkeys(points))


def preset_for(preset: Any, point: GridPoint) -> Any:
    """The preset with the point's lambda, zeta and latent dimension (stochastic encoder head when zeta < 1).

    Args:
        preset: a ``models.Preset`` or a preset name.
        point: the grid point.
    """
    from models import get_preset

    if isinstance(preset, str):
        preset = get_preset(preset)
    cfg = preset.model
    loss = dataclasses.replace(cfg.loss, lambda_mmd=point.lambda_mmd, zeta=point.zeta)
    encoder = cfg.encoder
    if point.zeta < 1.0 and not encoder.stochastic:
        encoder = dataclasses.replace(encoder, stochastic=True)  # the KL term exists only with the Gaussian head
    cfg = dataclasses.replace(cfg, loss=loss, encoder=encoder, latent_dim=point.latent_dim)
    return dataclasses.replace(preset, model=cfg)


# ------------------------------------------------------------------------------------------------ data helpers


def load_snapshot_images(
    digest: str, root: str | Path | None = None, *, max_images: int | None = None, seed: int = 0
) -> tuple[list[np.ndarray], pd.DataFrame]:
    """Read the images a catalog snapshot froze (grayscale arrays at native bit depth).

    Args:
        digest: snapshot digest or a unique prefix (>= 8 characters).
        root: catalog root (default ``catalog.default_root()``).
        max_images: keep a seeded random subset of at most this many images.
        seed: seed of that subset.

    Returns:
        The images and their catalog rows (same order).
    """
    from pipeline.catalog.tables import default_root as _default_root
    from pipeline.catalog.tables import load_snapshot, resolve_store_path
    from pipeline.common.images import read_images

    root = Path(root) if root is not None else _default_root()
    rows = load_snapshot(root, digest, columns=["image_id", "sha256", "store_path", "line", "captured_at"])
    if max_images is not None and len(rows) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), max_images, replace=False))
        rows = rows.iloc[keep].reset_index(drop=True)
    images = read_images([resolve_store_path(root, p) for p in rows["store_path"]], channels=1)
    return images, rows


def elpv_probe_set(
    pool: str = "calibration", *, max_images: int | None = None, seed: int = 0
) -> tuple[np.ndarray, dict[str, np.ndarray], pd.DataFrame]:
    """ELPV cells of a pool with the probe labels the data set provides.

    Labels: ``mono_poly`` (cell type) and ``defective`` (p >= 2/3 vs p = 0; cells with p = 1/3 are left out of the
    whole set so both probes see the same cells).

    Args:
        pool: an ELPV pool name (``train``, ``calibration``, ``heldout``) or several, comma-separated.
        max_images: keep a seeded, stratified-by-chance random subset of at most this many cells.
        seed: seed of that subset.

    Returns:
        ``(images uint8 (N, 300, 300), {"mono_poly": ..., "defective": ...}, rows of split_pools)``.
    """
    from pipeline.line.elpv import load_elpv, pool_indices, split_pools

    idx = pool_indices(pool, probs=(0.0, 2 / 3, 1.0))
    if max_images is not None and len(idx) > max_images:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_images, replace=False))
    data = load_elpv()
    rows = split_pools().iloc[idx].reset_index(drop=True)
    labels = {
        "mono_poly": data.types[idx].copy(),
        "defective": (data.probs[idx] >= 2 / 3 - 1e-9).astype(int),
    }
    return np.asarray(data.images[idx]), labels, rows


def _as_image_list(images: Any, what: str) -> list[np.ndarray]:
    if images is None:
        raise ValueError(f"{what}: no images given")
    out = list(images) if not isinstance(images, np.ndarray) or images.ndim >= 3 else [images]
    if len(out) < 2:
        raise ValueError(f"{what}: need at least 2 images (the MMD term needs a batch), got {len(out)}")
    return out


def _measure_properties(images: list[np.ndarray], properties: Sequence[str]) -> pd.DataFrame:
    """Image properties at native resolution when all images share a shape, else at 128 px."""
    from models import PreprocessSpec, to_model_input
    from pipeline.latent.properties import measure

    shapes = {im.shape[:2] for im in images}
    if len(shapes) == 1 and all(im.ndim == 2 for im in images):
        return measure(np.stack(images), list(properties))
    x = to_model_input(images, PreprocessSpec(image_size=128, channels=1, resample="area"))
    return measure(((x[:, 0].numpy() + 1.0) / 2.0).clip(0.0, 1.0), list(properties))


# ------------------------------------------------------------------------------------------------ figures


def summary_figure(table: pd.DataFrame) -> Any:
    """Bar charts of the main metrics per grid point (a matplotlib ``Figure``, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [
        ("final_eps_mse", "denoising loss (lower = better)"),
        ("mmd_to_prior", "MMD² to N(0, I) (lower = closer to prior)"),
        ("disentanglement", "disentanglement (sum of gaps, higher = better)"),
    ]
    panels += [(c, c.replace("probe.", "probe ").replace("_mean", "")) for c in table.columns
               if c.startswith("probe.") and c.endswith(".auroc_mean")]
    fig = Figure(figsize=(3.2 * len(panels), 3.4))
    FigureCanvasAgg(fig)
    axs = fig.subplots(1, len(panels), squeeze=False)[0]
    names = table["point"].astype(str).tolist()
    for ax, (col, title) in zip(axs, panels, strict=True):
        vals = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=float) if col in table else np.full(
            len(names), np.nan)
        ax.bar(range(len(names)), np.nan_to_num(vals, nan=0.0), color="#4c72b0")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("linewatch sweep", fontsize=9)
    fig.tight_layout()
    return fig


def table_markdown(table: pd.DataFrame) -> str:
    """A markdown table of the comparison (numbers to 3-4 significant digits; run ids shortened)."""
    cols = [c for c in table.columns if c not in ("checkpoint", "error")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if c == "run_id" and isinstance(v, str):
                v = v[:8]
            if isinstance(v, float):
                cells.append("" if not math.isfinite(v) else f"{v:.4g}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ the sweep


def _labels_dict(probe_labels: Any, n: int) -> dict[str, np.ndarray]:
    if probe_labels is None:
        return {}
    labels = dict(probe_labels) if isinstance(probe_labels, Mapping) else {"label": probe_labels}
    out = {}
    for name, y in labels.items():
        arr = np.asarray(y)
        if arr.shape != (n,):
            raise ValueError(f"probe_labels[{name!r}] has shape {arr.shape}; need one label per evaluation image ({n})")
        out[str(name)] = arr
    return out


def _evaluate(
    Z: np.ndarray, props: pd.DataFrame, labels: Mapping[str, np.ndarray], properties: Sequence[str], seed: int
) -> tuple[dict[str, float], pd.DataFrame]:
    """All latent-quality metrics of one model's codes (MLflow metric names) and the disentanglement table."""
    metrics: dict[str, float] = {}
    health = latent_health(Z, seed=seed)
    for k in ("mmd_to_prior", "active_axes", "active_share", "axis_std_min", "axis_std_median"):
        metrics[f"quality.{k}"] = float(health[k])
    dis = disentanglement_indicator(Z, props, properties)
    metrics["disentanglement.total"] = dis.total
    for r in dis.per_property.itertuples():
        metrics[f"disentanglement.{r.property}.gap"] = float(r.gap)
        metrics[f"disentanglement.{r.property}.abs_r_best"] = float(r.abs_r_best)
        metrics[f"disentanglement.{r.property}.best_axis"] = float(r.best_axis)
    for name, y in labels.items():
        try:
            pr = linear_probe(Z, y, seed=seed)
        except ValueError as exc:
            log.warning("probe %s skipped: %s", name, exc)
            continue
        for k in ("accuracy_mean", "accuracy_std", "auroc_mean", "auroc_std"):
            metrics[f"probe.{name}.{k}"] = float(getattr(pr, k))
    return metrics, dis.per_property


def sweep(
    images: Any = None,
    *,
    snapshot: str | None = None,
    root: str | Path | None = None,
    preset: str | Any = "tiny",
    lambdas: Sequence[float] = (0.0, 0.1, 1.0),
    zetas: Sequence[float] = (1.0,),
    latent_dims: Sequence[int] = (8, 16),
    steps: int | None = None,
    batch_size: int | None = None,
    eval_images: Any = None,
    probe_labels: Mapping[str, Any] | Any = None,
    properties: Sequence[str] = DEFAULT_PROPERTIES,
    out_dir: str | Path | None = None,
    run_name: str | None = None,
    traverse_steps: int = 10,
    seed: int = 0,
    device: str | None = "cpu",
    max_images: int | None = None,
    tags: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> SweepResult:
    """Train one model per grid point and compare their latent codes, logged as one MLflow parent run.

    Args:
        images: training images (uint8/uint16 arrays, a (N, H, W) stack or a list); or None with ``snapshot``.
        snapshot: catalog snapshot digest (or prefix) to train on instead of ``images``.
        root: catalog root of ``snapshot`` (default ``$LINEWATCH_HOME``).
        preset: preset name (``tiny``, ``cpu``, ...) or a ``models.Preset``.
        lambdas: MMD prior weights to try.
        zetas: mutual-information weights to try (< 1 adds the per-sample KL with a stochastic encoder head).
        latent_dims: latent sizes to try.
        steps: optimiser steps per model (default: the preset's).
        batch_size: images per step (default: the preset's).
        eval_images: images the metrics are measured on (default: the training images).
        probe_labels: linear-probe labels of the evaluation images: ``{"mono_poly": [...]}`` or one array (``label``).
        properties: image properties of the disentanglement indicator.
        out_dir: where checkpoints and figures go (default ``$LINEWATCH_HOME/sweeps/<run name>``).
        run_name: parent run name (default ``sweep-<UTC stamp>``).
        traverse_steps: DDIM steps of each traversal grid.
        seed: training seed (the same for every point) and probe seed.
        device: torch device (default cpu; None = cuda when available).
        max_images: train on a seeded random subset of at most this many images (snapshot or images).
        tags: extra tags of the parent run.
        progress: progress bars (only on a terminal).

    Returns:
        :class:`SweepResult`.

    Raises:
        ValueError: bad grid, too few images, mismatched labels, both or neither of ``images`` / ``snapshot``.
    """
    from models import get_preset
    from pipeline import tracking

    t_start = time.perf_counter()
    base = get_preset(preset) if isinstance(preset, str) else preset
    points = grid(lambdas, zetas, latent_dims)
    data = _sweep_data(images, snapshot, root, eval_images, probe_labels, properties, max_images=max_images,
                       seed=seed)
    for name, value in (("steps", steps or 1), ("traverse_steps", traverse_steps)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    run_name = run_name or f"sweep-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}"
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_name)
    out.mkdir(parents=True, exist_ok=True)
    job = _PointJob(base=base, data=data, properties=tuple(properties), out=out, run_name=run_name,
                    n_steps=steps or base.train.steps, batch_size=batch_size, seed=seed, device=device,
                    traverse_steps=traverse_steps, progress=progress)
    parent_tags = {"linewatch.sweep": "parent", "sweep.points": len(points), **(tags or {}),
                   **({"data.train.snapshot": snapshot} if snapshot is not None else {})}
    with tracking.start_training_run(run_name, tags=parent_tags,
                                     description=f"linewatch sweep over {len(points)} grid points") as parent_id:
        _log_sweep_params(job, lambdas, zetas, latent_dims, parent_id)
        rows, child_ids = _run_grid(points, job, parent_id)
        table = _publish_table(_make_table(rows), out, parent_id)
        tracking.set_tags({"sweep.children": ",".join(child_ids)}, run_id=parent_id)
    return SweepResult(table=table, parent_run_id=parent_id, child_run_ids=tuple(child_ids), out_dir=out,
                       seconds=time.perf_counter() - t_start)


def _run_grid(points: list[GridPoint], job: _PointJob, parent_id: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Every grid point in turn, with a progress bar: the table rows and the child run ids."""
    from tqdm.auto import tqdm

    rows, child_ids = [], []
    bar = tqdm(points, desc="sweep", unit="model", disable=not job.progress or not sys.stderr.isatty())
    for point in bar:
        bar.set_postfix_str(point.name)
        row, child_id = _run_point(point, job, parent_id)
        rows.append(row)
        child_ids.append(child_id)
    bar.close()
    return rows, child_ids


@dataclass(frozen=True)
class _SweepData:
    """The images a sweep trains and evaluates on, with the evaluation images' properties and probe labels."""

    train: list[np.ndarray]
    eval: list[np.ndarray]
    props: pd.DataFrame
    labels: dict[str, np.ndarray]
    train_rows: pd.DataFrame | None = None
    root: Path | None = None
    features: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Pooled backbone features (train, eval) per backbone id, computed once per sweep (:func:`_pooled`)."""


@dataclass(frozen=True)
class _PointJob:
    """What every grid point of one sweep shares."""

    base: Any
    data: _SweepData
    properties: tuple[str, ...]
    out: Path
    run_name: str
    n_steps: int
    batch_size: int | None
    seed: int
    device: str | None
    traverse_steps: int
    progress: bool


def _sweep_data(images: Any, snapshot: str | None, root: str | Path | None, eval_images: Any, probe_labels: Any,
                properties: Sequence[str], *, max_images: int | None, seed: int) -> _SweepData:
    """Load and check the training and evaluation images (from ``images`` or a catalog snapshot)."""
    if (images is None) == (snapshot is None):
        raise ValueError("give either images or snapshot (a catalog snapshot digest), not both and not neither")
    train_rows, catalog_root = None, None
    if snapshot is not None:
        from pipeline.catalog.tables import default_root

        catalog_root = Path(root) if root is not None else default_root()
        snap_images, train_rows = load_snapshot_images(snapshot, catalog_root, max_images=max_images, seed=seed)
        train_list = _as_image_list(snap_images, f"snapshot {snapshot}")
    else:
        train_list = _as_image_list(images, "images")
        if max_images is not None and len(train_list) > max_images:
            keep = np.sort(np.random.default_rng(seed).choice(len(train_list), max_images, replace=False))
            train_list = [train_list[i] for i in keep]
    eval_list = train_list if eval_images is None else _as_image_list(eval_images, "eval_images")
    if len(eval_list) < 3:
        raise ValueError(f"need at least 3 evaluation images for the correlations, got {len(eval_list)}")
    labels = _labels_dict(probe_labels, len(eval_list))
    return _SweepData(train_list, eval_list, _measure_properties(eval_list, properties), labels,
                      train_rows=train_rows, root=catalog_root)


def _log_sweep_params(job: _PointJob, lambdas: Sequence[float], zetas: Sequence[float],
                      latent_dims: Sequence[int], parent_id: str) -> None:
    from pipeline import tracking

    tracking.log_params_flat({
        "preset": job.base.name,
        "lambdas": list(dict.fromkeys(float(x) for x in lambdas)),
        "zetas": list(dict.fromkeys(float(x) for x in zetas)),
        "latent_dims": list(dict.fromkeys(int(x) for x in latent_dims)),
        "steps": job.n_steps,
        "batch_size": job.batch_size or job.base.train.batch_size,
        "seed": job.seed,
        "n_train": len(job.data.train),
        "n_eval": len(job.data.eval),
        "probes": sorted(job.data.labels),
        "properties": list(job.properties),
    }, prefix="sweep.", run_id=parent_id)


def _publish_table(table: pd.DataFrame, out: Path, parent_id: str) -> pd.DataFrame:
    """Write the comparison table (CSV, markdown) and figure, log them and the point counts to the parent run."""
    from pipeline import tracking

    table.to_csv(out / "sweep_table.csv", index=False)
    (out / "sweep_table.md").write_text(table_markdown(table))
    write_png(summary_figure(table), out / "sweep_summary.png", dpi=110)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("sweep_table.csv", "sweep_table.md", "sweep_summary.png"):
            (Path(tmp) / name).write_bytes((out / name).read_bytes())
        tracking.log_artifacts(tmp, "sweep", run_id=parent_id)
    ok = table[table["status"] == "ok"]
    tracking.log_metrics({"sweep.points_ok": len(ok), "sweep.points_failed": len(table) - len(ok)},
                         run_id=parent_id)
    return table


def _make_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    probe_cols = sorted({k for r in rows for k in r if k.startswith("probe.") and k.endswith("_mean")})
    cols = [*TABLE_COLUMNS, *probe_cols, "seconds", "run_id", "checkpoint", "error"]
    return pd.DataFrame([{c: r.get(c, np.nan) for c in cols} for r in rows], columns=cols)


def _run_point(point: GridPoint, job: _PointJob, parent_id: str) -> tuple[dict[str, Any], str]:
    """Train, evaluate and log one grid point as a child run; a failure gives a ``failed`` row."""
    from pipeline import tracking

    t0 = time.perf_counter()
    row: dict[str, Any] = {"point": point.name, "lambda_mmd": point.lambda_mmd, "zeta": point.zeta,
                           "latent_dim": point.latent_dim, "status": "failed", "error": ""}
    child_id = ""
    try:
        with tracking.start_training_run(
            f"{job.run_name}/{point.name}",
            tags={"mlflow.parentRunId": parent_id, "linewatch.sweep": "child", "sweep.parent": parent_id,
                  "sweep.point": point.name},
        ) as child_id:
            row["run_id"] = child_id
            row.update(_train_and_log_point(point, job, child_id))
    except tracking.TrackingUnavailable:
        raise  # MLflow is down: stop rather than mark every point failed
    except (RuntimeError, ValueError) as exc:  # a diverged or invalid point must not sink the sweep
        log.warning("sweep point %s failed: %s", point.name, exc)
        row["error"] = str(exc)[:500]
        _tag_failure(child_id, exc)
    row["seconds"] = time.perf_counter() - t0
    return row, child_id


def _train_and_log_point(point: GridPoint, job: _PointJob, child_id: str) -> dict[str, Any]:
    """Train one grid point's model in the open child run, evaluate its codes, log all; the table row's values."""
    import torch

    from models import to_model_input, train
    from pipeline import tracking
    from pipeline.latent.encode import encode_images

    preset = preset_for(job.base, point)
    tracking.log_params_flat({"lambda_mmd": point.lambda_mmd, "zeta": point.zeta, "latent_dim": point.latent_dim,
                              "preset": preset.name}, run_id=child_id)
    tracking.log_params_flat(preset.model, prefix="model.", run_id=child_id)
    tracking.log_params_flat(preset.train.replace(steps=job.n_steps, seed=job.seed,
                                                  batch_size=job.batch_size or preset.train.batch_size),
                             prefix="train.", run_id=child_id)
    ckpt_dir = job.out / point.name / "checkpoint"
    pooled = _pooled(preset, job.data)
    result = train(preset, to_model_input(job.data.train, preset.preprocess), ckpt_dir, steps=job.n_steps,
                   batch_size=job.batch_size, seed=job.seed, device=job.device, progress=job.progress,
                   features=None if pooled is None else pooled[0])
    tracking.log_history(result.history, run_id=child_id)
    last = result.history[-1] if result.history else {}
    final = {f"final.{k}": float(last[k]) for k in ("loss", "eps_mse", "mmd", "kl") if k in last}
    model = result.model.eval()
    if pooled is None:
        Z = encode_images(model, preset.preprocess, job.data.eval)
    else:
        with torch.inference_mode():
            Z = model.encode(None, features=pooled[1]).numpy()
    metrics, dis_table = _evaluate(Z, job.data.props, job.data.labels, job.properties, job.seed)
    tracking.log_metrics({**final, **metrics, "train.images_per_s": result.images_per_s}, step=int(result.step),
                         run_id=child_id)
    _log_point_figures(point, job, model, preset, dis_table, child_id)
    tracking.set_tags({"sweep.checkpoint": str(ckpt_dir.resolve())}, run_id=child_id)
    return {
        "status": "ok",
        "final_loss": final.get("final.loss", np.nan),
        "final_eps_mse": final.get("final.eps_mse", np.nan),
        "mmd_to_prior": metrics["quality.mmd_to_prior"],
        "active_axes": int(metrics["quality.active_axes"]),
        "disentanglement": metrics["disentanglement.total"],
        "checkpoint": str(ckpt_dir),
        **{k: v for k, v in metrics.items() if k.startswith("probe.")},
    }


def _pooled(preset: Any, data: _SweepData) -> tuple[Any, Any] | None:
    """(train, eval) pooled backbone features (float32 tensors) for a ``"pretrained"`` encoder preset, else None.

    Computed once per sweep and backbone, not once per grid point; a snapshot's training images come from the
    catalog's feature store (computed and stored there when missing).
    """
    if preset.model.encoder.kind != "pretrained":
        return None
    from models.checkpoint import backbone_record
    from pipeline.latent.features import image_features, pooled_features

    bid = backbone_record(preset.model)["id"]
    if bid not in data.features:
        if data.train_rows is not None and data.root is not None:
            train = pooled_features(preset.model, data.root, data.train_rows)
        else:
            train = image_features(preset.model, data.train)
        same = data.eval is data.train
        data.features[bid] = (train, train if same else image_features(preset.model, data.eval))
    return data.features[bid]


def _log_point_figures(point: GridPoint, job: _PointJob, model: Any, preset: Any, dis_table: pd.DataFrame,
                       child_id: str) -> None:
    """The traversal grid of evaluation image 0 and the disentanglement table, written and logged."""
    from models import to_model_input
    from pipeline import tracking

    point_dir = job.out / point.name
    dis_table.to_csv(point_dir / "disentanglement.csv", index=False)
    x0 = to_model_input([job.data.eval[0]], preset.preprocess).to(next(model.parameters()).device)
    z0 = None
    if getattr(model, "uses_features", False):
        import torch

        from pipeline.latent.encode import encode_images

        z0 = torch.from_numpy(encode_images(model, preset.preprocess, [job.data.eval[0]])).to(x0.device)
    png = traversal_grid(model, x0, point_dir / "traversal.png", steps=job.traverse_steps, z0=z0,
                         title=f"{point.name}: traversal of evaluation image 0, {job.traverse_steps} DDIM steps")
    with tempfile.TemporaryDirectory() as tmp:
        for p in (png, point_dir / "disentanglement.csv"):
            (Path(tmp) / p.name).write_bytes(p.read_bytes())
        tracking.log_artifacts(tmp, "sweep", run_id=child_id)


def _tag_failure(child_id: str, exc: Exception) -> None:
    from pipeline import tracking

    if not child_id:
        return
    try:
        tracking.set_tags({"sweep.error": str(exc)[:5000]}, run_id=child_id)
    except tracking.TrackingUnavailable:
        log.exception("could not tag failed child run %s", child_id)


def default_out_dir(run_name: str) -> Path:
    """``$LINEWATCH_HOME/sweeps/<run_name>``."""
    from pipeline.settings import get_settings

    return get_settings().home / "sweeps" / run_name

