"""Wall time of a tiny ``linewatch sweep`` and of the two notebooks (CI path, tiny preset).

Run: ``.venv/bin/python -m benchmarks.bench_sweep_notebooks [--steps 30]``. Everything goes to a temporary
``LINEWATCH_HOME`` (SQLite MLflow store included). Results: ``benchmarks/results/bench_sweep_notebooks.md``.
Executed notebook copies (with outputs, for reading) are left in ``benchmarks/out/notebooks/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_sweep_notebooks.md"
OUT = ROOT / "benchmarks" / "out" / "notebooks"
MACHINE = "2-core CPU, 24 GiB, no GPU"


def time_sweep(home: Path, steps: int, threads: int) -> tuple[float, str]:
    """A 2 x 2 grid (lambda 0, 0.1 x d 8, 16) on 64 ELPV train cells, probes on 96 calibration cells."""
    import torch

    from pipeline import tracking
    from pipeline.line.elpv import load_elpv, pool_indices
    from pipeline.training.sweep import elpv_probe_set, sweep

    torch.set_num_threads(threads)
    tracking.reset()
    images = load_elpv().images[pool_indices("train", functional_only=True)[:64]]
    ev, labels, _ = elpv_probe_set("calibration", max_images=96)
    t0 = time.perf_counter()
    res = sweep(images, preset="tiny", lambdas=(0.0, 0.1), latent_dims=(8, 16), steps=steps, batch_size=16,
                eval_images=ev, probe_labels=labels, out_dir=home / "sweep", progress=False)
    return time.perf_counter() - t0, res.markdown()


def time_notebook(path: Path, home: Path) -> float:
    """Execute one notebook on the CI path; returns seconds (kernel start included)."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    work = home / path.stem
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=900,
                            resources={"metadata": {"path": str(work)}}).execute()
    seconds = time.perf_counter() - t0
    OUT.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, OUT / path.name)
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Measure and write the markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per sweep model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the sweep (notebooks use 1)")
    parser.add_argument("--skip-notebooks", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["LINEWATCH_HOME"] = str(home)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
        os.environ.pop("LINEWATCH_NOTEBOOK_CKPT", None)
        os.environ["PYTHONPATH"] = str(ROOT)  # the kernels import this checkout
        sweep_s, table = time_sweep(home, args.steps, args.threads)
        nb_times = {}
        if not args.skip_notebooks:
            for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
                nb_times[nb.name] = time_notebook(nb, home)
    lines = [
        "# Tiny sweep and notebook run times",
        "",
        f"- command: `python -m benchmarks.bench_sweep_notebooks {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- machine: {MACHINE} (shared with other jobs while it ran: timings are indicative only)",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Tiny sweep (preset tiny, 2 x 2 grid: lambda 0, 0.1 x d 8, 16; {args.steps} steps x batch 16 per model on 64 "
        "ELPV train cells; probes and disentanglement on 96 calibration cells; traversal grids at 10 DDIM steps; "
        f"local SQLite MLflow, MLflow schema creation included; torch threads {args.threads}): **{sweep_s:.1f} s**",
        "",
    ]
    lines += [f"- notebook `{k}` (CI path, kernel start included): **{v:.1f} s**" for k, v in nb_times.items()]
    lines += ["", "Comparison table of that sweep:", "", table]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
