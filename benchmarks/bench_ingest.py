"""Ingestion throughput on real ELPV 300x300 PNGs, and where the time goes.

Run: ``.venv/bin/python -m benchmarks.bench_ingest [--sizes 200 1000 2000]``; writes
``benchmarks/results/bench_ingest.md``.

For each size N, N ELPV cells are written as PNGs (``compress_level=1``, as the simulator does) into a temporary
``DROP/L1/<day>/<serial>.png`` folder with a ``mes_export.csv`` per day (100 cells a day), then ingested into an
empty catalog with 1 and with 2 validation threads. Reported: files/s for the whole run (lock, known-state read,
validation, store writes, publishing, run record), and the idempotent re-run time. The files are back-dated an hour
(a drop written before the run), so no run waits for the settle time (``IngestConfig.settle_s``, 2 s at most per
run, only when files younger than that are present). A per-image profile splits the
work into read + sha256, validation (``decode_image``: header, PNG stream check, verify, full decode), and the store write.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.bench_catalog import synthetic_catalog
from pipeline.catalog import tables as C
from pipeline.catalog.ingest import IngestConfig, ingest, validate_bytes
from pipeline.catalog.store import ContentStore, sha256_bytes

OUT = Path(__file__).parent / "results" / "bench_ingest.md"
PER_DAY = 100


def write_drop(drop: Path, images: np.ndarray) -> list[Path]:
    paths = []
    start = dt.datetime(2026, 11, 1, 6, 0, tzinfo=dt.UTC)
    for day0 in range(0, len(images), PER_DAY):
        day = (start + dt.timedelta(days=day0 // PER_DAY)).date().isoformat()
        folder = drop / "L1" / day
        folder.mkdir(parents=True, exist_ok=True)
        mes = ["serial,timestamp,line,station,product_type"]
        for i in range(day0, min(day0 + PER_DAY, len(images))):
            serial = f"SN{i:07d}"
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG", compress_level=1)
            p = folder / f"{serial}.png"
            p.write_bytes(buf.getvalue())
            paths.append(p)
            ts = start + dt.timedelta(days=day0 // PER_DAY, seconds=30 * (i - day0))
            mes.append(f"{serial},{ts.isoformat()},L1,ST{i % 3 + 1},mono")
        (folder / "mes_export.csv").write_text("\n".join(mes) + "\n")
    old = time.time_ns() - 3600 * 10**9  # written an hour ago: the measurement is ingest, not the settle wait
    for p in paths:
        os.utime(p, ns=(old, old))
    return paths


def profile(paths: list[Path], tmp: Path) -> dict[str, float]:
    """Milliseconds per image for each step, single-threaded."""
    cfg = IngestConfig()
    t = time.perf_counter()
    blobs = [p.read_bytes() for p in paths]
    t_read = time.perf_counter() - t
    t = time.perf_counter()
    shas = [sha256_bytes(b) for b in blobs]
    t_sha = time.perf_counter() - t
    t = time.perf_counter()
    for b in blobs:
        validate_bytes(b, "png", cfg)
    t_val = time.perf_counter() - t
    store = ContentStore(tmp / "profile_store")
    t = time.perf_counter()
    for b, s in zip(blobs, shas, strict=True):
        store.put(b, "png", sha256=s)
    t_put = time.perf_counter() - t
    n = len(paths)
    return {
        "read": 1e3 * t_read / n,
        "sha256": 1e3 * t_sha / n,
        "validate": 1e3 * t_val / n,
        "store": 1e3 * t_put / n,
        "bytes": sum(map(len, blobs)) / n,
        "n": n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 2000])
    ap.add_argument(
        "--catalog-sizes",
        type=int,
        nargs="*",
        default=[100_000, 1_000_000],
        help="also ingest 200 new images into catalogs already holding this many synthetic rows",
    )
    args = ap.parse_args()
    from elpv_dataset.utils import load_dataset

    load0 = os.getloadavg()[0]
    images, _p, _t = load_dataset()
    rows = []
    prof = None
    # warm-up: first-call imports and plugin registration are not part of the steady state
    with tempfile.TemporaryDirectory(prefix="bench_ingest_warm_") as warm:
        write_drop(Path(warm) / "drop", images[-10:])
        ingest(Path(warm) / "drop", Path(warm) / "root", progress=False)
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp_s:
        tmp = Path(tmp_s)
        for n in args.sizes:
            if n > len(images) - 10:
                raise ValueError(f"at most {len(images)} ELPV cells, asked for {n}")
            drop = tmp / f"drop{n}"
            paths = write_drop(drop, images[:n])
            for workers in (1, 2):
                root = tmp / f"root{n}-{workers}"
                cpu0 = time.process_time()
                s = ingest(drop, root, config=IngestConfig(workers=workers), progress=False)
                cpu = time.process_time() - cpu0
                assert s.registered == n and s.n_quarantined == 0, s
                t = time.perf_counter()
                again = ingest(drop, root, config=IngestConfig(workers=workers), progress=False)
                rerun = time.perf_counter() - t
                assert again.registered == 0 and again.skipped_already_registered == n
                rows.append((n, workers, s.seconds, n / s.seconds, rerun, cpu))
                print(rows[-1], flush=True)
            if prof is None:
                prof = profile(paths[:200], tmp)
        grown = []
        drop = tmp / "drop200"
        if not drop.exists():
            write_drop(drop, images[:200])
        for rows_before in args.catalog_sizes:
            root = tmp / f"big{rows_before}"
            C.write_catalog_rows(root, synthetic_catalog(rows_before, seed=1), "part-synthetic-00001")
            s = ingest(drop, root, config=IngestConfig(workers=2), progress=False)
            assert s.registered == 200, s
            t = time.perf_counter()
            ingest(drop, root, config=IngestConfig(workers=2), progress=False)
            rerun = time.perf_counter() - t
            grown.append((rows_before, s.seconds, 200 / s.seconds, rerun))
            print(grown[-1], flush=True)
            shutil.rmtree(root)

    lines = [
        "# bench_ingest",
        "",
        f"Command: `.venv/bin/python -m benchmarks.bench_ingest --sizes {' '.join(map(str, args.sizes))} "
        f"--catalog-sizes {' '.join(map(str, args.catalog_sizes))}`  ",
        "Machine: 2-core CPU, 24 GiB, no GPU (shared with other jobs, so numbers are a lower bound)  ",
        f"Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs visible",
        "",
        "Real ELPV 300x300 8-bit cells written as PNG (compress_level=1), 100 per day folder with a MES export, "
        "ingested into an empty catalog (target: >= 200 images/s on 2 cores).",
        "",
        f"Load average (1 min) at start / end: {load0:.1f} / {os.getloadavg()[0]:.1f} on 2 cores; wall-clock rates "
        "fall when other jobs compete, so the CPU time of the ingesting process is reported too: images per "
        "CPU-second is what one core sustains, and two threads can use two cores (decoding and hashing release "
        "the GIL).",
        "",
        "| images | threads | ingest s (wall) | images/s (wall) | process CPU s | images per CPU-s "
        "| idempotent re-run s |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, w, secs, rate, rerun, cpu in rows:
        lines.append(f"| {n:,} | {w} | {secs:.2f} | {rate:.0f} | {cpu:.2f} | {n / cpu:.0f} | {rerun:.2f} |")
    if prof is not None:
        total = prof["read"] + prof["sha256"] + prof["validate"] + prof["store"]
        lines += [
            "",
            f"Per-image profile ({prof['n']} cells, {prof['bytes'] / 1024:.0f} KiB each, one thread, wall time under the "
            f"load above): read "
            f"{prof['read']:.2f} ms, sha256 {prof['sha256']:.2f} ms, validation (decode_image: verify, PNG stream check, full decode) "
            f"{prof['validate']:.2f} ms, store write (temp + rename) {prof['store']:.2f} ms; sum {total:.2f} ms "
            f"= {1e3 / total:.0f} images/s before catalog bookkeeping.",
        ]
    if grown:
        lines += [
            "",
            "## Ingesting 200 new images into a catalog that already holds many rows (2 threads)",
            "",
            "The existing rows are synthetic (benchmarks.bench_catalog.synthetic_catalog: 4 lines x 365 days, one part "
            "file per partition). The start-up cost is one scan of 5 columns of the whole catalog (registered digests "
            "and the paths/sizes/mtimes of files in this drop folder).",
            "",
            "| rows already in catalog | ingest s | images/s | idempotent re-run s |",
            "|---|---|---|---|",
        ]
        lines += [f"| {n:,} | {secs:.2f} | {rate:.0f} | {rerun:.2f} |" for n, secs, rate, rerun in grown]
    small = [r for r in rows if r[1] == 2]
    if len(small) > 1:
        lines += [
            "",
            f"Growth with the number of images (2 threads): {small[0][0]:,} images ran at {small[0][3]:.0f}/s wall "
            f"({small[0][0] / small[0][5]:.0f} per CPU-s), {small[-1][0]:,} at {small[-1][3]:.0f}/s wall "
            f"({small[-1][0] / small[-1][5]:.0f} per CPU-s): the cost per image is flat (the PNG decode dominates), "
            "so ingestion time grows linearly with the images; wall-clock differences between rows follow the "
            "machine's load more than the size. Growth with the catalog size: each run starts with one scan of "
            "the catalog (see the table above and bench_catalog), which grows with the rows and the number of part "
            "files; at 1M rows it is a few seconds per run, whatever the number of new images.",
        ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
