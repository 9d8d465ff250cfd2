"""Persistent small shifts: control charts across windows and a golden-sample camera check, on lot-ordered ELPV
streams, against peer online detectors at the same in-control average run length (ARL0).

**Streams.** All 2,624 ELPV cells with their derived lots (``pipeline.line.elpv``: 44 modules). A stream is whole lots
drawn with replacement (cells in file order, as the simulator replays them), cut into windows of 100 cells: each
window carries real module-to-module variation. Every capture carries the simulator's 1-grey-level read noise.
Faults (``pipeline.line.faults``, as the simulator applies them) start at a window boundary after 20 in-control windows:
gain x0.95 and x0.9, blur 1 px, noise 3 %, misalignment 2 deg, vignetting 0.2; and the two population faults, the
defect rate (severity 1: the share of p = 1 cells from the lots' own 27 % to 57 %, drawn as the simulator draws
them) and the product mix (mono lots 41 % -> 81 %).

**linewatch chart** (``pipeline.analysis.spc``): per-window means of the image statistics of ``pipeline.latent.properties`` (10
channels), the 32 latent axes of a cpu-preset model, and the share of cells above the Phase I's 90th anomaly-score
percentile; multivariate EWMA plus fault-pattern charts, each cell centred on its product type's in-control mean.
**Phase I / Phase II**: every replicate fits the chart on its own first ``--phase1`` in-control windows (limits from
a lot bootstrap of them, calibrated to ARL0 = 200 windows with the default margin, the centre's estimation error included), then runs it on
fresh windows of the same stream. The fault patterns are measured on the Phase I cells by applying each camera fault
to them (the same functions the faults come from: the pattern charts are matched to these faults; the MEWMA is not).

**Peers** on the same windows and Phase I, at the same ARL0: the monitor's per-window drift test
(``pipeline.analysis.drift.DriftDetector``, lot null, z + quality channels + anomaly scores, alpha = 1 / ARL0);
alibi-detect's ``CVMDriftOnline`` (and ``LSDDDriftOnline``) on the same per-window statistic vectors, with the
Phase I windows as reference and ERT = ARL0, and again at ERT = 3 x ARL0 (``--peer-erts``): their null treats
windows as independent draws, so on lot-structured streams their realised ARL falls far below the ERT, and the
larger ERT is the peer nearer the chart's realised ARL (the results list each one's realised ARL). They run in their own virtualenv
(``make peers``; alibi-detect needs numpy < 2 and is BSL-licensed, so it is never a dependency of linewatch).

**Golden samples** (``pipeline.analysis.golden``): 5 functional cells per stream, re-imaged at the start of every shift
through the current camera state, with re-imaging jitter (excitation 1 % sd, placement 0.1 deg and 0.5 px sd, read
noise 1 grey level): false alarms per shift, and the share of streams whose first shift after a fault's onset
raises "camera/optics changed: ..." naming the fault's statistic.

Run: ``.venv/bin/python -m benchmarks.bench_spc`` (features cached under ``benchmarks/out/cache/spc``; the peers
need ``make peers``). Writes ``benchmarks/results/bench_spc.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common as C
from benchmarks.spc_data import (
    CAPTURE_NOISE_DN,
    IMAGE_FAULTS,
    POPULATION_FAULTS,
    STATS,
    VARIANTS,
    WINDOW,
    Data,
    FaultRun,
    capture,
    fault_run,
    load_data,
    run_matrix,
)

NAME = "bench_spc"
ARL0 = 200.0
RAW = C.OUT / "bench_spc_raw.json"
PEERS_PY = Path(os.environ.get("LINEWATCH_PEERS_PYTHON", str(C.ROOT / ".venv-peers" / "bin" / "python")))


# ------------------------------------------------------------------------------------------------ the chart
@dataclass
class Rep:
    """One replicate: its Phase I cells, the per-image statistics of every variant, and the chart fitted on them."""

    index: int
    p1: np.ndarray
    F: dict[str, np.ndarray]
    chart: Any
    runs: list[np.ndarray]
    run_types: np.ndarray
    fit_seconds: float


def signatures(data: Data, p1: np.ndarray) -> dict[str, Any]:
    """The camera-fault patterns as the monitor measures them (``pipeline.monitoring.charts.fault_signatures``):
    each fault applied to 120 Phase I cells spread evenly over it, their statistics under the model."""
    from models import load_checkpoint
    from pipeline.monitoring.charts import SIGNATURE_IMAGES, fault_signatures, model_statistics

    ck = load_checkpoint(C.find_checkpoint("InfoDiffusion"))
    cells = p1[np.unique(np.linspace(0, len(p1) - 1, SIGNATURE_IMAGES).round().astype(int))]
    images = [capture(C.images()[c], "clean", int(c)) for c in cells]
    return fault_signatures(images, lambda ims: model_statistics(ck, ims))


def make_rep(data: Data, index: int, phase1: int, patterns: bool = True) -> Rep:
    """Phase I: ``phase1`` in-control windows of a fresh stream; the monitor's chart fitted on them."""
    import pandas as pd

    from pipeline.analysis.spc import lot_runs, resample_stream
    from pipeline.monitoring.charts import ChartSettings, fit_chart

    rng = np.random.default_rng([20261204, index])
    runs = lot_runs(len(data.lots), data.lots)
    run_types = np.array([data.types[r[0]] for r in runs])
    p1 = resample_stream(runs, phase1 * WINDOW, rng)
    threshold = float(np.quantile(data.scores["clean"][p1], 0.9))
    F = {C.slug(v): data.cells(v, threshold) for v in VARIANTS}
    sig = signatures(data, p1) if patterns else None
    t0 = time.perf_counter()
    settings = ChartSettings(arl0=ARL0, window=WINDOW, seed=index)
    chart = fit_chart("bench", data.model["model_id"], pd.DataFrame(F["clean"][p1], columns=data.names),
                      strata=data.types[p1], lots=data.lots[p1], settings=settings, signatures=sig)
    return Rep(index, p1, F, chart, runs, run_types, time.perf_counter() - t0)


def deviations(chart: Any, X: np.ndarray, types: np.ndarray) -> np.ndarray:
    """Window deviation vectors (T, K) of consecutive windows of per-image rows, as the chart computes them."""
    from pipeline.analysis.spc import window_means

    code = {s: i for i, s in enumerate(chart.strata)}
    g = np.array([code[t] for t in types])
    return window_means(X - chart.centers[g], np.arange(len(X)), WINDOW)


def in_control(rep: Rep, data: Data, n_windows: int) -> dict[str, Any]:
    """Run lengths of the chart on ``n_windows`` fresh in-control windows (restarted after every alarm)."""
    from pipeline.analysis.spc import ewma, resample_stream, run_alarms

    rng = np.random.default_rng([20261204, rep.index, 1])
    pos = resample_stream(rep.runs, n_windows * WINDOW, rng)
    V = deviations(rep.chart, rep.F["clean"][pos], data.types[pos])
    lam = rep.chart.config.lam
    alarms = run_alarms(ewma(rep.chart.clipped(V), lam), rep.chart.statistic, rep.chart.limit, lam)
    ends = np.r_[-1, alarms]
    return {"windows": n_windows, "alarms": len(alarms), "run_lengths": np.diff(ends).tolist(),
            "censored": int(n_windows - 1 - ends[-1]), "V": V}


def replay(rep: Rep, data: Data, run: FaultRun, onset: int, tag: str) -> dict[str, Any]:
    """Run the chart window by window (``SpcChart.update``, the monitor's path) over a fault stream.

    A false alarm before the onset restarts the chart, as a plant would after checking it. Returns the delay (the
    number of faulty windows seen when the alarm came; None if none came) and the alarm's text.
    """
    chart = rep.chart
    chart.reset()
    X = run_matrix(rep.F, run)
    for w in range(len(run.variants)):
        sl = slice(w * WINDOW, (w + 1) * WINDOW)
        point = chart.update(f"{tag}-{w}", X[sl], strata=data.types[run.pos[sl]])
        if point.alarm and w < onset:
            chart.reset()
        elif point.alarm:
            return {"delay": w - onset + 1, "text": point.text, "top": point.top.name if point.top else None,
                    "pattern": point.pattern}
    return {"delay": None, "text": "", "top": None, "pattern": None}


# ------------------------------------------------------------------------------------------------ peers
def window_test_rep(rep: Rep, data: Data, runs: dict[str, list[FaultRun]], onset: int, n_ic: int,
                    ref_cells: int) -> dict[str, Any]:
    """The monitor's per-window drift test at alpha = 1 / ARL0 on the same windows (fewer of them: it is slower).

    Reference: the first ``ref_cells`` Phase I cells, with their lots, product types, quality channels and
    cross-fitted anomaly scores, as the monitor's reference has them.
    """
    from pipeline.analysis.drift import DriftDetector
    from pipeline.analysis.spc import resample_stream
    from pipeline.latent.properties import QUALITY_CHANNELS

    q = [STATS.index(c) for c in QUALITY_CHANNELS if c in STATS]  # the channels the cached features hold
    ref = rep.p1[:ref_cells]
    det = DriftDetector(alpha=1.0 / ARL0, null="lot", n_calibration=1000, random_state=rep.index)
    det.fit(data.z["clean"][ref], ref_scores=data.scores["clean"][ref], ref_lots=data.lots[ref],
            ref_strata=data.types[ref], ref_quality=data.stats["clean"][ref][:, q])
    keep = det.rows_to_test(WINDOW)

    def flagged(cells: np.ndarray, variant: str) -> bool:
        s, c = C.slug(variant), cells[keep]
        return bool(det.test(data.z[s][c], cur_quality=data.stats[s][c][:, q], cur_scores=data.scores[s][c]).detected)

    pos = resample_stream(rep.runs, n_ic * WINDOW, np.random.default_rng([20261204, rep.index, 1]))
    ic = [flagged(pos[w * WINDOW : (w + 1) * WINDOW], "clean") for w in range(n_ic)]
    delays: dict[str, list[int | None]] = {}
    for label, rs in runs.items():
        delays[label] = []
        for r in rs:
            d = next((w - onset + 1 for w in range(onset, len(r.variants))
                      if flagged(r.pos[w * WINDOW : (w + 1) * WINDOW], r.variants[w])), None)
            delays[label].append(d)
    return {"ic_windows": n_ic, "ic_alarms": int(np.sum(ic)), "delays": delays}


def peer_inputs(rep: Rep, data: Data, ic: dict[str, Any], runs: dict[str, list[FaultRun]], path: Path) -> None:
    """The window vectors the alibi-detect peers see (the chart's own, stratum-centred), saved for their venv."""
    arrays = {"ref": deviations(rep.chart, rep.F["clean"][rep.p1], data.types[rep.p1]), "ic": ic["V"]}
    for i, (label, rs) in enumerate(runs.items()):
        arrays[f"fault_{i}"] = np.stack([deviations(rep.chart, run_matrix(rep.F, r), data.types[r.pos]) for r in rs])
        arrays[f"label_{i}"] = np.array(label)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def run_peers(inputs: list[Path], onset: int, out: Path, lsdd: bool, erts: Sequence[float] = (ARL0,)
              ) -> dict[str, Any]:
    """Run ``benchmarks/spc_peers.py`` in the peers' virtualenv at every ERT; {} with a reason when it is not there.

    Keys: ``"<detector>"`` at ERT = ARL0, ``"<detector> (ERT <e>)"`` at the others. On lot-structured streams a
    peer's realised ARL falls short of its ERT (its null is windows drawn independently), so a larger ERT is the
    peer at about the chart's realised ARL.
    """
    if not PEERS_PY.exists():
        return {"skipped": f"no peers virtualenv at {PEERS_PY} (run `make peers`)"}
    peers: dict[str, Any] = {}
    for ert in erts:
        path = out.with_name(f"{out.stem}_ert{ert:g}{out.suffix}")
        cmd = [str(PEERS_PY), str(C.ROOT / "benchmarks" / "spc_peers.py"), "--ert", str(ert), "--onset", str(onset),
               "--out", str(path), *(["--lsdd"] if lsdd else []), *map(str, inputs)]
        C.log(f"[{NAME}] peers: {' '.join(cmd[2:6])} ...")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"skipped": f"peers failed at ERT {ert:g}: {proc.stderr.strip().splitlines()[-1:]}"}
        suffix = "" if ert == ARL0 else f" (ERT {ert:g})"
        peers.update({f"{kind}{suffix}": v for kind, v in json.loads(path.read_text()).items()})
    return peers


# ------------------------------------------------------------------------------------------------ golden samples
GOLDEN_CELLS = 5
GOLDEN_CANDIDATES = 40
GOLDEN_CLEAN = 40
GOLDEN_FAULTY = 6
#: Re-imaging jitter of a golden capture: excitation (gain sd), placement (rotation sd in deg, shift sd in px).
GOLDEN_JITTER = {"gain_sd": 0.01, "rotation_sd": 0.1, "shift_sd": 0.5}
#: The statistic a golden alert should name for each image fault.
GOLDEN_EXPECTED = {"gain": "mean_intensity", "blur": "detail_ratio", "noise": "noise_level",
                   "misalign": "rotation_deg", "vignetting": "mean_intensity"}


def golden_capture(img: np.ndarray, variant: str, rng: np.random.Generator) -> np.ndarray:
    """One re-imaging of a golden cell: placement jitter (and a misalignment fault) in one move, excitation jitter
    and camera fault, then read noise."""
    from pipeline.line import faults

    j = GOLDEN_JITTER
    fn, v = IMAGE_FAULTS.get(variant, ("none", 0.0))
    deg = rng.normal(0, j["rotation_sd"]) + (v if fn == "misalign" else 0.0)
    dx = rng.normal(0, j["shift_sd"]) + (faults.MISALIGN_OFFSET_PX_PER_DEGREE * v if fn == "misalign" else 0.0)
    out = faults.misalign(img, deg, dx, offset_y_px=rng.normal(0, j["shift_sd"]))
    out = faults.gain(out, max(1e-3, rng.normal(1.0, j["gain_sd"])) * (v if fn == "gain" else 1.0))
    if fn == "blur":
        out = faults.blur(out, v)
    elif fn == "noise":
        out = faults.noise(out, v, rng)
    elif fn == "vignetting":
        out = faults.vignetting(out, v)
    return faults.noise(out, CAPTURE_NOISE_DN / 255.0, rng)


def golden_bank(ckpt_dir: Path) -> dict[str, np.ndarray]:
    """Captures of 40 candidate golden cells (functional, from every lot): 40 clean ones each and 6 under every
    image fault; their golden statistics and z (cached)."""
    import torch

    from models import load_checkpoint
    from pipeline.analysis.golden import GOLDEN_STATISTICS
    from pipeline.latent.properties import measure
    from pipeline.line.elpv import load_elpv

    names = [s.name for s in GOLDEN_STATISTICS]
    data = load_elpv()
    ok = np.flatnonzero(np.asarray(data.probs) == 0)
    cells = np.sort(np.random.default_rng(20261205).choice(ok, GOLDEN_CANDIDATES, replace=False))

    def comp() -> dict[str, np.ndarray]:
        torch.set_num_threads(1)
        ck = load_checkpoint(ckpt_dir)
        out: dict[str, np.ndarray] = {"cells": cells}
        for v in VARIANTS:
            n = GOLDEN_CLEAN if v == "clean" else GOLDEN_FAULTY
            C.log(f"[{NAME}] golden captures, {v}")
            imgs = np.stack([golden_capture(data.images[c], v, np.random.default_rng([11, int(c), i, len(v)]))
                             for c in cells for i in range(n)])
            out[f"s_{C.slug(v)}"] = measure(imgs, names).to_numpy().reshape(len(cells), n, len(names))
            out[f"z_{C.slug(v)}"] = C.encode(ck, imgs).reshape(len(cells), n, -1)
        return out

    mid = C.checkpoint_meta(ckpt_dir)["model_id"]
    key = C.key_of(cells.tolist(), GOLDEN_JITTER, GOLDEN_CLEAN, GOLDEN_FAULTY, list(VARIANTS), names)
    return C.cached(f"spc/golden_{mid}_{key}", comp)


def golden_streams(bank: dict[str, np.ndarray], model_id: str, n_streams: int) -> dict[str, Any]:
    """Golden checks on ``n_streams`` lines of 5 golden cells each, over the bank's 40 in-control shifts.

    Every shift from the fourth on is tested (in-control false alarms). At a random shift of each stream, every
    image fault is tried as the first shift after its onset (``GoldenCheck.test``, which leaves the baselines as
    they are), so detection is measured at every baseline length the line goes through.
    """
    from pipeline.analysis.golden import GoldenCapture, GoldenCheck

    rng = np.random.default_rng(20261206)
    names = [f"G{int(c)}" for c in bank["cells"]]
    out: dict[str, Any] = {"shifts": 0, "alarms": 0, "faults": {f: [] for f in IMAGE_FAULTS}}

    def caps(pick: np.ndarray, v: str, idx: dict[int, int]) -> list[Any]:
        s = C.slug(v)
        return [GoldenCapture(names[c], dict(zip(("mean_intensity", "detail_ratio", "noise_level", "rotation_deg"),
                                                 bank[f"s_{s}"][c, idx[c]].tolist(), strict=True)),
                              tuple(bank[f"z_{s}"][c, idx[c]].tolist())) for c in pick]

    for s in range(n_streams):
        pick = rng.choice(len(names), GOLDEN_CELLS, replace=False)
        order = {int(c): rng.permutation(GOLDEN_CLEAN) for c in pick}
        chk = GoldenCheck(f"golden-{s}", [names[c] for c in pick], model_id=model_id)
        onset = int(rng.integers(4, GOLDEN_CLEAN))
        for t in range(GOLDEN_CLEAN):
            if t == onset:
                for f in IMAGE_FAULTS:
                    res = chk.test(f"{f} @ {t}", caps(pick, f, {int(c): int(rng.integers(GOLDEN_FAULTY)) for c in pick}))
                    out["faults"][f].append({"detected": res.detected, "text": res.text, "baseline": min(t, 20),
                                             "fired": [x.family for x in res.fired]})
            res = chk.update(f"shift {t}", caps(pick, "clean", {int(c): int(order[int(c)][t]) for c in pick}))
            if res.tested:
                out["shifts"] += 1
                out["alarms"] += int(res.detected)
    return out


# ------------------------------------------------------------------------------------------------ summaries
def delay_summary(delays: list[int | None]) -> dict[str, Any]:
    """Median and 90th percentile of detection delays (windows; None = not detected), and shares detected."""
    a = np.array([np.inf if d is None else float(d) for d in delays])
    if not len(a):
        return {"n": 0}
    return {"n": int(len(a)), "median": float(np.median(a)), "p90": float(np.quantile(a, 0.9, method="higher")),
            "within_1": float(np.mean(a <= 1)), "within_2": float(np.mean(a <= 2)), "within_5": float(np.mean(a <= 5)),
            "detected": float(np.mean(np.isfinite(a)))}


def arl_summary(windows: int, alarms: int, run_lengths: list[int]) -> dict[str, Any]:
    """ARL (windows / alarms, restarting after each) and the distribution of complete run lengths."""
    rl = np.asarray(run_lengths, float)
    out: dict[str, Any] = {"windows": int(windows), "alarms": int(alarms),
                           "arl": float(windows / alarms) if alarms else float("inf"), "runs": int(len(rl))}
    if len(rl):
        q = np.quantile(rl, [0.05, 0.1, 0.25, 0.5, 0.75, 0.9])
        out.update({f"q{int(p * 100):02d}": float(v) for p, v in zip((0.05, 0.1, 0.25, 0.5, 0.75, 0.9), q,
                                                                       strict=True)})
        out["share_below_50"] = float(np.mean(rl < 50))
    return out


def arl_ci(windows: list[int], alarms: list[int], n_boot: int = 4000, seed: int = 0) -> list[float]:
    """90 % interval of the pooled ARL over replicates (each replicate's own Phase I), by resampling replicates."""
    w, a = np.asarray(windows, float), np.asarray(alarms, float)
    if len(w) < 2:
        return [float("nan"), float("nan")]
    idx = np.random.default_rng(seed).integers(len(w), size=(n_boot, len(w)))
    arl = w[idx].sum(axis=1) / np.maximum(a[idx].sum(axis=1), 1.0)
    return [float(v) for v in np.quantile(arl, [0.05, 0.95])]


def chart_rep_result(rep: Rep, data: Data, runs: dict[str, list[FaultRun]], onset: int, n_ic: int) -> dict[str, Any]:
    """The chart's in-control run lengths and its delays and alarm texts on every fault stream of one replicate."""
    ic = in_control(rep, data, n_ic)
    faults = {label: [replay(rep, data, r, onset, f"{rep.index}-{i}-{k}") for k, r in enumerate(rs)]
              for i, (label, rs) in enumerate(runs.items())}
    return {"ic": {k: v for k, v in ic.items() if k != "V"}, "faults": faults, "V_ic": ic["V"],
            "limit": rep.chart.limit, "arl0_fit": rep.chart.arl0_fit, "fit_s": rep.fit_seconds}


def ablation_rep(rep: Rep, data: Data, runs: dict[str, list[FaultRun]], onset: int, n_ic: int,
                 phase1: int) -> dict[str, Any]:
    """The same replicate with the MEWMA alone (no fault patterns): what the chart finds without knowing them."""
    alone = make_rep(data, rep.index, phase1, patterns=False)
    out = chart_rep_result(alone, data, runs, onset, n_ic)
    out.pop("V_ic")
    return out


# ------------------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every replicate of the chart, the ablation and the per-window test; the alibi-detect peers; golden cells."""
    data = load_data(args.steps, args.no_train)
    labels = ["no fault", *IMAGE_FAULTS, *POPULATION_FAULTS]
    reps, ablation, window_test, peer_files = [], [], [], []
    for r in range(args.reps):
        t0 = time.perf_counter()
        rep = make_rep(data, r, args.phase1)
        rng = np.random.default_rng([20261204, r, 2])
        runs = {lab: [fault_run(lab, data, rep.runs, rep.run_types, args.onset, args.onset + args.max_delay, rng)
                      for _ in range(args.fault_streams)] for lab in labels}
        res = chart_rep_result(rep, data, runs, args.onset, args.ic_windows)
        if r < args.peer_reps:
            path = C.OUT / "spc_peers" / f"rep{r}.npz"
            peer_inputs(rep, data, {"V": res["V_ic"]}, {k: v for k, v in runs.items() if k != "no fault"}, path)
            peer_files.append(path)
        res.pop("V_ic")
        reps.append(res)
        if not args.no_ablation:
            ablation.append(ablation_rep(rep, data, runs, args.onset, args.ic_windows, args.phase1))
        if r < args.window_test_reps:
            short = {k: v[: args.window_test_streams] for k, v in runs.items() if k != "no fault"}
            short = {k: [FaultRun(x.pos[: (args.onset + args.window_test_max) * WINDOW],
                                  x.variants[: args.onset + args.window_test_max]) for x in v]
                     for k, v in short.items()}
            window_test.append(window_test_rep(rep, data, short, args.onset, args.window_test_ic, args.ref_cells))
        C.log(f"[{NAME}] replicate {r}: {time.perf_counter() - t0:.0f} s (chart fit {rep.fit_seconds:.0f} s)")
    peers = run_peers(peer_files, args.onset, C.OUT / "spc_peers" / "peers.json", args.lsdd,
                      erts=args.peer_erts) if peer_files else {}
    ckpt = C.find_checkpoint("InfoDiffusion")
    golden = golden_streams(golden_bank(ckpt), data.model["model_id"], args.golden_streams)
    return {"args": vars(args), "model": data.model, "feature_notes": list(data.notes), "labels": labels, "reps": reps, "ablation": ablation,
            "window_test": window_test, "peers": peers, "golden": golden, "names": data.names}


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """Pooled figures per method: in-control ARL and run lengths, and delay summaries per fault."""
    out: dict[str, Any] = {}

    def pooled(reps: list[dict[str, Any]]) -> dict[str, Any]:
        ic = arl_summary(sum(r["ic"]["windows"] for r in reps), sum(r["ic"]["alarms"] for r in reps),
                         [x for r in reps for x in r["ic"]["run_lengths"]])
        ic["per_rep_arl"] = [r["ic"]["windows"] / max(1, r["ic"]["alarms"]) for r in reps]
        ic["arl_ci90"] = arl_ci([r["ic"]["windows"] for r in reps], [r["ic"]["alarms"] for r in reps])
        faults = {lab: delay_summary([f["delay"] for r in reps for f in r["faults"][lab]])
                  for lab in res["labels"]}
        return {"ic": ic, "faults": faults}

    out["linewatch chart (MEWMA + fault patterns)"] = pooled(res["reps"])
    if res["ablation"]:
        out["linewatch chart, MEWMA alone"] = pooled(res["ablation"])
    if res["window_test"]:
        wt = res["window_test"]
        out["per-window drift test (the monitor's, alpha = 1/ARL0)"] = {
            "ic": arl_summary(sum(w["ic_windows"] for w in wt), sum(w["ic_alarms"] for w in wt), []),
            "faults": {lab: delay_summary([d for w in wt for d in w["delays"].get(lab, [])])
                       for lab in res["labels"] if lab != "no fault"}}
    for kind, p in (res["peers"] or {}).items():
        if kind == "skipped":
            continue
        out[f"alibi-detect {kind}"] = {"ic": arl_summary(p["ic_windows"], p["ic_alarms"], p["run_lengths"]),
                                       "faults": {lab: delay_summary(v) for lab, v in p["delays"].items()},
                                       "config_s": float(np.mean(p["config_s"]))}
    return out


def golden_summary(g: dict[str, Any]) -> dict[str, Any]:
    """False alarms per tested shift; per fault, detection in the first shift and what the alert says."""
    out: dict[str, Any] = {"shifts": g["shifts"], "alarms": g["alarms"],
                           "far": g["alarms"] / max(1, g["shifts"]), "faults": {}}
    for f, rows in g["faults"].items():
        kind = IMAGE_FAULTS[f][0]
        det = [r for r in rows if r["detected"]]
        out["faults"][f] = {
            "streams": len(rows), "detected": len(det) / max(1, len(rows)),
            "says_camera": float(np.mean([r["text"].startswith("camera/optics changed") for r in det])) if det else 0.0,
            "names_expected": float(np.mean([GOLDEN_EXPECTED[kind] in r["fired"] for r in det])) if det else 0.0,
            "example": det[0]["text"] if det else "",
        }
    return out


def _attribution(reps: list[dict[str, Any]], label: str) -> tuple[str, float, str, float, str]:
    """Most common top statistic and pattern of the detecting alarms of one fault, with shares and an example."""
    from collections import Counter

    hits = [f for r in reps for f in r["faults"][label] if f["delay"] is not None]
    if not hits:
        return "-", 0.0, "-", 0.0, ""
    top, n_top = Counter(h["top"] for h in hits).most_common(1)[0]
    pat, n_pat = Counter(h["pattern"] or "none" for h in hits).most_common(1)[0]
    return str(top), n_top / len(hits), pat, n_pat / len(hits), hits[0]["text"]


def report(res: dict[str, Any], command: str) -> str:
    """The results page."""
    from pipeline.analysis.spc import stat_label

    s, a, gs = res["summary"], res["args"], res["golden_summary"]
    lines = [C.header(NAME, command).rstrip(), "", __doc__.split("\n\n")[1], "", *_setup_lines(res), ""]
    lines += _ic_table(s) + [""] + _delay_table(s, res["labels"]) + [""]
    lines += ["## What the chart's alarm says", "",
              "| fault | top statistic (share of alarms) | pattern matched (share) | example alarm |", "|---|---|---|---|"]
    for lab in res["labels"][1:]:
        top, st, pat, sp, ex = res["attribution"][lab]
        name = stat_label(top).label if top != "-" else "-"
        lines.append(f"| {lab} | {name} ({st:.2f}) | {pat} ({sp:.2f}) | {ex} |")
    lines += ["", "## Golden samples (5 cells re-imaged at the start of every shift)", "",
              f"In-control: {gs['alarms']} false alarms in {gs['shifts']} tested shifts "
              f"(**{gs['far'] * 200:.2f} per 200 shifts**; target <= 1); {a['golden_streams']} streams of 40 shifts.",
              "", "| fault | detected in the first shift after onset | says camera/optics | names the fault's statistic "
              "| example |", "|---|---|---|---|---|"]
    for f, r in gs["faults"].items():
        lines.append(f"| {f} | {r['detected']:.3f} | {r['says_camera']:.2f} | {r['names_expected']:.2f} | "
                     f"{r['example']} |")
    lines += ["", "## Targets", "", *_target_lines(res), "", "## Notes", "", *_notes(res)]
    return "\n".join(lines) + "\n"


def _setup_lines(res: dict[str, Any]) -> list[str]:
    a, m = res["args"], res["model"]
    return [
        f"Replicates: {a['reps']} streams, each with its own Phase I of {a['phase1']} in-control windows "
        f"({a['phase1'] * WINDOW:,} cells) and {a['ic_windows']:,} in-control Phase II windows; per fault "
        f"{a['fault_streams']} streams per replicate, the fault from window {a['onset']} on, followed for "
        f"{a['max_delay']} windows. Chart statistics ({len(res['names'])}): {', '.join(STATS)}, z_0..z_"
        f"{len(res['names']) - len(STATS) - 2}, score_tail. ARL0 = {ARL0:.0f} windows of {WINDOW} cells.",
        f"Model: `{m['path']}` ({m['image_size']} px, {m['steps']} steps, model id {m['model_id']}); anomaly "
        "scores with one noise field, cross-fitted by lots.",
        f"Per-window test: {a['window_test_reps']} replicates, {a['window_test_ic']} in-control windows each, "
        f"{a['window_test_streams']} streams per fault followed for {a['window_test_max']} windows; reference = "
        f"the first {a['ref_cells']:,} Phase I cells. alibi-detect: {a['peer_reps']} replicates "
        f"({'CVM and LSDD' if a['lsdd'] else 'CVM'}).",
    ]


def _ic_table(s: dict[str, Any]) -> list[str]:
    out = ["## In control: run lengths (windows until a false alarm, restarting after each)", "",
           "| method | windows | false alarms | ARL | run length 5 % / 10 % / 25 % / 50 % / 75 % / 90 % | runs < 50 | "
           "ARL per replicate (90 % interval over replicates) |", "|---|---|---|---|---|---|---|"]
    for name, m in s.items():
        ic = m["ic"]
        q = " / ".join(f"{ic[k]:.0f}" for k in ("q05", "q10", "q25", "q50", "q75", "q90")) if "q50" in ic else "-"
        per = ", ".join(f"{x:.0f}" for x in ic.get("per_rep_arl", [])) or "-"
        if np.isfinite(ic.get("arl_ci90", [np.nan])[0]):
            per += f" ({ic['arl_ci90'][0]:.0f}-{ic['arl_ci90'][1]:.0f})"
        below = f"{ic['share_below_50']:.2f}" if "share_below_50" in ic else "-"
        lines = f"| {name} | {ic['windows']:,} | {ic['alarms']} | {ic['arl']:.0f} | {q} | {below} | {per} |"
        out.append(lines)
    return out


def _delay_table(s: dict[str, Any], labels: list[str]) -> list[str]:
    faults = [lab for lab in labels if lab != "no fault"]
    out = ["## Detection delay (faulty windows seen when the alarm comes): median / 90th percentile "
           "(share within 5)", "",
           "`inf`: not detected by then (the median is `inf` when fewer than half the streams were detected).", "",
           "| method | " + " | ".join(faults) + " |", "|---|" + "---|" * len(faults)]
    for name, m in s.items():
        cells = []
        for lab in faults:
            d = m["faults"].get(lab, {})
            cells.append("-" if not d.get("n") else f"{d['median']:.0f} / {d['p90']:.0f} ({d['within_5']:.2f})")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def _target_lines(res: dict[str, Any]) -> list[str]:
    s, gs = res["summary"], res["golden_summary"]
    lw = s["linewatch chart (MEWMA + fault patterns)"]
    ic, f = lw["ic"], lw["faults"]

    def ok(c: bool) -> str:
        return "met" if c else "**not met**"

    ci = ic.get("arl_ci90", [float("nan")] * 2)
    out = [f"- In-control ARL >= 200 windows over >= 1,000 windows: ARL {ic['arl']:.0f} over {ic['windows']:,} windows "
           f"(90 % interval over replicates {ci[0]:.0f}-{ci[1]:.0f}), median run length "
           f"{ic.get('q50', float('nan')):.0f}: {ok(ic['arl'] >= 200 and ic['windows'] >= 1000)}.",
           f"- Gain x0.9 median delay <= 5 windows: {f['gain x0.9']['median']:.0f}: {ok(f['gain x0.9']['median'] <= 5)}.",
           f"- Blur 1 px median delay <= 2 windows: {f['blur 1 px']['median']:.0f}: {ok(f['blur 1 px']['median'] <= 2)}."]
    g = gs["faults"]
    both = min(g["gain x0.95"]["detected"], g["gain x0.9"]["detected"])
    out.append(f"- Golden, gain x0.95 / x0.9 found in the first shift in >= 95 % of streams: {g['gain x0.95']['detected']:.3f}"
               f" / {g['gain x0.9']['detected']:.3f}: {ok(both >= 0.95)}; false alarms {gs['far'] * 200:.2f} per 200 "
               f"shifts: {ok(gs['far'] * 200 <= 1)}; the alert says camera/optics in "
               f"{min(g['gain x0.95']['says_camera'], g['gain x0.9']['says_camera']):.2f} of them.")
    for name, m in s.items():
        if name.startswith("linewatch"):
            continue
        wins = [lab for lab in m["faults"] if m["faults"][lab].get("n") and f[lab]["median"] < m["faults"][lab]["median"]]
        ties = [lab for lab in m["faults"] if m["faults"][lab].get("n") and f[lab]["median"] == m["faults"][lab]["median"]]
        loses = [lab for lab in m["faults"] if m["faults"][lab].get("n") and f[lab]["median"] > m["faults"][lab]["median"]]
        out.append(f"- Sooner than {name} (median delay; its ARL {m['ic']['arl']:.0f}): sooner on {', '.join(wins) or 'none'}; "
                   f"equal on {', '.join(ties) or 'none'}; later on {', '.join(loses) or 'none'}.")
    return out


def _notes(res: dict[str, Any]) -> list[str]:
    p = res["peers"] or {}
    out = [
        "- Streams draw lots with replacement from the 44 ELPV modules, so a Phase II stream re-uses lots its Phase I "
        "saw (about 37 of 44 at 300 windows): the centre's error is as large as with new lots, but the covariance is "
        "somewhat kinder than on a line whose lots are all new.",
        "- The cpu model was trained on the train-pool lots (60 % of the cells); their z and residuals are in-sample, "
        "which adds lot-to-lot spread to the chart's statistics (it makes detection harder, not easier).",
        "- The fault patterns are measured with the same functions that inject the faults, so the pattern charts are "
        "matched to them; the `MEWMA alone` row is what the chart finds without that knowledge.",
        "- Product mix: each cell is compared with its product type's in-control mean, so a mix change alone is not a "
        "process shift for the chart (by design; the per-window test and `mix_text` report it).",
    ]
    out += [f"- {n}" for n in res.get("feature_notes", [])]
    if "skipped" in p:
        out.append(f"- alibi-detect peers not run: {p['skipped']}.")
    for kind, v in p.items():
        if kind != "skipped":
            out.append(f"- alibi-detect {kind}: configuration (threshold simulation) {np.mean(v['config_s']):.0f} s "
                       "per reference.")
    return out


def _erts(text: str) -> tuple[float, ...]:
    """``--peer-erts``: positive numbers, comma-separated."""
    try:
        erts = tuple(float(x) for x in text.split(","))
    except ValueError:
        erts = ()
    if not erts or min(erts) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas, got {text!r}")
    return erts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10, help="replicates (each: Phase I, fit, Phase II)")
    ap.add_argument("--phase1", type=int, default=300, help="Phase I windows per replicate")
    ap.add_argument("--ic-windows", type=int, default=2000, help="in-control Phase II windows per replicate")
    ap.add_argument("--fault-streams", type=int, default=20, help="streams per fault and replicate")
    ap.add_argument("--onset", type=int, default=20, help="in-control windows before a fault")
    ap.add_argument("--max-delay", type=int, default=100, help="windows followed after the onset")
    ap.add_argument("--no-ablation", action="store_true", help="skip the MEWMA-alone chart")
    ap.add_argument("--window-test-reps", type=int, default=2)
    ap.add_argument("--window-test-ic", type=int, default=400)
    ap.add_argument("--window-test-streams", type=int, default=10)
    ap.add_argument("--window-test-max", type=int, default=40)
    ap.add_argument("--ref-cells", type=int, default=3000, help="reference cells of the per-window test")
    ap.add_argument("--peer-reps", type=int, default=4, help="replicates given to the alibi-detect peers")
    ap.add_argument("--no-lsdd", dest="lsdd", action="store_false", help="skip alibi-detect's LSDDDriftOnline")
    ap.add_argument("--peer-erts", type=_erts, default=(ARL0, 3 * ARL0),
                    help="the peers' expected run times, comma-separated (default ARL0 and 3 x ARL0: at ERT = ARL0 "
                         "their realised ARL on lot streams is far below ARL0)")
    ap.add_argument("--golden-streams", type=int, default=300)
    ap.add_argument("--steps", type=int, default=3000, help="training steps if no checkpoint can be reused")
    ap.add_argument("--no-train", action="store_true", help="only reuse a checkpoint found under benchmarks/out/")
    ap.add_argument("--report-only", metavar="RAW_JSON",
                    help="rebuild the results from a raw file of an earlier run (benchmarks/out/bench_spc_raw.json)")
    args = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.report_only:
        res = json.loads(Path(args.report_only).read_text())
        rest = [a for i, a in enumerate(argv)
                if not a.startswith("--report-only") and (i == 0 or argv[i - 1] != "--report-only")]
        res.setdefault("command", C.command_line(NAME, rest))
    else:
        res = run(args)
        res["command"] = C.command_line(NAME, argv)
        RAW.parent.mkdir(parents=True, exist_ok=True)
        RAW.write_text(json.dumps(res, default=C._json_default))
    res["summary"] = summarise(res)
    res["attribution"] = {lab: _attribution(res["reps"], lab) for lab in res["labels"][1:]}
    res["golden_summary"] = golden_summary(res["golden"])
    raw = ("reps", "ablation", "window_test", "golden")  # per-stream records: the summaries are kept
    C.write_results(NAME, report(res, res["command"]), {k: v for k, v in res.items() if k not in raw})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
