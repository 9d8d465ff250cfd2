"""alibi-detect's online drift detectors on the window vectors of ``bench_spc``, in their own virtualenv.

alibi-detect needs numpy < 2 and is BSL-licensed, so it never enters the linewatch environment: ``make peers``
builds ``.venv-peers`` and ``benchmarks/bench_spc.py`` runs this script there on ``.npz`` files it wrote (one per
replicate: the Phase I window vectors ``ref``, an in-control sequence ``ic``, and per fault ``fault_i`` (streams,
windows, K) with its ``label_i``). Every detector is configured with the Phase I windows as reference and the same
expected run time (ERT = ARL0, in windows); after a detection it is reset, as the chart is.

Run: ``.venv-peers/bin/python benchmarks/spc_peers.py --ert 200 --onset 20 --out OUT.json REP.npz ...``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def run_lengths(det, X):
    """Positions of the detections in a sequence, resetting after each."""
    det.reset_state()
    hits = []
    for t, x in enumerate(X):
        if det.predict(x.astype(np.float32))["data"]["is_drift"]:
            hits.append(t)
            det.reset_state()
    return hits


def first_after(det, X, onset):
    """Faulty windows seen at the first detection at or after ``onset`` (earlier ones reset), else None."""
    det.reset_state()
    for t, x in enumerate(X):
        if det.predict(x.astype(np.float32))["data"]["is_drift"]:
            if t >= onset:
                return t - onset + 1
            det.reset_state()
    return None


def make(kind, ref, ert):
    from alibi_detect.cd import CVMDriftOnline, LSDDDriftOnline

    ref = ref.astype(np.float32)
    if kind == "CVMDriftOnline":
        # the threshold is a (1 - 1/ERT)-ish quantile of bootstrapped statistics: enough draws for it at a large ERT
        return CVMDriftOnline(ref, ert=ert, window_sizes=[5, 20], n_bootstraps=max(20000, int(60 * ert)), verbose=False)
    return LSDDDriftOnline(ref, ert=ert, window_size=10, backend="pytorch", n_bootstraps=max(2000, int(10 * ert)),
                           verbose=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--ert", type=float, required=True)
    ap.add_argument("--onset", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lsdd", action="store_true")
    args = ap.parse_args()
    kinds = ["CVMDriftOnline", *(["LSDDDriftOnline"] if args.lsdd else [])]
    out = {k: {"ic_windows": 0, "ic_alarms": 0, "run_lengths": [], "delays": {}, "config_s": []} for k in kinds}
    for path in args.inputs:
        d = np.load(path)
        for k in kinds:
            t0 = time.perf_counter()
            det = make(k, d["ref"], args.ert)
            out[k]["config_s"].append(time.perf_counter() - t0)
            hits = run_lengths(det, d["ic"])
            out[k]["ic_windows"] += len(d["ic"])
            out[k]["ic_alarms"] += len(hits)
            out[k]["run_lengths"] += np.diff(np.r_[-1, hits]).tolist()
            i = 0
            while f"fault_{i}" in d:
                label = str(d[f"label_{i}"])
                out[k]["delays"].setdefault(label, []).extend(
                    first_after(det, X, args.onset) for X in d[f"fault_{i}"])
                i += 1
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
