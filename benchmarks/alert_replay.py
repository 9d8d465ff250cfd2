"""Replay a soak's window verdicts through the alert manager under another policy (an offline check of a policy).

A soak (``benchmarks.soak``) keeps every window's verdict as first made (``state/windows.parquet``, rows with
``original``), with the causes it named. This feeds those causes, line by line in window order, to a fresh
``AlertManager`` with the policy given, and lists the events it would have sent. The verdicts themselves are the
soak's: a different policy would also have changed which windows the nightly excluded, so later models (and their
verdicts) could differ; the replay answers "what would this policy have said about these verdicts".

Command::

    python -m benchmarks.alert_replay --name soak_s31 --cooldown-windows 2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd

from benchmarks import common as C

__all__ = ["cause_of", "replay", "main"]


def cause_of(key: str) -> Any:
    """The ``Cause`` a stored cause key stands for (its family from the key: ``axes:``/``mmd`` are latent)."""
    from pipeline.monitoring.causes import Cause

    family = "latent" if key.startswith("axes:") or key == "mmd" else key.split(":")[0]
    return Cause(key, family, (), (), (), (), key)


def replay(windows: pd.DataFrame, policy: Any, state_dir: Path) -> pd.DataFrame:
    """Events (``line``, ``window_id``, ``kind``, ``key``) of ``policy`` on the windows' stored causes.

    Args:
        windows: rows of ``state/windows.parquet`` (``line``, ``window_id``, ``causes``: comma-separated keys;
            only ``original`` rows are used when the column is there).
        policy: an ``AlertPolicy``.
        state_dir: an empty folder for the replay's alert state.
    """
    from unittest import mock

    from pipeline.monitoring import alerts as AL

    w = windows[windows["original"]] if "original" in windows.columns else windows
    rows = []
    for line, g in w.sort_values(["line", "window_id"]).groupby("line"):
        manager = AL.AlertManager(state_dir / str(line), policy, [])
        for _, r in g.iterrows():
            causes = [cause_of(k) for k in str(r["causes"] or "").split(",") if k]
            result = SimpleNamespace(detected=bool(causes), meta={})
            with mock.patch("pipeline.monitoring.causes.window_causes", lambda *a, cs=causes, **k: cs):
                events = manager.update(str(line), str(r["window_id"]), result,
                                        SimpleNamespace(text="", axes=()) if causes else None)
            rows += [{"line": line, "window_id": r["window_id"], "kind": e.kind, "key": e.alert.dedup_key}
                     for e in events]
    return pd.DataFrame(rows, columns=["line", "window_id", "kind", "key"])


def main(argv: list[str] | None = None) -> int:
    """Command line: print the events of the policy on a soak's verdicts."""
    from pipeline.monitoring.alerts import AlertPolicy

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True, help="the soak (benchmarks/out/soak/<name>)")
    ap.add_argument("--cooldown-windows", type=int, default=AlertPolicy.cooldown_windows,
                    help=f"the policy's cooldown (default {AlertPolicy.cooldown_windows})")
    ap.add_argument("--k-consecutive", type=int, default=AlertPolicy.k_consecutive,
                    help=f"windows to open (default {AlertPolicy.k_consecutive})")
    ap.add_argument("--resolve-after", type=int, default=AlertPolicy.resolve_after,
                    help=f"windows to resolve (default {AlertPolicy.resolve_after})")
    ap.add_argument("--immediate", default=",".join(AlertPolicy.immediate_families),
                    help="families whose alert opens at their first window, comma-separated "
                         f"(default {','.join(AlertPolicy.immediate_families)})")
    args = ap.parse_args(argv)
    path = C.OUT / "soak" / args.name / "state" / "windows.parquet"
    if not path.is_file():
        print(f"alert_replay: no {path}: run the soak first")
        return 2
    policy = AlertPolicy(k_consecutive=args.k_consecutive, resolve_after=args.resolve_after,
                         cooldown_windows=args.cooldown_windows,
                         immediate_families=tuple(f for f in args.immediate.split(",") if f))
    with tempfile.TemporaryDirectory() as tmp:
        events = replay(pd.read_parquet(path), policy, Path(tmp))
    print(events.to_string(index=False) if len(events) else "no events")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
