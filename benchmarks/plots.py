"""PNG plots of the evidence benchmarks (read from ``benchmarks/results/*.json``, written to ``docs/img/``).

Small files on purpose (low dpi, few colours): the whole set stays at a few hundred KB.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import RESULTS, ROOT  # noqa: E402

IMG = ROOT / "docs" / "img"
DPI = 72


def _load(name: str) -> dict[str, Any] | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _save(fig: Any, name: str) -> Path:
    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / name
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_anomaly(res: dict[str, Any]) -> Path:
    """Grouped bars: AUROC overall / mono / poly per method."""
    rows = sorted(res["rows"], key=lambda r: r["auroc"])
    names = [r["method"] for r in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2))
    for k, (key, lab) in enumerate((("auroc", "all"), ("auroc_mono", "mono"), ("auroc_poly", "poly"))):
        vals = [np.nan if r[key] is None else r[key] for r in rows]
        ax.barh(y + (k - 1) * 0.27, vals, height=0.27, label=lab)
    ax.axvline(0.92, color="k", ls="--", lw=1)
    ax.axvline(0.872, color="grey", ls=":", lw=1)
    ax.text(0.92, len(rows) - 0.3, " target 0.92", fontsize=7)
    ax.text(0.872, -0.9, "InCTRL 0.872 ", fontsize=7, ha="right", color="grey")
    ax.set_yticks(y, names, fontsize=7)
    ax.set_xlim(0.4, 1.0)
    ax.set_xlabel("image AUROC (held-out functional vs p = 1)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("ELPV anomaly detection, lot-level split", fontsize=9)
    return _save(fig, "anomaly_auroc.png")


def plot_drift(res: dict[str, Any], kind: str, mode: str) -> Path:
    """Detection rate against window size, one panel per condition, one line per method."""
    rows = [r for r in res["rows"] if r["kind"] == kind]
    conds = list(dict.fromkeys(r["condition"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(conds), figsize=(2.0 * len(conds), 2.6), sharey=True)
    for ax, c in zip(np.atleast_1d(axes), conds, strict=False):
        for m in methods:
            pts = sorted((r["n"], r[mode]) for r in rows if r["condition"] == c and r["method"] == m)
            if pts:
                style = "-" if m.startswith("linewatch") else "--"
                ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, lw=1.2, label=m)
        ax.axhline(0.05 if c == "no fault" else 0.9, color="k", lw=0.6, ls=":")
        ax.set_title(c, fontsize=7)
        ax.set_xlabel("n", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_ylim(-0.02, 1.02)
    np.atleast_1d(axes)[0].set_ylabel("rate", fontsize=7)
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=6, loc="lower center", ncol=4, bbox_to_anchor=(0.5, -0.16))
    title = {"rate_nominal": "nominal alpha = 0.05", "rate_equal_far": "equal false-alarm rate (5 %)"}[mode]
    fig.suptitle(f"Drift detection, {'i.i.d.' if kind == 'iid' else 'lot'} windows, {title}", fontsize=8, y=1.08)
    return _save(fig, f"drift_{kind}_{'nominal' if mode == 'rate_nominal' else 'equal_far'}.png")


def plot_far(res: dict[str, Any]) -> Path:
    """False-alarm rate at nominal alpha per method, i.i.d. vs lot windows (each n)."""
    rows = [r for r in res["rows"] if r["condition"] == "no fault"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ns = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.35 * len(methods) + 1.4), sharey=True)
    y = np.arange(len(methods))
    for ax, kind in zip(axes, ("iid", "lot"), strict=True):
        for k, n in enumerate(ns):
            vals = [next((r["rate_nominal"] for r in rows if r["kind"] == kind and r["n"] == n and r["method"] == m),
                         np.nan) for m in methods]
            ax.barh(y + (k - 1) * 0.27, vals, height=0.27, label=f"n = {n}")
        ax.axvline(0.05, color="k", ls="--", lw=1)
        ax.set_title(f"{'i.i.d.' if kind == 'iid' else 'lot'} windows", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("false-alarm rate at alpha = 0.05", fontsize=7)
    axes[0].set_yticks(y, methods, fontsize=7)
    axes[1].legend(fontsize=7)
    return _save(fig, "drift_false_alarms.png")


def make_all() -> list[Path]:
    """Every plot whose results exist; returns the written paths."""
    out = []
    a = _load("bench_anomaly")
    if a:
        out.append(plot_anomaly(a))
    d = _load("bench_drift_faults")
    if d:
        for kind in ("iid", "lot"):
            for mode in ("rate_nominal", "rate_equal_far"):
                if any(r["kind"] == kind for r in d["rows"]):
                    out.append(plot_drift(d, kind, mode))
        out.append(plot_far(d))
    return out


if __name__ == "__main__":
    for p in make_all():
        print(p.relative_to(ROOT), f"{p.stat().st_size / 1024:.0f} KB")
