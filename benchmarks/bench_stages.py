"""Speed of the monitoring stages and how it grows: scoring (per-image detectors) with the number of images and of
reference latents, drift tests with the window size, the lot-null calibration with the reference size, and the
image-quality channels per image.

Latents are synthetic (d = 32, standard normal): the cost of these stages does not depend on what z holds, only on
the sizes. Encoding and training speed per preset are in ``bench_model_speed`` (constant per image, so they grow
linearly with the images); ingestion and catalog growth in ``bench_ingest`` / ``bench_catalog``.

Run: ``.venv/bin/python -m benchmarks.bench_stages [--quick]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import common as C

NAME = "bench_stages"
D = 32


def _time(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def scoring(n_refs: list[int], n_images: list[int]) -> list[dict[str, Any]]:
    """Fit on n_ref reference latents, then score n images, per detector."""
    from pipeline.analysis.detectors import (
        ConditionalResidual,
        IsolationForestDetector,
        KNNDistance,
        Mahalanobis,
    )

    rng = np.random.default_rng(0)
    rows = []

    def sample(n: int, with_residuals: bool) -> np.ndarray:
        Z = rng.normal(size=(n, D))
        return np.column_stack([Z, np.exp(rng.normal(size=(n, 2)))]) if with_residuals else Z

    for name, make in (("Mahalanobis", Mahalanobis), ("kNN distance", KNNDistance),
                       ("IsolationForest", IsolationForestDetector),
                       ("ConditionalResidual (the monitor's; residuals precomputed)", ConditionalResidual)):
        res = make is ConditionalResidual
        for n_ref in n_refs:
            ref = sample(n_ref, res)
            det = make()
            fit_s = _time(lambda det=det, ref=ref: det.fit(ref), repeat=1)
            for n in n_images:
                X = sample(n, res)
                s = _time(lambda det=det, X=X: det.score(X), repeat=2)
                rows.append({"detector": name, "n_ref": n_ref, "n": n, "fit_s": fit_s, "score_s": s,
                             "images_per_s": n / s})
        C.log(f"scoring: {name} done")
    return rows


def drift(ns: list[int], n_ref: int, n_calibration: int) -> list[dict[str, Any]]:
    """One window test per size, i.i.d. null (200 permutations) and lot null (calibration timed separately)."""
    from pipeline.analysis.drift import DriftDetector

    rng = np.random.default_rng(1)
    ref = rng.normal(size=(n_ref, D))
    q_ref = rng.normal(size=(n_ref, 3))
    rows = []
    for null in ("iid", "lot"):
        det = DriftDetector(null=null, n_permutations=200, n_calibration=n_calibration).fit(ref, ref_quality=q_ref)
        for n in ns:
            if null == "lot" and 2 * n > n_ref:
                continue
            Z, Q = rng.normal(size=(n, D)), rng.normal(size=(n, 3))
            cal = _time(lambda det=det, n=n: det.calibrate(n), repeat=1) if null == "lot" else 0.0
            t = _time(lambda det=det, Z=Z, Q=Q: det.test(Z, cur_quality=Q), repeat=3)
            rows.append({"null": null, "n_ref": n_ref, "n": n, "test_s": t, "calibration_s": cal})
        C.log(f"drift: {null} null done")
    return rows


def calibration_growth(n_refs: list[int], n: int, n_calibration: int) -> list[dict[str, Any]]:
    """Lot-null calibration time against the reference size (window n, stratified by two product types)."""
    from pipeline.analysis.drift import DriftDetector

    rng = np.random.default_rng(2)
    rows = []
    for n_ref in n_refs:
        ref = rng.normal(size=(n_ref, D))
        strata = np.where((np.arange(n_ref) // 50) % 3 == 0, "mono", "poly")
        lots = np.arange(n_ref) // 30
        det = DriftDetector(null="lot", n_calibration=n_calibration).fit(ref, ref_strata=strata, ref_lots=lots)
        rows.append({"n_ref": n_ref, "n": n, "calibration_s": _time(lambda det=det: det.calibrate(n), repeat=1)})
    C.log("calibration growth done")
    return rows


def quality_channels(n: int) -> dict[str, Any]:
    """Image-quality channels (``QUALITY_CHANNELS``) per real 300 x 300 ELPV cell."""
    from pipeline.latent.properties import QUALITY_CHANNELS, measure

    imgs = C.images()[:n]
    s = _time(lambda: measure(imgs, QUALITY_CHANNELS), repeat=2)
    return {"n": n, "seconds": s, "images_per_s": n / s, "channels": list(QUALITY_CHANNELS)}


def report(res: dict[str, Any], command: str) -> str:
    out = [C.header(NAME, command)]
    out.append("Synthetic latents (d = 32); the cost depends on sizes only. Best of 2-3 calls, 1 torch/BLAS thread.\n\n")
    out.append("## Scoring: fit on n_ref reference latents, score n images\n\n")
    out.append("| detector | n_ref | n | fit (s) | score (s) | images/s |\n|---|---|---|---|---|---|\n")
    for r in res["scoring"]:
        out.append(f"| {r['detector']} | {r['n_ref']:,} | {r['n']:,} | {r['fit_s']:.3f} | {r['score_s']:.4f} | "
                   f"{r['images_per_s']:,.0f} |\n")
    out.append("\n## Drift test per window against the window size\n\n")
    out.append("| null | n_ref | n | one window test (s) | one-off lot-null calibration for this n (s) |\n"
               "|---|---|---|---|---|\n")
    for r in res["drift"]:
        out.append(f"| {r['null']} | {r['n_ref']:,} | {r['n']} | {r['test_s']:.3f} | "
                   f"{r['calibration_s']:.1f} |\n" if r["null"] == "lot" else
                   f"| {r['null']} | {r['n_ref']:,} | {r['n']} | {r['test_s']:.3f} | - |\n")
    out.append(f"\n## Lot-null calibration against the reference size (window n = {res['calibration'][0]['n']}, "
               f"{res['n_calibration']} bootstrap windows, stratified, with lots)\n\n")
    out.append("| n_ref | calibration (s) |\n|---|---|\n")
    for r in res["calibration"]:
        out.append(f"| {r['n_ref']:,} | {r['calibration_s']:.1f} |\n")
    q = res["quality"]
    out.append(f"\n## Image-quality channels\n\n{', '.join(q['channels'])} on {q['n']} real 300 x 300 cells: "
               f"{q['seconds']:.2f} s ({q['images_per_s']:,.0f} images/s); measured once per image and cached by "
               "the monitor.\n")
    sc = {(r["detector"], r["n_ref"], r["n"]): r for r in res["scoring"]}
    lines = []
    for det in dict.fromkeys(k[0] for k in sc):
        refs = sorted({k[1] for k in sc if k[0] == det})
        ns = sorted({k[2] for k in sc if k[0] == det})
        a, b = sc[(det, refs[0], ns[-1])], sc[(det, refs[-1], ns[-1])]
        lines.append(f"{det}: x{b['score_s'] / a['score_s']:.1f} scoring time for x{refs[-1] // refs[0]} reference "
                     f"latents")
    dr = [r for r in res["drift"] if r["null"] == "iid"]
    lines.append(f"i.i.d. drift test: x{dr[-1]['test_s'] / dr[0]['test_s']:.1f} for x{dr[-1]['n'] // dr[0]['n']} "
                 "window size")
    cg = res["calibration"]
    lines.append(f"lot-null calibration: x{cg[-1]['calibration_s'] / cg[0]['calibration_s']:.1f} for "
                 f"x{cg[-1]['n_ref'] // cg[0]['n_ref']} reference size")
    out.append("\n## Growth\n\n" + "".join(f"- {x}\n" for x in lines))
    out.append("\nScoring grows linearly with the images scored; kNN and ConditionalResidual also with the reference "
               "(exact neighbour search), Mahalanobis and IsolationForest do not. ConditionalResidual's rows exclude "
               "the diffusion residuals themselves (about 24 ms per image and noise field on one core, 70 ms with the "
               "shipped three, `bench_anomaly.md`), which the "
               "monitor computes once per image. The drift test's cost is dominated by the MMD permutations "
               "(i.i.d. null) and grows with the window; under the lot null a window test is cheap and the one-off "
               "calibration per window size grows with the reference (each bootstrap window is compared with the "
               "rest).\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a few seconds)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.quick:
        res = {"scoring": scoring([200, 1000], [100, 1000]), "drift": drift([50, 100], 400, 100),
               "calibration": calibration_growth([300, 600], 50, 100), "quality": quality_channels(20),
               "n_calibration": 100}
    else:
        res = {"scoring": scoring([500, 5000], [1000, 10000, 100000]),
               "drift": drift([50, 100, 200, 500, 1000], 2000, 500),
               "calibration": calibration_growth([500, 1000, 2000, 4000], 100, 500),
               "quality": quality_channels(200), "n_calibration": 500}
    cmd = C.command_line("bench_stages", argv)
    C.write_results(NAME, report(res, cmd), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
