"""Speed of the simulated line and the ELPV facts the simulator documents.

Run: ``.venv/bin/python -m benchmarks.simulate_speed``; writes ``benchmarks/results/simulate_speed.md``.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.line.elpv import POOLS, load_elpv, split_pools
from pipeline.line.faults import FaultSpec
from pipeline.line.simulate import simulate_line

OUT = Path(__file__).parent / "results" / "simulate_speed.md"
CASES = [
    ("healthy, lot order", None, "lot"),
    ("gain fault (ramp)", FaultSpec("gain", start_day=3, severity=1.0, ramp_days=2), "lot"),
    ("blur fault", FaultSpec("blur", start_day=0, severity=1.0), "lot"),
    ("misalign fault", FaultSpec("misalign", start_day=0, severity=1.0), "lot"),
    ("defect_rate fault, shuffled", FaultSpec("defect_rate", start_day=0, severity=1.0), "shuffled"),
]


def main() -> None:
    t0 = time.perf_counter()
    data = load_elpv()
    load_s = time.perf_counter() - t0
    means = data.images.reshape(len(data), -1).mean(axis=1)
    adjacent = float(np.corrcoef(means[:-1], means[1:])[0, 1])
    perm = np.random.default_rng(0).permutation(len(means))
    random_pairs = float(np.corrcoef(means[perm[:-1]], means[perm[1:]])[0, 1])
    lot_mean = pd.Series(means).groupby(data.lot).transform("mean")
    between_lot = float(lot_mean.var() / means.var())

    rows = []
    for name, fault, order in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            res = simulate_line(
                Path(tmp) / "drop",
                days=8,
                per_day=100,
                start=dt.date(2026, 1, 5),
                fault=fault,
                order=order,
                progress=False,
            )
            secs = time.perf_counter() - t
            size = sum(p.stat().st_size for p in res.paths) / 2**20
        rows.append(
            f"| {name} | {res.n_images} | {secs:.2f} | {1000 * secs / res.n_images:.1f} | {size:.0f} |"
        )

    table = split_pools()
    counts = table.groupby(["pool", "type"], observed=True).size().unstack()
    levels = (
        table.assign(prob=table["prob"].round(2)).groupby(["pool", "prob"], observed=True).size().unstack()
    )
    pool_rows = [
        f"| {p} | {int((table['pool'] == p).sum())} | {table.loc[table['pool'] == p, 'lot'].nunique()} "
        f"| {counts.loc[p, 'mono']} | {counts.loc[p, 'poly']} | "
        + " | ".join(str(int(levels.loc[p, c])) for c in levels.columns)
        + " |"
        for p in POOLS
    ]
    text = "\n".join(
        [
            "# simulate_speed",
            "",
            "Command: `.venv/bin/python -m benchmarks.simulate_speed`  ",
            "Machine: 2-core CPU, 24 GiB, no GPU (shared with other jobs)  ",
            f"Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
            "",
            f"ELPV load (first call, 2,624 PNGs): {load_s:.1f} s",
            "",
            "## Simulation, 1 line x 8 days x 100 images, pool heldout, PNG compress_level 1",
            "",
            "| case | images | seconds | ms / image | MiB written |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "## ELPV file order (lots)",
            "",
            f"- correlation of the mean intensities of adjacent cells: {adjacent:.3f}",
            f"- same for random pairs: {random_pairs:.3f}",
            f"- share of the mean-intensity variance between the 44 derived lots: {between_lot:.2f}",
            "",
            "## Pools (split_pools(seed=0), whole lots)",
            "",
            "| pool | cells | lots | mono | poly | " + " | ".join(f"p={c:g}" for c in levels.columns) + " |",
            "|---|---|---|---|---|" + "---|" * len(levels.columns),
            *pool_rows,
            "",
        ]
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
