"""Replay the promotion gate's reconstruction check on a finished soak: how much do two nightly models differ?

The gate compares a candidate's DDIM reconstruction error with the champion's on the same calibration images
(``pipeline.training.gate``, ``recon_tolerance``). For every nightly of a soak (``benchmarks.soak``) that had a
champion, this loads both models (the candidate's and its parent's checkpoint folders, as the nightly's record names
them), reconstructs the candidate's calibration images (its bundle's ``calibration.parquet``, in order) with the
gate's settings, and reports per nightly:

* ``gate_ratio``: candidate / champion on the first ``recon_images`` images, the gate's own comparison; it
  reproduces the ``recon_mse`` the bundle's ``gate.json`` recorded for both models (``max_rel_diff``);
* ``ratio``: the same on the first ``--images`` images (whether the gate's few images speak for the calibration set);
* whether the candidate was promoted.

The log-ratio standard deviation over the nightlies is the spread between two ordinary nightly models that
``recon_tolerance`` must clear (a champion on the good side of it otherwise refuses ordinary candidates for days).
Models with a pretrained encoder need their backbone features and are refused with a message. Nothing is written
under the soak's home.

Command::

    python -m benchmarks.gate_replay --name soak_s44 [--images 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common as C

__all__ = ["GateReplayError", "main", "nightly_pairs", "replay_gate"]


class GateReplayError(Exception):
    """A soak or a model the replay cannot use (one line for the user)."""


def nightly_pairs(home: Path) -> list[dict[str, Any]]:
    """The soak's nightlies that compared a candidate with a champion: day, versions and both model folders."""
    path = home / "soak_log.jsonl"
    if not path.is_file():
        raise GateReplayError(f"no soak log under {home}: run the soak first")
    folders: dict[str, Path] = {}
    pairs = []
    for line in path.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        res = (rec.get("result") or {}).get("retrain") if rec.get("command") == "nightly" else None
        if not isinstance(res, dict) or not res.get("version") or not res.get("model_dir"):
            continue
        version, parent = str(res["version"]), res.get("parent_version")
        folders[version] = Path(res["model_dir"])
        if parent is not None and str(parent) in folders:
            pairs.append({"day": rec["day"], "version": version, "parent": str(parent),
                          "promoted": bool(res.get("promoted")), "candidate_dir": folders[version],
                          "champion_dir": folders[str(parent)]})
    return pairs


def _pair_ratios(settings: Any, pair: dict[str, Any], gate: Any, seed: int, n_images: int) -> dict[str, Any]:
    """One nightly: the gate's ratio (replayed and as recorded) and the ratio on ``n_images``."""
    import pandas as pd

    from models.checkpoint import load_checkpoint
    from pipeline.handoff.bundle import BUNDLE_DIR, CALIBRATION_FILE
    from pipeline.training.evaluation import reconstruction_errors
    from pipeline.training.retrain import load_images

    cand, champ = load_checkpoint(pair["candidate_dir"]), load_checkpoint(pair["champion_dir"])
    for ckpt in (cand, champ):
        if getattr(getattr(ckpt.model.cfg, "encoder", None), "kind", "down") == "pretrained":
            raise GateReplayError(f"v{pair['version']}: a pretrained encoder needs its backbone features; not replayed")
    cal = pd.read_parquet(pair["candidate_dir"] / BUNDLE_DIR / CALIBRATION_FILE)
    x = load_images(settings, cal.iloc[:max(n_images, gate.recon_images)], cand.preprocess)
    a = reconstruction_errors(cand.model, x, steps=gate.recon_steps, seed=seed)
    b = reconstruction_errors(champ.model, x, steps=gate.recon_steps, seed=seed)
    k = gate.recon_images
    recorded = json.loads((pair["candidate_dir"] / BUNDLE_DIR / "gate.json").read_text())
    rec_c, rec_p = recorded["candidate"]["recon_mse"], recorded["champion"]["recon_mse"]
    return {"day": pair["day"], "version": pair["version"], "parent": pair["parent"], "promoted": pair["promoted"],
            "gate_ratio": float(a[:k].mean() / b[:k].mean()), "recorded_ratio": rec_c / rec_p,
            "max_rel_diff": max(abs(a[:k].mean() / rec_c - 1.0), abs(b[:k].mean() / rec_p - 1.0)),
            "ratio": float(a[:n_images].mean() / b[:n_images].mean()), "n_images": int(min(n_images, len(a)))}


def replay_gate(home: Path, n_images: int = 64) -> dict[str, Any]:
    """Every nightly's reconstruction ratios (:func:`_pair_ratios`) and their log standard deviations."""
    from threadpoolctl import threadpool_limits

    from benchmarks.drift_replay import soak_config, soak_settings
    from pipeline.training.retrain import retrain_config

    saved = soak_config(home)
    cfg = retrain_config(**(saved.get("retrain") or {}))
    pairs = nightly_pairs(home)
    with tempfile.TemporaryDirectory(prefix="gate_replay-") as tmp, threadpool_limits(limits=saved.get("threads")):
        settings = soak_settings(home, Path(tmp))
        rows = [_pair_ratios(settings, p, cfg.gate, cfg.seed, n_images) for p in pairs]
    out: dict[str, Any] = {"home": str(home), "recon_images": cfg.gate.recon_images, "recon_steps": cfg.gate.recon_steps,
                           "n_images": n_images, "nightlies": rows}
    for key in ("gate_ratio", "ratio"):
        logs = np.log([r[key] for r in rows])
        out[f"{key}_log_sd"] = float(logs.std(ddof=1)) if logs.size > 1 else math.nan
        out[f"{key}_range"] = [float(np.exp(logs.min())), float(np.exp(logs.max()))] if logs.size else []
    return out


def report(run: dict[str, Any]) -> None:
    """Print one line per nightly and the spread."""
    print(f"{'day':>4} {'v':>4} {'parent':>6} {'promoted':>8} {'gate ratio':>10} {'recorded':>9} "
          f"{'ratio@' + str(run['n_images']):>10}")
    for r in run["nightlies"]:
        print(f"{r['day']:>4} {r['version']:>4} {r['parent']:>6} {r['promoted']!s:>8} {r['gate_ratio']:>10.4f} "
              f"{r['recorded_ratio']:>9.4f} {r['ratio']:>10.4f}")
    print(f"log-ratio sd: gate ({run['recon_images']} images) {run['gate_ratio_log_sd']:.3f}, "
          f"{run['n_images']} images {run['ratio_log_sd']:.3f} over {len(run['nightlies'])} nightlies")


def main(argv: list[str] | None = None) -> int:
    """Command line: replay the soak's gate comparisons; exit 1 when one does not reproduce the recorded values."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="the soak (benchmarks/out/soak/NAME)")
    ap.add_argument("--images", type=int, default=64, help="calibration images of the wider ratio (default 64)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    args = ap.parse_args(argv)
    if args.images < 1:
        print("gate_replay: --images must be >= 1")
        return 2
    try:
        run = replay_gate(C.OUT / "soak" / args.name, args.images)
    except GateReplayError as exc:
        print(f"gate_replay: {exc}")
        return 2
    report(run)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(run, indent=1, default=str))
    return 0 if all(r["max_rel_diff"] < 1e-4 for r in run["nightlies"]) else 1


if __name__ == "__main__":
    sys.exit(main())
