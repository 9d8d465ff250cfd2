"""Shared pieces of the evidence benchmarks: splits, drift faults, disk caches, checkpoints, result files.

Protocol (all benchmarks): ELPV pools of ``pipeline.line.elpv.split_pools(seed=0)``, assigned by **whole lots** (modules),
which is stricter than the random splits of the published ELPV results (no near-duplicate neighbour cell of a test
cell is ever seen in training).

* training: train-pool functional cells (p = 0);
* calibration: calibration-pool functional cells (linewatch detector fitting, thresholds, drift reference);
* test: held-out functional cells against held-out p = 1 cells (p = 1/3 and 2/3 dropped, the InCTRL protocol).

Every expensive intermediate (network features, latents, residual scores) is cached under ``benchmarks/out/``
(git-ignored), keyed by what produced it, so reruns are quick.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
CACHE = OUT / "cache"
RESULTS = ROOT / "benchmarks" / "results"
MACHINE = "2-core CPU, 24 GiB, no GPU (shared with other jobs)"

#: The drift faults of the evidence issue, as (function name in ``pipeline.line.faults``, physical parameter).
DRIFT_FAULTS: dict[str, tuple[str, float]] = {
    "gain x0.9": ("gain", 0.9),
    "blur 1 px": ("blur", 1.0),
    "noise 3%": ("noise", 0.03),
    "misalign 2 deg": ("misalign", 2.0),
    "illumination 30%": ("illumination", 0.3),
}
#: Fault kind (``pipeline.line.faults.FAULTS`` / ``pipeline.latent.properties.FAULT_PROPERTIES`` key) of each drift fault.
FAULT_KIND: dict[str, str] = {
    "gain x0.9": "gain",
    "blur 1 px": "blur",
    "noise 3%": "noise",
    "misalign 2 deg": "misalign",
    "illumination 30%": "illumination",
    "product mix 40->90% mono": "product_mix",
    "defect rate 0->25% p=1": "defect_rate",
}


def log(msg: str) -> None:
    """Timestamped progress line on stderr."""
    print(f"[{dt.datetime.now(dt.UTC):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ splits
@dataclass(frozen=True)
class Splits:
    """ELPV indices (file order) of the benchmark sets, and per-cell metadata for all 2,624 cells."""

    train: np.ndarray
    calibration: np.ndarray
    test_ok: np.ndarray
    test_defect: np.ndarray
    types: np.ndarray
    probs: np.ndarray
    lots: np.ndarray

    @property
    def test(self) -> np.ndarray:
        """Held-out functional then held-out p = 1 cells."""
        return np.concatenate([self.test_ok, self.test_defect])

    @property
    def test_labels(self) -> np.ndarray:
        """1 = defective (p = 1), aligned with :attr:`test`."""
        return np.r_[np.zeros(len(self.test_ok), int), np.ones(len(self.test_defect), int)]


def get_splits(seed: int = 0) -> Splits:
    """The benchmark sets of the documented split."""
    from pipeline.line.elpv import split_pools

    t = split_pools(seed=seed)
    pool, prob = t["pool"].astype(str).to_numpy(), t["prob"].to_numpy()
    idx = t["index"].to_numpy()
    return Splits(
        train=idx[(pool == "train") & (prob == 0)],
        calibration=idx[(pool == "calibration") & (prob == 0)],
        test_ok=idx[(pool == "heldout") & (prob == 0)],
        test_defect=idx[(pool == "heldout") & (np.abs(prob - 1.0) < 1e-6)],
        types=t["type"].to_numpy().astype(str),
        probs=prob,
        lots=t["lot"].to_numpy(),
    )


def images() -> np.ndarray:
    """All ELPV images, uint8 (2624, 300, 300), read-only."""
    from pipeline.line.elpv import load_elpv

    return load_elpv().images


def apply_drift_fault(img: np.ndarray, name: str, cell: int) -> np.ndarray:
    """Apply drift fault ``name`` (a key of :data:`DRIFT_FAULTS`) to one 300 px image; noise is seeded per cell."""
    from pipeline.line import faults

    fn, v = DRIFT_FAULTS[name]
    if fn == "gain":
        return faults.gain(img, v)
    if fn == "blur":
        return faults.blur(img, v)
    if fn == "noise":
        return faults.noise(img, v, np.random.default_rng([20261127, int(cell)]))
    if fn == "misalign":
        return faults.misalign(img, v, faults.MISALIGN_OFFSET_PX_PER_DEGREE * v)
    if fn == "illumination":
        return faults.illumination(img, v)
    raise ValueError(f"unknown drift fault {name!r}: choose from {list(DRIFT_FAULTS)}")


def variant_images(idx: np.ndarray, variant: str) -> np.ndarray:
    """Images of cells ``idx``, clean (``variant="clean"``) or with a drift fault applied."""
    imgs = images()[idx]
    if variant == "clean":
        return np.ascontiguousarray(imgs)
    return np.stack([apply_drift_fault(im, variant, int(c)) for im, c in zip(imgs, idx, strict=True)])


def slug(text: str) -> str:
    """File-safe name."""
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_").lower()


def key_of(*parts: Any) -> str:
    """Short stable hash of the parts (for cache names)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached(name: str, fn: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load ``CACHE/name.npz`` or compute ``fn()`` (a dict of arrays), save it and return it."""
    path = CACHE / f"{name}.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    t0 = time.perf_counter()
    out = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")  # parallel runs never share a temp file
    np.savez(tmp, **out)
    tmp.replace(path)
    log(f"cached {name} ({time.perf_counter() - t0:.0f} s)")
    return out


# ------------------------------------------------------------------------------------------------ models
VARIANTS: dict[str, tuple[float, float]] = {"InfoDiffusion": (0.1, 1.0), "DiffAE ablation": (0.0, 0.0)}
"""Model variant -> (lambda_mmd, zeta)."""


def _loss_of(cfg_path: Path) -> tuple[str, float, float, dict[str, Any]]:
    doc = json.loads(cfg_path.read_text())
    loss = doc["model"].get("loss", {})
    return (
        str(doc["model"].get("image_size")),
        float(loss.get("lambda_mmd", -1)),
        float(loss.get("zeta", -1)),
        doc.get("meta", {}),
    )


def _steps_of(d: Path) -> int:
    """Optimiser steps behind the weights of checkpoint folder ``d`` (``meta.step``, else bench_train.json)."""
    try:
        step = json.loads((d / "config.json").read_text()).get("meta", {}).get("step")
        if step is not None:
            return int(step)
    except (ValueError, json.JSONDecodeError):
        pass
    info = d / "bench_train.json"
    return int(json.loads(info.read_text()).get("steps", 0)) if info.exists() else 0


def find_checkpoint(variant: str, image_size: int = 32, preset: str = "cpu") -> Path | None:
    """A checkpoint under ``benchmarks/out/`` of the given variant (matched on the loss weights in config.json).

    Only the shipped MMD kernel (``mmd_bandwidth="reference"``) counts, and only the encoder kind of ``preset``
    (``"pretrained"``: the frozen-backbone encoder; otherwise one that reads the image). Prefers the one trained for
    the most steps (``meta.step`` of its config.json), then the lowest training seed, then the path (deterministic).
    Models of a soak (``benchmarks/out/soak/``) never count: they trained on the soak's line days, whose cells are the
    benchmarks' test cells too.
    """
    lam, zeta = VARIANTS[variant]
    want_features = preset == "pretrained"
    found: list[tuple[int, int, str, Path]] = []
    for cfg in OUT.rglob("config.json"):
        d = cfg.parent
        if d.name.startswith(".") or not (d / "weights.safetensors").exists() or "anomaly_tiles" in d.parts \
                or d.relative_to(OUT).parts[0] == "soak":
            continue  # tile models (bench_anomaly_tiles) are not whole-cell models; soak models saw the test cells
        try:
            size, l_, z_, meta = _loss_of(cfg)
            model_doc = json.loads(cfg.read_text())["model"]
            bandwidth = model_doc.get("loss", {}).get("mmd_bandwidth", "reference")
            reads_features = model_doc.get("encoder", {}).get("kind") == "pretrained"
        except (KeyError, ValueError, json.JSONDecodeError, AttributeError):
            continue
        if size != str(image_size) or abs(l_ - lam) > 1e-9 or abs(z_ - zeta) > 1e-9 or bandwidth != "reference" \
                or reads_features != want_features:
            continue
        seed = int(meta.get("train", {}).get("seed", 0) or 0)
        found.append((-_steps_of(d), seed, str(d), d))
    return min(found)[3] if found else None


def get_checkpoint(variant: str, splits: Splits, steps: int = 1000, threads: int = 1, preset: str = "cpu") -> Path:
    """Reuse a checkpoint of ``variant`` from ``benchmarks/out/``, else train ``preset`` on the training cells."""
    found = find_checkpoint(variant, preset=preset)
    if found is not None:
        log(f"[{variant}] reusing checkpoint {found.relative_to(ROOT)}")
        return found
    import torch

    from models import get_preset, to_model_input, train

    lam, zeta = VARIANTS[variant]
    spec = get_preset(preset)
    loss = dataclasses.replace(spec.model.loss, lambda_mmd=lam, zeta=zeta)
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, loss=loss))
    out = OUT / "evidence" / f"{preset}_{slug(variant)}_s{steps}_seed0"
    torch.set_num_threads(threads)
    log(f"[{variant}] training {preset} preset for {steps} steps on {len(splits.train)} training cells -> {out}")
    x = to_model_input(images()[splits.train], spec.preprocess)
    from pipeline.latent.features import image_features

    feats = image_features(spec.model, images()[splits.train])  # None for an encoder that reads the image
    t0 = time.perf_counter()
    res = train(spec, x, out, steps=steps, progress=False, seed=0, resume=True, features=feats)
    secs = time.perf_counter() - t0
    (out / "bench_train.json").write_text(json.dumps({"steps": int(res.step), "seconds": secs}, indent=2))
    return out


def resolve_models(specs: list[str] | None, splits: Splits, no_train: bool, steps: int,
                   preset: str = "cpu") -> dict[str, Path | None]:
    """Models to benchmark: ``LABEL=DIR`` specs, or by default the newest InfoDiffusion (label ``linewatch``) and
    DiffAE-ablation (label ``DiffAE ablation``) checkpoints under ``benchmarks/out/`` (trained if missing).

    A label starting with ``linewatch`` marks the shipped model; the others are ablations.
    """
    if specs:
        out: dict[str, Path | None] = {}
        for spec in specs:
            label, sep, path = spec.partition("=")
            if not sep or not Path(path).is_dir():
                raise ValueError(f"--model takes LABEL=CHECKPOINT_DIR with an existing folder, got {spec!r}")
            out[label.strip()] = Path(path).resolve()
        return out
    labels = {"InfoDiffusion": "linewatch", "DiffAE ablation": "DiffAE ablation"}
    if preset != "cpu":
        labels = {k: f"{v} ({preset})" for k, v in labels.items()}
    return {
        labels[v]: (find_checkpoint(v, preset=preset) if no_train else get_checkpoint(v, splits, steps=steps,
                                                                                     preset=preset))
        for v in VARIANTS
    }


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """What a checkpoint is (for the results header)."""
    size, lam, zeta, meta = _loss_of(path / "config.json")
    steps = _steps_of(path)
    return {
        "path": str(path.relative_to(ROOT)),
        "image_size": size,
        "lambda_mmd": lam,
        "zeta": zeta,
        "steps": steps,
        "model_id": meta.get("model_id", "?"),
    }


def model_lines(models: dict[str, dict[str, Any]]) -> list[str]:
    """Report lines naming each model used (path, size, lambda, zeta, steps, id) from :func:`checkpoint_meta`."""
    return [
        f"- {k}: `{v['path']}` ({v['image_size']} px, lambda = {v['lambda_mmd']}, zeta = {v['zeta']}, "
        f"{v['steps']} steps, model id {v['model_id']})\n"
        for k, v in models.items()
    ]


def encode(ckpt: Any, imgs: np.ndarray, batch: int = 128) -> np.ndarray:
    """Latents z (N, d) of uint8 images with a loaded checkpoint (a ``"pretrained"`` encoder: via its backbone)."""
    import torch

    from models import to_model_input

    if getattr(ckpt.model, "uses_features", False):
        from pipeline.latent.encode import encode_images

        return encode_images(ckpt.model, ckpt.preprocess, list(imgs)).astype(np.float64)

    out = []
    with torch.no_grad():
        for s in range(0, len(imgs), batch):
            out.append(ckpt.model.encode(to_model_input(imgs[s : s + batch], ckpt.preprocess)).numpy())
    return np.concatenate(out).astype(np.float64)


# ------------------------------------------------------------------------------------------------ results
def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reproduces a benchmark run: ``.venv/bin/python -m benchmarks.<module> <args>``."""
    args = sys.argv[1:] if argv is None else argv
    return f".venv/bin/python -m benchmarks.{module}" + "".join(" " + a for a in args)


def header(name: str, command: str) -> str:
    """Markdown header of a results file."""
    return (
        f"# {name}\n\nCommand: `{command}`  \nMachine: {MACHINE}  \n"
        f"Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC\n\n"
    )


def write_results(name: str, markdown: str, data: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.md`` and ``<name>.json`` (for plotting); returns the markdown path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    md = RESULTS / f"{name}.md"
    md.write_text(markdown)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=_json_default))
    log(f"wrote {md.relative_to(ROOT)}")
    return md


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def fmt(v: Any, nd: int = 3) -> str:
    """Table cell: numbers to ``nd`` decimals, None/NaN as 'n/a'."""
    if v is None:
        return "n/a"
    if isinstance(v, float | np.floating):
        return "n/a" if not np.isfinite(v) else f"{v:.{nd}f}"
    return str(v)


# ------------------------------------------------------------------------------------------------ cached features
_EFFNET: Any = None


def effnet_features(idx: np.ndarray, variant: str = "clean", patches: bool = False, chunk: int = 128) -> dict:
    """EfficientNet-Lite0 features of cells ``idx`` (clean or faulted), cached on disk in chunks.

    Returns:
        ``{"global": (N, 1280) float32, "patches": (N, 152, 18, 18) float16 (only when ``patches``)}``.
    """
    global _EFFNET
    idx = np.asarray(idx, dtype=np.int64)
    parts: dict[str, list[np.ndarray]] = {"global": [], "patches": []}
    for s in range(0, len(idx), chunk):
        sub = idx[s : s + chunk]
        name = f"effnet/{slug(variant)}_{'p' if patches else 'g'}_{key_of(sub.tolist())}"

        def compute(sub: np.ndarray = sub) -> dict[str, np.ndarray]:
            global _EFFNET
            from benchmarks.baselines import EffNetLite0

            if _EFFNET is None:
                _EFFNET = EffNetLite0()
            g, p = _EFFNET.features(variant_images(sub, variant))
            return {"global": g, "patches": p} if patches else {"global": g}

        got = cached(name, compute)
        parts["global"].append(got["global"])
        if patches:
            parts["patches"].append(got["patches"])
    out = {"global": np.concatenate(parts["global"])}
    if patches:
        out["patches"] = np.concatenate(parts["patches"])
    return out


def precompute_effnet() -> None:
    """Fill the EfficientNet feature cache for every set the benchmarks use (test sets first)."""
    sp = get_splits()
    effnet_features(sp.test, patches=True)
    effnet_features(sp.calibration)
    effnet_features(sp.train, patches=True)
    for name in DRIFT_FAULTS:
        effnet_features(sp.test_ok, name)
    log("EfficientNet features complete")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="precompute cached features of the evidence benchmarks")
    ap.add_argument("--effnet", action="store_true", help="EfficientNet-Lite0 features of all benchmark sets")
    if ap.parse_args().effnet:
        precompute_effnet()
