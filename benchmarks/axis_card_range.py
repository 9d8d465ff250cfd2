"""How much an axis card visibly changes across its columns: reference quantiles against wider spans.

    make demo
    python -m benchmarks.axis_card_range --home .linewatch/demo --out benchmarks/results/axis_card_range.md

Loads a registered model of a linewatch store (checkpoint and calibration bundle, ``pipeline.handoff.bundle``),
renders the cards of every axis three ways on the same reference images, and reports, per axis, the mean absolute pixel difference
(8-bit grey levels) between the card's first and last column, averaged over its rows. The model is the version
that raised the store's latest alert, whose moved axis is marked. The cards go to ``--cards``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time
from pathlib import Path

import numpy as np


def extreme_column_diff(strip: np.ndarray) -> float:
    """Mean |last column - first column| of an (R, V, C, H, W) strip in [-1, 1], in 8-bit grey levels."""
    return float(np.abs(strip[:, -1] - strip[:, 0]).mean() * 127.5)


def render(home: Path, version: int, out_dir: Path, n_images: int = 3, steps: int = 10) -> tuple[dict, dict, str, float]:
    """Cards of every axis of ``version`` three ways; per-axis diffs, reference sd per axis, model id, seconds.

    (a) reference quantiles, (b) +-3 reference sd, (c) +-3 max(reference sd, 1): what the monitor renders.
    """
    import torch

    from pipeline import tracking
    from pipeline.analysis.axes import axis_cards
    from pipeline.catalog.tables import resolve_store_path
    from pipeline.common.images import load_batch, read_images
    from pipeline.handoff.bundle import load_bundle
    from pipeline.latent.properties import measure
    from pipeline.settings import get_settings

    torch.set_num_threads(1)
    settings = get_settings({"LINEWATCH_HOME": str(home)})
    tracking.configure(settings)
    bundle = load_bundle(tracking.download_model(version, Path(settings.checkpoints_dir) / f"registry-v{version}"))
    rows = bundle.reference.head(256)
    paths = [resolve_store_path(settings.catalog_root, p) for p in rows["store_path"]]
    x = load_batch(paths, bundle.checkpoint.preprocess)
    props = measure(np.stack([np.asarray(im).squeeze() for im in read_images(paths, channels=1)]))
    z = bundle.z_ref[: len(rows)]
    t0 = time.perf_counter()
    diffs = {}
    for label, span, floor in (("quantiles", None, 0.0), ("sd3", 3.0, 0.0), ("monitor", 3.0, 1.0)):
        cards = axis_cards(bundle.checkpoint.model, x, z, props, out_dir / label, n_images=n_images, steps=steps,
                           span_sd=span, sd_floor=floor, model_id=bundle.model_id, progress=False)
        diffs[label] = {c.axis: extreme_column_diff(c.strip) for c in cards}
    return diffs, {a: float(sd) for a, sd in enumerate(z.std(axis=0))}, bundle.model_id, time.perf_counter() - t0


def moved_axis(home: Path) -> tuple[int | None, int | None]:
    """The top axis of the store's latest drifted window and the model version that judged it (window log)."""
    import pandas as pd

    path = home / "state" / "windows.parquet"
    if not path.exists():
        return None, None
    wins = pd.read_parquet(path)
    hit = wins[wins["detected"].astype(bool) & (wins["top_axis"] >= 0)]
    if not len(hit):
        return None, None
    return int(hit.iloc[-1]["top_axis"]), int(hit.iloc[-1]["model_version"])


def report(diffs: dict, spread: dict, moved: int | None, model_id: str, seconds: float, command: str) -> str:
    """The results page (Markdown)."""
    q, s3, p3 = (np.array(list(diffs[k].values())) for k in ("quantiles", "sd3", "monitor"))
    lines = [
        "# Axis cards: visible change across the columns", "",
        f"Command: `{command}`", "",
        f"Machine: 2-core x86_64 CPU, no GPU, Python {platform.python_version()}; "
        f"date {dt.date.today().isoformat()}; model `{model_id}` (the version that raised the demo's alert); "
        f"{seconds:.0f} s for the three renderings.", "",
        "Measure: mean absolute difference between the card's last and first column, in 8-bit grey levels, averaged "
        "over the card's rows (3 reference images), DDIM 10 steps. Columns: (a) the reference's 2, 16, 50, 84, 98 % "
        "quantiles of the axis (before); (b) mean -3 .. +3 reference sd (`span_sd=3`); (c) mean -3 .. +3 "
        "max(reference sd, 1), i.e. at least +-3 in the units of the model's N(0, I) prior (`span_sd=3, sd_floor=1`: "
        "what the monitor renders now).", "",
        f"**All {len(q)} axes, median:** (a) {np.median(q):.1f}, (b) {np.median(s3):.1f}, (c) {np.median(p3):.1f} "
        f"grey levels; axes changing by at least 5 levels: {(q >= 5).sum()}, {(s3 >= 5).sum()}, {(p3 >= 5).sum()}.",
        "", "| axis | ref. sd of z | (a) quantiles 2-98 % | (b) +-3 ref. sd | (c) +-3 max(ref. sd, 1) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for axis in sorted(diffs["quantiles"]):
        mark = " (moved in the demo's alert)" if axis == moved else ""
        lines.append(f"| {axis}{mark} | {spread[axis]:.3f} | {diffs['quantiles'][axis]:.1f} | {diffs['sd3'][axis]:.1f} "
                     f"| {diffs['monitor'][axis]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", default=".linewatch/demo")
    p.add_argument("--out", default="benchmarks/results/axis_card_range.md")
    p.add_argument("--cards", default="benchmarks/out/axis_card_range", help="folder for the rendered cards")
    args = p.parse_args(argv)
    home, out = Path(args.home).resolve(), Path(args.out)
    axis, version = moved_axis(home)
    if version is None:
        raise SystemExit(f"no drifted window with a moved axis in {home}: run `make demo` first")
    diffs, spread, model_id, seconds = render(home, version, Path(args.cards))
    command = f"python -m benchmarks.axis_card_range --home {args.home} --out {args.out}"
    out.write_text(report(diffs, spread, axis, model_id, seconds, command))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
