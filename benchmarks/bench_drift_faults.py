"""Drift-detection benchmark on ELPV windows with the simulator's faults: linewatch against peer monitors.

Windows of n = 50, 100, 200 held-out functional cells (the monitored line), reference = the calibration-pool
functional cells (what the shipped monitor uses). Two kinds of windows:

* **i.i.d. windows**: cells drawn at random (40 % mono, the reference's product mix);
* **lot windows**: cells in production order: a run of consecutive mono cells and a run of consecutive poly cells
  (file order = module order), so a window carries the lot-to-lot variation of a real line.

Conditions: no fault (false alarms), gain x0.9, blur sigma = 1 px (at 300 px), noise sigma = 3 % of full range,
misalignment 2 deg (+6 px shift), product mix 40 % -> 90 % mono, defect rate 0 % -> 25 % p = 1 cells. Image faults are
applied to every cell of the window with ``pipeline.line.faults`` (one noise draw per cell, cached). Strata smaller than
the draw (e.g. 90 % of 200 mono cells from 90 held-out mono cells) are drawn with replacement (i.i.d.) or wrap around
(lot windows).

Methods (each on the same windows):

* linewatch: ``pipeline.analysis.drift.DriftDetector`` on InfoDiffusion z (per-axis KS + BH and MMD permutation test,
  Bonferroni across families), with the i.i.d. null and with the lot null (calibrated on consecutive reference
  cells, stratified by cell type with the lots known, as the monitor does with the catalog's product type; windows
  above a third of the reference, ``DriftDetector.max_window``, are evenly subsampled, as the monitor does);
  "z + quality" adds the full-resolution image-quality family (``pipeline.latent.properties.QUALITY_CHANNELS``); "z + quality + scores" also the per-image anomaly
  scores (the window's scores against the reference's cross-fitted ones: AUC and tail share,
  ``score_features``): this is the shipped monitor; "anomaly scores (AUC + tail share)" is that family on its own
  under the i.i.d. null (one-sided Mann-Whitney AUC and Fisher test of the share above the reference's 90th
  percentile, Bonferroni);
  ``--unstratified`` also runs the lot null without strata (the 2026-11-27 version);
* DiffAE ablation z, same detector (i.i.d. null);
* KS on mean intensity; pixel PCA (64 px, 32 components) + KS (BH); pixel PCA + MMD (permutations);
  EfficientNet-Lite0 global features + PCA (32) + KS (BH) ("Failing Loudly", Rabanser et al. 2019).

Reported: detection rate at nominal alpha = 0.05, and at an **equal false-alarm rate**: every method's threshold on
its own drift statistic is set to 5 % on a separate set of no-fault windows of the same kind and size (an oracle
calibration that none of them has in production; it compares power only). Attribution: for each single-factor fault,
the share of detected linewatch windows naming the modal top axis (or, when the quality family fired, the top
image-quality channel, which is what the alert names), and whether that axis's description (from
``pipeline.analysis.axes.describe_axes`` on the calibration cells) or that channel is a property the fault moves
(``pipeline.latent.properties.FAULT_PROPERTIES``). Equal-FAR statistic of the lot null: the largest family z-score against
its bootstrap (bootstrap p-values tie at their 1 / (B + 1) floor).

Run: ``.venv/bin/python -m benchmarks.bench_drift_faults [--windows 50 --null-windows 100]``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common as C

NAME = "bench_drift_faults"
ALPHA = 0.05
CONDITIONS: dict[str, dict[str, Any]] = {
    "no fault": {"variant": "clean", "mono": 0.4, "defect": 0.0},
    "gain x0.9": {"variant": "gain x0.9", "mono": 0.4, "defect": 0.0},
    "blur 1 px": {"variant": "blur 1 px", "mono": 0.4, "defect": 0.0},
    "noise 3%": {"variant": "noise 3%", "mono": 0.4, "defect": 0.0},
    "misalign 2 deg": {"variant": "misalign 2 deg", "mono": 0.4, "defect": 0.0},
    "illumination 30%": {"variant": "illumination 30%", "mono": 0.4, "defect": 0.0},
    "product mix 40->90% mono": {"variant": "clean", "mono": 0.9, "defect": 0.0},
    "defect rate 0->25% p=1": {"variant": "clean", "mono": 0.4, "defect": 0.25},
}
VARIANTS = ("clean", *C.DRIFT_FAULTS)


# ------------------------------------------------------------------------------------------------ windows
@dataclass(frozen=True)
class Strata:
    """Positions (into the window pool = held-out functional cells then held-out p = 1 cells), in file order."""

    mono: np.ndarray
    poly: np.ndarray
    defect: np.ndarray


def _draw(rng: np.random.Generator, pos: np.ndarray, k: int, kind: str) -> np.ndarray:
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if kind == "iid":
        return rng.choice(pos, k, replace=k > len(pos))
    start = int(rng.integers(0, len(pos)))
    return pos[(start + np.arange(k)) % len(pos)]


def make_window(rng: np.random.Generator, strata: Strata, n: int, mono: float, defect: float, kind: str) -> np.ndarray:
    """Pool positions of one window of ``n`` cells: ``defect`` share p = 1, the rest ``mono`` share mono."""
    if kind not in ("iid", "lot"):
        raise ValueError(f"window kind must be 'iid' or 'lot', got {kind!r}")
    n_def = int(round(defect * n))
    n_mono = int(round(mono * (n - n_def)))
    parts = [
        _draw(rng, strata.mono, n_mono, kind),
        _draw(rng, strata.poly, n - n_def - n_mono, kind),
        _draw(rng, strata.defect, n_def, kind),
    ]
    return np.concatenate(parts)


# ------------------------------------------------------------------------------------------------ features
@dataclass
class Features:
    """One method's features: reference (n_ref, d) and, per variant, the window pool (n_pool, d)."""

    ref: np.ndarray
    pool: dict[str, np.ndarray]
    q_ref: np.ndarray | None = None
    q_pool: dict[str, np.ndarray] | None = None
    s_ref: np.ndarray | None = None
    s_pool: dict[str, np.ndarray] | None = None


def _pool_matrix(ok: dict[str, np.ndarray], defect: np.ndarray) -> dict[str, np.ndarray]:
    return {v: np.vstack([ok[v], defect]) for v in ok}


def pixel_features(sp: C.Splits) -> dict[str, Features]:
    """Mean intensity and pixel PCA (fit on training cells) features."""
    from benchmarks.baselines import PixelPCA, downsample

    def comp() -> dict[str, np.ndarray]:
        out = {"train": downsample(C.images()[sp.train], 64), "cal": downsample(C.images()[sp.calibration], 64),
               "defect": downsample(C.images()[sp.test_defect], 64),
               "mean_cal": C.images()[sp.calibration].mean(axis=(1, 2)) / 255.0,
               "mean_defect": C.images()[sp.test_defect].mean(axis=(1, 2)) / 255.0}
        for v in VARIANTS:
            imgs = C.variant_images(sp.test_ok, v)
            out[f"ok_{C.slug(v)}"] = downsample(imgs, 64)
            out[f"mean_ok_{C.slug(v)}"] = imgs.mean(axis=(1, 2)) / 255.0
        return out

    P = C.cached(f"drift/pixels_{C.key_of(sp.test_ok.tolist(), sp.calibration.tolist())}", comp)
    pca = PixelPCA(32).fit(P["train"])
    pix = Features(pca.transform(P["cal"]), _pool_matrix(
        {v: pca.transform(P[f"ok_{C.slug(v)}"]) for v in VARIANTS}, pca.transform(P["defect"])))
    mean = Features(P["mean_cal"][:, None], _pool_matrix(
        {v: P[f"mean_ok_{C.slug(v)}"][:, None] for v in VARIANTS}, P["mean_defect"][:, None]))
    return {"mean": mean, "pixpca": pix}


def effnet_pca_features(sp: C.Splits) -> Features:
    """EfficientNet-Lite0 global features, PCA to 32 dims fit on the training cells."""
    from benchmarks.baselines import PixelPCA

    pca = PixelPCA(32).fit(C.effnet_features(sp.train, patches=True)["global"])
    g_test = C.effnet_features(sp.test, patches=True)["global"]  # held-out functional, then p = 1
    n_ok = len(sp.test_ok)
    ok = {v: pca.transform(g_test[:n_ok] if v == "clean" else C.effnet_features(sp.test_ok, v)["global"])
          for v in VARIANTS}
    return Features(pca.transform(C.effnet_features(sp.calibration)["global"]),
                    _pool_matrix(ok, pca.transform(g_test[n_ok:])))


def latent_features(sp: C.Splits, ckpt_dir: Any) -> Features:
    """z of the reference and of every window-pool variant under one checkpoint (cached per model id)."""
    import torch

    from models import load_checkpoint

    mid = C.checkpoint_meta(ckpt_dir)["model_id"]

    def comp() -> dict[str, np.ndarray]:
        torch.set_num_threads(1)
        ck = load_checkpoint(ckpt_dir)
        out = {"cal": C.encode(ck, C.images()[sp.calibration]), "defect": C.encode(ck, C.images()[sp.test_defect])}
        for v in VARIANTS:
            out[f"ok_{C.slug(v)}"] = C.encode(ck, C.variant_images(sp.test_ok, v))
        return out

    Z = C.cached(f"drift/z_{mid}_{C.key_of(sp.test_ok.tolist(), sp.calibration.tolist())}", comp)
    return Features(Z["cal"], _pool_matrix({v: Z[f"ok_{C.slug(v)}"] for v in VARIANTS}, Z["defect"]))


def quality_features(sp: C.Splits) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Full-resolution image-quality channels (``pipeline.latent.properties.QUALITY_CHANNELS``) of reference and pool."""
    from pipeline.latent.properties import QUALITY_CHANNELS, measure

    def comp() -> dict[str, np.ndarray]:
        def q(imgs: np.ndarray) -> np.ndarray:
            return measure(imgs, QUALITY_CHANNELS).to_numpy(np.float64)

        out = {"cal": q(C.images()[sp.calibration]), "defect": q(C.images()[sp.test_defect])}
        for v in VARIANTS:
            out[f"ok_{C.slug(v)}"] = q(C.variant_images(sp.test_ok, v))
        return out

    Q = C.cached(f"drift/quality_{C.key_of(sp.test_ok.tolist(), sp.calibration.tolist(), list(QUALITY_CHANNELS))}",
                 comp)
    return Q["cal"], _pool_matrix({v: Q[f"ok_{C.slug(v)}"] for v in VARIANTS}, Q["defect"])


def score_features(sp: C.Splits, ckpt_dir: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-image anomaly scores as the monitor computes them: reference (cross-fitted) and every pool variant.

    Residuals with the shipped recipe (``pipeline.training.retrain.ScoringConfig``), the detector of
    ``pipeline.training.retrain.detector_calibration`` on the calibration cells (fit on one half, as the monitor), the
    reference's own scores from ``pipeline.training.retrain.calibration_scores`` (two-fold cross-fitting).
    """
    import torch

    from models import load_checkpoint, to_model_input
    from pipeline.training.retrain import ScoringConfig, calibration_scores, detector_calibration

    mid = C.checkpoint_meta(ckpt_dir)["model_id"]
    sc = ScoringConfig()

    def comp() -> dict[str, np.ndarray]:
        torch.set_num_threads(1)
        ck = load_checkpoint(ckpt_dir)
        res = sc.residual_detector(ck.model)

        def zr(imgs: np.ndarray) -> np.ndarray:
            given = C.encode(ck, imgs) if getattr(ck.model, "uses_features", False) else None  # backbone codes
            z, r = res.latents_and_residuals(to_model_input(imgs, ck.preprocess), given)
            return np.column_stack([z, r])

        out = {"cal": zr(C.images()[sp.calibration]), "defect": zr(C.images()[sp.test_defect])}
        for v in VARIANTS:
            out[f"ok_{C.slug(v)}"] = zr(C.variant_images(sp.test_ok, v))
        return out

    key = C.key_of(sp.test_ok.tolist(), sp.calibration.tolist(), list(sc.t_stars))
    seeds = "" if sc.seeds == (0,) else "_seeds" + "-".join(map(str, sc.seeds))
    R = C.cached(f"drift/zr_{mid}{seeds}_{key}", comp)
    m = len(sc.t_stars)
    z_cal, r_cal = R["cal"][:, :-m], R["cal"][:, -m:]
    _, det = detector_calibration(z_cal, 0.05, seed=0, residuals=r_cal, k=sc.k)
    s_ref = calibration_scores(z_cal, r_cal, k=sc.k, seed=0)
    pool = _pool_matrix({v: det.score(R[f"ok_{C.slug(v)}"])[:, None] for v in VARIANTS},
                        det.score(R["defect"])[:, None])
    return s_ref, {v: x.ravel() for v, x in pool.items()}


# ------------------------------------------------------------------------------------------------ methods
def linewatch_method(
    feats: Features, null: str, n_perm: int, seed: int, lot_block: int | None = None,
    strata: np.ndarray | None = None, lots: np.ndarray | None = None, quality: bool = False, scores: bool = False,
) -> Callable[..., tuple]:
    """A (window, quality) -> (p_equiv, stat, detected, top_axis, top_channel) function around the DriftDetector.

    ``top_channel`` is the index (into ``QUALITY_CHANNELS``) of the image-quality channel the result names when the
    quality family fired, else -1.
    """
    from pipeline.analysis.drift import DriftDetector

    det = DriftDetector(alpha=ALPHA, null=null, n_permutations=n_perm, random_state=seed, lot_block=lot_block)
    det.fit(feats.ref, ref_strata=strata, ref_lots=lots, ref_quality=feats.q_ref if quality else None,
            ref_scores=feats.s_ref if scores else None)

    def test(Zw: np.ndarray, Qw: np.ndarray | None = None, Sw: np.ndarray | None = None,
             Tw: np.ndarray | None = None) -> tuple:
        keep = det.rows_to_test(len(Zw))  # as the monitor does
        Zw = Zw[keep]
        Qw = None if Qw is None else Qw[keep]
        Sw = None if Sw is None else Sw[keep]
        # as the monitor does: each product compared with its own kind (the window's product mix is context)
        Tw = None if Tw is None or strata is None else Tw[keep]
        r = det.test(Zw, cur_quality=Qw if quality else None, cur_scores=Sw if scores else None, cur_strata=Tw)
        # one continuous statistic: how far the most significant family is below its level
        ratio = min(p / r.family_alpha for p in r.family_p.values())
        stat = float(-np.log10(max(ratio, 1e-300)))
        if null == "lot":
            # bootstrap p-values floor at 1 / (B + 1), so many windows tie at the top: use each family's statistic
            # as a z-score against its lot-null bootstrap, the largest over the families
            cal = det.calibrate(len(Zw), shares=r.meta.get("calibration_shares"))
            obs = {"axes": float(r.per_axis["ks_stat"].max()), "mmd": r.mmd_stat, "quality": r.quality_stat,
                   "scores": r.score_stat, "scores_tail": r.score_tail}
            fams = [*r.family_p, *(["scores_tail"] if "scores" in r.family_p else [])]
            stat = max((obs[f] - float(np.mean(cal[f]))) / max(1e-12, float(np.std(cal[f]))) for f in fams)
        ch = -1 if r.top_channel is None else list(det.quality_names_).index(r.top_channel)
        return min(1.0, ratio * ALPHA), stat, bool(r.detected), int(r.top_axis), ch

    return test


def baseline_method(kind: str, ref: np.ndarray, n_perm: int, seed: int) -> Callable[[np.ndarray], tuple]:
    """KS-1d / KS-BH / MMD window tests of :mod:`benchmarks.baselines`."""
    from benchmarks.baselines import ks_bh_test, ks_test_1d, mmd_test

    def test(Xw: np.ndarray, _q: Any = None, _s: Any = None, _t: Any = None) -> tuple:
        if kind == "mw":
            # the score family under the i.i.d. null: AUC (Mann-Whitney) and tail share (Fisher), Bonferroni
            from pipeline.analysis.drift import score_distribution_test, score_tail_test

            _, p_auc = score_distribution_test(ref[:, 0], Xw[:, 0])
            _, p_tail = score_tail_test(ref[:, 0], Xw[:, 0])
            p = min(1.0, 2.0 * min(p_auc, p_tail))
            # the equal-FAR statistic: -log of the smaller p-value, uncapped (the capped p ties at 1 for most windows)
            return p, -np.log(max(min(p_auc, p_tail), 1e-300)), p <= ALPHA, -1, -1
        if kind == "ks1":
            r = ks_test_1d(ref[:, 0], Xw[:, 0])
        elif kind == "ksbh":
            r = ks_bh_test(ref, Xw)
        else:
            r = mmd_test(ref, Xw, n_permutations=n_perm, seed=seed)
        return r.p, r.stat, r.p <= ALPHA, -1, -1

    return test


# ------------------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.analysis.strata import mix_signal

    sp = C.get_splits()
    n_ok = len(sp.test_ok)
    t_ok = sp.types[sp.test_ok]
    strata = Strata(mono=np.flatnonzero(t_ok == "mono"), poly=np.flatnonzero(t_ok == "poly"),
                    defect=n_ok + np.arange(len(sp.test_defect)))
    feats: dict[str, Features] = {}
    methods: dict[str, tuple[str, str]] = {}  # label -> (features key, how)
    models: dict[str, Any] = {}
    notes: list[str] = []
    shipped: Any = None
    for tag, ck in C.resolve_models(args.model, sp, args.no_train, args.steps, args.preset).items():
        if ck is None:
            notes.append(f"{tag}: not run (no checkpoint under benchmarks/out/)")
            continue
        models[tag] = C.checkpoint_meta(ck)
        key = "z" if tag.startswith("linewatch") else f"z {tag}"
        feats[key] = latent_features(sp, ck)
        if tag.startswith("linewatch"):
            shipped = ck
            methods["linewatch z (i.i.d. null)"] = ("z", "lw_iid")
            methods["linewatch z (lot null)"] = ("z", "lw_lot")
            methods["linewatch z + quality (lot null)"] = ("z", "lw_lotq")
            methods["linewatch z + quality + scores (lot null)"] = ("z", "lw_lotqs")
            methods["linewatch z + scores (i.i.d. null)"] = ("z", "lw_iids")
            if args.unstratified:
                methods["linewatch z (lot null, unstratified)"] = ("z", "lw_lotu")
            if args.lot_blocks:
                methods[f"linewatch z (lot null, {args.lot_blocks}-cell blocks)"] = ("z", f"lw_lot{args.lot_blocks}")
        else:
            methods[f"{tag} z (i.i.d. null)"] = (key, "lw_iid")
    C.log("pixel features")
    feats.update(pixel_features(sp))
    methods["KS mean intensity"] = ("mean", "ks1")
    methods["pixel PCA + KS (BH)"] = ("pixpca", "ksbh")
    methods["pixel PCA + MMD"] = ("pixpca", "mmd")
    if not args.no_effnet and (not args.only or any("Efficient" in o for o in args.only)):
        C.log("EfficientNet features")
        feats["effnet"] = effnet_pca_features(sp)
        methods["EfficientNet-Lite0 + PCA + KS (BH)"] = ("effnet", "ksbh")
    else:
        notes.append("EfficientNet-Lite0 + KS: not run (--no-effnet)")

    if args.only:
        methods = {k: v for k, v in methods.items() if any(o in k for o in args.only)}
    score_methods = ("lw_lotqs", "lw_iids")
    needs_scores = not args.only or any(how in score_methods for _, how in methods.values()) or \
        any(o in "linewatch anomaly scores (AUC + tail share)" for o in args.only)
    if "z" in feats and shipped is not None:
        feats["z"].q_ref, feats["z"].q_pool = quality_features(sp)
    if "z" in feats and shipped is not None and needs_scores:
        C.log("anomaly scores")
        feats["z"].s_ref, feats["z"].s_pool = score_features(sp, shipped)
        # the score family on its own (AUC + tail share, i.i.d. null): what the family could add where no latent or
        # quality family fires
        feats["scores"] = Features(feats["z"].s_ref[:, None], {v: x[:, None] for v, x in feats["z"].s_pool.items()})
        if not args.only or any(o in "linewatch anomaly scores (AUC + tail share)" for o in args.only):
            methods["linewatch anomaly scores (AUC + tail share)"] = ("scores", "mw")
    cal_types, cal_lots = sp.types[sp.calibration], sp.lots[sp.calibration]
    pool_types = np.r_[sp.types[sp.test_ok], sp.types[sp.test_defect]]
    testers: dict[str, Callable[..., tuple]] = {}
    for label, (fk, how) in methods.items():
        f = feats[fk]
        if how.startswith("lw_"):
            null = how[3:6]
            tail = how[6:]
            block = int(tail) if tail.isdigit() else None
            # the shipped lot null: stratified by product type, lots from the catalog ("u": the old, unstratified)
            strat = null == "lot" and tail != "u"
            testers[label] = linewatch_method(
                f, null, args.permutations, 0, block, strata=cal_types if strat else None,
                lots=cal_lots if strat else None, quality="q" in tail, scores="s" in tail)
        else:
            testers[label] = baseline_method(how, f.ref, args.permutations, 0)

    # window sets: (kind, n, condition, role) -> list of position arrays
    results: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    t_method = Counter()
    n_method = Counter()
    for kind in ("iid", "lot"):
        for n in args.ns:
            sets: dict[tuple[str, str], list[np.ndarray]] = {}
            rng_cal = np.random.default_rng([1, n, kind == "lot"])
            rng_eval = np.random.default_rng([2, n, kind == "lot"])
            sets[("no fault", "cal")] = [make_window(rng_cal, strata, n, 0.4, 0.0, kind)
                                         for _ in range(args.null_windows)]
            for cond, spec in CONDITIONS.items():
                k = args.null_windows if cond == "no fault" else args.windows
                sets[(cond, "eval")] = [make_window(rng_eval, strata, n, spec["mono"], spec["defect"], kind)
                                        for _ in range(k)]
            C.log(f"{kind} windows n={n}: {sum(len(v) for v in sets.values())} windows x {len(testers)} methods")
            for label, tester in testers.items():
                fk = methods[label][0]
                out: dict[tuple[str, str], np.ndarray] = {}
                for (cond, role), wins in sets.items():
                    v = CONDITIONS[cond]["variant"]
                    X = feats[fk].pool[v]
                    Q = None if feats[fk].q_pool is None else feats[fk].q_pool[v]
                    S = None if feats[fk].s_pool is None else feats[fk].s_pool[v]
                    t0 = time.perf_counter()
                    out[(cond, role)] = np.array(
                        [tester(X[w], None if Q is None else Q[w], None if S is None else S[w], pool_types[w])
                         for w in wins],
                        dtype=float)
                    t_method[label] += time.perf_counter() - t0
                    n_method[label] += len(wins)
                null_cal = out[("no fault", "cal")][:, 1]
                thr = float(np.quantile(null_cal, 1 - ALPHA, method="higher"))
                for cond in CONDITIONS:
                    a = out[(cond, "eval")]
                    row = {"kind": kind, "n": n, "method": label, "condition": cond, "windows": len(a),
                           "rate_nominal": float(a[:, 2].mean()), "rate_equal_far": float((a[:, 1] > thr).mean()),
                           "threshold_equal_far": thr}
                    if a[:, 3].max() >= 0 and cond != "no fault":
                        det = a[:, 2].astype(bool)
                        # what the alert names: the quality channel when that family fired, else the top axis
                        names = [f"ch:{int(c)}" if c >= 0 else f"z:{int(t)}" for t, c in a[det][:, 3:5]]
                        row["top_axes"] = Counter(names).most_common()
                        # the monitor names the product mix in a drifted window's alert only when it explains the
                        # verdict (a product the reference lacks; pipeline.analysis.strata.MixSignal.explains)
                        wins = sets[(cond, "eval")]
                        stated = [mix_signal(cal_types, pool_types[w]).explains
                                  for w, d in zip(wins, det, strict=True) if d]
                        row["mix_stated"] = float(np.mean(stated))
                    results.append(row)
                raw[f"{kind}|{n}|{label}"] = {f"{c}|{r}": v[:, :3].tolist() for (c, r), v in out.items()}
            C.log(f"{kind} n={n} done")

    attribution = attribution_table(sp, feats.get("z"), results) if "z" in feats else []
    speed = {m: t_method[m] / max(1, n_method[m]) for m in t_method}
    return {"rows": results, "attribution": attribution, "models": models, "notes": notes, "speed_s_per_window": speed,
            "ns": list(args.ns), "windows": args.windows, "null_windows": args.null_windows,
            "permutations": args.permutations, "n_ref": int(len(sp.calibration)), "n_pool_ok": n_ok,
            "n_pool_mono": int(len(strata.mono)), "n_pool_poly": int(len(strata.poly)),
            "n_pool_defect": int(len(strata.defect))}


def pool_stats(sp: C.Splits) -> dict[str, Any]:
    """Mean intensity (fraction of full scale) of the reference and the window pool: the benign pool-level shift."""
    out = {}
    for name, idx in (("reference", sp.calibration), ("window pool", sp.test_ok)):
        m = C.images()[idx].mean(axis=(1, 2)) / 255.0
        out[name] = {"mean": float(m.mean()), "sd": float(m.std()), "lots": int(len(np.unique(sp.lots[idx]))),
                     "mono_share": float((sp.types[idx] == "mono").mean())}
    return out


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine partial runs (e.g. one per window size, run in parallel) into one result."""
    if not parts:
        raise ValueError("nothing to merge")
    out = dict(parts[0])
    out["rows"] = [r for p in parts for r in p["rows"]]
    out["attribution"] = [a for p in parts for a in p["attribution"]]
    out["ns"] = sorted({n for p in parts for n in p["ns"]})
    speeds: dict[str, list[float]] = {}
    for p in parts:
        for m, v in p["speed_s_per_window"].items():
            speeds.setdefault(m, []).append(v)
    out["speed_s_per_window"] = {m: float(np.mean(v)) for m, v in speeds.items()}
    return out


def attribution_table(sp: C.Splits, zf: Features | None, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Top-axis consistency per fault and whether the axis description names the fault's property."""
    from pipeline.analysis.axes import MIN_ABS_R, axis_correlations, describe_axes
    from pipeline.latent.properties import FAULT_PROPERTIES, PROPERTIES, QUALITY_CHANNELS, measure

    props = C.cached(f"drift/props_cal_{C.key_of(sp.calibration.tolist(), list(PROPERTIES))}",
                     lambda: {c: v.to_numpy() for c, v in measure(C.images()[sp.calibration]).items()})
    import pandas as pd

    desc = {d.axis: d for d in describe_axes(axis_correlations(zf.ref, pd.DataFrame(props)))}
    out = []
    for r in rows:
        if "top_axes" not in r or not r["method"].startswith("linewatch"):
            continue
        tops = r["top_axes"]
        n_det = sum(c for _, c in tops)
        if n_det == 0:
            out.append({**{k: r[k] for k in ("kind", "n", "method", "condition")}, "detected": 0})
            continue
        label, count = tops[0]
        kind = C.FAULT_KIND[r["condition"]]
        base = {**{k: r[k] for k in ("kind", "n", "method", "condition")}, "detected": n_det,
                "consistency": count / n_det, "fault_properties": list(FAULT_PROPERTIES[kind]),
                "mix_stated": r.get("mix_stated")}
        if label.startswith("ch:"):
            ch = QUALITY_CHANNELS[int(label[3:])]
            out.append({**base, "top_axis": ch, "description": f"image quality: {PROPERTIES[ch].label}",
                        "names_fault_property": ch in FAULT_PROPERTIES[kind]})
            continue
        axis = int(label[2:])
        d = desc[axis]
        second = d.second_best[0] if d.second_best and d.property and abs(d.second_best[1]) >= MIN_ABS_R else None
        named = [p for p in (d.property, second) if p]  # the properties the description's text names
        out.append({**base, "top_axis": f"z_{axis}", "description": d.text,
                    "names_fault_property": any(p in FAULT_PROPERTIES[kind] for p in named)})
    return out


# ------------------------------------------------------------------------------------------------ report
def report(res: dict[str, Any], command: str) -> str:
    f = C.fmt
    rows = res["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    conds = list(CONDITIONS)
    out = [C.header(NAME, command)]
    out.append(
        f"Reference: {res['n_ref']} calibration-pool functional cells. Window pool: {res['n_pool_ok']} held-out "
        f"functional cells ({res['n_pool_mono']} mono / {res['n_pool_poly']} poly) and {res['n_pool_defect']} "
        f"held-out p = 1 cells. Per table cell: {res['windows']} fault windows; false-alarm rates from "
        f"{res['null_windows']} no-fault windows; equal-FAR thresholds from another {res['null_windows']} no-fault "
        f"windows. MMD: {res['permutations']} permutations. alpha = {ALPHA}.\n\n"
        "Columns: detection rate per condition (the `no fault` column is the false-alarm rate). `nominal` = each "
        "test's own decision at alpha = 0.05; `equal FAR` = threshold on the method's statistic set to a 5 % "
        "false-alarm rate on separate no-fault windows of the same kind and size (power at an equal false-alarm "
        "rate; baselines have no lot-aware null of their own, so this is the only fair comparison on lot windows).\n\n"
    )
    ps = res.get("pool_stats")
    if ps:
        r, w = ps["reference"], ps["window pool"]
        out.append(
            f"**Benign shift between pools.** The reference ({r['lots']} lots) and the window pool ({w['lots']} other "
            f"lots) differ without any fault: mean intensity {r['mean']:.3f} (sd {r['sd']:.3f}) vs {w['mean']:.3f} "
            f"(sd {w['sd']:.3f}), i.e. {(w['mean'] - r['mean']) / r['sd']:+.2f} reference sd, from module-to-module "
            "variation. Every test that assumes i.i.d. images therefore flags most no-fault windows (the `no fault` "
            "column under `nominal`); this is the lot-to-lot variation the lot null exists for, and why the "
            "equal-false-alarm comparison is the fair one for the baselines.\n\n"
        )
    for kind, title in (("iid", "i.i.d. windows"), ("lot", "lot windows (consecutive cells: lot-to-lot variation)")):
        for mode, mtitle in (("rate_nominal", "nominal alpha = 0.05"), ("rate_equal_far", "equal false-alarm rate")):
            out.append(f"## {title}, {mtitle}\n\n")
            out.append("| method | n | " + " | ".join(conds) + " |\n|---|---|" + "---|" * len(conds) + "\n")
            for m in methods:
                for n in res["ns"]:
                    cells = {r["condition"]: r for r in rows if r["kind"] == kind and r["n"] == n and r["method"] == m}
                    if not cells:
                        continue
                    vals = []
                    for c in conds:
                        v = cells[c][mode]
                        s = f(v, 2)
                        vals.append(f"**{s}**" if (c != "no fault" and v >= 0.9) else s)
                    out.append(f"| {m} | {n} | " + " | ".join(vals) + " |\n")
            out.append("\n")
    out.append("## Attribution (linewatch, detected windows)\n\n")
    out.append("`mix stated`: share of the detected windows whose alert also names the product mix, which the monitor "
               "does only when the mix explains the verdict (a product the reference lacks; "
               "`pipeline.analysis.strata.MixSignal.explains`); the tests compare each product with its own kind.\n\n")
    out.append("| windows | method | n | fault | detected | modal top axis / channel | share naming it | description | "
               "names the fault's property | mix stated |\n|---|---|---|---|---|---|---|---|---|---|\n")
    for a in res["attribution"]:
        if a.get("detected", 0) == 0:
            out.append(f"| {a['kind']} | {a['method']} | {a['n']} | {a['condition']} | 0 | - | - | - | - | - |\n")
            continue
        out.append(
            f"| {a['kind']} | {a['method']} | {a['n']} | {a['condition']} | {a['detected']} | "
            f"{a['top_axis']} | {a['consistency']:.2f} | {a['description']} | "
            f"{'yes' if a['names_fault_property'] else 'no'} | "
            f"{'-' if a.get('mix_stated') is None else format(a['mix_stated'], '.2f')} |\n"
        )
    out.append("\n## Models, speed, notes\n\n")
    out.extend(C.model_lines(res["models"]))
    for m, s in res["speed_s_per_window"].items():
        out.append(f"- {m}: {s * 1e3:.1f} ms per window test (features precomputed)\n")
    for note in res["notes"]:
        out.append(f"- {note}\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--windows", type=int, default=50, help="fault windows per table cell")
    ap.add_argument("--null-windows", type=int, default=100, help="no-fault windows (each of FAR and threshold set)")
    ap.add_argument("--permutations", type=int, default=100, help="MMD permutations")
    ap.add_argument("--steps", type=int, default=1000, help="training steps if no checkpoint can be reused")
    ap.add_argument("--no-train", action="store_true", help="only reuse checkpoints found under benchmarks/out/")
    ap.add_argument("--preset", default="cpu", help="preset of the default models (cpu; pretrained: frozen backbone)")
    ap.add_argument("--name", default=NAME, help="results file name under benchmarks/results/ (without .md)")
    ap.add_argument("--model", action="append", help="LABEL=CHECKPOINT_DIR (repeatable; label 'linewatch...' = shipped)")
    ap.add_argument("--no-effnet", action="store_true")
    ap.add_argument("--lot-blocks", type=int, default=0, help="also run the lot null with blocks of this many cells")
    ap.add_argument("--unstratified", action="store_true", help="also run the old lot null (not stratified by type)")
    ap.add_argument("--only", nargs="+", help="run only the methods whose label contains one of these strings")
    ap.add_argument("--part-out", help="write the raw results of this (partial) run as JSON here, no report")
    ap.add_argument("--merge", nargs="+", help="merge --part-out JSON files (e.g. one per window size) into the report")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.merge:
        res = merge([json.loads(Path(p).read_text()) for p in args.merge])
    else:
        res = run(args)
    if args.part_out:
        Path(args.part_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.part_out).write_text(json.dumps(res, default=C._json_default))
        C.log(f"wrote part {args.part_out}")
        return 0
    if "pool_stats" not in res:
        res["pool_stats"] = pool_stats(C.get_splits())
    cmd = C.command_line("bench_drift_faults", argv)
    C.write_results(args.name, report(res, cmd), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
