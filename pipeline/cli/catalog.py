"""``linewatch ingest`` and ``linewatch catalog ...``: bring line images in, look at the catalog."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.catalog import tables as C
from pipeline.catalog.ingest import REASONS, IngestConfig, ingest, refresh_metadata

_INGEST_EPILOG = """\
examples:
  linewatch ingest /data/drop                      # everything new under the drop folder
  linewatch ingest /data/drop --line L1 --json     # one line, machine-readable summary
  linewatch ingest /data/drop --quarantine-mode move --root /srv/linewatch

The drop folder layout is DROP/<line>/<YYYY-MM-DD>/<serial>.png with an optional mes_export.csv
(serial,timestamp,line,station,product_type) per folder. Re-running is safe: files already handled are skipped.
Files younger than --settle-time seconds, or still changing, are left for the next run. The drop folder may not
overlap the catalog root's own folders (a plain sub-folder such as ROOT/drop is fine).
Exit status: 0 ok, 2 bad arguments (overlapping folders included), 3 another ingest holds the catalog lock.
"""

_CATALOG_EPILOG = """\
examples:
  linewatch catalog stats                          # images per line and day, quarantine reasons, storage
  linewatch catalog stats --json
  linewatch catalog snapshot --name train-2026-11 --line L1 --start 2026-11-01 --end 2026-11-28
  linewatch catalog compact                        # merge small part files
  linewatch catalog remeta /data/drop              # re-read fixed MES exports for registered images
  linewatch catalog clean-tmp                      # remove .tmp-* files a crashed writer left (older than 10 min)

Exit status: 0 ok, 2 bad arguments, 3 another writer holds the catalog lock.
"""


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _root(args: argparse.Namespace) -> Path:
    from pipeline.settings import get_settings

    return Path(args.root) if args.root else get_settings().catalog_root


def _busy(command: str, exc: Exception) -> int:
    print(f"linewatch {command}: busy: {exc}", file=sys.stderr)
    return 3


def _cmd_ingest(args: argparse.Namespace) -> int:
    from pipeline.settings import get_settings

    config = IngestConfig(
        mes_timezone=get_settings().timezone,
        quarantine_mode=args.quarantine_mode,
        quarantine_dir=args.quarantine_dir,
        delete_source=args.delete_source,
        lock_timeout=args.lock_timeout,
        workers=args.workers,
        settle_s=args.settle_time,
    )
    try:
        summary = ingest(args.drop, _root(args), line=args.line, config=config, progress=not args.no_progress)
    except C.CatalogLockedError as exc:
        return _busy("ingest", exc)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=1))
        return 0
    _print_summary(summary, _root(args))
    return 0


def _print_summary(summary: Any, root: Path) -> None:
    print(f"ingest run {summary.run_id} into {root}")
    print(f"  registered  {summary.registered}")
    print(f"  duplicates  {summary.duplicates}")
    print(
        f"  skipped     {summary.skipped_already_registered} already registered, "
        f"{summary.skipped_already_seen} already seen (duplicate or quarantined)"
    )
    print(f"  quarantined {summary.n_quarantined}")
    for code, n in summary.quarantined.items():
        print(f"    {code:<20} {n:>6}  {REASONS.get(code, '')}")
    extra = {
        "left for the next run (younger than the settle time or still changing)": summary.left_unsettled,
        "removed from the drop folder": summary.removed,
        "kept: changed after being read": summary.kept_changed,
        "store objects repaired from a good copy": summary.store_repaired,
        "metadata filled in from a duplicate's MES data": summary.metadata_refreshed,
    }
    for what, n in extra.items():
        if n:
            print(f"  {n:>6}  {what}")
    if summary.mes_flags:
        print("  MES problems: " + ", ".join(f"{k} {v}" for k, v in summary.mes_flags.items()))
        for msg in summary.mes_problems[:5]:
            print(f"    {msg}")
    print(f"  time        {summary.seconds:.2f} s ({summary.images_per_s:.0f} files/s)")


def _cmd_stats(args: argparse.Namespace) -> int:
    from pipeline.settings import get_settings

    tz = get_settings().timezone
    stats = C.catalog_stats(_root(args), timezone=tz)
    if args.json:
        print(json.dumps({**stats.to_dict(), "timezone": tz}, indent=1))
        return 0
    print(
        f"catalog {_root(args)}: {stats.n_images} images, {stats.n_duplicates} duplicates, "
        f"{stats.n_quarantined} quarantined, {stats.n_part_files} part files"
    )
    if stats.per_line_day:
        print(f"  {'line':<12} {'date':<10} {'images':>8}   (plant days in {tz}, LINEWATCH_TIMEZONE)")
        for row in stats.per_line_day:
            print(f"  {row['line']:<12} {row['date']:<10} {row['images']:>8}")
    if stats.quarantine_by_reason:
        print("  quarantine by reason:")
        for code, n in stats.quarantine_by_reason.items():
            print(f"    {code:<20} {n:>6}")
    print("  storage: " + ", ".join(f"{k} {_human_bytes(v)}" for k, v in stats.storage_bytes.items()))
    return 0


def _cmd_snapshot(args: argparse.Namespace) -> int:
    query: dict[str, Any] = {}
    if args.line:
        query["lines"] = args.line
    if args.station:
        query["stations"] = args.station
    if args.start:
        query["start"] = args.start
    if args.end:
        query["end"] = args.end
    if args.split:
        query["split"] = args.split
    snap = C.snapshot(query, args.name, _root(args))
    if args.json:
        print(json.dumps(snap.to_dict(), indent=1))
    else:
        print(f"snapshot {snap.digest} ({snap.n_images} images) name={snap.name} at {snap.path}")
    return 0


def _cmd_compact(args: argparse.Namespace) -> int:
    try:
        n = C.compact(_root(args), lock_timeout=args.lock_timeout)
    except C.CatalogLockedError as exc:
        return _busy("catalog compact", exc)
    print(f"compacted {n} partitions")
    return 0


def _cmd_clean_tmp(args: argparse.Namespace) -> int:
    try:
        n = C.clean_temporary(_root(args), lock_timeout=args.lock_timeout, min_age_s=args.min_age)
    except C.CatalogLockedError as exc:
        return _busy("catalog clean-tmp", exc)
    print(f"removed {n} temporary files older than {args.min_age:g} s under {_root(args)}")
    return 0


def _cmd_remeta(args: argparse.Namespace) -> int:
    try:
        res = refresh_metadata(args.drop, _root(args), config=IngestConfig(lock_timeout=args.lock_timeout))
    except C.CatalogLockedError as exc:
        return _busy("catalog remeta", exc)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
        return 0
    print(f"re-read MES metadata of {res.checked} registered images from {args.drop}: {res.updated} updated "
          f"({res.partitions_rewritten} partitions rewritten)")
    for msg in res.mes_problems[:10]:
        print(f"  {msg}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ingest`` and ``catalog {stats,snapshot,compact,remeta,clean-tmp}`` to the ``linewatch`` command."""
    fmt = argparse.RawDescriptionHelpFormatter
    root_help = "catalog root (default: $LINEWATCH_CATALOG, else $LINEWATCH_HOME, else ./.linewatch)"

    p = subparsers.add_parser(
        "ingest",
        help="register new images from a drop folder (exactly once)",
        description="Validate and register new images from a drop folder into the catalog.",
        epilog=_INGEST_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("drop", metavar="DROP", help="the drop folder")
    p.add_argument("--line", help="only ingest DROP/<LINE>")
    p.add_argument("--root", help=root_help)
    p.add_argument(
        "--quarantine-mode",
        choices=("copy", "move"),
        default="copy",
        help="copy rejects to quarantine (default) or move them out of the drop folder",
    )
    p.add_argument("--quarantine-dir", help="where rejects go (default: ROOT/quarantine)")
    p.add_argument(
        "--delete-source",
        action="store_true",
        help="remove registered files from the drop folder once published (off by default)",
    )
    p.add_argument(
        "--lock-timeout", type=float, default=10.0, help="seconds to wait for another ingest (default 10)"
    )
    p.add_argument("--workers", type=int, default=2, help="validation threads (default 2)")
    p.add_argument(
        "--settle-time",
        type=float,
        default=IngestConfig.settle_s,
        metavar="S",
        help="take a file only when it is S seconds old and did not change between two looks S apart "
        f"(default {IngestConfig.settle_s:g})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_ingest)
    _register_catalog(subparsers, root_help)


def _register_catalog(subparsers: argparse._SubParsersAction, root_help: str) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    cat = subparsers.add_parser(
        "catalog",
        help="inspect and maintain the image catalog",
        description="Inspect and maintain the image catalog.",
        epilog=_CATALOG_EPILOG,
        formatter_class=fmt,
    )
    csub = cat.add_subparsers(dest="catalog_command", metavar="ACTION")

    s = csub.add_parser("stats", help="counts per line and day, quarantine by reason, storage used")
    s.add_argument("--root", help=root_help)
    s.add_argument("--json", action="store_true", help="print as JSON")
    s.set_defaults(func=_cmd_stats)

    sn = csub.add_parser("snapshot", help="freeze a set of images and print its digest")
    sn.add_argument("--name", required=True, help="what the set is for, e.g. train-2026-11")
    sn.add_argument("--line", action="append", help="line (repeatable)")
    sn.add_argument("--station", action="append", help="station (repeatable)")
    sn.add_argument("--start", help="inclusive start time (ISO 8601; naive = UTC)")
    sn.add_argument("--end", help="exclusive end time")
    sn.add_argument("--split", action="append", help="split (repeatable)")
    sn.add_argument("--root", help=root_help)
    sn.add_argument("--json", action="store_true", help="print as JSON")
    sn.set_defaults(func=_cmd_snapshot)
    _register_maintenance(csub, root_help)

    def _catalog_help(_args: argparse.Namespace) -> int:
        cat.print_help()
        return 0

    cat.set_defaults(func=_catalog_help)


def _register_maintenance(csub: argparse._SubParsersAction, root_help: str) -> None:
    cp = csub.add_parser("compact", help="merge each partition's part files into one")
    cp.add_argument("--root", help=root_help)
    cp.add_argument("--lock-timeout", type=float, default=10.0, help="seconds to wait for the writer lock")
    cp.set_defaults(func=_cmd_compact)

    rm = csub.add_parser("remeta", help="re-read the MES exports of a drop folder for registered images")
    rm.add_argument("drop", metavar="DROP", help="the drop folder the images were ingested from")
    rm.add_argument("--root", help=root_help)
    rm.add_argument("--lock-timeout", type=float, default=10.0, help="seconds to wait for the writer lock")
    rm.add_argument("--json", action="store_true", help="print the summary as JSON")
    rm.set_defaults(func=_cmd_remeta)

    ct = csub.add_parser("clean-tmp", help="remove .tmp-* files left by crashed writers")
    ct.add_argument("--root", help=root_help)
    ct.add_argument("--lock-timeout", type=float, default=10.0, help="seconds to wait for the writer lock")
    ct.add_argument("--min-age", type=float, default=600.0, metavar="S",
                    help="only files older than S seconds (default 600: a writer may be in flight)")
    ct.set_defaults(func=_cmd_clean_tmp)
