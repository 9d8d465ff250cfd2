"""Window-query speed of the Parquet catalog as it grows (synthetic rows).

Run: ``.venv/bin/python -m benchmarks.bench_catalog [--sizes 10000 100000 1000000]``; writes
``benchmarks/results/bench_catalog.md``.

Each catalog has 4 lines x 365 days (1,460 hive partitions, one part file each, as after ``compact``) and the
requested number of rows spread evenly. Timed (median of ``--repeats`` runs, first run reported separately):

* one line, one day: ``read_catalog(root, lines="L2", start=day, end=day + 1 day)`` (the target: < 1 s at 1M rows)
* one line, seven days
* the ingest start-up scan (``scan_catalog``, 5 columns of every row: what exactly-once needs to know), and the
  same columns through ``read_catalog`` (sorted pandas frame)
* ``catalog_stats``
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.catalog import tables as C
from pipeline.common import schemas as S

OUT = Path(__file__).parent / "results" / "bench_catalog.md"
LINES = ("L1", "L2", "L3", "L4")
DAYS = 365
START = pd.Timestamp("2026-01-01T00:00:00Z")


def synthetic_catalog(n: int, seed: int = 0) -> pa.Table:
    """``n`` catalog rows over 4 lines x 365 days with random digests and capture times."""
    rng = np.random.default_rng(seed)
    raw = rng.bytes(32 * n)
    sha = [raw[32 * i : 32 * i + 32].hex() for i in range(n)]
    line_idx = np.arange(n) % len(LINES)
    day_idx = (np.arange(n) // len(LINES)) % DAYS
    seconds = rng.integers(0, 86400, n)
    captured = START.value // 1000 + (day_idx.astype(np.int64) * 86400 + seconds) * 1_000_000
    dates = (START + pd.to_timedelta(day_idx, unit="D")).strftime("%Y-%m-%d")
    lines = np.array(LINES)[line_idx]
    ts = pa.array(captured, type=pa.timestamp("us", tz="UTC"))
    return pa.table(
        {
            S.IMAGE_ID: [s[:24] for s in sha],
            S.SHA256: sha,
            S.SOURCE_PATH: [
                f"/drop/{ln}/{d}/S{i:08d}.png" for i, (ln, d) in enumerate(zip(lines, dates, strict=True))
            ],
            S.SOURCE_SIZE: rng.integers(20_000, 60_000, n),
            S.SOURCE_MTIME_NS: captured * 1000,
            S.LINE: lines,
            S.STATION: np.array(["ST1", "ST2", "ST3"])[rng.integers(0, 3, n)],
            S.CAPTURED_AT: ts,
            S.TIMESTAMP_SOURCE: ["mes"] * n,
            S.PRODUCT_TYPE: np.array(["mono", "poly"])[rng.integers(0, 2, n)],
            S.WIDTH: np.full(n, 300, np.int32),
            S.HEIGHT: np.full(n, 300, np.int32),
            S.MODE: ["L"] * n,
            S.BIT_DEPTH: np.full(n, 8, np.int8),
            S.CONVERTED_FROM_RGB: np.zeros(n, bool),
            S.STORE_PATH: [f"store/{s[:2]}/{s[2:4]}/{s}.png" for s in sha],
            S.INGESTED_AT: ts,
            S.INGEST_RUN_ID: ["bench"] * n,
            S.DATE: list(dates),
            S.SPLIT: pa.nulls(n, pa.string()),
            S.FLAGS: pa.array([[]] * n, type=pa.list_(pa.string())),
        },
        schema=S.CATALOG_SCHEMA,
    )


def timed(fn, repeats: int) -> tuple[float, float, object]:
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t)
    return first, statistics.median(runs), out


def bench(n: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_catalog_") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        table = synthetic_catalog(n)
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        C.write_catalog_rows(root, table, "part-bench-00001")
        write_s = time.perf_counter() - t
        del table
        disk = sum(p.stat().st_size for p in (root / "catalog").rglob("*.parquet"))
        day = START + pd.Timedelta(days=200)
        q1 = timed(
            lambda: C.read_catalog(root, lines="L2", start=day, end=day + pd.Timedelta(days=1)), repeats
        )
        q7 = timed(
            lambda: C.read_catalog(root, lines="L2", start=day, end=day + pd.Timedelta(days=7)), repeats
        )
        cols = [S.IMAGE_ID, S.SHA256, S.SOURCE_PATH, S.SOURCE_SIZE, S.SOURCE_MTIME_NS]
        scan = timed(lambda: C.scan_catalog(root, cols), max(1, repeats // 3))
        full = timed(lambda: C.read_catalog(root, columns=cols), max(1, repeats // 3))
        stats = timed(lambda: C.catalog_stats(root), max(1, repeats // 3))
        return {
            "rows": n,
            "gen_s": gen_s,
            "write_s": write_s,
            "disk_mib": disk / 2**20,
            "q1_first": q1[0],
            "q1_med": q1[1],
            "q1_rows": len(q1[2]),
            "q7_first": q7[0],
            "q7_med": q7[1],
            "q7_rows": len(q7[2]),
            "scan_med": scan[1],
            "full_med": full[1],
            "stats_med": stats[1],
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    results = []
    for n in args.sizes:
        r = bench(n, args.repeats)
        print(r, flush=True)
        results.append(r)

    lines = [
        "# bench_catalog",
        "",
        f"Command: `.venv/bin/python -m benchmarks.bench_catalog --sizes {' '.join(map(str, args.sizes))}`  ",
        "Machine: 2-core CPU, 24 GiB, no GPU (shared with other jobs)  ",
        f"Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; Python {platform.python_version()}, "
        f"pyarrow {pa.__version__}, pandas {pd.__version__}, {os.cpu_count()} CPUs visible",
        "",
        f"Synthetic catalogs: 4 lines x {DAYS} days = {len(LINES) * DAYS} hive partitions, one part file each; "
        f"timings are the median of {args.repeats} runs after a first (cold-cache-ish) run.",
        "",
        "| rows | write s | on disk MiB | 1 line x 1 day: rows | first s | median s | 1 line x 7 days: rows "
        "| median s | scan_catalog 5 cols, all rows (ingest start-up) s | read_catalog 5 cols, all rows s "
        "| catalog stats s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['rows']:,} | {r['write_s']:.1f} | {r['disk_mib']:.1f} | {r['q1_rows']} | {r['q1_first']:.3f} "
            f"| {r['q1_med']:.3f} | {r['q7_rows']} | {r['q7_med']:.3f} | {r['scan_med']:.2f} | {r['full_med']:.2f} "
            f"| {r['stats_med']:.2f} |"
        )
    if len(results) > 1:
        a, b = results[0], results[-1]
        lines += [
            "",
            f"Growth from {a['rows']:,} to {b['rows']:,} rows (x{b['rows'] / a['rows']:.0f}): one-day query "
            f"x{b['q1_med'] / a['q1_med']:.1f}, seven-day query x{b['q7_med'] / a['q7_med']:.1f}, "
            f"full scan x{b['scan_med'] / a['scan_med']:.1f}.",
            "",
            "Why: `read_catalog` lists only the `line=`/`date=` folders the query can touch and opens just those part "
            "files, so a window query costs the directory listing (1,460 entries here, fixed) plus the rows in the "
            "window; it does not grow with the rest of the catalog. The full scan (the known-state read at the start "
            "of each ingest) grows linearly with the rows.",
        ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
