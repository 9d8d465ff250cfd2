"""Attribution benchmark: does a single-factor fault get the same top axis, and does its card name the fault?

Protocol:

* Data: ELPV lot-level pools (``pipeline.line.elpv.split_pools(seed=0)``). The model trains on the train pool; the
  reference is the calibration pool (latents + ``pipeline.latent.properties`` measured on the 300 px originals); windows are
  drawn from the held-out pool (``--window`` cells per window, drawn at random without replacement within a window).
* Faults (``pipeline.line.faults.apply_fault``, severity ``--severity``): gain, blur, noise, misalign, vignetting, plus
  a control (no fault). ``--windows`` windows each, i.i.d.-null ``DriftDetector`` (alpha 0.05).
* Per fault: detection rate; among detected windows, the share naming the modal top axis (target >= 90 %); the modal
  axis's description, and whether its best property is one the fault moves (``FAULT_PROPERTIES``).
* Also: ``pipeline.latent.properties.measure`` time on 1,000 ELPV images, and ``axis_cards`` time for the named axes.

Run: ``.venv/bin/python -m benchmarks.axes_attribution [--preset cpu --steps 400 | --ckpt DIR]``.
Checkpoints go to ``benchmarks/out/axes_attribution/`` (reused on the next run).
Results: ``benchmarks/results/axes_attribution.md``.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "axes_attribution"
RESULTS = ROOT / "benchmarks" / "results" / "axes_attribution.md"
MACHINE = "2-core CPU, 24 GiB, no GPU (shared with other jobs)"
FAULT_KINDS = ("control", "gain", "blur", "noise", "misalign", "vignetting")


def properties_speed(images: np.ndarray) -> float:
    from pipeline.latent.properties import measure

    big = np.ascontiguousarray(np.concatenate([images] * (1000 // len(images) + 1))[:1000])
    measure(big[:64])  # warm-up
    t = time.perf_counter()
    measure(big)
    return time.perf_counter() - t


def get_model(args, images: np.ndarray, pools: pd.DataFrame):
    import torch

    from models import get_preset, load_checkpoint, to_model_input, train

    if args.ckpt:
        ck = load_checkpoint(args.ckpt)
        return ck.model, ck.preprocess, ck.meta.get("model_id"), f"checkpoint {args.ckpt}"
    out = OUT / f"{args.preset}-{args.steps}"
    if not (out / "weights.safetensors").exists():
        preset = get_preset(args.preset)
        tr = pools.loc[pools["pool"] == "train", "index"].to_numpy()
        X = to_model_input(images[tr], preset.preprocess)
        t = time.perf_counter()
        train(preset, X, out, steps=args.steps, seed=0, progress=False, device="cpu")
        print(f"trained {args.preset} for {args.steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
    ck = load_checkpoint(out)
    torch.manual_seed(0)
    return (
        ck.model,
        ck.preprocess,
        ck.meta.get("model_id"),
        f"preset {args.preset}, {args.steps} steps (train pool)",
    )


def encode(model, preprocess, imgs: np.ndarray, batch: int = 256) -> np.ndarray:
    import torch

    from models import to_model_input

    out = []
    with torch.no_grad():
        for s in range(0, len(imgs), batch):
            out.append(model.encode(to_model_input(imgs[s : s + batch], preprocess)).numpy())
    return np.concatenate(out).astype(np.float64)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--ckpt", default=None, help="use this checkpoint instead of training one")
    ap.add_argument("--window", type=int, default=60)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--severity", type=float, default=1.0)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    from pipeline.analysis.axes import attribute, axis_cards, axis_correlations, describe_axes
    from pipeline.analysis.drift import DriftDetector
    from pipeline.latent.properties import FAULT_PROPERTIES, measure
    from pipeline.line.elpv import load_elpv, split_pools
    from pipeline.line.faults import apply_fault

    data = load_elpv()
    images = data.images
    pools = split_pools(seed=0)
    t_props = properties_speed(images[:500])
    print(f"properties: 1000 images in {t_props:.2f} s", flush=True)

    model, preprocess, model_id, model_desc = get_model(args, images, pools)
    model.eval()
    cal = pools.loc[pools["pool"] == "calibration", "index"].to_numpy()
    held = pools.loc[pools["pool"] == "heldout", "index"].to_numpy()
    Z_ref = encode(model, preprocess, images[cal])
    props_ref = measure(images[cal])
    corr = axis_correlations(Z_ref, props_ref)
    descs = {d.axis: d for d in describe_axes(corr)}
    det = DriftDetector(alpha=0.05, n_permutations=100, random_state=0).fit(Z_ref, model_id=model_id)

    rng = np.random.default_rng(0)
    rows = []
    for kind in FAULT_KINDS:
        for w in range(args.windows):
            idx = rng.choice(held, size=args.window, replace=False)
            imgs = images[idx]
            if kind != "control":
                frng = np.random.default_rng(1000 + w)
                imgs = np.stack([apply_fault(im, kind, args.severity, rng=frng) for im in imgs])
            res = det.test(encode(model, preprocess, imgs), model_id=model_id)
            att = attribute(res, descs)
            rows.append(
                {
                    "fault": kind,
                    "window": w,
                    "detected": res.detected,
                    "top_axis": att.top_axis,
                    "top_share": att.top_share,
                    "fired": ",".join(res.fired),
                }
            )
        print(f"{kind}: done", flush=True)
    df = pd.DataFrame(rows)

    summary = []
    named_axes = set()
    for kind in FAULT_KINDS:
        sub = df[df["fault"] == kind]
        detd = sub[sub["detected"] & sub["top_axis"].notna()]
        if len(detd):
            counts = collections.Counter(int(a) for a in detd["top_axis"])
            modal, n_modal = counts.most_common(1)[0]
            d = descs[modal]
            named_axes.add(modal)
            best = d.property or d.best
            ok = (
                "-"
                if kind == "control"
                else ("yes" if d.property in FAULT_PROPERTIES.get(kind, ()) else "no")
            )
            second_ok = (
                "-"
                if kind == "control" or d.second_best is None
                else ("yes" if d.second_best[0] in FAULT_PROPERTIES.get(kind, ()) else "no")
            )
            summary.append(
                {
                    "fault": kind,
                    "detected": f"{sub['detected'].mean():.0%}",
                    "same top axis": f"{n_modal / len(detd):.0%} (axis {modal})",
                    "mean top share": f"{detd['top_share'].mean():.0%}",
                    "card description": d.text,
                    "names fault property": ok,
                    "runner-up is fault property": second_ok,
                    "best property": best,
                }
            )
        else:
            summary.append(
                {
                    "fault": kind,
                    "detected": f"{sub['detected'].mean():.0%}",
                    "same top axis": "-",
                    "mean top share": "-",
                    "card description": "-",
                    "names fault property": "-",
                    "runner-up is fault property": "-",
                    "best property": "-",
                }
            )
    summ = pd.DataFrame(summary)
    print(summ.to_string(index=False), flush=True)

    from models import to_model_input

    ref_t = to_model_input(images[cal[:3]], preprocess)
    t = time.perf_counter()
    cards = axis_cards(
        model,
        ref_t,
        Z_ref[:],
        props_ref,
        OUT / "cards",
        axes=sorted(named_axes) or [0],
        image_indices=[0, 1, 2],
        steps=20,
        model_id=model_id,
        progress=False,
    )
    t_cards = time.perf_counter() - t

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    cmd = "    .venv/bin/python -m benchmarks.axes_attribution " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    lines = [
        "# axes_attribution",
        "",
        f"Command:\n\n{cmd}\n",
        f"Machine: {MACHINE}. Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        f"Model: {model_desc}; model_id {model_id}; latent_dim {Z_ref.shape[1]}. Reference: calibration pool "
        f"({len(cal)} cells). Windows: {args.windows} per fault, {args.window} held-out cells each, severity "
        f"{args.severity}; DriftDetector i.i.d. null, alpha 0.05.",
        "",
        summ.to_markdown(index=False) if hasattr(summ, "to_markdown") and _has_tabulate() else _md(summ),
        "",
        "Target: same top axis in >= 90 % of detected windows and the card names the fault's property.",
        "",
        f"`pipeline.latent.properties.measure`, all {len(props_ref.columns)} properties, 1,000 ELPV 300x300 images: "
        f"{t_props:.2f} s.",
        f"`axis_cards`, {len(cards)} axes x 3 images x 5 quantiles, 20 DDIM steps: {t_cards:.1f} s.",
        "",
        "Axis descriptions on the reference set:",
        "",
        *[f"- {descs[a].text}" for a in sorted(descs)],
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print(f"wrote {RESULTS}")


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def _md(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


if __name__ == "__main__":
    main()
