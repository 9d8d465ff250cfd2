"""Latent-quality benchmark on ELPV: linear probes on z and a disentanglement indicator.

Protocol (the InfoDiffusion paper's latent-quality protocol, applied to ELPV):

* Data: the deterministic lot-level pools of ``pipeline.line.elpv.split_pools(seed=0)``. Models train on the
  **train-pool functional cells** (p = 0) only; all probes run on the **calibration + held-out** pools, cells from
  lots the models never saw.
* Models (same preset, same number of steps, same seed, same data order):
  InfoDiffusion (lambda = 0.1, zeta = 1: MMD prior term) and the DiffAE ablation (lambda = 0, zeta = 0: no prior
  term, deterministic encoder). Baseline: PCA on the model-resolution pixels, fit on the same training cells, with the
  same dimension d.
* Probes: 5-fold stratified CV logistic regression on standardised codes (``StandardScaler`` fit on the train folds,
  ``LogisticRegression``): cell type mono vs poly (accuracy, AUROC); defective (p >= 2/3) vs functional (p = 0)
  (AUROC; cells with p = 1/3 are left out). A second, stricter variant groups the folds by lot (no near-duplicate
  neighbour cell across train/test folds).
* Disentanglement indicator (TAD-like): for each measurable property (mean intensity, contrast, sharpness, dark
  fraction; ``pipeline.latent.properties``) the largest |Pearson correlation| with a single axis and its gap to the second
  largest; the summed gap is the score (higher = each property lives in one axis).

Run: ``.venv/bin/python -m benchmarks.bench_latent_quality [--steps N]``; checkpoints are kept under
``benchmarks/out/latent_quality/`` (git-ignored) and reused by later runs with the same steps (``--retrain`` forces).
``--lambda`` and ``--mmd-bandwidth`` (``LossConfig.mmd_bandwidth``) change the InfoDiffusion variant only; a
non-default value adds ``_lam<L>`` / ``_bw<B>`` to its checkpoint folder, so runs never share a folder.
Results: ``benchmarks/results/bench_latent_quality.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "out" / "latent_quality"
RESULTS = ROOT / "benchmarks" / "results" / "bench_latent_quality.md"
PROPERTIES = ("mean_intensity", "contrast", "sharpness", "dark_fraction")
MACHINE = "2-core CPU, 24 GiB, no GPU"
DEFAULT_LAMBDA = 0.1
DEFAULT_BANDWIDTH = "reference"
TARGETS = {"mono_poly_acc": 0.98, "defect_auroc": 0.90}


# --- data ------------------------------------------------------------------------------------------------------
def load_pools(seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """ELPV images (N, 300, 300) uint8 and the pool table (index, prob, type, lot, pool)."""
    from pipeline.line.elpv import load_elpv, split_pools

    data = load_elpv()
    pools = split_pools(seed=seed)
    return data.images, pools


# --- models ----------------------------------------------------------------------------------------------------
def variants(lam: float = DEFAULT_LAMBDA, bandwidth: str = DEFAULT_BANDWIDTH) -> dict[str, tuple[float, float, str]]:
    """The two trained variants: name -> (lambda_mmd, zeta, mmd_bandwidth). The first is InfoDiffusion."""
    name = f"InfoDiffusion ({lam:g}, 1)"
    if bandwidth != DEFAULT_BANDWIDTH:
        name = f"InfoDiffusion ({lam:g}, 1, bw {bandwidth})"
    return {name: (lam, 1.0, bandwidth), "DiffAE ablation (0, 0)": (0.0, 0.0, DEFAULT_BANDWIDTH)}


def checkpoint_dir(preset: str, lam: float, bandwidth: str, steps: int, seed: int) -> Path:
    """Folder of one variant's checkpoint; non-default lambda / bandwidth get a suffix (no collision)."""
    slug = "infodiffusion" if lam > 0 else "diffae"
    if lam > 0 and lam != DEFAULT_LAMBDA:
        slug += f"_lam{lam:g}"
    if bandwidth != DEFAULT_BANDWIDTH:
        slug += f"_bw{bandwidth}"
    return OUT_DIR / f"{preset}_{slug}_s{steps}_seed{seed}"


def train_variant(name: str, lam: float, zeta: float, data, args, bandwidth: str = DEFAULT_BANDWIDTH,
                  features=None) -> Path:
    """Train (or reuse) one model variant; returns its checkpoint folder.

    ``features`` (N, F) are the training cells' pooled backbone features, for a ``"pretrained"`` encoder preset.
    """
    import torch

    from models import get_preset, load_checkpoint, train

    out = checkpoint_dir(args.preset, lam, bandwidth, args.steps, args.seed)
    if args.retrain and out.exists():
        import shutil

        shutil.rmtree(out)
    if train_info(out).get("steps") == args.steps:
        load_checkpoint(out)  # fails loudly if the folder is damaged
        print(f"[{name}] reusing {out}", file=sys.stderr)
        return out
    preset = get_preset(args.preset)
    loss = dataclasses.replace(preset.model.loss, lambda_mmd=lam, zeta=zeta, mmd_bandwidth=bandwidth)
    preset = dataclasses.replace(preset, model=dataclasses.replace(preset.model, loss=loss))
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = train(
        preset,
        data,
        out,
        steps=args.steps,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
        seed=args.seed,
        device=args.device,
        resume=True,  # an interrupted run continues from its last checkpoint (same total steps, same schedule)
        features=features,
    )
    secs = time.perf_counter() - t0
    meta = {"steps": int(result.step), "seconds": secs, "images_per_s": float(result.images_per_s)}
    (out / "bench_train.json").write_text(json.dumps(meta, indent=2))
    print(
        f"[{name}] trained {result.step} steps in {secs:.0f} s ({result.images_per_s:.1f} img/s)",
        file=sys.stderr,
    )
    return out


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def train_info(ckpt_dir: Path) -> dict:
    """The ``bench_train.json`` written after training (empty if the checkpoint came from elsewhere)."""
    p = ckpt_dir / "bench_train.json"
    return json.loads(p.read_text()) if p.exists() else {}


def elpv_features(images: np.ndarray):
    """Pooled backbone features of all ELPV cells (computed once with ``pipeline.latent.features``, then cached
    under ``benchmarks/out/features``, keyed by the backbone id)."""
    import re

    from models.backbone import BACKBONE_ID
    from pipeline.latent.features import compute_features

    slug = re.sub(r"[^\w.-]", "_", BACKBONE_ID)
    path = ROOT / "benchmarks" / "out" / "features" / f"elpv_{slug}_pooled.npy"
    if path.exists():
        pooled = np.load(path)
        if len(pooled) == len(images):
            return pooled
    t0 = time.perf_counter()
    pooled = compute_features(images).pooled
    print(f"[features] {len(images)} cells in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, pooled)
    return pooled


def encode_z(model, preprocess, images: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
    """z of cells: from their pooled backbone features for a ``"pretrained"`` encoder, else from the images."""
    import torch

    from pipeline.latent.encode import encode_images

    if getattr(model, "uses_features", False):
        model.eval()
        return model.encode(None, features=torch.from_numpy(np.asarray(features, np.float32))).numpy()
    return encode_images(model, preprocess, list(images), batch_size=128)


# --- probes ----------------------------------------------------------------------------------------------------
def probe(Z: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, seed: int = 0) -> dict[str, float]:
    """5-fold logistic-regression probe on standardised features: out-of-fold accuracy and AUROC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if groups is None:
        folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed).split(Z, y)
    else:
        folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed).split(Z, y, groups)
    proba = np.zeros(len(y))
    for tr, te in folds:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        clf.fit(Z[tr], y[tr])
        proba[te] = clf.predict_proba(Z[te])[:, 1]
    return {"acc": float(accuracy_score(y, proba >= 0.5)), "auroc": float(roc_auc_score(y, proba))}


def disentanglement(Z: np.ndarray, props: pd.DataFrame) -> dict[str, tuple[float, float, int]]:
    """Per property: (best single-axis |corr|, gap to the second best, best axis)."""
    Zc = (Z - Z.mean(0)) / (Z.std(0) + 1e-12)
    out = {}
    for name in props.columns:
        p = props[name].to_numpy(dtype=float)
        p = (p - p.mean()) / (p.std() + 1e-12)
        corr = np.abs(Zc.T @ p / len(p))
        order = np.argsort(corr)[::-1]
        second = corr[order[1]] if len(order) > 1 else 0.0
        out[name] = (float(corr[order[0]]), float(corr[order[0]] - second), int(order[0]))
    return out


def measure_properties(images: np.ndarray) -> pd.DataFrame:
    """The four properties of the indicator (``pipeline.latent.properties.measure``)."""
    from pipeline.latent.properties import measure

    return measure(images, list(PROPERTIES))


def evaluate(
    Z: np.ndarray, types: np.ndarray, probs: np.ndarray, lots: np.ndarray, props: pd.DataFrame
) -> dict:
    """All probe metrics and the disentanglement indicator for one representation."""
    mono = (types == "mono").astype(int)
    mp = probe(Z, mono)
    mp_lot = probe(Z, mono, groups=lots)
    sel = (probs == 0) | (probs >= 2 / 3)
    defect = (probs[sel] >= 2 / 3).astype(int)
    de = probe(Z[sel], defect)
    de_lot = probe(Z[sel], defect, groups=lots[sel])
    dis = disentanglement(Z, props)
    return {
        "mono_poly_acc": mp["acc"],
        "mono_poly_auroc": mp["auroc"],
        "defect_auroc": de["auroc"],
        "mono_poly_acc_lot": mp_lot["acc"],
        "defect_auroc_lot": de_lot["auroc"],
        "tad": float(sum(v[1] for v in dis.values())),
        "z_std_mean": float(Z.std(0).mean()),
        "z_std_min": float(Z.std(0).min()),
        "z_std_max": float(Z.std(0).max()),
        "dis": dis,
    }


# --- report ----------------------------------------------------------------------------------------------------
def write_report(rows: dict[str, dict], ctx: dict) -> str:
    """Render the markdown report."""
    lines = [
        "# Latent quality on ELPV (linear probes on z, disentanglement indicator)",
        "",
        f"- command: `{ctx['command']}`",
        (f"- machine: {MACHINE} (shared with other jobs while it ran: timings are indicative only)"
         if ctx["device"] == "cpu" else f"- machine: torch device {ctx['device']} ({ctx['device_name']})"),
        f"- date: {ctx['date']}",
        f"- preset: `{ctx['preset']}` ({ctx['image_size']} px, d = {ctx['d']}), budget {ctx['steps']} steps x batch "
        f"{ctx['batch_size']} per model when trained here, seed {ctx['seed']}; torch threads {ctx['threads']}",
        f"- training cells: {ctx['n_train']} functional (p = 0) cells of the train pool (`split_pools(seed=0)`)",
        f"- probe cells: {ctx['n_eval']} cells of the calibration + held-out pools ({ctx['n_mono']} mono / "
        f"{ctx['n_eval'] - ctx['n_mono']} poly; defect task: {ctx['n_def']} defective p >= 2/3 vs "
        f"{ctx['n_func']} functional p = 0)",
        f"- training time: {ctx['train_times']}",
        *[f"- checkpoint {c}" for c in ctx["checkpoints"]],
        "",
        "Probes: 5-fold stratified CV, `StandardScaler` + `LogisticRegression` fit on the train folds, out-of-fold "
        "predictions. `lot-grouped` = same with folds grouped by lot (no neighbour cell of the same module in the "
        "train and test folds). TAD-like = sum over the four properties of (best single-axis |corr| - second best).",
        "",
        "| representation | mono/poly acc | mono/poly AUROC | defect AUROC | mono/poly acc (lot-grouped) | "
        "defect AUROC (lot-grouped) | TAD-like |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['mono_poly_acc']:.3f} | {r['mono_poly_auroc']:.3f} | {r['defect_auroc']:.3f} | "
            f"{r['mono_poly_acc_lot']:.3f} | {r['defect_auroc_lot']:.3f} | {r['tad']:.3f} |"
        )
    lines += ["", "Per property: best single-axis |corr| / gap to the second-best axis (best axis).", ""]
    lines.append("| representation | " + " | ".join(PROPERTIES) + " |")
    lines.append("|---|" + "---|" * len(PROPERTIES))
    for name, r in rows.items():
        cells = [f"{r['dis'][p][0]:.2f} / {r['dis'][p][1]:.2f} (z_{r['dis'][p][2]})" for p in PROPERTIES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Scale of the codes: per-axis std over the probe cells, mean (min - max) over the d axes.", ""]
    lines += [
        f"- {name}: {r['z_std_mean']:.3f} ({r['z_std_min']:.3f} - {r['z_std_max']:.3f})"
        for name, r in rows.items()
        if "z_std_mean" in r
    ]
    info, diffae = rows[list(rows)[0]], rows[list(rows)[1]]
    lines += ["", "Targets:", ""]
    checks = [
        ("InfoDiffusion mono/poly accuracy >= 0.98", info["mono_poly_acc"] >= TARGETS["mono_poly_acc"]),
        ("InfoDiffusion defect AUROC >= 0.90", info["defect_auroc"] >= TARGETS["defect_auroc"]),
        ("InfoDiffusion >= DiffAE on mono/poly accuracy", info["mono_poly_acc"] >= diffae["mono_poly_acc"]),
        ("InfoDiffusion >= DiffAE on defect AUROC", info["defect_auroc"] >= diffae["defect_auroc"]),
        ("InfoDiffusion > DiffAE on the TAD-like indicator", info["tad"] > diffae["tad"]),
    ]
    lines += [f"- [{'x' if ok else ' '}] {text}: **{'met' if ok else 'not met'}**" for text, ok in checks]
    if ctx.get("note"):
        lines += ["", ctx["note"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=3000,
                        help="training steps per model (same for both; default 3000, about 8 min per model on one core)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu",
                        help="torch device for training and encoding: cpu (default) or cuda (e.g. --preset standard)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: on shared, oversubscribed cores 2 threads spin)"
    )
    parser.add_argument("--infodiffusion", default=None, metavar="CKPT", help="evaluate this checkpoint, no training")
    parser.add_argument("--diffae", default=None, metavar="CKPT", help="evaluate this checkpoint, no training")
    parser.add_argument(
        "--lambda", dest="lam", type=float, default=DEFAULT_LAMBDA, help="lambda_mmd of the InfoDiffusion variant"
    )
    parser.add_argument(
        "--mmd-bandwidth",
        default=DEFAULT_BANDWIDTH,
        choices=("reference", "dim"),
        help="MMD kernel bandwidth of the InfoDiffusion variant (LossConfig.mmd_bandwidth)",
    )
    parser.add_argument("--retrain", action="store_true", help="ignore checkpoints saved by an earlier run")
    parser.add_argument("--out", default=str(RESULTS), help="markdown results file")
    args = parser.parse_args(argv)

    import torch

    from models import get_preset, load_checkpoint, to_model_input

    torch.set_num_threads(args.threads)
    images, pools = load_pools(0)
    train_idx = pools.index[(pools["pool"] == "train") & (pools["prob"] == 0)].to_numpy()
    eval_mask = pools["pool"].isin(["calibration", "heldout"]).to_numpy()
    eval_idx = np.flatnonzero(eval_mask)
    preset = get_preset(args.preset)
    spec = preset.preprocess
    data = to_model_input(images[train_idx], spec)
    eval_images = images[eval_idx]
    types = pools["type"].to_numpy()[eval_idx]
    probs = pools["prob"].to_numpy()[eval_idx]
    lots = pools["lot"].to_numpy()[eval_idx]
    props = measure_properties(eval_images)
    feats = elpv_features(images) if preset.model.encoder.kind == "pretrained" else None
    train_feats = None if feats is None else torch.from_numpy(feats[train_idx])

    rows: dict[str, dict] = {}
    times: list[str] = []
    ckpts: list[str] = []
    d = preset.model.latent_dim
    if args.lam <= 0:
        parser.error("--lambda must be > 0 (lambda = 0 is the DiffAE ablation, always run)")
    for name, (lam, zeta, bandwidth) in variants(args.lam, args.mmd_bandwidth).items():
        given = args.infodiffusion if lam > 0 else args.diffae
        ckpt_dir = Path(given) if given else train_variant(name, lam, zeta, data, args, bandwidth, train_feats)
        ckpt = load_checkpoint(ckpt_dir)
        d = ckpt.config.latent_dim
        Z = encode_z(ckpt.model.to(args.device), ckpt.preprocess, eval_images, None if feats is None else feats[eval_idx])
        rows[name] = evaluate(Z, types, probs, lots, props)
        info = train_info(ckpt_dir)
        loss = ckpt.config.loss
        step = info.get("steps", ckpt.meta.get("step", "?"))
        ckpts.append(f"{name}: `{_rel(ckpt_dir)}` (lambda {loss.lambda_mmd:g}, zeta {loss.zeta:g}, "
                     f"MMD bandwidth {loss.mmd_bandwidth}, step {step}, "
                     f"model id {ckpt.meta.get('model_id')})")
        if "seconds" in info:
            times.append(f"{name}: {info['seconds']:.0f} s wall ({info.get('images_per_s', 0):.1f} img/s)")
        print(f"[{name}] {json.dumps({k: v for k, v in rows[name].items() if k != 'dis'})}", file=sys.stderr)

    from sklearn.decomposition import PCA

    pca = PCA(n_components=d, random_state=args.seed).fit(data.flatten(1).numpy())
    Zp = pca.transform(to_model_input(eval_images, spec).flatten(1).numpy())
    rows[f"PCA on pixels (d = {d})"] = evaluate(Zp, types, probs, lots, props)
    if feats is not None:
        fpca = PCA(n_components=d, random_state=args.seed).fit(feats[train_idx])
        rows[f"PCA on pooled backbone features (d = {d})"] = evaluate(fpca.transform(feats[eval_idx]), types, probs,
                                                                      lots, props)

    ctx = {
        "command": "python -m benchmarks.bench_latent_quality "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "preset": args.preset,
        "image_size": spec.image_size,
        "d": d,
        "steps": args.steps,
        "batch_size": args.batch_size or preset.train.batch_size,
        "seed": args.seed,
        "threads": args.threads,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "n_train": len(train_idx),
        "n_eval": len(eval_idx),
        "n_mono": int((types == "mono").sum()),
        "n_def": int((probs >= 2 / 3).sum()),
        "n_func": int((probs == 0).sum()),
        "train_times": "; ".join(times) or "n/a (reused checkpoints without timing)",
        "checkpoints": ckpts,
        "note": f"python {platform.python_version()}, torch {torch.__version__}.",
    }
    report = write_report(rows, ctx)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
