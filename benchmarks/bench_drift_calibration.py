"""False-alarm and detection rates of DriftDetector under the i.i.d. null and the lot null.

Run: ``.venv/bin/python -m benchmarks.bench_drift_calibration`` (about 10 minutes on 2 busy cores; ``--quick`` for a
smoke run). Writes ``benchmarks/results/bench_drift_calibration.md``.

Scenarios (alpha = 0.05 per window, window sizes n = 50, 100, 200):

1. **synthetic i.i.d.**: reference and windows drawn i.i.d. from one correlated Gaussian (d = 16), with anomaly
   scores (3 test families). Both nulls should stay at or under alpha.
2. **synthetic lots**: latents with lot structure (each lot of 50 images has its own mean offset, sd 0.5 per axis);
   windows are consecutive images of new lots. Benign lot-to-lot variation: the i.i.d. null flags it, the lot
   null should not. Power: a mean shift of 1.0 reference sd on one axis.
3. **ELPV pixel-PCA** (stand-in for z until the model is trained): 32 x 32 area-downsampled ELPV cells, PCA to 16
   axes fitted on the reference. 5 folds over the 44 derived lots (modules); for each fold the other lots are the
   reference (in file order), windows are non-overlapping runs of consecutive cells of the fold's lots. Power: the
   window's images scaled by a gain of 0.95 (a 5 % dimmer EL image), projected with the same PCA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.analysis.drift import DriftDetector

ALPHA = 0.05
SIZES = (50, 100, 200)
D = 16
OUT = Path(__file__).parent / "results" / "bench_drift_calibration.md"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95 % interval of a binomial proportion."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def fmt(flags: list[bool]) -> str:
    k, n = int(np.sum(flags)), len(flags)
    lo, hi = wilson(k, n)
    return f"{k / n:.3f} [{lo:.2f}, {hi:.2f}]"


def detectors(n_perm: int, n_cal: int, seed: int = 0) -> dict[str, DriftDetector]:
    return {
        "iid": DriftDetector(alpha=ALPHA, n_permutations=n_perm, mmd_max_ref=400, random_state=seed),
        "lot": DriftDetector(
            alpha=ALPHA, null="lot", n_calibration=n_cal, mmd_max_ref=400, random_state=seed
        ),
    }


def _spread(rates: list[float]) -> str:
    return f"{min(rates):.2f}-{max(rates):.2f}"


def synthetic_iid(n_windows: int, n_perm: int, n_cal: int, n_refs: int) -> list[dict]:
    """I.i.d. Gaussian latents with anomaly scores; ``n_refs`` independent references, windows split over them."""
    rng = np.random.default_rng(0)
    A = rng.normal(size=(D, D)) / math.sqrt(D) + np.eye(D)
    per_ref = max(1, n_windows // n_refs)
    acc: dict[tuple[str, int], dict] = {}
    for r in range(n_refs):
        ref = rng.normal(size=(3000, D)) @ A.T
        scores = rng.gamma(2.0, size=3000)
        for name, det in detectors(n_perm, n_cal, seed=r).items():
            det.fit(ref, ref_scores=scores)
            for n in SIZES:
                rec = acc.setdefault((name, n), {"flags": [], "rates": [], "t": 0.0})
                t0 = time.perf_counter()
                flags = [
                    det.test(rng.normal(size=(n, D)) @ A.T, cur_scores=rng.gamma(2.0, size=n)).detected
                    for _ in range(per_ref)
                ]
                rec["t"] += time.perf_counter() - t0
                rec["flags"] += flags
                rec["rates"].append(float(np.mean(flags)))
    return [
        {
            "data": "synthetic i.i.d.",
            "null": name,
            "n": n,
            "windows": len(rec["flags"]),
            "far": fmt(rec["flags"]),
            "spread": _spread(rec["rates"]),
            "power": "",
            "s_per_window": rec["t"] / len(rec["flags"]),
        }
        for (name, n), rec in sorted(acc.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    ]


def _lots(rng: np.random.Generator, n_images: int, lot_size: int = 50, lot_sd: float = 0.5) -> np.ndarray:
    n_lots = n_images // lot_size + 2
    offsets = rng.normal(size=(n_lots, D)) * lot_sd
    start = int(rng.integers(0, lot_size))  # windows start anywhere in a lot, as the calibration windows do
    Z = np.repeat(offsets, lot_size, axis=0)[start : start + n_images]
    return Z + rng.normal(size=(n_images, D))


def synthetic_lots(n_windows: int, n_perm: int, n_cal: int, n_refs: int) -> list[dict]:
    """Latents with lot structure; ``n_refs`` independent references; power = +1.0 sd on axis 5."""
    rng = np.random.default_rng(1)
    per_ref = max(1, n_windows // n_refs)
    acc: dict[tuple[str, int], dict] = {}
    for r in range(n_refs):
        ref = _lots(rng, 3000)
        shift = np.zeros(D)
        shift[5] = 1.0 * ref[:, 5].std()
        for name, det in detectors(n_perm, n_cal, seed=r).items():
            det.fit(ref)
            for n in SIZES:
                rec = acc.setdefault((name, n), {"flags": [], "rates": [], "power": [], "top": [], "t": 0.0})
                t0 = time.perf_counter()
                flags = [det.test(_lots(rng, n)).detected for _ in range(per_ref)]
                res = [det.test(_lots(rng, n) + shift) for _ in range(max(4, per_ref // 4))]
                rec["t"] += time.perf_counter() - t0
                rec["flags"] += flags
                rec["rates"].append(float(np.mean(flags)))
                rec["power"] += [x.detected for x in res]
                rec["top"] += [x.top_axis == 5 for x in res if x.detected]
    rows = []
    for (name, n), rec in sorted(acc.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        top = f"{np.mean(rec['top']):.2f}" if rec["top"] else "n/a"
        rows.append(
            {
                "data": "synthetic lots",
                "null": name,
                "n": n,
                "windows": len(rec["flags"]),
                "far": fmt(rec["flags"]),
                "spread": _spread(rec["rates"]),
                "power": f"{fmt(rec['power'])}; top axis right {top}",
                "s_per_window": rec["t"] / (len(rec["flags"]) + len(rec["power"])),
            }
        )
    return rows


def elpv_rows(n_perm: int, n_cal: int, folds: int = 5, gains: tuple[float, ...] = (0.95, 0.8)) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from pipeline.line.elpv import load_elpv

    data = load_elpv()
    imgs = torch.from_numpy(np.asarray(data.images, dtype=np.float32) / 255.0)[:, None]
    small = F.adaptive_avg_pool2d(imgs, 32).flatten(1).numpy().astype(np.float64)  # (2624, 1024), fixed range
    lot = np.asarray(data.lot)
    fold_of_lot = np.arange(lot.max() + 1) % folds
    results: dict[tuple[str, int], dict[str, list[bool]]] = {}
    for f in range(folds):
        in_fold = fold_of_lot[lot] == f
        ref_px, cur_px = small[~in_fold], small[in_fold]  # both in file order
        mean = ref_px.mean(axis=0)
        _, _, vt = np.linalg.svd(ref_px - mean, full_matrices=False)
        P = vt[:D].T

        def proj(x: np.ndarray, mean: np.ndarray = mean, P: np.ndarray = P) -> np.ndarray:
            return (x - mean) @ P

        ref = proj(ref_px)
        for name, det in detectors(n_perm, n_cal).items():
            det.fit(ref)
            for n in SIZES:
                rec = results.setdefault((name, n), {"null": [], "rates": [], **{g: [] for g in gains}})
                flags = []
                for lo in range(0, cur_px.shape[0] - n + 1, n):
                    win = cur_px[lo : lo + n]
                    flags.append(det.test(proj(win)).detected)
                    for g in gains:
                        rec[g].append(det.test(proj(win * g)).detected)
                rec["null"] += flags
                rec["rates"].append(float(np.mean(flags)))
        print(f"  ELPV fold {f + 1}/{folds} done", file=sys.stderr, flush=True)
    rows = []
    for (name, n), rec in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rows.append(
            {
                "data": "ELPV pixel-PCA",
                "null": name,
                "n": n,
                "windows": len(rec["null"]),
                "far": fmt(rec["null"]),
                "spread": _spread(rec["rates"]),
                "power": "; ".join(f"gain {g}: {fmt(rec[g])}" for g in gains),
                "s_per_window": math.nan,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=200, help="synthetic windows per (null, n)")
    ap.add_argument("--permutations", type=int, default=200)
    ap.add_argument("--calibration", type=int, default=300, help="lot-null bootstrap windows per n")
    ap.add_argument(
        "--refs", type=int, default=5, help="independent synthetic references (windows split over them)"
    )
    ap.add_argument("--no-elpv", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 windows, 50 permutations, no ELPV")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.quick:
        args.windows, args.permutations, args.calibration, args.refs, args.no_elpv = 20, 50, 100, 2, True
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:  # pragma: no cover
        pass
    t0 = time.perf_counter()
    rows = []
    for fn in (synthetic_iid, synthetic_lots):
        print(f"running {fn.__name__}", file=sys.stderr, flush=True)
        rows += fn(args.windows, args.permutations, args.calibration, args.refs)
    if not args.no_elpv:
        print("running ELPV", file=sys.stderr, flush=True)
        rows += elpv_rows(args.permutations, args.calibration)
    total = time.perf_counter() - t0

    cmd = "python -m benchmarks.bench_drift_calibration " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    lines = [
        "# Drift-test calibration: i.i.d. null vs lot null",
        "",
        f"- command: `{cmd.strip()}`",
        "- machine: 2-core CPU, 24 GiB, no GPU (shared with other jobs)",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- alpha = {ALPHA} per window; d = {D} axes; MMD permutations = {args.permutations}; lot-null bootstrap "
        f"windows = {args.calibration}; total run time {total:.0f} s",
        "- rates with Wilson 95 % intervals; FAR = share of unshifted windows flagged (`detected`); power = share "
        "of shifted windows flagged",
        "",
        "| data | null | n | windows | false-alarm rate | FAR per reference (min-max) | detection rate (shift) "
        "| s / window |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spw = "" if math.isnan(r["s_per_window"]) else f"{r['s_per_window']:.3f}"
        lines.append(
            f"| {r['data']} | {r['null']} | {r['n']} | {r['windows']} | {r['far']} | {r['spread']} | {r['power']} "
            f"| {spw} |"
        )
    lines += [
        "",
        "Shifts: synthetic lots = +1.0 reference sd on axis 5 (`top axis right` = share of detected windows whose "
        "top axis is axis 5); ELPV = every image of the window multiplied by the gain, then projected.",
        "ELPV windows are non-overlapping runs of consecutive cells of held-out lots (5 folds over the 44 lots), "
        "so their number is small and the intervals are wide.",
        "Synthetic windows are split over independent references (`--refs`); 'FAR per reference' shows how much the "
        "false-alarm rate a line actually experiences varies with its one reference (and its one lot-null "
        "calibration), around the pooled rate. ELPV: per fold (5 references).",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
