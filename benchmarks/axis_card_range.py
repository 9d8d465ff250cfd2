"""How much an axis card visibly changes across its columns: reference quantiles (2 %-98 %) against +-3 reference sd.

    make demo
    python -m benchmarks.axis_card_range --home .linewatch/demo --out benchmarks/results/axis_card_range.md

Loads the champion of a linewatch store (checkpoint and calibration bundle, as the monitor does), renders the cards
of every axis both ways on the same reference images, and reports, per axis, the mean absolute pixel difference
(8-bit grey levels) between the card's first and last column, averaged over its rows. The moved axis of the store's
latest alert is marked. The pictures go next to the results (``<out stem>/axis_XX_{quantiles,sd3}.png``).
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


def render(home: Path, out_dir: Path, n_images: int = 3, steps: int = 10) -> tuple[dict, dict, str, float]:
    """Cards of every axis with quantiles and with span_sd=3; returns their per-axis diffs, the model id, seconds."""
    import torch

    from pipeline.analysis.axes import axis_cards
    from pipeline.catalog.tables import resolve_store_path
    from pipeline.common.images import load_batch, read_images
    from pipeline.latent.properties import measure
    from pipeline.monitoring.monitor import load_champion
    from pipeline.settings import get_settings

    torch.set_num_threads(1)
    settings = get_settings({"LINEWATCH_HOME": str(home)})
    champ = load_champion(settings)
    rows = champ.reference.head(256)
    paths = [resolve_store_path(settings.catalog_root, p) for p in rows["store_path"]]
    x = load_batch(paths, champ.checkpoint.preprocess)
    props = measure(np.stack([np.asarray(im).squeeze() for im in read_images(paths, channels=1)]))
    t0 = time.perf_counter()
    diffs = {}
    for label, span in (("quantiles", None), ("sd3", 3.0)):
        cards = axis_cards(champ.checkpoint.model, x, champ.z_ref[: len(rows)], props, out_dir / label,
                           n_images=n_images, steps=steps, span_sd=span, model_id=champ.model_id, progress=False)
        diffs[label] = {c.axis: extreme_column_diff(c.strip) for c in cards}
    return diffs["quantiles"], diffs["sd3"], champ.model_id, time.perf_counter() - t0


def moved_axis(home: Path) -> int | None:
    """The top axis of the store's latest drifted window (the monitor's window log), if any."""
    import pandas as pd

    path = home / "state" / "windows.parquet"
    if not path.exists():
        return None
    wins = pd.read_parquet(path)
    hit = wins[wins["detected"].astype(bool) & (wins["top_axis"] >= 0)]
    return int(hit.iloc[-1]["top_axis"]) if len(hit) else None


def report(before: dict, after: dict, moved: int | None, model_id: str, seconds: float, command: str) -> str:
    """The results page (Markdown)."""
    b, a = np.array(list(before.values())), np.array(list(after.values()))
    lines = [
        "# Axis cards: visible change across the columns, reference quantiles vs +-3 sd", "",
        f"Command: `{command}`", "",
        f"Machine: 2-core x86_64 CPU, no GPU, Python {platform.python_version()}; "
        f"date {dt.date.today().isoformat()}; model `{model_id}`; {seconds:.0f} s for both renderings.", "",
        "Measure: mean absolute difference between the card's last and first column, in 8-bit grey levels, averaged "
        "over the card's rows (3 reference images), DDIM 10 steps. Before: columns at the reference's 2, 16, 50, 84 "
        "and 98 % quantiles of the axis. After: mean -3, -1.5, 0, +1.5, +3 reference sd.", "",
        f"**All {len(b)} axes:** median {np.median(b):.1f} -> {np.median(a):.1f} grey levels; mean {b.mean():.1f} -> "
        f"{a.mean():.1f}; axes changing by at least 5 levels: {(b >= 5).sum()} -> {(a >= 5).sum()}.", "",
        "| axis | quantiles 2-98 % | +-3 sd | ratio |", "|---:|---:|---:|---:|",
    ]
    for axis in sorted(before):
        mark = " (moved in the demo's alert)" if axis == moved else ""
        ratio = after[axis] / before[axis] if before[axis] > 0 else float("nan")
        lines.append(f"| {axis}{mark} | {before[axis]:.1f} | {after[axis]:.1f} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", default=".linewatch/demo")
    p.add_argument("--out", default="benchmarks/results/axis_card_range.md")
    args = p.parse_args(argv)
    home, out = Path(args.home).resolve(), Path(args.out)
    before, after, model_id, seconds = render(home, out.with_suffix(""))
    command = f"python -m benchmarks.axis_card_range --home {args.home} --out {args.out}"
    out.write_text(report(before, after, moved_axis(home), model_id, seconds, command))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
