"""How large is each drift fault compared with ordinary module-to-module (lot-to-lot) variation on ELPV?

The drift targets ask for a lot-aware null (benign lot changes must not page anyone) *and* for detecting a gain of
x0.9 in a window. This measures whether the two can hold together on ELPV, independently of any model: if a fault
moves a lot's image statistics less than ordinary lots differ from each other, no per-window test calibrated on
lot-to-lot variation can see it, whatever the features.

Data: every functional (p = 0) ELPV cell, with its derived lot (module, ``pipeline.line.elpv``), per product type.
Statistics: full-resolution image properties (``pipeline.latent.properties``): brightness, contrast, noise level, fine-detail
ratio, sharpness, dark-area fraction. For each fault of ``benchmarks.common.DRIFT_FAULTS``:

* **univariate**: the fault's mean effect on each statistic in units of the lot-to-lot sd (sd of the lot means);
* **multivariate (lot-whitened)**: the Mahalanobis length of the fault's effect vector under the between-lot
  covariance of the lot means (all six statistics together; a combination that lots never move along would show up
  here even if each statistic alone is within lot variation);
* **share of lots that differ more**: for every lot, the Mahalanobis distance of its mean from the mean of the other
  lots of its type (covariance without it, leave-one-lot-out). The share of lots farther from the rest than the fault
  moves a lot is the share of healthy lot changes that look at least as different as the fault does: near 0 means
  the fault stands out, near or above 0.5 means a lot-aware null must miss it;
* **ideal lot-level detection**: the same leave-one-lot-out distance with the fault applied to the held-out lot,
  against a threshold at the 95th percentile of the healthy lots' distances. This is what an oracle test on all six
  statistics, with lot-level noise known and no sampling noise (a whole lot per window), would detect at a 5 %
  false-alarm rate. With six statistics and 18-26 lots the covariance is itself noisy, so the same oracle is also
  given for the fault's own top statistic alone, one-sided in the fault's direction (it knows what the fault does).
  A per-window monitor cannot do better with these statistics.

Run: ``.venv/bin/python -m benchmarks.fault_vs_lots`` (about 3 minutes on one core; measurements cached in
``benchmarks/out/cache/``). Writes ``benchmarks/results/fault_vs_lots.md``.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from benchmarks import common as C

NAME = "fault_vs_lots"
CHANNELS = ("mean_intensity", "contrast", "noise_level", "detail_ratio", "sharpness", "dark_fraction")


def measurements(cells: np.ndarray) -> dict[str, np.ndarray]:
    """Image statistics (n_cells, len(CHANNELS)) of the clean cells and of each drift-fault variant (cached)."""
    from pipeline.latent.properties import measure

    def comp() -> dict[str, np.ndarray]:
        out = {}
        for v in ("clean", *C.DRIFT_FAULTS):
            C.log(f"[{NAME}] measuring {v}")
            out[C.slug(v)] = measure(C.variant_images(cells, v), list(CHANNELS)).to_numpy(np.float64)
        return out

    return C.cached(f"{NAME}_{C.key_of(cells.tolist(), list(CHANNELS))}", comp)


def _mahalanobis(v: np.ndarray, cov: np.ndarray) -> float:
    return float(np.sqrt(v @ np.linalg.solve(cov, v)))


def lot_distances(lot_means: np.ndarray, shift: np.ndarray | None = None) -> np.ndarray:
    """Leave-one-lot-out Mahalanobis distance of each lot's mean (plus ``shift``) from the other lots' mean, under
    the other lots' covariance."""
    out = np.empty(len(lot_means))
    add = 0.0 if shift is None else shift
    for i in range(len(lot_means)):
        rest = np.delete(lot_means, i, axis=0)
        out[i] = _mahalanobis(lot_means[i] + add - rest.mean(axis=0), np.cov(rest.T))
    return out


def _loo_z(values: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """Leave-one-lot-out z-score of each lot's mean (plus ``shift``) against the other lots' means."""
    out = np.empty(len(values))
    for i in range(len(values)):
        rest = np.delete(values, i)
        out[i] = (values[i] + shift - rest.mean()) / rest.std(ddof=1)
    return out


def analyse(M: dict[str, np.ndarray], lots: np.ndarray, types: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    clean = M["clean"]
    for typ in sorted(set(types)):
        m = types == typ
        ids = np.unique(lots[m])
        lot_means = np.stack([clean[m & (lots == lt)].mean(axis=0) for lt in ids])
        lot_sd = lot_means.std(axis=0, ddof=1)
        cov = np.cov(lot_means.T)
        loo = lot_distances(lot_means)
        for fault in C.DRIFT_FAULTS:
            eff = (M[C.slug(fault)][m] - clean[m]).mean(axis=0)
            uni = eff / lot_sd
            d = _mahalanobis(eff, cov)
            top = int(np.argmax(np.abs(uni)))
            faulty = lot_distances(lot_means, eff)
            sign = np.sign(eff[top])
            z_ok = sign * _loo_z(lot_means[:, top])
            z_bad = sign * _loo_z(lot_means[:, top], eff[top])
            rows.append({
                "type": typ, "n_cells": int(m.sum()), "n_lots": int(ids.size), "fault": fault,
                "univariate": dict(zip(CHANNELS, uni.tolist(), strict=True)),
                "top_channel": CHANNELS[top], "top_effect_lot_sd": float(uni[top]),
                "mahalanobis": d, "lot_distance_median": float(np.median(loo)),
                "share_lots_farther": float(np.mean(loo >= d)),
                "ideal_detection": float(np.mean(faulty > np.quantile(loo, 0.95))),
                "ideal_detection_top": float(np.mean(z_bad > np.quantile(z_ok, 0.95))),
            })
    return rows


def report(rows: list[dict[str, Any]], command: str) -> str:
    lines = [C.header(NAME, command).rstrip(), "", __doc__.split("\n\n")[1], ""]
    lines += [
        "Effects in lot-to-lot sd (sd of the lot means of that type). `Mahalanobis` = length of the fault's effect "
        "on all six statistics under the between-lot covariance; `lots farther` = share of healthy lots whose mean "
        "is farther (leave-one-lot-out Mahalanobis) from the other lots than the fault moves a lot; `ideal detection` = "
        "share of lots flagged, with the fault applied, by the leave-one-lot-out distance at the healthy lots' 95th "
        "percentile (an oracle per-lot test on these six statistics at a 5 % false-alarm rate); `ideal, top statistic` = "
        "the same with the fault's top statistic alone, one-sided.",
        "",
        "| type | lots | fault | " + " | ".join(CHANNELS) + " | Mahalanobis | median lot distance | lots farther | ideal detection | ideal, top statistic |",
        "|---|---|---|" + "---|" * len(CHANNELS) + "---|---|---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(f"{r['univariate'][c]:+.2f}" for c in CHANNELS)
        lines.append(f"| {r['type']} | {r['n_lots']} | {r['fault']} | {cells} | {r['mahalanobis']:.2f} | "
                     f"{r['lot_distance_median']:.2f} | {r['share_lots_farther']:.2f} | {r['ideal_detection']:.2f} | "
                     f"{r['ideal_detection_top']:.2f} ({r['top_channel']}) |")
    gain = [r for r in rows if r["fault"].startswith("gain")]
    lines += [
        "",
        "Reading: a fault stands out from lot-to-lot variation when its Mahalanobis length is well above the median "
        "lot distance and few lots are farther. "
        + "; ".join(f"{r['type']}: gain x0.9 moves brightness by {r['univariate']['mean_intensity']:+.2f} lot sd, "
                    f"Mahalanobis {r['mahalanobis']:.2f} against a median lot distance of "
                    f"{r['lot_distance_median']:.2f}, {r['share_lots_farther']:.0%} of healthy lots farther, ideal "
                    f"per-lot detection {r['ideal_detection']:.2f} (brightness alone, one-sided: {r['ideal_detection_top']:.2f})"
                    for r in gain)
        + ". A per-window test calibrated on lot-to-lot variation (the lot null) therefore cannot flag a x0.9 gain on "
        "ELPV without also flagging that share of healthy lot changes; it needs evidence accumulated over many lots "
        "or a lot label to compare within a lot. Lots are derived from ELPV's file order (`pipeline.line.elpv`), which "
        "publishes no module ids.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.parse_args(argv)
    from pipeline.line.elpv import load_elpv

    data = load_elpv()
    cells = np.flatnonzero(np.asarray(data.probs) == 0)
    M = measurements(cells)
    rows = analyse(M, np.asarray(data.lot)[cells], np.asarray(data.types)[cells])
    C.write_results(NAME, report(rows, C.command_line(NAME, argv)), {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
