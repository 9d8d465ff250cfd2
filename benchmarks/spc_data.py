"""The data of ``bench_spc``: per-cell features of every ELPV cell under every camera fault, and lot-ordered streams.

Features (cached under ``benchmarks/out/cache/spc``): the image statistics of ``pipeline.latent.properties``, the
latents and diffusion residuals of a cpu-preset model, and per-cell anomaly scores cross-fitted by lots, each for the
clean captures and for every image fault, with the simulator's read noise. Streams: whole lots drawn with
replacement, in file order, with the simulator's product-mix and defect-rate faults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common as C
from pipeline.latent.properties import CHART_CHANNELS

WINDOW = 100
STATS: tuple[str, ...] = CHART_CHANNELS
"""The image properties the monitor's chart follows (``pipeline.latent.properties.CHART_CHANNELS``)."""
#: Image faults: label -> (``pipeline.line.faults`` function, parameter).
IMAGE_FAULTS: dict[str, tuple[str, float]] = {
    "gain x0.95": ("gain", 0.95),
    "gain x0.9": ("gain", 0.9),
    "blur 1 px": ("blur", 1.0),
    "noise 3%": ("noise", 0.03),
    "misalign 2 deg": ("misalign", 2.0),
    "vignetting 0.2": ("vignetting", 0.2),
}
POPULATION_FAULTS = ("defect rate 27->57% p=1", "product mix 41->81% mono")
VARIANTS = ("clean", *IMAGE_FAULTS)
CAPTURE_NOISE_DN = 1.0
NAME = "bench_spc"


# ------------------------------------------------------------------------------------------------ captures
def capture(img: np.ndarray, variant: str, cell: int) -> np.ndarray:
    """One capture of ELPV cell ``cell`` through a camera with ``variant`` (a key of :data:`IMAGE_FAULTS` or
    ``"clean"``): the fault, then the simulator's read noise. The noise draws depend on the cell only, so the clean
    and faulty captures of a cell share them (paired)."""
    from pipeline.line import faults

    rng = np.random.default_rng([7, int(cell)])
    out = img
    if variant != "clean":
        kind, value = IMAGE_FAULTS[variant]
        out = faults.apply_value(img, kind, value, rng)
    return faults.noise(out, CAPTURE_NOISE_DN / 255.0, rng)


def variant_stack(cells: np.ndarray, variant: str) -> np.ndarray:
    """Captures (N, 300, 300) uint8 of ``cells`` under ``variant``."""
    imgs = C.images()
    return np.stack([capture(imgs[c], variant, int(c)) for c in cells])


# ------------------------------------------------------------------------------------------------ features
def image_stats() -> dict[str, np.ndarray]:
    """The :data:`STATS` of every ELPV cell under every variant, {variant slug: (2624, len(STATS))} (cached)."""
    from pipeline.latent.properties import measure

    def comp() -> dict[str, np.ndarray]:
        cells = np.arange(len(C.images()))
        out = {}
        for v in VARIANTS:
            C.log(f"[{NAME}] image statistics, {v}")
            out[C.slug(v)] = np.concatenate([measure(variant_stack(cells[s : s + 256], v), list(STATS)).to_numpy()
                                             for s in range(0, len(cells), 256)])
        return out

    return C.cached(f"spc/stats_{C.key_of(list(STATS), list(VARIANTS), CAPTURE_NOISE_DN)}", comp)


def latents_and_scores(ckpt_dir: Path) -> dict[str, np.ndarray]:
    """z (2624, d) and diffusion residuals of every cell and variant under one model (cached per model id).

    Residuals with the shipped recipe (``pipeline.training.retrain.ScoringConfig``) but one noise field (a third of the
    cost): ``{"z_<variant>": ..., "r_<variant>": ...}``.
    """
    import torch

    from models import load_checkpoint, to_model_input
    from pipeline.training.retrain import ScoringConfig

    sc = ScoringConfig(seeds=(0,))
    mid = C.checkpoint_meta(ckpt_dir)["model_id"]
    cells = np.arange(len(C.images()))

    def comp() -> dict[str, np.ndarray]:
        torch.set_num_threads(1)
        ck = load_checkpoint(ckpt_dir)
        res = sc.residual_detector(ck.model)
        out = {}
        for v in VARIANTS:
            C.log(f"[{NAME}] latents and residuals, {v}")
            zs, rs = [], []
            for s in range(0, len(cells), 128):
                z, r = res.latents_and_residuals(to_model_input(variant_stack(cells[s : s + 128], v), ck.preprocess))
                zs.append(z)
                rs.append(r)
            out[f"z_{C.slug(v)}"], out[f"r_{C.slug(v)}"] = np.concatenate(zs), np.concatenate(rs)
        return out

    return C.cached(f"spc/zr_{mid}_{C.key_of(list(sc.t_stars), sc.steps, list(VARIANTS), CAPTURE_NOISE_DN)}", comp)


def anomaly_scores(zr: dict[str, np.ndarray], lots: np.ndarray, k: int = 25) -> dict[str, np.ndarray]:
    """Per-cell anomaly scores of every variant, cross-fitted by lots (the monitor's detector, two folds).

    The ``ConditionalResidual`` fitted on the clean captures of one half of the lots (seeded) scores every variant
    of the other half's cells, so no cell is scored by a detector that saw it.
    """
    from pipeline.training.retrain import make_detector

    ids = np.unique(lots)
    half = np.isin(lots, np.random.default_rng(20261204).permutation(ids)[: len(ids) // 2])
    n_res = zr["r_clean"].shape[1]
    out = {C.slug(v): np.empty(len(lots)) for v in VARIANTS}
    for fit, score in ((half, ~half), (~half, half)):
        X = np.column_stack([zr["z_clean"][fit], zr["r_clean"][fit]])
        det = make_detector(n_res, k=k, n_fit=int(fit.sum())).fit(X)
        for v in VARIANTS:
            s = C.slug(v)
            out[s][score] = det.score(np.column_stack([zr[f"z_{s}"][score], zr[f"r_{s}"][score]]))
    return out


@dataclass(frozen=True)
class Data:
    """Per-cell features of every variant and the cells' metadata (file order)."""

    stats: dict[str, np.ndarray]
    z: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    lots: np.ndarray
    types: np.ndarray
    defective: np.ndarray
    model: dict[str, Any]
    notes: tuple[str, ...] = ()

    def cells(self, variant: str, tail_threshold: float) -> np.ndarray:
        """The chart's per-image statistics (2624, 10 + d + 1): image statistics, z, above-tail indicator."""
        s = C.slug(variant)
        return np.column_stack([self.stats[s], self.z[s], (self.scores[s] > tail_threshold).astype(float)])

    @property
    def names(self) -> list[str]:
        """Names of the columns of :meth:`cells`."""
        return [*STATS, *(f"z_{i}" for i in range(self.z["clean"].shape[1])), "score_tail"]


def load_data(steps: int, no_train: bool) -> Data:
    """Every feature the benchmark needs (computed once, cached)."""
    from pipeline.line.elpv import load_elpv

    data = load_elpv()
    ckpt = C.find_checkpoint("InfoDiffusion") if no_train else C.get_checkpoint("InfoDiffusion", C.get_splits(),
                                                                                  steps=steps)
    if ckpt is None:
        raise SystemExit("no InfoDiffusion checkpoint under benchmarks/out/ (run without --no-train to train one)")
    zr = latents_and_scores(ckpt)
    lots = np.asarray(data.lot)
    notes = (f"z and residuals: {zr['source']}.",) if "source" in zr else ()
    return Data(image_stats(), {C.slug(v): zr[f"z_{C.slug(v)}"] for v in VARIANTS}, anomaly_scores(zr, lots), lots,
                np.asarray(data.types).astype(str), np.asarray(data.probs) >= 1.0 - 1e-9, C.checkpoint_meta(ckpt), notes)


# ------------------------------------------------------------------------------------------------ streams
def mix_stream(runs: list[np.ndarray], run_types: np.ndarray, n_rows: int, mono_share: float,
               rng: np.random.Generator) -> np.ndarray:
    """A stream of whole lots whose type is mono with probability ``mono_share`` (the simulator's product mix)."""
    by = {t: [r for r, rt in zip(runs, run_types, strict=True) if rt == t] for t in ("mono", "poly")}
    out, n = [], 0
    while n < n_rows:
        pool = by["mono"] if rng.random() < mono_share else by["poly"]
        r = pool[rng.integers(len(pool))]
        out.append(r)
        n += len(r)
    return np.concatenate(out)[:n_rows]


def defect_stream(pos: np.ndarray, data: Data, rate: float, rng: np.random.Generator) -> np.ndarray:
    """The cells a lot-ordered stream gives when a share ``rate`` of them is drawn defective (p = 1).

    As the simulator does: every slot of a lot draws its class, takes the lot's next cell of that class, and when
    the lot has run out of that class borrows a random cell of the same type and class from all lots.
    """
    out = np.empty_like(pos)
    lots = data.lots[pos]
    starts = np.r_[0, np.flatnonzero((np.diff(pos) != 1) | (lots[1:] != lots[:-1])) + 1, len(pos)]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        run = pos[a:b]
        queue = {d: list(run[data.defective[run] == d]) for d in (True, False)}
        for i in range(b - a):
            d = bool(rng.random() < rate)
            if queue[d]:
                out[a + i] = queue[d].pop(0)
            else:
                pool = np.flatnonzero((data.types == data.types[run[0]]) & (data.defective == d))
                out[a + i] = pool[rng.integers(len(pool))]
    return out


@dataclass(frozen=True)
class FaultRun:
    """One fault stream: the cells of every window and the variant each window is captured under."""

    pos: np.ndarray
    variants: tuple[str, ...]


def fault_run(label: str, data: Data, runs: list[np.ndarray], run_types: np.ndarray, onset: int, n: int,
              rng: np.random.Generator) -> FaultRun:
    """A stream of ``n`` windows, in control for ``onset`` windows, then under fault ``label`` (or none)."""
    from pipeline.analysis.spc import resample_stream

    head = onset * WINDOW
    if label.startswith("product mix"):
        pos = np.r_[resample_stream(runs, head, rng), mix_stream(runs, run_types, (n - onset) * WINDOW, 0.81, rng)]
        return FaultRun(pos, ("clean",) * n)
    pos = resample_stream(runs, n * WINDOW, rng)
    if label.startswith("defect rate"):
        return FaultRun(np.r_[pos[:head], defect_stream(pos[head:], data, 0.57, rng)], ("clean",) * n)
    if label == "no fault":
        return FaultRun(pos, ("clean",) * n)
    return FaultRun(pos, ("clean",) * onset + (label,) * (n - onset))


def run_matrix(F: dict[str, np.ndarray], run: FaultRun) -> np.ndarray:
    """Per-image statistics (n * WINDOW, K) of a fault run, each window captured under its variant."""
    out = np.empty((len(run.pos), next(iter(F.values())).shape[1]))
    for w, v in enumerate(run.variants):
        sl = slice(w * WINDOW, (w + 1) * WINDOW)
        out[sl] = F[C.slug(v)][run.pos[sl]]
    return out
