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


def _run_flow(command: str, fn: Any, **kwargs: Any) -> Any:
    """Run a flow; a failure is one line on stderr (Prefect's run log keeps the details), never a traceback."""
    try:
        return fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: report, exit 1
        print(f"linewatch {command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


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
        logging.getLogger(name).setLevel(logging.WARNING)
    result = run_demo(config, runner, fresh=False)
    return 0 if result.ok else 1


# ------------------------------------------------------------------------------------------------ flows once
def cmd_nightly(args: argparse.Namespace) -> int:
    """Run the nightly flow once now."""
    if _tracking_down("nightly"):
        return 1
    _prefect_home()
    from flows.nightly import nightly_flow

    retrain = {"preset": args.preset, "steps": args.steps, "window_days": args.window_days,
               "from_scratch": args.from_scratch}
    res = _run_flow("nightly", nightly_flow, ingest=not args.no_ingest, retrain=retrain,
                    monitor={"skip": True} if args.no_monitor else {})
    if res is None:
        return 1
    _print_json(res)
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    """Run the retrain flow once now."""
    if _tracking_down("retrain"):
        return 1
    _prefect_home()
    from flows.retrain import retrain_flow

    res = _run_flow("retrain", retrain_flow, preset=args.preset, steps=args.steps, window_days=args.window_days,
                    from_scratch=args.from_scratch)
    if res is None:
        return 1
    _print_json(res)
    return 0 if res["promoted"] else 3


def cmd_monitor(args: argparse.Namespace) -> int:
    """Run the monitor flow once now."""
    if _tracking_down("monitor"):
        return 1
    _prefect_home()
    from flows.monitor import monitor_flow
    from flows.runners import with_task_runner

    res = _run_flow("monitor", with_task_runner(monitor_flow), lookback_days=args.lookback_days,
                    window_by=args.window_by, start=args.start, end=args.end, quality=not args.no_quality,
                    scores=not args.no_scores, encode_chunk_size=args.encode_chunk_size)
    if res is None:
        return 1
    _print_json(res)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the scheduled deployments (blocks)."""
    _prefect_home()
    from flows.deploy import serve

    serve(args.timezone, webhook_url=args.webhook)
    return 0


def register(subparsers: Any) -> None:
    """Add the flow commands to the ``linewatch`` parser."""
    p = subparsers.add_parser(
        "demo",
        help="the main job end to end: simulate a line with a fault, ingest, retrain, monitor, alert, retrain",
        description="Runs everything locally (SQLite MLflow, local Prefect), in ~15 minutes on 2 cores. "
        "The demo home is wiped and recreated on every run.",
    )
    p.add_argument("--home", default=".linewatch/demo", help="demo LINEWATCH_HOME (default .linewatch/demo)")
    p.add_argument("--preset", default="cpu", help="model preset (default cpu)")
    p.add_argument("--days", type=int, default=8)
    p.add_argument("--per-day", type=int, default=64, help="captures per day (default 64)")
    p.add_argument("--steps-first", type=int, default=400, help="steps of the first training (default 400)")
    p.add_argument("--steps-second", type=int, default=150, help="steps of the warm-started second training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-prefect", action="store_true", help="call the jobs directly instead of as Prefect flows")
    p.set_defaults(func=cmd_demo)

    p = subparsers.add_parser("nightly", help="run the nightly flow (ingest -> retrain -> monitor) once now")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--window-days", type=int, default=7)
    p.add_argument("--from-scratch", action="store_true")
    p.add_argument("--no-ingest", action="store_true")
    p.add_argument("--no-monitor", action="store_true")
    p.set_defaults(func=cmd_nightly)

    p = subparsers.add_parser("retrain", help="run the retrain flow (train, gate, register) once now")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--window-days", type=int, default=7)
    p.add_argument("--from-scratch", action="store_true")
    p.set_defaults(func=cmd_retrain)

    p = subparsers.add_parser("monitor", help="run the monitor flow (encode, score, drift, alerts) once now")
    p.add_argument("--lookback-days", type=float, default=2.0)
    p.add_argument("--window-by", choices=("day", "shift"), default="day")
    p.add_argument("--start", default=None, help="ISO 8601 start (default: lookback from the newest image)")
    p.add_argument("--end", default=None, help="ISO 8601 end (exclusive)")
    p.add_argument("--no-quality", action="store_true",
                   help="skip the full-resolution image-quality channels (blur, noise, rotation)")
    p.add_argument("--no-scores", action="store_true",
                   help="skip the test of the windows' anomaly scores against the reference's")
    p.add_argument("--encode-chunk-size", type=int, default=None,
                   help="images per parallel encode task (default: 1024 with LINEWATCH_TASK_RUNNER=dask, else 0 = off)")
    p.set_defaults(func=cmd_monitor)

    p = subparsers.add_parser("serve", help="serve the scheduled deployments (nightly 02:00, monitor /15 min, "
                              "ingest /10 min) with flow.serve")
    p.add_argument("--timezone", default=None, help="schedule time zone (default LINEWATCH_TIMEZONE)")
    p.add_argument("--webhook", default=None, help="create the drift-alert automation posting to this URL")
    p.set_defaults(func=cmd_serve)
