"""The ``linewatch`` command.

Sub-commands live in one module per command group (``pipeline/cli/*.py``, ``flows/cli.py``). Each such module exposes
``register(subparsers)`` and is listed in the ``linewatch.commands`` entry-point group of ``pyproject.toml``; this
module only discovers and dispatches, so ``pipeline`` never imports ``flows``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from importlib.metadata import entry_points

# Modules with sub-commands that ship in this package. Entry points add the ones from other packages (flows/).
_BUILTIN = (
    "pipeline.cli.model",
    "pipeline.cli.simulate",
    "pipeline.cli.catalog",
    "pipeline.cli.monitor",
    "pipeline.cli.ops",
    "pipeline.cli.sweep",
)


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``linewatch <command>: error: ...``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print one line naming the command and the problem, and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "mlflow", "alembic", "docket", "uvicorn", "prefect.server",
                 "prefect._internal", "prefect.client", "prefect.events")
"""Loggers below WARNING unless ``--verbose``: HTTP requests, MLflow's database set-up, Prefect's server internals."""


PREFECT_LIFECYCLE = re.compile(
    r"^(Beginning (sub)?flow run|Finished in state|(Starting|Stopping) temporary server|Created (task|flow) run|"
    r"Submitted task run|Executing '|Running on Prefect|View at )"
)
"""Prefect's own INFO messages about runs and its temporary server (shown with ``--verbose`` only)."""


class _QuietFilter(logging.Filter):
    """Without ``--verbose``: drop Prefect's run bookkeeping and timeout warning, keep its errors to one line.

    Prefect announces every flow, sub-flow and task run and its final state, starts and stops a temporary server, and
    warns on every run of a task with a timeout in a worker thread (the monitor's tasks have one: the flow's own
    timeout still applies); it logs the full traceback of a failed run, which the command prints itself, in one line.
    What linewatch's steps print (Prefect's ``log_prints``) stays.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("prefect"):
            message = record.getMessage()
            if "running in a worker thread" in message:
                return False
            if record.levelno <= logging.INFO and PREFECT_LIFECYCLE.match(message):
                return False
            record.exc_info, record.exc_text = None, None
            record.msg, record.args = message.split("\n", 1)[0], ()
        return True


def configure_logging(verbose: bool) -> None:
    """Log to stderr: INFO from linewatch, WARNING from the libraries' internals; everything with ``verbose``."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet = _QuietFilter()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _QuietFilter) for f in handler.filters):
            handler.addFilter(quiet)
    logging.getLogger("prefect").addFilter(quiet)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its loggers' level from it on import


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered sub-command."""
    parser = _Parser(
        prog="linewatch",
        description="Manufacturing anomaly and drift monitoring on InfoDiffusion latents.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, HTTP requests and Prefect internals (default: quiet)")
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
    configure_logging(bool(args.verbose or getattr(args, "verbose_cmd", False)))
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

