"""Wall time of the main job (`linewatch demo`) on embedded defaults, per step, and whether its checks pass.

Run: `.venv/bin/python -m benchmarks.bench_demo [--no-prefect] [--preset cpu]`. Writes benchmarks/results/bench_demo.md
(``bench_demo_<preset>.md`` for another preset).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--no-prefect", action="store_true")
    ap.add_argument("--home", default=".linewatch/bench-demo")
    args = ap.parse_args()
    out_file = RESULTS / ("bench_demo.md" if args.preset == "cpu" else f"bench_demo_{args.preset}.md")
    load0 = os.getloadavg()
    from flows import use_local_prefect_home
    from pipeline.demo import DemoConfig, LocalRunner, prepare_environment, run_demo

    cfg = DemoConfig(home=Path(args.home), preset=args.preset, progress=False)
    home = prepare_environment(cfg)
    if args.no_prefect:
        runner = LocalRunner()
    else:
        use_local_prefect_home(home)
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        from flows.cli import FlowRunner

        runner = FlowRunner()
    t0 = time.perf_counter()
    res = run_demo(cfg, runner, fresh=False, out=lambda s: None)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    rows = "\n".join(f"| {k} | {v:.0f} |" for k, v in res.seconds.items())
    checks = "\n".join(f"| {k} | {'PASS' if ok else 'FAIL'} | {d[:120]} |" for k, (ok, d) in res.checks.items())
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(
        f"# bench_demo: `linewatch demo` end to end\n\n"
        f"- command: `.venv/bin/python -m benchmarks.bench_demo{' --no-prefect' if args.no_prefect else ''} "
        f"--preset {args.preset}`\n"
        f"- machine: 2-core CPU, 24 GiB, no GPU ({platform.machine()}); torch threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')}\n"
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC\n"
        f"- load average before {load0[0]:.1f}, after {load1[0]:.1f} (other agents share the 2 cores: pessimistic)\n"
        f"- runner: {'plain functions' if args.no_prefect else 'Prefect flows (ephemeral local API)'}; "
        f"wall {wall:.0f} s\n\n| step | seconds |\n|---|---|\n{rows}\n\n| check | result | detail |\n|---|---|---|\n"
        f"{checks}\n"
    )
    print(out_file.read_text())


if __name__ == "__main__":
    main()
