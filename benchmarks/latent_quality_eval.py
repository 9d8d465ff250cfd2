"""Latent probes of given checkpoints (no training): ``bench_latent_quality``'s probes on each one's z.

Run: ``.venv/bin/python -m benchmarks.latent_quality_eval --name NAME LABEL=CHECKPOINT_DIR [...]``
Writes ``benchmarks/results/<NAME>.md`` (+ ``.json``). Same cells and probes as ``bench_latent_quality`` (calibration
+ held-out pools; 5-fold logistic probes, plain and lot-grouped); a ``"pretrained"`` encoder reads the cells' pooled
backbone features (``bench_latent_quality.elpv_features``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common as C

METRICS = (("mono_poly_acc", "mono/poly acc"), ("defect_auroc", "defect AUROC"),
           ("mono_poly_acc_lot", "mono/poly acc (lot-grouped)"), ("defect_auroc_lot", "defect AUROC (lot-grouped)"),
           ("tad", "TAD-like"))


def run(models: dict[str, Path]) -> dict[str, Any]:
    """Probe metrics per checkpoint."""
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
    idx = np.flatnonzero(pools["pool"].isin(["calibration", "heldout"]).to_numpy())
    types, probs, lots = (pools[c].to_numpy()[idx] for c in ("type", "prob", "lot"))
    props = measure_properties(images[idx])
    rows = []
    for label, d in models.items():
        ck = load_checkpoint(d)
        feats = elpv_features(images)[idx] if ck.model.uses_features else None
        r = evaluate(encode_z(ck.model, ck.preprocess, images[idx], feats), types, probs, lots, props)
        rows.append({"label": label, "dir": str(d), "step": ck.meta.get("step"), "model_id": ck.meta.get("model_id"),
                     **{k: float(r[k]) for k, _ in METRICS}})
        C.log(f"{label}: " + ", ".join(f"{k} {r[k]:.3f}" for k, _ in METRICS))
    return {"rows": rows}


def report(res: dict[str, Any], name: str, command: str) -> str:
    """Markdown table, one row per checkpoint."""
    out = [C.header(name, command), (__doc__ or "").split("\n\n", 1)[1] + "\n"]
    out.append("| model | checkpoint | " + " | ".join(lab for _, lab in METRICS) + " |\n")
    out.append("|---|---|" + "---|" * len(METRICS) + "\n")
    for r in res["rows"]:
        out.append(f"| {r['label']} | `{r['dir']}` (model id {r['model_id']}) | "
                   + " | ".join(f"{r[k]:.3f}" for k, _ in METRICS) + " |\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--name", required=True, help="results file name (benchmarks/results/<name>.md)")
    ap.add_argument("models", nargs="+", metavar="LABEL=CHECKPOINT_DIR")
    args = ap.parse_args(argv)
    bad = [m for m in args.models if "=" not in m]
    if bad:
        ap.error(f"expected LABEL=CHECKPOINT_DIR, got {bad[0]!r}")
    models = {m.split("=", 1)[0]: Path(m.split("=", 1)[1]) for m in args.models}
    res = run(models)
    C.write_results(args.name, report(res, args.name, C.command_line("latent_quality_eval", argv)), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
