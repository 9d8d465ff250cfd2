"""Timings of the native production stack (deploy/native_stack.sh) and of the MLflow outage path.

Measures, each once (wall clock, on a shared machine the numbers vary):

* ``--apt``: ``apt-get update`` and ``apt-get install -y postgresql`` (what ``.ci/run`` adds; root only).
* ``--apt-reinstall``: ``apt-get install --reinstall`` of the big packages (postgresql-15, its client, libllvm14,
  libicu72, libpq5: ~50 MB), i.e. the download + unpack cost of a fresh machine where they are missing.
* cold start: ``native_stack.sh purge`` then ``start`` (initdb, DB creation, MLflow + Prefect schema migrations,
  work pool, worker; until all health checks pass).
* warm start: ``stop`` then ``start`` on the existing data.
* the stack test suite: ``LINEWATCH_REQUIRE_STACK=1 pytest tests/stack``.
* the outage path: time until ``pipeline.tracking`` raises ``TrackingUnavailable`` for an MLflow URL on a closed
  port, with the default policy (3 tries, back-off 1 s then 2 s).

Run: ``.venv/bin/python -m benchmarks.stack_timing [--apt] [--keep]`` (``--keep`` leaves the stack running).
Results: ``benchmarks/results/stack_timing.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "native_stack.sh"
RESULTS = ROOT / "benchmarks" / "results" / "stack_timing.md"
MACHINE = "2-core CPU, 24 GiB, no GPU (shared with other jobs)"


def timed(cmd: list[str], **kw) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    return time.perf_counter() - t0, p.returncode, (p.stdout + p.stderr)[-2000:]


def outage_seconds() -> tuple[float, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import time\n"
        "from pipeline import tracking\n"
        "t0 = time.perf_counter()\n"
        "try:\n"
        "    tracking.get_alias_version('champion')\n"
        "except tracking.TrackingUnavailable as e:\n"
        "    print(f'{time.perf_counter() - t0:.2f}|{str(e)[:90]}')\n"
    )
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", LINEWATCH_HOME="/tmp/lw-outage")
    for k in ("LINEWATCH_MLFLOW_RETRIES", "LINEWATCH_MLFLOW_BACKOFF_S", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT).stdout
    secs, msg = out.strip().splitlines()[-1].split("|", 1)
    return float(secs), msg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--apt", action="store_true", help="also time apt-get update + install postgresql")
    ap.add_argument("--apt-reinstall", action="store_true", help="time a reinstall of the big postgres packages")
    ap.add_argument("--keep", action="store_true", help="leave the stack running")
    args = ap.parse_args(argv)
    rows: list[tuple[str, str]] = []
    if args.apt:
        t, rc, _ = timed(["apt-get", "update", "-q"])
        rows.append(("apt-get update", f"{t:.1f} s (rc {rc})"))
        t, rc, _ = timed(["apt-get", "install", "-y", "-q", "postgresql"], env=dict(os.environ,
                                                                              DEBIAN_FRONTEND="noninteractive"))
        rows.append(("apt-get install -y postgresql", f"{t:.1f} s (rc {rc}; near 0 when already installed)"))
    if args.apt_reinstall:
        pkgs = ["postgresql-15", "postgresql-client-15", "libllvm14", "libicu72", "libpq5"]
        t, rc, _ = timed(["apt-get", "install", "--reinstall", "-y", "-q", *pkgs],
                         env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        rows.append((f"apt-get install --reinstall {' '.join(pkgs)}", f"{t:.1f} s (rc {rc})"))
    timed([str(SCRIPT), "purge"])
    t, rc, log = timed([str(SCRIPT), "start"])
    rows.append(("native stack cold start (purge + start)", f"{t:.1f} s (rc {rc})"))
    if rc:
        print(log)
    timed([str(SCRIPT), "stop"])
    t, rc, log = timed([str(SCRIPT), "start"])
    rows.append(("native stack warm start (stop + start)", f"{t:.1f} s (rc {rc})"))
    t, rc, log = timed([str(ROOT / ".venv" / "bin" / "pytest"), "tests/stack", "-q", "-p", "no:cacheprovider"],
                       cwd=ROOT, env=dict(os.environ, LINEWATCH_REQUIRE_STACK="1"))
    rows.append(("pytest tests/stack (stack running)", f"{t:.1f} s (rc {rc}): {log.strip().splitlines()[-1]}"))
    if not args.keep:
        t, _, _ = timed([str(SCRIPT), "stop"])
        rows.append(("native stack stop", f"{t:.1f} s"))
    secs, msg = outage_seconds()
    rows.append(("MLflow unreachable -> TrackingUnavailable (defaults)", f"{secs:.2f} s: {msg} ..."))

    lines = [
        "# Native stack timings",
        "",
        f"Command: `.venv/bin/python -m benchmarks.stack_timing{' --apt' if args.apt else ''}"
        f"{' --apt-reinstall' if args.apt_reinstall else ''}`  ",
        f"Machine: {MACHINE}  ",
        f"Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}  ",
        f"Load average at the end: {os.getloadavg()[0]:.1f}",
        "",
        "| step | time |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
