"""Does more resolution fix the residual score on poly cells? A tile-level InfoDiffusion at 128 px, measured.

The shipped per-image score (residual at 32 px judged among the 25 calibration cells nearest in z) reaches 0.97 AUROC
on mono cells but 0.66 on poly cells, where PatchCore at 300 px reaches 0.83. The obvious suspect is resolution: at
32 px the poly grain and the cracks are both at the pixel scale. This experiment trains the cpu preset (same network,
32 px input) on **tiles**: each training cell resized to 128 px and cut into 4 x 4 tiles of 32 px (15,232 tiles,
4x the linear resolution of the whole-cell model). Every test cell is scored the same way at tile level (residual at
t* = 100, 250 with the shared noise field, each tile judged among the k calibration tiles nearest in tile-z, like
``pipeline.analysis.detectors.ConditionalResidual``), and the tile scores are pooled per cell (max, mean of the top 2, mean).

Same split and labels as ``bench_anomaly`` (train on train-pool functional cells, calibration-pool functional cells
as the reference, held-out functional vs p = 1). Not part of the shipped pipeline; kept to record the answer.

Run: ``.venv/bin/python -m benchmarks.bench_anomaly_tiles [--steps 3000] [--res 128]``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks import common as C

NAME = "bench_anomaly_tiles"
T_STARS = (100, 250)


def tiles(idx: np.ndarray, res: int) -> Any:
    """Cells ``idx`` resized (area) to ``res`` px and cut into (res/32)^2 tiles: (N * G^2, 1, 32, 32) in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(C.images()[idx].astype(np.float32) / 255.0)[:, None]
    x = F.interpolate(x, size=(res, res), mode="area") * 2 - 1
    t = x.unfold(2, 32, 32).unfold(3, 32, 32)  # B, 1, G, G, 32, 32
    return t.permute(0, 2, 3, 1, 4, 5).reshape(-1, 1, 32, 32).contiguous()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from models import load_checkpoint, train
    from models.presets import cpu
    from pipeline.analysis.detectors import ConditionalResidual, DiffusionResidual
    from pipeline.analysis.detectors.conditional import stack_latents_residuals

    torch.set_num_threads(1)
    sp = C.get_splits()
    g2 = (args.res // 32) ** 2
    out = C.OUT / "anomaly_tiles" / f"cpu_tiles{args.res}_s{args.steps}_seed0"
    train_s = None
    if not (out / "weights.safetensors").exists():
        data = tiles(sp.train, args.res)
        C.log(f"training on {len(data)} tiles")
        t0 = time.perf_counter()
        train(cpu(), data, out, steps=args.steps, progress=False, seed=0)
        train_s = time.perf_counter() - t0
    meta = C.checkpoint_meta(out)

    def residuals(idx: np.ndarray, tag: str) -> dict[str, np.ndarray]:
        def comp() -> dict[str, np.ndarray]:
            ck = load_checkpoint(out)
            det = DiffusionResidual(ck.model, t_stars=T_STARS, steps=10, batch_size=256, progress=False)
            z, r = det.latents_and_residuals(tiles(idx, args.res))
            return {"z": z, "r": r}

        return C.cached(f"anomaly_tiles/{meta['model_id']}_{tag}_{C.key_of(idx.tolist())}", comp)

    cal, tst = residuals(sp.calibration, "cal"), residuals(sp.test, "test")
    y, ttype = sp.test_labels, sp.types[sp.test]
    rows = []
    for k in (25, 50):
        det = ConditionalResidual(n_residuals=len(T_STARS), k=k).fit(stack_latents_residuals(cal["z"], cal["r"]))
        s = det.score(stack_latents_residuals(tst["z"], tst["r"])).reshape(len(sp.test), g2)
        pooled = {"max": s.max(1), "mean of top 2": np.sort(s, 1)[:, -2:].mean(1), "mean": s.mean(1)}
        for pool, v in pooled.items():
            row = {"method": f"tile residual, {k} nearest tiles in z, {pool} over tiles"}
            row["auroc"] = float(roc_auc_score(y, v))
            for t in ("mono", "poly"):
                row[f"auroc_{t}"] = float(roc_auc_score(y[ttype == t], v[ttype == t]))
            rows.append(row)
    return {"rows": rows, "model": meta, "res": args.res, "tiles_per_cell": g2, "steps": args.steps,
            "train_s": train_s, "n_train_tiles": int(len(sp.train) * g2)}


def report(res: dict[str, Any], command: str) -> str:
    f = C.fmt
    out = [C.header(NAME, command), (__doc__ or "").split("\n\n")[1] + "\n\n"]
    out.append(f"Tile model: cpu preset, {res['steps']} steps x 32 tiles, {res['n_train_tiles']:,} training tiles "
               f"({res['tiles_per_cell']} per cell at {res['res']} px), model id {res['model']['model_id']}"
               + (f", trained in {res['train_s']:.0f} s on one core" if res["train_s"] else "") + ".\n\n")
    out.append("| method | AUROC | AUROC mono | AUROC poly |\n|---|---|---|---|\n")
    for r in res["rows"]:
        out.append(f"| {r['method']} | {f(r['auroc'])} | {f(r['auroc_mono'])} | {f(r['auroc_poly'])} |\n")
    best = max(res["rows"], key=lambda r: r["auroc"])
    out.append(
        f"\nFor comparison (`bench_anomaly.md`, same split): the shipped whole-cell score at 32 px 0.777 (mono 0.966, "
        f"poly 0.655); PatchCore at 300 px 0.798 (mono 0.737, poly 0.826).\n\n"
        f"**Answer:** the best tile variant reaches {best['auroc']:.3f} (poly {best['auroc_poly']:.3f}): 4x the "
        "resolution with the same network and budget does not close the poly gap, and mono gets worse (a tile "
        "sees less of the cell). The residual of a small, briefly trained denoiser does not separate poly grain from "
        "cracks at this budget; a longer-trained or larger model (GPU) is the next thing to measure.\n"
    )
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--res", type=int, default=128, help="cell size before tiling (a multiple of 32)")
    args = ap.parse_args(argv)
    if args.res % 32:
        ap.error("--res must be a multiple of 32")
    res = run(args)
    cmd = C.command_line("bench_anomaly_tiles", argv)
    C.write_results(NAME, report(res, cmd), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
