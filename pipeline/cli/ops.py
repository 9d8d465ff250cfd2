"""Operator sub-commands: ``promote``, ``rollback``, ``models``, ``ui``, ``golden``.

``linewatch promote --version 3`` points the ``champion`` alias at version 3 and records who (``$USER``), when and
why as tags of that version; ``linewatch rollback`` returns ``champion`` to the version that held it before.
``linewatch models`` lists the registered versions with aliases and lineage tags. ``linewatch ui`` opens the MLflow
UI on the local SQLite store (``--print-command`` prints the command instead of running it) and prints the link that
opens its model-training layout. ``linewatch golden --line L1`` shows the line's golden-sample baselines and
``--rebaseline [CELL ...]`` restarts them after a deliberate camera or optics change (``docs/spc.md``).

MLflow is imported lazily (through ``pipeline.tracking``) so other sub-commands stay fast.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from typing import Any

_LINEAGE_KEYS = ("data.train_digest", "data.calibration_digest", "lineage.parent_version", "lineage.code_version")


def register(subparsers: Any) -> None:
    """Add ``promote``, ``rollback``, ``models`` and ``ui`` to the ``linewatch`` parser."""
    p = subparsers.add_parser("promote", help="point an alias (default champion) at a model version, by hand")
    p.add_argument("--version", type=int, required=True, help="registered model version")
    p.add_argument("--alias", default="champion", help="alias to move (champion | challenger)")
    p.add_argument("--reason", default="", help="why (recorded as a version tag)")
    p.add_argument("--model", default=None, help="registered model name (default from settings)")
    p.add_argument("--who", default=None, help=argparse.SUPPRESS)  # default $USER; for automation
    p.set_defaults(func=_promote)

    p = subparsers.add_parser("rollback", help="move champion back to the previous champion version")
    p.add_argument("--alias", default="champion", help="alias to roll back")
    p.add_argument("--reason", default="", help="why (recorded as a version tag)")
    p.add_argument("--model", default=None, help="registered model name (default from settings)")
    p.add_argument("--who", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_rollback)

    p = subparsers.add_parser("models", help="list registered model versions with aliases and lineage tags")
    p.add_argument("--model", default=None, help="registered model name (default from settings)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_models)

    p = subparsers.add_parser("ui", help="open the MLflow UI on the local store (no server or account needed)")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    p.add_argument("--print-command", action="store_true", help="print the command instead of running it")
    p.set_defaults(func=_ui)

    p = subparsers.add_parser("golden", help="show or restart a line's golden-sample baselines (camera check)")
    p.add_argument("--line", required=True, help="production line")
    p.add_argument("--rebaseline", nargs="*", default=None, metavar="CELL",
                   help="restart the baselines of these golden cells (none named: all) after a deliberate camera, "
                   "optics or golden-cell change")
    p.set_defaults(func=_golden)


def _golden(args: argparse.Namespace) -> int:
    from pipeline.monitoring.golden import golden_status, rebaseline
    from pipeline.monitoring.monitor import default_alert_manager
    from pipeline.settings import get_settings

    folder = default_alert_manager(get_settings()).state_dir
    if args.rebaseline is not None:
        print(rebaseline(folder, args.line, args.rebaseline))
    else:
        print(golden_status(folder, args.line))
    return 0


def _cli_error(exc: Exception) -> Exception:
    from pipeline.cli import CLIError

    return CLIError(str(exc))


def _promote(args: argparse.Namespace) -> int:
    from pipeline import tracking

    try:
        ch = tracking.set_alias(args.alias, args.version, name=args.model, who=args.who, why=args.reason,
                                event="promote")
    except tracking.TrackingUnavailable as exc:
        raise _cli_error(exc) from exc
    before = f"v{ch.previous}" if ch.previous is not None else "(unset)"
    print(f"{ch.name}@{ch.alias}: {before} -> v{ch.version}  by {ch.who} at {ch.at}  reason: {ch.why or '-'}")
    if ch.previous is not None and ch.previous != ch.version:
        print(f"  v{ch.previous} is tagged {ch.alias}.event=demoted (replaced by v{ch.version})")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from pipeline import tracking

    try:
        ch = tracking.rollback(alias=args.alias, name=args.model, who=args.who, why=args.reason)
    except tracking.TrackingUnavailable as exc:
        raise _cli_error(exc) from exc
    print(f"{ch.name}@{ch.alias}: rolled back v{ch.previous} -> v{ch.version}  by {ch.who} at {ch.at}  "
          f"reason: {ch.why or '-'}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from pipeline import settings as lw_settings
    from pipeline import tracking

    name = args.model or lw_settings.get_settings().model_name
    try:
        versions = tracking.list_versions(name=name)
    except tracking.TrackingUnavailable as exc:
        raise _cli_error(exc) from exc
    if args.json:
        print(json.dumps([
            {"name": v.name, "version": v.version, "aliases": list(v.aliases), "run_id": v.run_id,
             "source": v.source, "created_at": v.created_at.isoformat() if v.created_at else None, "tags": v.tags}
            for v in versions
        ], indent=1))
        return 0
    if not versions:
        print(f"{name}: no registered versions yet (run `linewatch train` / the nightly flow)")
        return 0
    print(f"{name}")
    print(f"{'ver':>4}  {'aliases':<20} {'created (UTC)':<17} {'parent':<7} {'train data':<14} gates / code")
    for v in versions:
        created = v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else "-"
        gates = ", ".join(f"{k[5:]}={val}" for k, val in sorted(v.tags.items()) if k.startswith("gate."))
        print(f"{v.version:>4}  {','.join(v.aliases) or '-':<20} {created:<17} "
              f"{v.tags.get('lineage.parent_version', '-'):<7} {v.tags.get('data.train_digest', '-')[:12]:<14} "
              f"{gates or '-'} | {v.tags.get('lineage.code_version', '-')}")
        for alias in v.aliases:
            by, at, why = (v.tags.get(f"{alias}.{k}") for k in ("set_by", "set_at", "reason"))
            if by:
                print(f"{'':>6}{alias}: set by {by} at {at}, reason: {why}")
        for alias in ("champion", "challenger"):
            if alias not in v.aliases and v.tags.get(f"{alias}.replaced_by"):
                print(f"{'':>6}{alias} until {v.tags.get(f'{alias}.demoted_at', '?')}: "
                      f"{v.tags.get(f'{alias}.event', 'demoted')}, replaced by v{v.tags[f'{alias}.replaced_by']} "
                      f"({v.tags.get(f'{alias}.demoted_reason', '-')})")
    return 0


def _ui(args: argparse.Namespace) -> int:
    from pipeline import settings as lw_settings
    from pipeline import tracking

    st = lw_settings.get_settings()
    if not st.mlflow_is_local:
        print(f"MLflow runs as a server: open {tracking.ui_url(settings=st)} in a browser")
        return 0
    text = tracking.ui_command_text(args.port, st)
    if args.print_command:
        print(text)
        return 0
    lw_settings.ensure_dirs(st)
    print(f"MLflow UI on {st.mlflow_tracking_uri}: {tracking.ui_url(port=args.port, settings=st)}  (Ctrl-C to stop)")
    print(f"  {text}")
    try:
        return subprocess.call(tracking.ui_command(args.port, st))
    except KeyboardInterrupt:
        return 0
