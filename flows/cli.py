"""``linewatch`` sub-commands that run flows: ``demo``, ``nightly``, ``retrain``, ``monitor``, ``serve``.

Discovered through the ``linewatch.commands`` entry point (``flows = "flows.cli"``). Prefect is imported only when a
command runs, after ``PREFECT_HOME`` has been pointed under ``LINEWATCH_HOME`` (no ``~/.prefect`` side effects
when no Prefect server is configured).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _prefect_home() -> None:
    from flows import use_local_prefect_home
    from pipeline.settings import get_settings

    use_local_prefect_home(get_settings().home)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str))


def _tracking_down(command: str) -> bool:
    """Print one line and return True when MLflow cannot be reached (checked before any flow starts)."""
    from pipeline import tracking

    try:
        tracking.check_reachable()
    except tracking.TrackingUnavailable as exc:
        print(f"linewatch {command}: {exc} Nothing ran.", file=sys.stderr)
        return True
    return False


# ------------------------------------------------------------------------------------------------ demo
class FlowRunner:
    """Runs the demo's steps as Prefect flows (ephemeral local API when no server is configured)."""

    def ingest(self) -> dict[str, Any]:
        """The ingest flow."""
        from flows.ingest import ingest_flow

        return ingest_flow()

    def retrain(self, **params: Any) -> dict[str, Any]:
        """The retrain flow."""
        from flows.retrain import retrain_flow

        return retrain_flow(**params)

    def monitor(self, **params: Any) -> dict[str, Any]:
        """The monitor flow."""
        from flows.monitor import monitor_flow
        from flows.runners import with_task_runner

        return with_task_runner(monitor_flow)(**params)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo (see ``pipeline.demo``)."""
    import logging
    import os

    from flows import use_local_prefect_home
    from pipeline.demo import DemoConfig, LocalRunner, prepare_environment, run_demo

    config = DemoConfig(
        home=Path(args.home), preset=args.preset, days=args.days, per_day=args.per_day,
        steps_first=args.steps_first, steps_second=args.steps_second, seed=args.seed,
        progress=sys.stderr.isatty(),
    )
    home = prepare_environment(config)
    print(f"[demo] fresh demo home {home} (wiped and recreated on every run)")
    if args.no_prefect:
        runner: Any = LocalRunner(progress=config.progress)
    else:
        prefect_home = use_local_prefect_home(home)
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        print(f"[demo] Prefect flows run locally (ephemeral API, state in {prefect_home})")
        runner = FlowRunner()
    for name in ("mlflow", "alembic", "pipeline", "httpx"):
        if not (getattr(args, "verbose", False) or getattr(args, "verbose_cmd", False)):
            logging.getLogger(name).setLevel(logging.WARNING)
    result = run_demo(config, runner, fresh=False)
    return 0 if result.ok else 1


# ------------------------------------------------------------------------------------------------ flows once
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_ARGS = 2
EXIT_REJECTED = 3
EXIT_NO_CANDIDATE = 4
EXIT_NOTHING_YET = 4
"""``linewatch monitor`` on a line without a champion yet: nothing monitored, not a failure."""
_STATUS_EXIT = {"promoted": EXIT_OK, "rejected": EXIT_REJECTED, "no_candidate": EXIT_NO_CANDIDATE, "failed": EXIT_FAILED}

EXIT_CODES_HELP = """\
exit status:
  0  done; a retrained candidate passed the gate and is the champion
  1  a step failed (the message names it); a failed retrain leaves the champion in place
  2  bad arguments or settings (nothing ran)
  3  the candidate was refused by the gate (including one the monitor could not use): the champion stays,
     an ops alert was sent
  4  too few healthy images to train a candidate, even reaching back --max-lookback-days: the champion stays,
     an ops alert was sent
"""

MONITOR_EXIT_HELP = """\
exit status:
  0  done
  1  failed (one line names why)
  2  bad arguments or settings (nothing ran)
  4  nothing monitored yet: the line has no champion (its first model is promoted by a nightly once the
     catalog holds four line-days)
"""


def _fail(command: str, exc: BaseException) -> int:
    """One line on stderr for a run that failed, and the exit status."""
    print(f"linewatch {command}: failed: {exc if hasattr(exc, 'step') else f'{type(exc).__name__}: {exc}'}",
          file=sys.stderr)
    return EXIT_FAILED


def _retrain_params(args: argparse.Namespace, monitor: dict[str, Any]) -> dict[str, Any]:
    """Retrain parameters from the command line, validated (a bad one is a one-line error, exit 2)."""
    from pipeline.cli import CLIError
    from pipeline.training.retrain import retrain_config

    params = {"preset": args.preset, "steps": args.steps, "window_days": args.window_days,
              "max_lookback_days": args.max_lookback_days, "from_scratch": args.from_scratch, "monitor": monitor}
    try:
        from models.presets import get_preset

        get_preset(args.preset)
        retrain_config(**params).calibration_floor()
    except (ValueError, KeyError) as exc:
        raise CLIError(str(exc).strip("'\"")) from None
    return params


def _monitor_params(args: argparse.Namespace) -> dict[str, Any]:
    """Monitor settings from the command line, validated."""
    from pipeline.cli import CLIError
    from pipeline.monitoring.monitor import monitor_config

    params = {k: v for k, v in {
        "lookback_days": getattr(args, "lookback_days", None), "window_by": getattr(args, "window_by", None),
        "start": getattr(args, "start", None), "end": getattr(args, "end", None), "min_window": args.min_window,
        "quality": False if getattr(args, "no_quality", False) else None,
        "scores": False if getattr(args, "no_scores", False) else None,
        "heatmaps": False if getattr(args, "no_heatmaps", False) else None,
        "fusion": False if getattr(args, "no_fusion", False) else None,
        "residual_weight": getattr(args, "residual_weight", None),
        "recentre": False if getattr(args, "no_recentre", False) else None,
    }.items() if v is not None}
    try:
        monitor_config(**params)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    return params


def _retrain_line(res: dict[str, Any]) -> str:
    if res.get("status") in ("no_candidate", "failed"):
        return f"retrain: no new model ({res['status']}), the champion stays: {res.get('reason', '')}"
    verdict = "promoted to champion" if res["promoted"] else f"NOT promoted, champion v{res['parent_version'] or '-'} stays"
    return (f"retrain: model v{res['version']} {verdict} ({res['gate']['reason']}); {res['n_train']} train / "
            f"{res['n_calibration']} calibration images over {res.get('lookback_days', '?')} days, "
            f"excluded {res['excluded']}")


def _monitor_lines(res: dict[str, Any]) -> list[str]:
    out = [f"monitor: model v{res['model_version']}, {len(res['windows'])} windows, {res['n_encoded']} images"]
    for w in res["windows"]:
        verdict = f"DRIFT ({', '.join(w.get('causes') or w.get('fired') or [])})" if w["detected"] else "no drift"
        alerts = "; ".join(f"alert {e['kind']} {e['alert'].get('cause', '')}".rstrip() for e in w.get("events", ()))
        serials = f"; most unusual: {', '.join(w['example_serials'][:3])}" if w["detected"] and w.get(
            "example_serials") else ""
        again = "" if w.get("original", True) else " (re-evaluation, the original verdict stands)"
        out.append(f"  line {w['line']} {w['window_id']}: {w['n_images']} images, {w['n_anomalous']} flagged, "
                   f"{verdict}{'; ' + alerts if alerts else ''}{serials}{again}")
    for s in res.get("skipped", ()):
        out.append(f"  skipped {s['window_id']}: {s['reason']}")
    return out


def cmd_nightly(args: argparse.Namespace) -> int:
    """Run the nightly flow once now."""
    monitor = _monitor_params(args)
    retrain = _retrain_params(args, monitor)
    if _tracking_down("nightly"):
        return EXIT_FAILED
    _prefect_home()
    from flows import StepFailed
    from flows.nightly import nightly_flow

    try:
        out = nightly_flow(ingest=not args.no_ingest, retrain=retrain,
                           monitor={"skip": True} if args.no_monitor else monitor)
    except StepFailed as exc:
        return _fail("nightly", exc)
    if args.json:
        _print_json(out)
    else:
        if "ingest" in out:
            print(f"ingest: {out['ingest'].get('registered', 0)} registered, "
                  f"{out['ingest'].get('n_quarantined', 0)} quarantined")
        print(_retrain_line(out["retrain"]))
        if "monitor" in out:
            print("\n".join(_monitor_lines(out["monitor"])))
        elif "monitor_skipped" in out:
            print(f"monitor: skipped ({out['monitor_skipped']})")
    return _STATUS_EXIT[out["status"]]


def cmd_retrain(args: argparse.Namespace) -> int:
    """Run the retrain flow once now."""
    params = _retrain_params(args, _monitor_params(args))
    if _tracking_down("retrain"):
        return EXIT_FAILED
    _prefect_home()
    from flows.retrain import retrain_flow
    from pipeline.training.retrain import InsufficientData

    try:
        res = retrain_flow(**params)
    except InsufficientData as exc:
        print(f"linewatch retrain: no candidate, the champion stays: {exc}", file=sys.stderr)
        return EXIT_NO_CANDIDATE
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        return _fail("retrain", exc)
    _print_json(res) if args.json else print(_retrain_line(res))
    return EXIT_OK if res["promoted"] else EXIT_REJECTED


def cmd_monitor(args: argparse.Namespace) -> int:
    """Run the monitor flow once now."""
    params = _monitor_params(args)
    if _tracking_down("monitor"):
        return EXIT_FAILED
    _prefect_home()
    from flows.monitor import monitor_flow
    from flows.runners import with_task_runner

    try:
        res = with_task_runner(monitor_flow)(encode_chunk_size=args.encode_chunk_size, **params)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        return _fail("monitor", exc)
    if args.json:
        _print_json(res)
    else:
        print(f"monitor: skipped ({res['skipped']})" if res.get("skipped") else "\n".join(_monitor_lines(res)))
    return EXIT_NOTHING_YET if res.get("skipped") else EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the scheduled deployments (blocks)."""
    _prefect_home()
    from flows.deploy import serve

    serve(args.timezone, webhook_url=args.webhook)
    return 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's layout and appends every option's default to its help."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the whole result as JSON instead of a summary")
    p.add_argument("--verbose", action="store_true", dest="verbose_cmd",
                   help="also show HTTP requests, Prefect internals and debug messages")


def _retrain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu",
                   help="model preset: tiny, cpu, pretrained (frozen ImageNet backbone + trained head; trains from "
                   "the catalog's feature store), standard or large")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps of the training (warm start or scratch)")
    p.add_argument("--window-days", type=int, default=7, help="training window: the last N days of the catalog")
    p.add_argument("--max-lookback-days", type=int, default=28,
                   help="how far back the window may reach for healthy images when alerted days and flagged images "
                        "leave it short")
    p.add_argument("--from-scratch", action="store_true", help="ignore the champion: train from initialisation")


def _monitor_options(p: argparse.ArgumentParser, *, full: bool) -> None:
    p.add_argument("--min-window", type=int, default=30,
                   help="smallest window tested; a candidate model needs a reference of at least twice this")
    if not full:
        p.add_argument("--lookback-days", type=float, default=2.0, help="days before the newest image monitored")
        return
    p.add_argument("--lookback-days", type=float, default=2.0,
                   help="days before the newest image monitored (when --start is not given)")
    p.add_argument("--window-by", choices=("day", "shift"), default="day",
                   help="window: plant day or shift, in LINEWATCH_TIMEZONE")
    p.add_argument("--start", default=None, help="ISO 8601 start (default: --lookback-days from the newest image)")
    p.add_argument("--end", default=None, help="ISO 8601 end, exclusive (default: open)")
    p.add_argument("--no-quality", action="store_true",
                   help="skip the full-resolution image-quality channels (blur, noise, rotation)")
    p.add_argument("--no-scores", action="store_true",
                   help="skip the test of the windows' anomaly scores against the reference's")
    p.add_argument("--no-heatmaps", action="store_true",
                   help="skip the heatmap overlays of a drifted window's top flagged cells (alert and drift report)")
    p.add_argument("--no-fusion", action="store_true",
                   help="flag cells by the diffusion residual alone (default: the backbone's patch maps judged "
                        "against the calibration cells')")
    p.add_argument("--residual-weight", type=float, default=0.0, metavar="W",
                   help="weight of the diffusion residual fused into the patch maps' per-image score (0: the patch "
                        "maps alone, no residuals computed; 1: both equally)")
    p.add_argument("--no-recentre", action="store_true",
                   help="flag cells against the calibration cells only (default: against their own line-day's "
                        "median and spread, so a day of new lots is flagged at about the configured rate)")
    p.add_argument("--encode-chunk-size", type=int, default=None,
                   help="images per parallel encode task (None: 1024 with LINEWATCH_TASK_RUNNER=dask, else 0 = off)")


def register(subparsers: Any) -> None:
    """Add the flow commands to the ``linewatch`` parser."""
    _register_demo(subparsers)
    _register_jobs(subparsers)
    p = subparsers.add_parser("serve", help="serve the scheduled deployments (nightly 02:00, monitor /15 min, "
                              "ingest /10 min) with flow.serve", formatter_class=_HelpFormatter)
    p.add_argument("--timezone", default=None, help="schedule time zone (None: LINEWATCH_TIMEZONE)")
    p.add_argument("--webhook", default=None, help="create the drift-alert automation posting to this URL")
    p.add_argument("--verbose", action="store_true", dest="verbose_cmd",
                   help="also show HTTP requests and Prefect internals")
    p.set_defaults(func=cmd_serve)


def _register_demo(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the main job end to end: simulate a line with a fault, ingest, retrain, monitor, alert, retrain",
        description="Runs everything locally (SQLite MLflow, local Prefect), in ~15 minutes on 2 cores. "
        "The demo home is wiped and recreated on every run.", formatter_class=_HelpFormatter,
    )
    p.add_argument("--home", default=".linewatch/demo", help="demo LINEWATCH_HOME")
    p.add_argument("--preset", default="cpu", help="model preset")
    p.add_argument("--days", type=int, default=8, help="simulated production days")
    p.add_argument("--per-day", type=int, default=64, help="captures per day")
    p.add_argument("--steps-first", type=int, default=400, help="steps of the first training")
    p.add_argument("--steps-second", type=int, default=150, help="steps of the warm-started second training")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulation and the trainings")
    p.add_argument("--no-prefect", action="store_true", help="call the jobs directly instead of as Prefect flows")
    p.add_argument("--verbose", action="store_true", dest="verbose_cmd",
                   help="also show HTTP requests and Prefect internals")
    p.set_defaults(func=cmd_demo)


def _register_jobs(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "nightly", help="run the nightly flow (ingest -> retrain -> monitor) once now",
        description="Ingest the drop folder, retrain a candidate (promoted only through the gate, which also checks "
        "that the monitor can use it with the monitor options below), then monitor with the champion, new or kept. "
        "A refused candidate, too few healthy images or a failed retrain never stop the monitor step.",
        epilog=EXIT_CODES_HELP, formatter_class=_HelpFormatter,
    )
    _retrain_options(p)
    _monitor_options(p, full=False)
    p.add_argument("--no-ingest", action="store_true", help="skip the ingest step")
    p.add_argument("--no-monitor", action="store_true", help="skip the monitor step")
    _common(p)
    p.set_defaults(func=cmd_nightly)

    p = subparsers.add_parser(
        "retrain", help="run the retrain flow (train, gate, register) once now",
        description="Train a candidate on the recent healthy images (windows any verdict called drifted and images "
        "flagged anomalous are left out; the window reaches back for older healthy images when that leaves it "
        "short) and promote it only through the gate. --min-window is the monitor's, which the candidate must serve.",
        epilog=EXIT_CODES_HELP, formatter_class=_HelpFormatter,
    )
    _retrain_options(p)
    p.add_argument("--min-window", type=int, default=30,
                   help="the monitor's smallest window; the candidate's reference must hold at least twice this")
    _common(p)
    p.set_defaults(func=cmd_retrain)

    p = subparsers.add_parser(
        "monitor", help="run the monitor flow (encode, score, drift, alerts) once now",
        description="Encode and score the recent images with the champion, test each complete window for drift and "
        "alert (one alert per cause). Verdicts are appended to <state>/windows.parquet; drift reports go to "
        "<state>/reports/.", epilog=MONITOR_EXIT_HELP,
        formatter_class=_HelpFormatter,
    )
    _monitor_options(p, full=True)
    _common(p)
    p.set_defaults(func=cmd_monitor)
