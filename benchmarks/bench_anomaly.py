"""ELPV anomaly benchmark: linewatch scores against peer baselines on the same lot-level split.

Protocol (InCTRL-style labels, stricter split): train on the train-pool functional cells; test held-out functional
cells (negatives) against held-out p = 1 cells (positives), cells with p = 1/3 and 2/3 dropped. Pools are whole lots
(modules), so a test cell's near-duplicate neighbours are never in training. AUROC and AUPR overall and per cell type
(mono / poly), with a 95 % stratified-bootstrap interval on the overall AUROC.

Methods:

* linewatch (InfoDiffusion cpu preset, 32 px) and the DiffAE ablation (same preset, lambda = zeta = 0):
  Mahalanobis and kNN on z, and the diffusion-native residual (``pipeline.analysis.detectors.DiffusionResidual`` recipe:
  t* = 100, 250, 10 DDIM steps, reductions mse / l1 / q99, standardised on calibration residuals), and the ensemble
  Mahalanobis(z) + residual(mse) (``pipeline.analysis.detectors.Ensemble``, robust z). Latent detectors and standardisers are
  fit on the calibration-pool functional cells (as the shipped monitor does); the models trained on the train pool.
  The **shipped** score (``pipeline.training.retrain.ScoringConfig``: residual mse at t* = 100, 250 averaged over three shared
  noise fields, judged among the 25 calibration cells nearest in z by ``pipeline.analysis.detectors.ConditionalResidual``), the
  same with one noise field, and the residuals standardised per cell type with the product label, to show how much
  of the type effect z recovers.
* Pixel PCA (64 px, 32 components, fit on training cells): Mahalanobis and reconstruction error.
* Convolutional autoencoder (32 px, trained on training cells): reconstruction error.
* PatchCore-style: EfficientNet-Lite0 (ImageNet) patch features at full 300 px, memory bank = greedy coreset of
  the training patches, image score = max patch NN distance.

Run: ``.venv/bin/python -m benchmarks.bench_anomaly``. Results: ``benchmarks/results/bench_anomaly.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from benchmarks import common as C

NAME = "bench_anomaly"
T_STARS = (100, 250)
REDUCES = ("mse", "l1", "q99")


# ------------------------------------------------------------------------------------------------ metrics
def auroc_aupr(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """AUROC and AUPR (average precision) of scores ``s`` for labels ``y`` (1 = anomalous); NaN if one class."""
    if len(np.unique(y)) < 2:
        return float("nan"), float("nan")
    return float(roc_auc_score(y, s)), float(average_precision_score(y, s))


def bootstrap_auroc_ci(y: np.ndarray, s: np.ndarray, reps: int = 500, seed: int = 0) -> tuple[float, float]:
    """95 % stratified-bootstrap interval of the AUROC."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    vals = []
    for _ in range(reps):
        i = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        vals.append(roc_auc_score(y[i], s[i]))
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------------ linewatch scores
def residuals(model: Any, x: Any, batch: int = 64, steps: int = 10) -> dict[str, np.ndarray]:
    """Partial-denoising residuals (N, len(T_STARS)) per reduction, with DiffusionResidual's seeding (seed 0)."""
    import torch

    out = {r: np.zeros((x.shape[0], len(T_STARS))) for r in REDUCES}
    model.eval()
    with torch.no_grad():
        for b, lo in enumerate(range(0, x.shape[0], batch)):
            x0 = x[lo : lo + batch]
            z = model.encode(x0)
            for i, t in enumerate(T_STARS):
                g = torch.Generator().manual_seed((i * 10_007 + b) % (2**63 - 1))
                xh = model.partial_denoise(x0, t_start=t, steps=steps, z=z, generator=g)
                d = (x0 - xh).float()
                sl = slice(lo, lo + x0.shape[0])
                out["mse"][sl, i] = d.pow(2).flatten(1).mean(1).numpy()
                out["l1"][sl, i] = d.abs().flatten(1).mean(1).numpy()
                out["q99"][sl, i] = torch.quantile(d.pow(2).mean(1).flatten(1), 0.99, dim=1).numpy()
    return out


def standardise(R_ref: np.ndarray, R: np.ndarray) -> np.ndarray:
    """DiffusionResidual's score: mean over t* of (r - median_ref) / IQR_ref."""
    med = np.median(R_ref, axis=0)
    q75, q25 = np.percentile(R_ref, [75, 25], axis=0)
    iqr = np.maximum(q75 - q25, 1e-12 + 1e-9 * np.abs(med))
    return ((R - med) / iqr).mean(axis=1)


def model_latents_and_residuals(ckpt_dir: Any, idx: np.ndarray, tag: str) -> dict[str, np.ndarray]:
    """z and raw residuals of cells ``idx`` under a checkpoint (cached per model id)."""
    import torch

    from models import load_checkpoint, to_model_input

    meta = C.checkpoint_meta(ckpt_dir)

    def compute() -> dict[str, np.ndarray]:
        torch.set_num_threads(1)
        ck = load_checkpoint(ckpt_dir)
        imgs = C.images()[idx]
        t0 = time.perf_counter()
        z = C.encode(ck, imgs)
        t_enc = time.perf_counter() - t0
        x = to_model_input(imgs, ck.preprocess)
        t0 = time.perf_counter()
        R = residuals(ck.model, x)
        t_res = time.perf_counter() - t0
        return {"z": z, **{f"r_{k}": v for k, v in R.items()},
                "sec_per_img": np.array([t_enc / len(idx), t_res / len(idx)])}

    return C.cached(f"anomaly/{meta['model_id']}_{tag}_{C.key_of(idx.tolist())}", compute)


def shipped_residuals(ckpt_dir: Any, idx: np.ndarray, tag: str, seeds: tuple[int, ...] | None = None
                      ) -> dict[str, np.ndarray]:
    """z and residuals of cells ``idx`` as the monitor computes them (``ScoringConfig()``: shared noise fields).

    ``seeds`` (default: the shipped ``ScoringConfig().seeds``) averages the residual over that many noise fields.
    """
    import dataclasses

    import torch

    from models import load_checkpoint, to_model_input
    from pipeline.training.retrain import ScoringConfig

    meta = C.checkpoint_meta(ckpt_dir)
    sc = ScoringConfig()
    seeds = sc.seeds if seeds is None else tuple(seeds)
    sc = dataclasses.replace(sc, seeds=seeds)

    def compute() -> dict[str, np.ndarray]:
        torch.set_num_threads(1)
        ck = load_checkpoint(ckpt_dir)
        x = to_model_input(C.images()[idx], ck.preprocess)
        t0 = time.perf_counter()
        z, r = sc.residual_detector(ck.model).latents_and_residuals(x)
        return {"z": z, "r": r, "sec_per_img": np.array((time.perf_counter() - t0) / len(idx))}

    suffix = "" if seeds == (0,) else "_seeds" + "-".join(map(str, seeds))
    return C.cached(f"anomaly/{meta['model_id']}_{tag}_shipped{suffix}_{C.key_of(idx.tolist())}", compute)


# ------------------------------------------------------------------------------------------------ main
def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.baselines import ConvAE, PatchCore, PixelPCA, downsample
    from pipeline.analysis.detectors import ConditionalResidual, Ensemble, KNNDistance, Mahalanobis
    from pipeline.analysis.detectors.conditional import stack_latents_residuals

    sp = C.get_splits()
    test = sp.test
    y = sp.test_labels
    ttype = sp.types[test]
    scores: dict[str, np.ndarray] = {}
    timing: dict[str, float] = {}
    notes: dict[str, str] = {}
    models_used: dict[str, Any] = {}

    # ---- linewatch + DiffAE ablation
    for tag, ck in C.resolve_models(args.model, sp, args.no_train, args.steps).items():
        if ck is None:
            notes[tag] = "not run: no checkpoint found under benchmarks/out/"
            continue
        models_used[tag] = C.checkpoint_meta(ck)
        C.log(f"[{tag}] encoding + residuals")
        cal = model_latents_and_residuals(ck, sp.calibration, "cal")
        tst = model_latents_and_residuals(ck, test, "test")
        t0 = time.perf_counter()
        maha = Mahalanobis().fit(cal["z"])
        scores[f"{tag}: Mahalanobis(z)"] = s_maha = maha.score(tst["z"])
        timing[f"{tag}: Mahalanobis(z)"] = (time.perf_counter() - t0) / len(test) + float(tst["sec_per_img"][0])
        knn = KNNDistance(k=5).fit(cal["z"])
        scores[f"{tag}: kNN(z)"] = knn.score(tst["z"])
        for r in REDUCES:
            scores[f"{tag}: residual {r}"] = standardise(cal[f"r_{r}"], tst[f"r_{r}"])
            timing[f"{tag}: residual {r}"] = float(tst["sec_per_img"][1])
        # the shipped per-image score: residual (three shared noise fields) judged against the 25 calibration cells nearest
        # in z; and, for comparison, the same residuals standardised per cell type (needs the product label)
        cal_s, tst_s = shipped_residuals(ck, sp.calibration, "cal"), shipped_residuals(ck, test, "test")
        t0 = time.perf_counter()
        cond = ConditionalResidual(n_residuals=cal_s["r"].shape[1], k=25).fit(
            stack_latents_residuals(cal_s["z"], cal_s["r"]))
        label = f"{tag}: residual mse, judged among the 25 nearest in z (shipped)"
        scores[label] = cond.score(stack_latents_residuals(tst_s["z"], tst_s["r"]))
        timing[label] = (time.perf_counter() - t0) / len(test) + float(tst_s["sec_per_img"])
        ctype = sp.types[sp.calibration]
        per_type = np.zeros(len(test))
        for t in ("mono", "poly"):
            per_type[ttype == t] = standardise(cal_s["r"][ctype == t], tst_s["r"][ttype == t])
        scores[f"{tag}: residual mse, standardised per cell type (label)"] = per_type
        timing[f"{tag}: residual mse, standardised per cell type (label)"] = float(tst_s["sec_per_img"])
        # variant: one noise field instead of the shipped three (a third of the cost)
        cal1, tst1 = shipped_residuals(ck, sp.calibration, "cal", (0,)), shipped_residuals(ck, test, "test", (0,))
        cond1 = ConditionalResidual(n_residuals=cal1["r"].shape[1], k=25).fit(
            stack_latents_residuals(cal1["z"], cal1["r"]))
        label1 = f"{tag}: residual mse, judged among the 25 nearest in z, 1 noise seed"
        scores[label1] = cond1.score(stack_latents_residuals(tst1["z"], tst1["r"]))
        timing[label1] = float(tst1["sec_per_img"])
        ens = Ensemble(["Mahalanobis", "DiffusionResidual"])
        ref = np.column_stack([maha.reference_scores_ if hasattr(maha, "reference_scores_") else maha.score(cal["z"]),
                               standardise(cal["r_mse"], cal["r_mse"])])
        ens.fit_scores(ref)
        scores[f"{tag}: ensemble Mahalanobis(z) + residual mse"] = ens.score_from_matrix(
            np.column_stack([s_maha, scores[f"{tag}: residual mse"]])
        )
        timing[f"{tag}: ensemble Mahalanobis(z) + residual mse"] = float(tst["sec_per_img"].sum())

    # ---- pixel PCA
    def pix() -> dict[str, np.ndarray]:
        return {"train": downsample(C.images()[sp.train], 64), "test": downsample(C.images()[test], 64)}

    P = C.cached(f"anomaly/pixels64_{C.key_of(sp.train.tolist(), test.tolist())}", pix)
    for kind, label in (("mahalanobis", "pixel PCA: Mahalanobis"), ("reconstruction", "pixel PCA: reconstruction")):
        pca = PixelPCA(32, kind).fit(P["train"])
        t0 = time.perf_counter()
        scores[label] = pca.score(P["test"])
        timing[label] = (time.perf_counter() - t0) / len(test)

    # ---- conv AE
    def ae() -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        m = ConvAE(size=32, steps=args.ae_steps).fit(C.images()[sp.train])
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        s = m.score(C.images()[test])
        return {"score": s, "params": np.array(m.n_parameters()), "fit_s": np.array(t_fit),
                "sec_per_img": np.array((time.perf_counter() - t0) / len(test))}

    A = C.cached(f"anomaly/convae32_s{args.ae_steps}_{C.key_of(test.tolist())}", ae)
    scores["conv autoencoder (32 px): reconstruction"] = A["score"]
    timing["conv autoencoder (32 px): reconstruction"] = float(A["sec_per_img"])
    notes["conv autoencoder"] = f"{int(A['params']):,} parameters, {args.ae_steps} Adam steps"

    # ---- PatchCore on EfficientNet-Lite0
    if not args.no_effnet:
        C.log("PatchCore: features")
        ftr = C.effnet_features(sp.train, patches=True)
        fte = C.effnet_features(test, patches=True)

        def pc() -> dict[str, np.ndarray]:
            t0 = time.perf_counter()
            m = PatchCore(coreset=args.coreset).fit(ftr["patches"])
            t_fit = time.perf_counter() - t0
            t0 = time.perf_counter()
            s = m.score(fte["patches"])
            return {"score": s, "fit_s": np.array(t_fit), "sec_per_img": np.array((time.perf_counter() - t0) / len(test))}

        R = C.cached(f"anomaly/patchcore_c{args.coreset}_{C.key_of(test.tolist())}", pc)
        lab = "PatchCore (EfficientNet-Lite0, 300 px)"
        scores[lab] = R["score"]
        timing[lab] = float(R["sec_per_img"])
        notes["PatchCore"] = (
            f"blocks 4 (40 ch, stride 8) + 10 (112 ch, stride 16), 3x3 local mean, 18x18 patches/image; greedy coreset "
            f"{args.coreset} of {ftr['patches'].shape[0] * 324:,} training patches; feature extraction not included in "
            "the per-image time"
        )
    else:
        notes["PatchCore"] = "not run (--no-effnet)"

    # ---- metrics
    rows = []
    for m, s in scores.items():
        row: dict[str, Any] = {"method": m}
        row["auroc"], row["aupr"] = auroc_aupr(y, s)
        row["auroc_ci"] = bootstrap_auroc_ci(y, s)
        for t in ("mono", "poly"):
            k = ttype == t
            row[f"auroc_{t}"], row[f"aupr_{t}"] = auroc_aupr(y[k], s[k])
        row["sec_per_img"] = timing.get(m)
        rows.append(row)
    return {
        "rows": rows,
        "n_test_ok": int(len(sp.test_ok)), "n_test_defect": int(len(sp.test_defect)),
        "n_train": int(len(sp.train)), "n_calibration": int(len(sp.calibration)),
        "n_by_type": {t: {"ok": int((ttype[y == 0] == t).sum()), "defect": int((ttype[y == 1] == t).sum())}
                      for t in ("mono", "poly")},
        "models": models_used, "notes": notes,
    }


def report(res: dict[str, Any], command: str) -> str:
    f = C.fmt
    rows = sorted(res["rows"], key=lambda r: -r["auroc"])
    lw = [r for r in rows if r["method"].startswith("linewatch")]
    peers = [r for r in rows if r["method"].split(":")[0] not in res["models"] and not r["method"].startswith("linewatch")]
    best_lw = lw[0] if lw else None
    best_peer = peers[0] if peers else None
    out = [C.header(NAME, command)]
    nt = res["n_by_type"]
    out.append(
        "Protocol: models and baselines train on the train-pool functional cells "
        f"({res['n_train']}); linewatch latent detectors and residual standardisation are fit on the calibration-pool "
        f"functional cells ({res['n_calibration']}); test = held-out functional ({res['n_test_ok']}: "
        f"{nt['mono']['ok']} mono / {nt['poly']['ok']} poly) vs held-out p = 1 ({res['n_test_defect']}: "
        f"{nt['mono']['defect']} mono / {nt['poly']['defect']} poly); p = 1/3, 2/3 dropped (InCTRL protocol). "
        "**Pools are whole lots (modules)**, stricter than the random splits of published ELPV numbers: no test "
        "cell has a near-duplicate neighbour in training. Nothing was tuned on the test cells; all variants run are "
        "reported.\n\n"
    )
    out.append("| method | AUROC | 95% CI | AUPR | AUROC mono | AUROC poly | AUPR mono | AUPR poly | s / image |\n")
    out.append("|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        ci = f"{r['auroc_ci'][0]:.3f}-{r['auroc_ci'][1]:.3f}"
        t = "n/a" if r["sec_per_img"] is None else f"{r['sec_per_img'] * 1e3:.1f} ms"
        out.append(
            f"| {r['method']} | {f(r['auroc'])} | {ci} | {f(r['aupr'])} | {f(r['auroc_mono'])} | "
            f"{f(r['auroc_poly'])} | {f(r['aupr_mono'])} | {f(r['aupr_poly'])} | {t} |\n"
        )
    out.append("\nPublished reference (different, random split): InCTRL 0.872 AUROC on ELPV with 8 shots.\n\n")
    out.append("## Against the targets\n\n")
    if best_lw:
        out.append(
            f"- Target: best linewatch AUROC >= 0.92 -> **{best_lw['auroc']:.3f}** ({best_lw['method']}): "
            f"{'met' if best_lw['auroc'] >= 0.92 else 'NOT met'}.\n"
        )
    if best_lw and best_peer:
        beat = all(best_lw["auroc"] > p["auroc"] for p in peers)
        out.append(
            f"- Target: above every peer -> best peer {best_peer['method']} {best_peer['auroc']:.3f}: "
            f"{'met' if beat else 'NOT met'}.\n"
        )
    out.append("\n## Models and notes\n\n")
    out.extend(C.model_lines(res["models"]))
    for k, v in res["notes"].items():
        out.append(f"- {k}: {v}\n")
    out.append(
        "- s / image: scoring time per test image on this machine (encode / residual / nearest-neighbour search; "
        "model training and EfficientNet feature extraction excluded), measured while other jobs shared the 2 cores.\n"
    )
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000, help="training steps if no checkpoint can be reused")
    ap.add_argument("--no-train", action="store_true", help="only reuse checkpoints found under benchmarks/out/")
    ap.add_argument("--model", action="append", help="LABEL=CHECKPOINT_DIR (repeatable; label 'linewatch...' = shipped)")
    ap.add_argument("--ae-steps", type=int, default=1500)
    ap.add_argument("--coreset", type=int, default=5000)
    ap.add_argument("--no-effnet", action="store_true", help="skip the EfficientNet-based PatchCore")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    res = run(args)
    cmd = C.command_line("bench_anomaly", argv)
    C.write_results(NAME, report(res, cmd), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
