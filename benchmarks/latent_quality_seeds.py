"""InfoDiffusion against the DiffAE ablation over training seeds: is the difference larger than the seed spread?

``bench_latent_quality`` trains one InfoDiffusion (lambda = 0.1, zeta = 1) and one DiffAE ablation (0, 0) per seed with
the same budget. One seed cannot answer "InfoDiffusion >= DiffAE": at 3000 steps the ordering flipped between seeds 0
and 1. This module re-evaluates every seed pair found under ``benchmarks/out/latent_quality/`` (``cpu_*_s<steps>_seed<k>``,
reference MMD kernel) with the same probes (``bench_latent_quality.evaluate``), and reports per seed, the mean and
sd over seeds, and the paired difference (InfoDiffusion - DiffAE, same seed) with a t-interval and a sign count.
Nothing is trained here; train more seeds with ``python -m benchmarks.bench_latent_quality --steps 3000 --seed K``.

Run: ``.venv/bin/python -m benchmarks.latent_quality_seeds [--steps 3000]``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from benchmarks import common as C

NAME = "bench_latent_quality_seeds"
METRICS = (("mono_poly_acc", "mono/poly acc"), ("defect_auroc", "defect AUROC"),
           ("mono_poly_acc_lot", "mono/poly acc (lot-grouped)"), ("defect_auroc_lot", "defect AUROC (lot-grouped)"),
           ("tad", "TAD-like"))


def seed_pairs(steps: int, preset: str = "cpu") -> dict[int, dict[str, Path]]:
    """``{seed: {"InfoDiffusion": dir, "DiffAE": dir}}`` for the seeds that have both checkpoints."""
    root = C.OUT / "latent_quality"
    found: dict[int, dict[str, Path]] = {}
    for d in sorted(root.glob(f"{preset}_*_s{steps}_seed*")):
        m = re.fullmatch(rf"{re.escape(preset)}_(infodiffusion|diffae)_s{steps}_seed(\d+)", d.name)
        if m and (d / "weights.safetensors").exists():
            found.setdefault(int(m.group(2)), {})["InfoDiffusion" if m.group(1) == "infodiffusion" else "DiffAE"] = d
    return {s: v for s, v in found.items() if len(v) == 2}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks.bench_latent_quality import (
        elpv_features,
        encode_z,
        evaluate,
        load_pools,
        measure_properties,
    )
    from models import load_checkpoint

    torch.set_num_threads(1)
    images, pools = load_pools(0)
    eval_idx = np.flatnonzero(pools["pool"].isin(["calibration", "heldout"]).to_numpy())
    eval_images = images[eval_idx]
    types, probs = pools["type"].to_numpy()[eval_idx], pools["prob"].to_numpy()[eval_idx]
    lots = pools["lot"].to_numpy()[eval_idx]
    props = measure_properties(eval_images)
    feats = elpv_features(images)[eval_idx] if args.preset == "pretrained" else None
    rows: list[dict[str, Any]] = []
    for seed, pair in seed_pairs(args.steps, args.preset).items():
        for model, d in pair.items():
            ck = load_checkpoint(d)
            Z = encode_z(ck.model, ck.preprocess, eval_images, feats)
            r = evaluate(Z, types, probs, lots, props)
            rows.append({"seed": seed, "model": model, "dir": str(d.relative_to(C.ROOT)),
                         "model_id": ck.meta.get("model_id"), **{k: float(r[k]) for k, _ in METRICS}})
            C.log(f"seed {seed} {model}: " + ", ".join(f"{k} {r[k]:.3f}" for k, _ in METRICS))
    return {"rows": rows, "steps": args.steps, "preset": args.preset}


def paired(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Paired InfoDiffusion - DiffAE difference over seeds: mean, 95 % t-interval, wins."""
    by = {(r["seed"], r["model"]): r[key] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    diff = np.array([by[(s, "InfoDiffusion")] - by[(s, "DiffAE")] for s in seeds])
    n = len(diff)
    half = float(stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(diff.mean()), "lo": float(diff.mean() - half), "hi": float(diff.mean() + half),
            "wins": int((diff > 0).sum()), "n": n}


def report(res: dict[str, Any], command: str) -> str:
    rows = res["rows"]
    seeds = sorted({r["seed"] for r in rows})
    out = [C.header(NAME, command), (__doc__ or "").split("\n\n")[1] + "\n\n"]
    out.append(f"{res['preset']} preset (32 px decoder, d = 32), {res['steps']} steps x batch 32 per model, seeds {seeds}; probes on the "
               "1010 calibration + held-out cells, as in `bench_latent_quality.md`.\n\n")
    out.append("| seed | model | " + " | ".join(lab for _, lab in METRICS) + " |\n")
    out.append("|---|---|" + "---|" * len(METRICS) + "\n")
    for r in sorted(rows, key=lambda r: (r["seed"], r["model"])):
        out.append(f"| {r['seed']} | {r['model']} | " + " | ".join(f"{r[k]:.3f}" for k, _ in METRICS) + " |\n")
    out.append("\nMean (sd) over seeds, and the paired difference InfoDiffusion - DiffAE (same seed) with its 95 % "
               "t-interval and how many seeds InfoDiffusion wins:\n\n")
    out.append("| metric | InfoDiffusion | DiffAE | difference | 95 % interval | InfoDiffusion wins |\n")
    out.append("|---|---|---|---|---|---|\n")
    verdicts = []
    for k, lab in METRICS:
        vals = {m: np.array([r[k] for r in rows if r["model"] == m]) for m in ("InfoDiffusion", "DiffAE")}
        p = paired(rows, k)
        out.append(f"| {lab} | {vals['InfoDiffusion'].mean():.3f} ({vals['InfoDiffusion'].std(ddof=1):.3f}) | "
                   f"{vals['DiffAE'].mean():.3f} ({vals['DiffAE'].std(ddof=1):.3f}) | {p['mean']:+.3f} | "
                   f"{p['lo']:+.3f} to {p['hi']:+.3f} | {p['wins']} of {p['n']} |\n")
        if p["lo"] > 0:
            verdicts.append(f"{lab}: InfoDiffusion better (interval above 0)")
        elif p["hi"] < 0:
            verdicts.append(f"{lab}: DiffAE better (interval below 0)")
        else:
            verdicts.append(f"{lab}: undecided (interval contains 0)")
    out.append("\n" + "".join(f"- {v}\n" for v in verdicts))
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--preset", default="cpu", help="the preset of the checkpoints (cpu, pretrained)")
    args = ap.parse_args(argv)
    res = run(args)
    if len({r["seed"] for r in res["rows"]}) < 2:
        ap.error(f"need checkpoints of at least two seeds at {args.steps} steps under benchmarks/out/latent_quality/")
    name = NAME if args.preset == "cpu" else f"{NAME}_{args.preset}"
    C.write_results(name, report(res, C.command_line("latent_quality_seeds", argv)), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
