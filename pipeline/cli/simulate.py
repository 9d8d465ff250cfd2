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

  # a blur fault that is repaired after 3 days
  linewatch simulate --out data/drop --days 8 --per-day 100 --fault blur --fault-start 2 --fault-days 3

  # two lines, 100-200 cells per line-day, 5 % defective cells, a schedule of faults from a CSV file
  # (columns kind,start,days,severity[,ramp_days,lines]; lines separated by '|'; start = day index or date)
  linewatch simulate --out data/drop --days 30 --per-day 100-200 --lines L1,L2 --pool all \\
      --defect-rate 0.05 --schedule faults.csv

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


def _check_start_day(day: int, text: str, start: dt.date, days: int, flag: str) -> int:
    if not 0 <= day < days:
        last = start + dt.timedelta(days=days - 1)
        raise ValueError(
            f"{flag} {text} is outside the simulated days 0..{days - 1} ({start.isoformat()}..{last.isoformat()})"
        )
    return day


def _single_fault(args: argparse.Namespace, start: dt.date) -> FaultSpec | None:
    """The fault of ``--fault`` and its flags, or None."""
    if args.fault is None:
        given = [
            flag
            for flag, v in (("--fault-start", args.fault_start), ("--severity", args.severity),
                            ("--ramp-days", args.ramp_days), ("--fault-days", args.fault_days))
            if v is not None
        ]
        if given:
            raise ValueError(f"{', '.join(given)} given without --fault KIND (one of {', '.join(FAULTS)})")
        return None
    if args.fault not in FAULTS:
        raise ValueError(f"unknown fault {args.fault!r}: choose from {', '.join(FAULTS)}")
    start_day = 0
    if args.fault_start is not None:
        start_day = _check_start_day(_fault_start(args.fault_start, start), args.fault_start, start, args.days,
                                     "--fault-start")
    return FaultSpec(
        kind=args.fault,
        start_day=start_day,
        severity=1.0 if args.severity is None else args.severity,
        ramp_days=0.0 if args.ramp_days is None else args.ramp_days,
        duration_days=args.fault_days,
    )


def _schedule_row(row: dict[str, object], start: dt.date, days: int, where: str) -> FaultSpec:
    """One fault of a schedule file: ``kind, start, days, severity`` and optional ``ramp_days, lines``."""
    def get(key: str) -> str | None:
        v = row.get(key)
        return None if v is None or (isinstance(v, float) and v != v) or str(v).strip() == "" else str(v).strip()

    kind = get("kind")
    if kind not in FAULTS:
        raise ValueError(f"{where}: unknown fault {kind!r}: choose from {', '.join(FAULTS)}")
    first = get("start")
    if first is None:
        raise ValueError(f"{where}: every fault needs a start (day index or YYYY-MM-DD)")
    lines = get("lines")
    try:
        return FaultSpec(
            kind=kind,
            start_day=_check_start_day(_fault_start(first, start), first, start, days, f"{where}: start"),
            severity=float(get("severity") or 1.0),
            ramp_days=float(get("ramp_days") or 0.0),
            duration_days=float(d) if (d := get("days")) is not None else None,
            lines=tuple(x.strip() for x in lines.split("|") if x.strip()) if lines else None,
        )
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def read_schedule(path: str | Path, start: dt.date, days: int) -> tuple[FaultSpec, ...]:
    """A fault schedule from a CSV or JSON file (a list of objects with the CSV's columns)."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--schedule {path!r} is not a file (a CSV with columns kind,start,days,severity)")
    try:
        rows = json.loads(p.read_text()) if p.suffix.lower() == ".json" else \
            pd.read_csv(p, dtype=str).to_dict("records")
    except (json.JSONDecodeError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"--schedule {path}: cannot read it ({exc})") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"--schedule {path}: no faults in it")
    return tuple(_schedule_row(dict(r), start, days, f"--schedule {p.name} row {i + 1}") for i, r in enumerate(rows))


def _per_day(text: str) -> int | tuple[int, int]:
    """``K`` or ``LOW-HIGH``."""
    parts = text.split("-")
    try:
        values = [int(x) for x in parts]
    except ValueError:
        raise ValueError(f"bad --per-day {text!r}: give a count (100) or a range (100-200)") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise ValueError(f"bad --per-day {text!r}: give a count (100) or a range (100-200)")


def _defect_rate(text: str | None) -> float | tuple[float, ...] | None:
    """``R`` or ``R1,R2,...`` (one share per day)."""
    if text is None:
        return None
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"bad --defect-rate {text!r}: give a share (0.05) or one per day (0.04,0.06,...)") from None
    return values[0] if len(values) == 1 else values


def run_simulate(args: argparse.Namespace) -> int:
    """Run ``linewatch simulate`` from parsed arguments; returns the exit status."""
    from pipeline.line.simulate import DEFAULT_START, simulate_line

    start = _parse_date(args.start) if args.start else DEFAULT_START
    fault = _single_fault(args, start)
    faults = read_schedule(args.schedule, start, args.days) if args.schedule else ()
    lines = tuple(x.strip() for x in args.lines.split(",") if x.strip())
    result = simulate_line(
        Path(args.out),
        days=args.days,
        per_day=_per_day(args.per_day),
        lines=lines,
        start=start,
        seed=args.seed,
        defect_rate=_defect_rate(args.defect_rate),
        fault=fault,
        faults=faults,
        pool=args.pool,
        order=args.order,
        truth=Path(args.truth) if args.truth else None,
        progress=not args.json,
        golden_cells=args.golden_cells,
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
    p.add_argument("--per-day", required=True, metavar="K",
                   help="captures per line and day, or a range LOW-HIGH drawn per line-day (e.g. 100-200)")
    p.add_argument("--lines", default="L1", metavar="L1,L2", help="comma-separated line names (default: L1)")
    p.add_argument("--start", default=None, metavar="YYYY-MM-DD", help="first production day (default: 2026-01-05)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    p.add_argument(
        "--defect-rate", default=None, metavar="R",
        help="imposed share of defective (p=1) cells, or one share per day R1,R2,... (default: the pool's own share)",
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
        "--fault-days", type=float, default=None, metavar="D",
        help="days the --fault lasts before it is repaired (default: to the end)",
    )
    p.add_argument(
        "--schedule", default=None, metavar="FILE",
        help="a schedule of faults (CSV or JSON; columns kind,start,days,severity[,ramp_days,lines]), "
        "in addition to --fault",
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
    p.add_argument(
        "--golden-cells", type=int, default=0, metavar="K",
        help="golden cells per line, re-imaged at the start of every shift and marked sample_kind=golden in the MES "
        "export (default: 0 = none)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary (and no progress bar)")
    p.set_defaults(func=run_simulate)
