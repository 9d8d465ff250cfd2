"""Replay the monitor's drift test of a finished soak's windows offline and compare it with the recorded verdicts.

For one model version of a soak (``benchmarks.soak``) this rebuilds, from the pipeline's own functions, what a
monitor pass tests a plant-day window with, and tests the windows again:

* the model: ``pipeline.monitoring.champion.load_bundle`` on its registry folder (``checkpoints/registry-v<N>``);
* the score family's reference: ``pipeline.monitoring.monitor.bundled_reference_scores`` (the bundle's patch family),
  or the residual family's (``champ.ref_scores``) when the model's saved flag scores are residual ones;
* the fitted detector: ``pipeline.monitoring.monitor.build_drift_detector`` (quality channels, lot-null blocks);
* the window: the line's catalog rows without golden captures (``split_golden``), joined with the model's saved
  latents and flag scores (``state/latents.parquet``, ``state/scores.parquet``: nothing is encoded or scored again),
  cut into windows by ``pipeline.analysis.windows.windows``;
* the test: ``pipeline.monitoring.monitor._drift_of_window`` (subsampling, strata, quality, scores).

The monitor's settings are the ``MonitorConfig`` defaults with the soak's ``monitor`` overrides (``soak_config.json``)
and the ``--set`` ones; the time zone and the BLAS threads are the soak's. Each window's family p-values are compared
with its recorded verdict (``state/windows.parquet``, to the summary's 3 significant figures) and with the
full-precision values the monitor logged to MLflow. The exit status is 1 when a window does not match.

Nothing is written under the soak's home: the pipeline's state folder is a temporary folder linking the soak's
tables (an image-quality value the soak never measured would be measured there, and dropped with it).

Command::

    python -m benchmarks.drift_replay --name soak_s42 --version 7 --windows L2:2026-01-13,L2:2026-01-14
    python -m benchmarks.drift_replay --name soak_s42 --version 7 --all-original --json out.json
    ... --code /path/to/checkout     # with another checkout's pipeline package (before / after a change)
    ... --set n_calibration=1000      # a MonitorConfig field changed (JSON value)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import re
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks import common as C

__all__ = ["FAMILIES", "ReplayError", "parse_windows", "monitor_settings", "recorded_windows", "replay", "compare",
           "mlflow_family_p", "main"]

FAMILIES = ("axes", "mmd", "scores", "quality")
#: The soak's state tables the replay reads (linked into the scratch state folder, never written).
STATE_TABLES = ("quality.parquet", "latents.parquet", "scores.parquet", "windows.parquet")
_SUMMARY_P = re.compile(r"\b(axes|mmd|scores|quality) p=([0-9.eE+-]+)")


class ReplayError(Exception):
    """A replay that cannot run (no such model, window or setting); its message is the one line ``main`` prints."""


# --------------------------------------------------------------------------------------------------------------
# What to replay, and with which settings
# --------------------------------------------------------------------------------------------------------------
def parse_windows(text: str) -> list[tuple[str, str]]:
    """The ``(line, window id)`` pairs of a comma-separated ``LINE:YYYY-MM-DD`` list (in order, without repeats)."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        line, _, day = item.partition(":")
        try:
            dt.date.fromisoformat(day)
        except ValueError:
            raise ReplayError(f"bad window {item!r}: expected LINE:YYYY-MM-DD, e.g. L2:2026-01-13") from None
        out.append((line, day))
    return list(dict.fromkeys(out))


def soak_config(home: Path) -> dict[str, Any]:
    """The soak's saved settings (``soak_config.json``; {} when it has none)."""
    path = home / "soak_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def monitor_settings(home: Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The ``MonitorConfig`` the soak's monitor ran with, then the ``FIELD=JSON`` overrides."""
    from pipeline.monitoring.config import monitor_config

    params = dict(soak_config(home).get("monitor") or {})
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ReplayError(f"--set {item}: expected FIELD=JSON, e.g. n_calibration=1000")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ReplayError(f"--set {item}: the value is not JSON (a string needs quotes: {key}='\"...\"')") from None
    try:
        config = monitor_config(**params)
    except (TypeError, ValueError) as exc:
        raise ReplayError(f"monitor settings: {exc}") from None
    if config.window_by != "day":
        raise ReplayError(f"window_by={config.window_by!r}: only plant-day windows are replayed")
    return config


def soak_settings(home: Path, scratch: Path) -> Any:
    """The pipeline settings of the soak's installation, with a scratch state folder linking the soak's tables.

    Files only are linked: the pipeline replaces a table atomically (the link, never its target) and no folder is
    linked, so nothing can be written into the soak's state.
    """
    from pipeline.settings import get_settings

    home = home.resolve()
    tz = soak_config(home).get("timezone") or "Europe/Berlin"
    settings = get_settings({"LINEWATCH_HOME": str(home), "LINEWATCH_TIMEZONE": tz,
                             "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"})
    scratch.mkdir(parents=True, exist_ok=True)
    for name in STATE_TABLES:
        src, dst = Path(settings.state_dir) / name, scratch / name
        if src.exists() and not (dst.exists() or dst.is_symlink()):
            dst.symlink_to(src)
    return dataclasses.replace(settings, state_dir=scratch)


def recorded_windows(home: Path, version: str | None = None, original: bool = False) -> pd.DataFrame:
    """The soak's recorded verdicts (``state/windows.parquet``), of one model version and only first ones if asked."""
    from pipeline.handoff.state import read_verdicts

    w = read_verdicts(home / "state" / "windows.parquet")
    w = w.assign(line=w["line"].astype(str), window_id=w["window_id"].astype(str))
    if version is not None:
        w = w[w["model_version"] == str(version)]
    return w[w["original"].astype(bool)] if original else w


# --------------------------------------------------------------------------------------------------------------
# The model, its saved tables and the windows
# --------------------------------------------------------------------------------------------------------------
def model_folder(home: Path, version: str) -> Path:
    """The checkpoint folder (with its ``linewatch/`` bundle) of ``registry-v<version>``, as download_model left it."""
    from pipeline.handoff.bundle import BUNDLE_DIR, CALIBRATION_FILE

    root = home / "checkpoints" / f"registry-v{version}"
    if not root.is_dir():
        known = sorted((p.name.removeprefix("registry-v") for p in (home / "checkpoints").glob("registry-v*")),
                       key=lambda v: (len(v), v))
        raise ReplayError(f"no model version {version} in {home.name} (versions: {', '.join(known) or 'none'})")
    hits = sorted(p.parent.parent for p in root.rglob(f"{BUNDLE_DIR}/{CALIBRATION_FILE}"))
    if len(hits) != 1:
        raise ReplayError(f"expected one {BUNDLE_DIR}/{CALIBRATION_FILE} under {root}, found {len(hits)}")
    return hits[0]


def model_tables(settings: Any, model_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The model's saved latents (``image_id, z_*``) and per-image flag scores (``image_id, score, scorer, ...``)."""
    from pipeline.latent.encode import z_columns
    from pipeline.monitoring.tables import latents_table_path, scores_table_path

    lat = pd.read_parquet(latents_table_path(settings))
    lat = lat[lat["model_id"] == model_id]
    lat = lat[["image_id", *z_columns(lat)]].drop_duplicates("image_id", keep="last")
    sc = pd.read_parquet(scores_table_path(settings))
    sc = sc[sc["model_id"] == model_id][["image_id", "score", "is_anomaly", "scorer", "day_offset"]]
    sc = sc.drop_duplicates("image_id", keep="last")
    if lat.empty or sc.empty:
        raise ReplayError(f"model {model_id} has no saved latents ({len(lat)}) or scores ({len(sc)})")
    return lat, sc


def reference_scores(settings: Any, champ: Any, config: Any, scorers: list[str]) -> Any:
    """The calibration cells' scores the score family compares with, as the monitor's ``score_images`` returns them.

    None (the residual family's, ``champ.ref_scores``) when the model's saved flag scores are the residual family's.
    """
    import numpy as np

    from pipeline.monitoring.monitor import bundled_reference_scores
    from pipeline.monitoring.patches import ChampionPatches

    if scorers == ["residual"]:
        return None
    ref = bundled_reference_scores(settings, champ, config)
    if ref is None and config.fusion:
        ref = ChampionPatches(settings, champ).fused(config.fpr, residual_weight=config.residual_weight).ref_scores
    return None if ref is None else np.asarray(ref, dtype=np.float64)


def window_frames(settings: Any, config: Any, wanted: list[tuple[str, str]], lat: pd.DataFrame,
                  sc: pd.DataFrame) -> dict[tuple[str, str], Any]:
    """The monitor's windows ``{(line, window id): Window}``: catalog rows with the saved z, score and flag."""
    from pipeline.analysis.windows import windows
    from pipeline.catalog.tables import read_catalog
    from pipeline.monitoring.golden import split_golden
    from pipeline.monitoring.scoring import local_time

    tz, out = settings.timezone, {}
    for line in sorted({ln for ln, _ in wanted}):
        days = sorted(day for ln, day in wanted if ln == line)
        start = pd.Timestamp(days[0]).tz_localize(tz) - pd.Timedelta(days=1)
        end = pd.Timestamp(days[-1]).tz_localize(tz) + pd.Timedelta(days=2)
        rows, _golden = split_golden(read_catalog(settings.catalog_root, lines=[line], start=start, end=end))
        # as score_images: catalog rows inner-joined with the model's latents, then the per-image flag score
        df = rows.merge(lat, on="image_id", how="inner")
        df = df.merge(sc[["image_id", "score", "is_anomaly", "day_offset"]], on="image_id", how="left")
        df["captured_local"] = local_time(df["captured_at"], tz)
        for w in windows(df, by=config.window_by, size=config.window_size, time_col="captured_local",
                         min_size=config.min_window, skipped=[]):
            if (line, w.window_id) in wanted:
                out[(line, w.window_id)] = w
    return out


# --------------------------------------------------------------------------------------------------------------
# The replay
# --------------------------------------------------------------------------------------------------------------
def prepare_pass(settings: Any, home: Path, version: str, config: Any,
                 wanted: list[tuple[str, str]]) -> tuple[Any, dict[tuple[str, str], Any], list[str]]:
    """The monitor's pass context (champion, fitted detector, quality table), the windows, and the model's scorers."""
    from pipeline.monitoring.champion import load_bundle
    from pipeline.monitoring.monitor import _Pass, build_drift_detector

    champ = load_bundle(model_folder(home, version), version, fpr=config.fpr, seed=config.seed)
    lat, sc = model_tables(settings, champ.model_id)
    scorers = sorted(sc["scorer"].astype(str).unique())
    frames = window_frames(settings, config, wanted, lat, sc)
    images = pd.concat([w.frame for w in frames.values()], ignore_index=True) if frames else None
    drift, quality = build_drift_detector(settings, champ, config, images,
                                          reference_scores(settings, champ, config, scorers))
    return _Pass(settings, config, champ, drift, quality, [], None), frames, scorers


def replay_window(ctx: Any, line: str, window: Any) -> dict[str, Any]:
    """One window's drift test as the monitor ran it: family p-values, fired families, summary, per-channel table."""
    from pipeline.monitoring.monitor import _drift_of_window

    frame = window.frame
    if frame["score"].isna().any():
        raise ReplayError(f"{line}:{window.window_id}: {int(frame['score'].isna().sum())} images without a saved score")
    t0 = time.perf_counter()
    res, n_tested = _drift_of_window(ctx, frame)
    pc = res.per_channel
    return {"line": line, "window_id": window.window_id, "start": pd.Timestamp(window.start).isoformat(),
            "n_images": len(frame), "n_tested": int(n_tested),
            "family_p": {k: float(v) for k, v in res.family_p.items()}, "fired": list(res.fired),
            "detected": bool(res.detected), "family_alpha": float(res.family_alpha), "summary": res.summary(),
            "seconds": round(time.perf_counter() - t0, 2),
            "per_channel": None if pc is None else
            pc[["channel", "effect_size", "p_value", "significant"]].to_dict("records")}


def replay(home: Path, version: str, wanted: list[tuple[str, str]], config: Any = None,
           scratch: Path | None = None) -> dict[str, Any]:
    """Test the soak's windows ``wanted`` again with model ``version``; a dict of the setup and one row per window.

    Args:
        home: the soak's home (read only).
        version: the registered model version.
        wanted: ``(line, window id)`` plant-day windows; one the model did not test is listed under ``missing``.
        config: the ``MonitorConfig`` (default: :func:`monitor_settings`, the soak's own).
        scratch: the pipeline's state folder (default: a temporary folder, removed afterwards).
    """
    from threadpoolctl import threadpool_limits

    home, version = Path(home).resolve(), str(version)
    config = config if config is not None else monitor_settings(home)
    threads = soak_config(home).get("threads") or None  # the soak's BLAS threads: sums run in the same order
    with tempfile.TemporaryDirectory(prefix="drift_replay-") as tmp, threadpool_limits(limits=threads):
        settings = soak_settings(home, Path(scratch) if scratch is not None else Path(tmp))
        t0 = time.perf_counter()
        ctx, frames, scorers = prepare_pass(settings, home, version, config, wanted)
        setup = time.perf_counter() - t0
        rows = [replay_window(ctx, line, frames[(line, day)]) for line, day in wanted if (line, day) in frames]
    return {"home": str(home), "version": version, "model_id": ctx.champ.model_id, "scorers": scorers,
            "score_family": bool(ctx.use_scores), "timezone": settings.timezone, "setup_s": round(setup, 2),
            "config": {f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
            "missing": [f"{line}:{day}" for line, day in wanted if (line, day) not in frames], "windows": rows}


# --------------------------------------------------------------------------------------------------------------
# Comparison with what the monitor recorded
# --------------------------------------------------------------------------------------------------------------
def summary_p(summary: str) -> dict[str, float]:
    """The family p-values a verdict's summary text states (3 significant figures)."""
    return {k: float(v) for k, v in _SUMMARY_P.findall(summary or "")}


def mlflow_family_p(home: Path) -> dict[tuple[str, str, int], dict[str, set[float]]]:
    """Full-precision family p-values the monitor logged to MLflow (``<family>/p`` of the monitoring runs).

    Keyed by ``(line, model version, window start in ms)``, each family with the values of every pass that logged
    the window; read from ``mlflow.db`` opened read-only ({} when there is none).
    """
    db = Path(home) / "mlflow.db"
    if not db.is_file():
        return {}
    query = """
        select tl.value, tv.value, m.timestamp, m.key, m.value from metrics m
        join tags tl on tl.run_uuid = m.run_uuid and tl.key = 'line'
        join tags tv on tv.run_uuid = m.run_uuid and tv.key = 'model_version'
        join tags tk on tk.run_uuid = m.run_uuid and tk.key = 'linewatch.kind' and tk.value = 'monitoring'
        where m.key in ('axes/p', 'mmd/p', 'scores/p', 'quality/p')"""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        out: dict[tuple[str, str, int], dict[str, set[float]]] = {}
        for line, ver, ts, key, val in con.execute(query):
            out.setdefault((str(line), str(ver), int(ts)), {}).setdefault(key.split("/")[0], set()).add(float(val))
        return out
    except sqlite3.Error:
        return {}
    finally:
        con.close()


def _fmt(p: float | None) -> str:
    """A p-value as the verdict summaries write it (3 significant figures; "-" for none)."""
    return "-" if p is None else f"{p:.3g}"


def compare(result: dict[str, Any], recorded: pd.DataFrame, logged: dict) -> dict[str, Any]:
    """A replayed window with what the monitor recorded of it (``recorded``: ``recorded_windows`` of the version).

    Adds ``recorded`` (the verdict's family p-values, fired families, rows tested), ``match`` (the same p-values to
    3 significant figures and the same rows tested), ``summary_identical`` and ``mlflow_max_abs_diff`` (the largest
    difference from any logged full-precision value of the window; None when none was logged).
    """
    out = dict(result)
    r = recorded[(recorded["line"] == result["line"]) & (recorded["window_id"] == result["window_id"])]
    if r.empty:
        return {**out, "recorded": None, "match": False, "summary_identical": False, "mlflow_max_abs_diff": None}
    r = r.iloc[0]
    rp, fam = summary_p(r["summary"]), result["family_p"]
    out["recorded"] = {"family_p": rp, "fired": r["fired"], "n_tested": int(r["n_tested"]),
                       "original": bool(r["original"]), "summary": r["summary"]}
    out["match"] = all(_fmt(fam.get(k)) == _fmt(rp.get(k)) for k in set(fam) | set(rp)) \
        and int(r["n_tested"]) == result["n_tested"]
    out["summary_identical"] = r["summary"] == result["summary"]
    key = (result["line"], str(r["model_version"]), int(pd.Timestamp(result["start"]).value // 10**6))
    diffs = [abs(fam[k] - v) for k, vals in logged.get(key, {}).items() if k in fam for v in vals]
    out["mlflow_max_abs_diff"] = max(diffs) if diffs else None
    return out


def comparison_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One line per window: replayed/recorded rows tested, family p-values and fired families, and the match."""
    table = []
    for r in rows:
        rec = r.get("recorded") or {"family_p": {}, "fired": None, "n_tested": None, "original": None}
        d = r.get("mlflow_max_abs_diff")
        table.append({"window": f"{r['line']} {r['window_id']}", "orig": rec["original"],
                      "n": f"{r['n_tested']}/{rec['n_tested']}",
                      **{k: f"{_fmt(r['family_p'].get(k))}/{_fmt(rec['family_p'].get(k))}" for k in FAMILIES},
                      "fired": f"{','.join(r['fired']) or '-'}/{rec['fired'] or '-'}",
                      "match": "YES" if r["match"] else "NO", "summary==": "yes" if r["summary_identical"] else "no",
                      "mlflow|d|": "n/a" if d is None else f"{d:.2g}", "s": r["seconds"]})
    return pd.DataFrame(table)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are a ``ReplayError`` (one line from ``main``), not usage text and an exit."""

    def error(self, message: str) -> Any:
        raise ReplayError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = _Parser(prog="python -m benchmarks.drift_replay", description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True, help="the soak (benchmarks/out/soak/<name>)")
    ap.add_argument("--version", help="the registered model version (checkpoints/registry-v<N>); required")
    ap.add_argument("--windows", default="", help="plant-day windows, comma-separated LINE:YYYY-MM-DD")
    ap.add_argument("--all-original", action="store_true",
                    help="also every window whose first verdict this model version made")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="change a MonitorConfig field (JSON value), e.g. --set n_calibration=1000; repeatable")
    ap.add_argument("--code", type=Path, default=None,
                    help="import the 'pipeline' package from this checkout instead of this one")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return ap.parse_args(argv)


def use_code(code: Path) -> None:
    """Import the ``pipeline`` (and ``models``) packages from another checkout ``code``."""
    root = code.resolve()
    if not (root / "pipeline" / "__init__.py").is_file():
        raise ReplayError(f"--code {code}: no pipeline package there")
    loaded = sys.modules.get("pipeline")
    if loaded is not None and Path(loaded.__file__).resolve().parent != root / "pipeline":
        raise ReplayError(f"--code {code}: the pipeline package is already imported from {loaded.__file__}")
    sys.path.insert(0, str(root))


def wanted_windows(home: Path, args: argparse.Namespace) -> list[tuple[str, str]]:
    """The windows the command line asks for: ``--windows``, then the version's first verdicts with --all-original."""
    wanted = parse_windows(args.windows)
    if args.all_original:
        w = recorded_windows(home, args.version, original=True)
        wanted += list(zip(w["line"], w["window_id"], strict=True))
    wanted = list(dict.fromkeys(wanted))
    if not wanted:
        raise ReplayError("no windows: give --windows LINE:YYYY-MM-DD,... or --all-original")
    return wanted


def report(run: dict[str, Any]) -> None:
    """Print the setup, the windows not found, and the replayed/recorded table."""
    import pipeline

    cfg = run["config"]
    print(f"pipeline from {Path(pipeline.__file__).parent}; soak {run['home']}; model v{run['version']} "
          f"({run['model_id']}); scorer(s) {run['scorers']}, score family {'on' if run['score_family'] else 'off'}; "
          f"tz {run['timezone']}; setup {run['setup_s']:.1f} s")
    print("monitor config: " + " ".join(f"{k}={cfg[k]}" for k in (
        "alpha", "null", "n_calibration", "seed", "min_window", "quality", "scores", "fusion", "residual_weight")))
    for w in run["missing"]:
        print(f"!! window {w}: not found (no saved latents of this model, or fewer than min_window images)")
    if run["windows"]:
        print(comparison_table(run["windows"]).to_string(index=False))
    n_match = sum(r["match"] for r in run["windows"])
    print(f"{n_match} of {len(run['windows']) + len(run['missing'])} windows match the recorded verdicts")


def main(argv: list[str] | None = None) -> int:
    """Command line: replay the windows, print the comparison, exit 1 when one does not match."""
    try:
        args = parse_args(argv)
        home = C.OUT / "soak" / args.name
        if not (home / "state" / "windows.parquet").is_file():
            print(f"drift_replay: no verdicts under {home}: run the soak first")
            return 2
        if args.version is None:
            raise ReplayError("--version is required (the soak's model versions: checkpoints/registry-v<N>)")
        if args.code is not None:
            use_code(args.code)
        run = replay(home, args.version, wanted_windows(home, args), monitor_settings(home, args.set))
    except ReplayError as exc:
        print(f"drift_replay: {exc}")
        return 2
    recorded, logged = recorded_windows(home, run["version"]), mlflow_family_p(home)
    run["windows"] = [compare(r, recorded, logged) for r in run["windows"]]
    report(run)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(run, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0 if not run["missing"] and all(r["match"] for r in run["windows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
