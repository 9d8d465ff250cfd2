"""The ``linewatch`` command.

Sub-commands live next to the code they drive (``pipeline/cli_*.py``, ``flows/cli.py``). Each such module exposes
``register(subparsers)`` and is listed in the ``linewatch.commands`` entry-point group of ``pyproject.toml``; this
module only discovers and dispatches, so ``pipeline`` never imports ``flows``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

# Modules with sub-commands that ship in this package. Entry points add the ones from other packages (flows/).
_BUILTIN = (
    "pipeline.cli_model",
    "pipeline.cli_sim",
    "pipeline.cli_line",
    "pipeline.cli_monitor",
    "pipeline.cli_ops",
    "pipeline.cli_sweep",
)


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="linewatch",
        description="Manufacturing anomaly and drift monitoring on InfoDiffusion latents.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seen: set[str] = set()
    modules = list(_BUILTIN)
    for ep in entry_points(group="linewatch.commands"):
        if ep.value not in modules:
            modules.append(ep.value)
    import importlib

    for name in modules:
        if name in seen:
            continue
        seen.add(name)
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a module not written yet, or an optional extra missing
            if exc.name == name:
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``linewatch`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        rc = args.func(args)
    except CLIError as exc:
        print(f"linewatch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"linewatch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":  # `python -m pipeline.cli`: run the imported module's main, so the sub-commands' CLIError
    from pipeline.cli import main as _main  # (pipeline.cli.CLIError, not __main__.CLIError) is caught

    raise SystemExit(_main())
