"""Run every benchmark in sequence, then regenerate ``docs/results.md`` and the PNG plots in ``docs/img/``.

Each benchmark runs as its own subprocess (``python -m benchmarks.<name>``) with a time limit, so one failure or
time-out does not stop the others; its results file says what it measured, and ``docs/results.md`` marks a missing
one as "not run". Expensive intermediates (checkpoints, features, latents) are cached under ``benchmarks/out/``, so
a rerun is much faster than the first run.

Run: ``.venv/bin/python -m benchmarks.run_all`` (``make bench``); ``--only NAME ...``, ``--skip NAME ...``,
``--report-only`` (just rebuild ``docs/results.md`` from the existing results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import MACHINE, RESULTS, ROOT, fmt, log

#: (module, time limit in s, extra args), in run order.
BENCHMARKS: list[tuple[str, int, list[str]]] = [
    ("simulate_speed", 900, []),
    ("bench_ingest", 1200, []),
    ("bench_catalog", 1200, []),
    ("bench_stages", 1800, []),
    ("bench_model_speed", 1800, []),
    ("bench_latent_quality", 3600, []),
    ("axes_attribution", 3600, []),
    ("bench_drift_calibration", 2400, []),
    ("bench_anomaly", 5400, []),
    ("bench_anomaly_tiles", 3600, []),
    ("bench_patch", 3600, []),
    ("bench_drift_faults", 5400, []),
    ("fault_vs_lots", 900, []),
    ("bench_spc", 5400, []),
    ("stack_timing", 1200, []),
    ("bench_flag_rate", 1800, []),
    ("soak", 6 * 3600, []),
]
DOC = ROOT / "docs" / "results.md"

SECTIONS: list[tuple[str, list[str], str]] = [
    ("1. Anomaly detection on ELPV", ["bench_anomaly", "bench_anomaly_tiles", "bench_patch"],
     "Image AUROC / AUPR per method, overall and per cell type, on the lot-level split; and whether a tile-level "
     "model at 4x the resolution closes the poly gap."),
    ("2. Drift detection with the simulator's faults", ["bench_drift_faults", "bench_drift_calibration",
                                                         "fault_vs_lots"],
     "Detection rate against window size for each fault, with false-alarm rates, for linewatch and each baseline; "
     "and how large each fault is against ordinary lot-to-lot variation (what a lot-aware monitor can see at all)."),
    ("2b. Persistent small shifts: control charts and golden samples", ["bench_spc"],
     "In-control run lengths and detection delays of the control chart across windows, against the per-window test "
     "and alibi-detect's online detectors at the same ARL0; golden-sample camera checks per shift."),
    ("3. Attribution", ["axes_attribution"],
     "Attribution consistency per fault (also in the attribution table of section 2)."),
    ("4. Speed", ["bench_model_speed", "bench_stages", "simulate_speed", "bench_ingest", "bench_catalog",
                  "stack_timing"],
     "Speed of each stage (model, scoring, drift, simulator, ingestion, catalog, stack) and how it grows with the "
     "catalog, reference and window sizes."),
    ("5. InfoDiffusion against the DiffAE ablation", ["bench_latent_quality"],
     "Latent quality; the anomaly and drift rows of the DiffAE ablation are in sections 1 and 2."),
    ("6. The closed loop on a running line", ["soak", "bench_flag_rate"],
     "30 simulated days of two lines driven through ingest, monitor and nightly with the default settings: uptime, "
     "every fault alerted and resolved, false alerts, per-image flags, the cycle's wall time; and the per-image "
     "flags' false-flag rate on unseen line-days against the configured one."),
]


def run_benchmarks(names: list[str], timeout_scale: float = 1.0) -> dict[str, dict[str, Any]]:
    """Run the named benchmark modules; returns status per module."""
    status: dict[str, dict[str, Any]] = {}
    for mod, limit, extra in BENCHMARKS:
        if mod not in names:
            continue
        if not (ROOT / "benchmarks" / f"{mod}.py").exists():
            status[mod] = {"status": "missing"}
            log(f"{mod}: not present, skipped")
            continue
        log(f"{mod}: running (limit {int(limit * timeout_scale)} s)")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", f"benchmarks.{mod}", *extra], cwd=ROOT, timeout=limit * timeout_scale,
                capture_output=True, text=True,
            )
            ok = proc.returncode == 0
            status[mod] = {"status": "ok" if ok else f"failed (exit {proc.returncode})",
                           "seconds": round(time.perf_counter() - t0, 1)}
            if not ok:
                log(f"{mod}: failed\n{proc.stderr[-2000:]}")
        except subprocess.TimeoutExpired:
            status[mod] = {"status": f"timed out after {int(limit * timeout_scale)} s",
                           "seconds": round(time.perf_counter() - t0, 1)}
            log(f"{mod}: timed out")
        log(f"{mod}: {status[mod]['status']} ({status[mod].get('seconds', 0)} s)")
    return status


def _demote(md: str) -> str:
    """Drop the results file's title and push its headings two levels down."""
    lines = md.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(("##" + ln) if re.match(r"^#{1,4} ", ln) else ln for ln in lines).strip()


def headline(anom: dict[str, Any] | None, drift: dict[str, Any] | None) -> list[str]:
    """Bullet lines with the numbers that answer the targets."""
    out: list[str] = []
    if anom:
        rows = sorted(anom["rows"], key=lambda r: -r["auroc"])
        lw = [r for r in rows if r["method"].startswith("linewatch")]
        peers = [r for r in rows if not r["method"].startswith(("linewatch", "DiffAE"))]
        if lw:
            b = lw[0]
            out.append(f"- Anomaly, best linewatch score: **{b['method']}** AUROC {fmt(b['auroc'])} "
                       f"(mono {fmt(b['auroc_mono'])}, poly {fmt(b['auroc_poly'])}); target >= 0.92: "
                       f"{'met' if b['auroc'] >= 0.92 else '**not met**'}.")
        if peers:
            p = peers[0]
            out.append(f"- Anomaly, best peer: **{p['method']}** AUROC {fmt(p['auroc'])} "
                       f"(mono {fmt(p['auroc_mono'])}, poly {fmt(p['auroc_poly'])}).")
    if drift:
        rows = drift["rows"]

        def get(kind: str, n: int, m: str, c: str, mode: str) -> float | None:
            return next((r[mode] for r in rows if r["kind"] == kind and r["n"] == n and r["method"] == m
                         and r["condition"] == c), None)

        lw = "linewatch z (i.i.d. null)"
        shipped = "linewatch z + quality + scores (lot null)"  # what the monitor runs
        conds = [c for c in dict.fromkeys(r["condition"] for r in rows) if c != "no fault"]
        if any(r["method"] == shipped for r in rows):
            for kind in ("iid", "lot"):
                far = get(kind, 100, shipped, "no fault", "rate_nominal")
                far_iid = get(kind, 100, lw, "no fault", "rate_nominal")
                det = ", ".join(f"{c} {fmt(get(kind, 100, shipped, c, 'rate_nominal'), 2)}" for c in conds)
                out.append(f"- Drift, shipped monitor (z + image-quality channels + anomaly scores, stratified lot null), "
                           f"{'i.i.d.' if kind == 'iid' else 'lot'} windows, n = 100, alpha 0.05: false alarms "
                           f"{fmt(far, 2)} (target <= 0.05; {fmt(far_iid, 2)} under the i.i.d. null); detection: {det}.")
        me = shipped if any(r["method"] == shipped for r in rows) else lw
        for kind in ("iid", "lot"):
            ms = list(dict.fromkeys(r["method"] for r in rows if r["kind"] == kind))
            if me not in ms:
                continue
            peers = [m for m in ms if not m.startswith("linewatch") and not m.startswith("DiffAE")]
            parts = []
            for c in conds:
                vals = {m: get(kind, 100, m, c, "rate_equal_far") for m in peers}
                vals = {m: v for m, v in vals.items() if v is not None}
                best = max(vals, key=lambda m: vals[m]) if vals else None
                peer = f"best peer {best} {fmt(vals[best], 2)}" if best else "no peer"
                parts.append(f"{c}: linewatch {fmt(get(kind, 100, me, c, 'rate_equal_far'), 2)}, {peer}")
            out.append(f"- Drift at an equal 5 % false-alarm rate, {'i.i.d.' if kind == 'iid' else 'lot'} windows, "
                       f"n = 100 (linewatch = {me}): " + "; ".join(parts) + ".")
    return out


def build_report(status: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write ``docs/results.md`` (and the plots) from ``benchmarks/results``."""
    from benchmarks import plots

    imgs = plots.make_all()
    anom = _json("bench_anomaly")
    drift = _json("bench_drift_faults")
    prev = _json("run_all") or {}
    status = {**prev.get("status", {}), **(status or {})}
    parts = [
        "# linewatch benchmark results\n",
        "_Generated by `make bench` (`python -m benchmarks.run_all`) from `benchmarks/results/`: do not edit by hand._\n",
        f"Machine: {MACHINE}. Generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC. Every number below was measured "
        "by a script in `benchmarks/` (its command is in each section); timings were taken while other jobs shared "
        "the cores, so they are pessimistic.\n",
        "## Headline\n",
        "\n".join(headline(anom, drift)) or "_No headline results yet._",
        "",
    ]
    img_for = {
        "bench_anomaly": ["anomaly_auroc.png"],
        "bench_drift_faults": ["drift_iid_nominal.png", "drift_iid_equal_far.png", "drift_lot_nominal.png",
                               "drift_lot_equal_far.png", "drift_false_alarms.png"],
    }
    have = {p.name for p in imgs}
    for title, names, blurb in SECTIONS:
        parts.append(f"## {title}\n\n{blurb}\n")
        for name in names:
            md = RESULTS / f"{name}.md"
            st = status.get(name, {}).get("status")
            if not md.exists():
                parts.append(f"### {name}\n\n**not run**{f' ({st})' if st else ''}.\n")
                continue
            parts.append(f"### {name}\n")
            if st and st != "ok":
                parts.append(f"_Last run status: {st}; the results below are from an earlier run._\n")
            for img in img_for.get(name, []):
                if img in have:
                    parts.append(f"![{img}](img/{img})\n")
            parts.append(_demote(md.read_text()) + "\n")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(parts))
    (RESULTS / "run_all.json").write_text(json.dumps({"status": status}, indent=2))
    log(f"wrote {DOC.relative_to(ROOT)} ({len(imgs)} plots)")
    return DOC


def _json(name: str) -> dict[str, Any] | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", help="run only these benchmark modules")
    ap.add_argument("--skip", nargs="+", default=[], help="benchmark modules to skip")
    ap.add_argument("--report-only", action="store_true", help="only rebuild docs/results.md and the plots")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every module's time limit")
    args = ap.parse_args(argv)
    status: dict[str, dict[str, Any]] = {}
    if not args.report_only:
        names = args.only or [m for m, _, _ in BENCHMARKS]
        unknown = [n for n in names + args.skip if n not in {m for m, _, _ in BENCHMARKS}]
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {[m for m, _, _ in BENCHMARKS]}")
        status = run_benchmarks([n for n in names if n not in args.skip], args.timeout_scale)
    build_report(status)
    return 0 if all(s["status"] in ("ok", "missing") for s in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
