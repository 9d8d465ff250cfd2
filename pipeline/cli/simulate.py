"""``linewatch simulate``: replay real ELPV cells as a production line into a drop folder."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from pipeline.line.faults import FAULTS, FaultSpec

_EPILOG = """\
examples:
  # a healthy line, 8 days x 100 cells, replaying the held-out pool in lot order
  linewatch simulate --out data/drop --days 8 --per-day 100

  # two lines; from day 3 the camera gain ramps down over 2 days to severity 1 (factor 0.75)
  linewatch simulate --out data/drop --days 8 --per-day 100 --lines L1,L2 \\
      --fault gain --fault-start 3 --severity 1 --ramp-days 2

  # continue the same drop folder one week later, with a sudden fixture misalignment
  linewatch simulate --out data/drop --days 7 --per-day 100 --start 2026-01-13 \\
      --fault misalign --fault-start 2026-01-15 --severity 0.5

  # a calibration reference with 10% defective cells, shuffled, machine-readable summary
  linewatch simulate --out data/ref --days 2 --per-day 200 --pool calibration --order shuffled \\
      --defect-rate 0.1 --json

files: DROP/<line>/<YYYY-MM-DD>/<serial>.png and DROP/<line>/<YYYY-MM-DD>/mes_export.csv
(serial, timestamp, line, station, product_type); ground truth for evaluation only goes to
--truth (default: <DROP>_truth.parquet beside DROP, never inside it).

faults (severity 1 ->):
""" + "\n".join(
    f"  {k:<12} {f.parameter} {'+' if f.per_severity >= 0 else ''}{f.per_severity:g} per severity ({f.unit})"
    for k, f in FAULTS.items()
)


def _parse_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"bad date {text!r}: use YYYY-MM-DD") from None


def _fault_start(text: str, start: dt.date) -> int:
    """A day index (0 = first simulated day) or a YYYY-MM-DD date."""
    try:
        return int(text)
    except ValueError:
        pass
    if "-" in text:
        return (_parse_date(text) - start).days
    raise ValueError(f"bad --fault-start {text!r}: give a day index (0 = first day) or a date YYYY-MM-DD")


def run_simulate(args: argparse.Namespace) -> int:
    """Run ``linewatch simulate`` from parsed arguments; returns the exit status."""
    from pipeline.line.simulate import DEFAULT_START, simulate_line

    start = _parse_date(args.start) if args.start else DEFAULT_START
    fault = None
    if args.fault is None:
        given = [
            flag
            for flag, v in (("--fault-start", args.fault_start), ("--severity", args.severity),
                            ("--ramp-days", args.ramp_days))
            if v is not None
        ]
        if given:
            raise ValueError(f"{', '.join(given)} given without --fault KIND (one of {', '.join(FAULTS)})")
    else:
        if args.fault not in FAULTS:
            raise ValueError(f"unknown fault {args.fault!r}: choose from {', '.join(FAULTS)}")
        start_day = _fault_start(args.fault_start, start) if args.fault_start is not None else 0
        if not 0 <= start_day < args.days:
            last = start + dt.timedelta(days=args.days - 1)
            raise ValueError(
                f"--fault-start {args.fault_start} is outside the simulated days 0..{args.days - 1} "
                f"({start.isoformat()}..{last.isoformat()})"
            )
        fault = FaultSpec(
            kind=args.fault,
            start_day=start_day,
            severity=1.0 if args.severity is None else args.severity,
            ramp_days=0.0 if args.ramp_days is None else args.ramp_days,
        )
    lines = tuple(x.strip() for x in args.lines.split(",") if x.strip())
    result = simulate_line(
        Path(args.out),
        days=args.days,
        per_day=args.per_day,
        lines=lines,
        start=start,
        seed=args.seed,
        defect_rate=args.defect_rate,
        fault=fault,
        pool=args.pool,
        order=args.order,
        truth=Path(args.truth) if args.truth else None,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(
            f"wrote {result.n_images} images for {len(result.lines)} line(s) x {len(result.dates)} day(s) "
            f"({result.dates[0]}..{result.dates[-1]}) to {result.out}; ground truth: {result.truth_path}"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` sub-command."""
    p = subparsers.add_parser(
        "simulate",
        help="replay real ELPV cells as a production line into a drop folder",
        description=(
            "Replay real ELPV electroluminescence cells as a production line: images with realistic capture "
            "times, a per-day MES metadata export, optional faults, and a separate ground-truth file."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, metavar="DROP", help="drop folder to write into")
    p.add_argument("--days", type=int, required=True, metavar="N", help="number of production days")
    p.add_argument("--per-day", type=int, required=True, metavar="K", help="captures per line and day")
    p.add_argument("--lines", default="L1", metavar="L1,L2", help="comma-separated line names (default: L1)")
    p.add_argument("--start", default=None, metavar="YYYY-MM-DD", help="first production day (default: 2026-01-05)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    p.add_argument(
        "--defect-rate", type=float, default=None, metavar="R",
        help="imposed share of defective (p=1) cells (default: the pool's own share)",
    )
    p.add_argument("--fault", default=None, metavar="KIND", help=f"inject a fault: {', '.join(FAULTS)}")
    p.add_argument(
        "--fault-start", default=None, metavar="DAY",
        help="fault onset: day index (0 = first day) or YYYY-MM-DD (default: 0)",
    )
    p.add_argument("--severity", type=float, default=None, metavar="S", help="fault severity (default: 1)")
    p.add_argument(
        "--ramp-days", type=float, default=None, metavar="D",
        help="days of linear ramp to full severity (default: 0 = sudden)",
    )
    p.add_argument(
        "--pool", default="heldout", metavar="POOL",
        help="ELPV pool(s) to replay: heldout (default), calibration, train, all, or comma-separated names",
    )
    p.add_argument("--order", default="lot", metavar="ORDER", help="lot (default) or shuffled")
    p.add_argument(
        "--truth", default=None, metavar="PATH",
        help="ground-truth Parquet file, outside DROP (default: <DROP>_truth.parquet)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary (and no progress bar)")
    p.set_defaults(func=run_simulate)
