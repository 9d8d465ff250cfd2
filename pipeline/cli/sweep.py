"""``linewatch sweep``: train a small (lambda, zeta, latent dim) grid and print a comparison table.

The work is done by :func:`pipeline.training.sweep.sweep`; this module parses the arguments, loads the images (a folder, a
catalog snapshot, or ELPV pools) and prints the table (or JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from pipeline.cli import CLIError

SWEEP_EPILOG = """\
examples:
  linewatch sweep --images cells/ --preset tiny --steps 200                    # lambda 0,0.1,1 x d 8,16 (6 models)
  linewatch sweep --snapshot 3f2a9c1e --lambdas 0,0.1 --latent-dims 16,32 --preset cpu --steps 1500
  linewatch sweep --elpv-pool calibration --preset tiny --steps 300 --max-images 256   # ELPV, with probes
  linewatch sweep --images cells/ --elpv-pool heldout --zetas 1,0.9 --json     # probes on held-out ELPV cells

Training images come from --images (a folder, searched recursively), --snapshot (a catalog snapshot digest under
--root) or, with neither, the functional cells of the ELPV train pool. With --elpv-pool the metrics are measured on
that ELPV pool (cells the models never saw) and linear probes predict its labels (mono vs poly; defective p >= 2/3
vs functional p = 0); otherwise they are measured on the training images, without probes.

Every model is a child run of one MLflow parent run in the training experiment (open it with `linewatch ui`):
params, loss curves, latent quality (MMD to the prior, active axes), the disentanglement indicator, probe
accuracy/AUROC and a traversal grid. The parent holds the comparison table and a summary figure.
"""


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise CLIError(f"{what} takes comma-separated numbers like 0,0.1,1; got {text!r}") from exc
    if not vals or not all(math.isfinite(v) for v in vals):
        raise CLIError(f"{what} takes comma-separated finite numbers, got {text!r}")
    return vals


def _ints(text: str, what: str) -> list[int]:
    vals = _floats(text, what)
    if any(v != int(v) for v in vals):
        raise CLIError(f"{what} takes comma-separated integers like 8,16; got {text!r}")
    return [int(v) for v in vals]


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run ``linewatch sweep``."""
    from pipeline.training.sweep import elpv_probe_set, sweep

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.images and args.snapshot:
        raise CLIError("give --images or --snapshot, not both")
    lambdas = _floats(args.lambdas, "--lambdas")
    zetas = _floats(args.zetas, "--zetas")
    dims = _ints(args.latent_dims, "--latent-dims")
    images = _training_images(args)
    eval_images, labels = None, None
    if args.elpv_pool:
        eval_images, labels, _ = elpv_probe_set(args.elpv_pool, max_images=args.max_images, seed=args.seed)
        print(f"probes on {len(eval_images)} cells of the ELPV {args.elpv_pool} pool", file=sys.stderr)
    result = sweep(
        images, snapshot=args.snapshot, root=args.root, preset=args.preset, lambdas=lambdas, zetas=zetas,
        latent_dims=dims, steps=args.steps, batch_size=args.batch_size, eval_images=eval_images,
        probe_labels=labels, out_dir=args.out, run_name=args.run_name, traverse_steps=args.traverse_steps,
        seed=args.seed, device=None if args.device == "auto" else args.device,
        max_images=args.max_images if args.snapshot else None,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    _print_result(result, as_json=args.json)
    failed = int((result.table["status"] != "ok").sum())
    if failed:
        print(f"{failed} grid point(s) failed; see the 'error' column in {result.out_dir / 'sweep_table.csv'}",
              file=sys.stderr)
    return 1 if failed == len(result.table) else 0


def _training_images(args: argparse.Namespace) -> Any:
    """The images of ``--images`` (seeded subset of ``--max-images``), or ELPV train cells, or None (snapshot)."""
    import numpy as np

    if args.images:
        from pipeline.common.images import find_images, read_images

        if not Path(args.images).exists():
            raise CLIError(f"--images {args.images!r} does not exist")
        paths = find_images(args.images)
        if len(paths) < 2:
            raise CLIError(f"need at least 2 training images under {args.images!r}, found {len(paths)}")
        if args.max_images and len(paths) > args.max_images:
            keep = np.sort(np.random.default_rng(args.seed).choice(len(paths), args.max_images, replace=False))
            paths = [paths[i] for i in keep]
        return read_images(paths, channels=1)
    if args.snapshot:
        return None
    from pipeline.line.elpv import load_elpv, pool_indices

    idx = pool_indices("train", functional_only=True)
    if args.max_images and len(idx) > args.max_images:
        idx = np.sort(np.random.default_rng(args.seed).choice(idx, args.max_images, replace=False))
    print(f"training on {len(idx)} functional cells of the ELPV train pool", file=sys.stderr)
    return np.asarray(load_elpv().images[idx])


def _print_result(result: Any, *, as_json: bool) -> None:
    import numpy as np

    if as_json:
        table = result.table.replace({np.nan: None})
        print(json.dumps({
            "parent_run_id": result.parent_run_id,
            "child_run_ids": list(result.child_run_ids),
            "out_dir": str(result.out_dir),
            "seconds": result.seconds,
            "table": table.to_dict(orient="records"),
        }, indent=1, default=str))
        return
    print(result.markdown())
    print(f"parent run:  {result.parent_run_id}")
    print(f"outputs:     {result.out_dir}")
    print(f"time:        {result.seconds:.0f} s")


def register(subparsers: Any) -> None:
    """Add ``sweep`` to the ``linewatch`` parser."""
    p = subparsers.add_parser(
        "sweep",
        help="train a small (lambda, zeta, latent dim) grid and compare the latents",
        description="Train one model per grid point, score each latent code, log child runs under one MLflow "
        "parent run and print a comparison table.",
        epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("training images (default: functional cells of the ELPV train pool)")
    src.add_argument("--images", default=None, metavar="DIR", help="folder of training images (recursive)")
    src.add_argument("--snapshot", default=None, metavar="DIGEST", help="catalog snapshot digest (or prefix)")
    src.add_argument("--root", default=None, metavar="DIR", help="catalog root of --snapshot ($LINEWATCH_HOME)")
    p.add_argument("--elpv-pool", default=None, metavar="POOL",
                   help="measure on this ELPV pool (train, calibration, heldout) with label probes")
    p.add_argument("--preset", default="tiny", choices=("tiny", "cpu", "standard", "large"),
                   help="model preset (default tiny)")
    p.add_argument("--lambdas", default="0,0.1,1", help="MMD prior weights, comma-separated (default 0,0.1,1)")
    p.add_argument("--zetas", default="1", help="mutual-information weights in [0, 1] (default 1; < 1 adds a KL)")
    p.add_argument("--latent-dims", default="8,16", help="latent sizes, comma-separated (default 8,16)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per model (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: the preset's)")
    p.add_argument("--max-images", type=int, default=None, help="seeded subset of at most N images per set")
    p.add_argument("--traverse-steps", type=int, default=10, help="DDIM steps of the traversal grids (default 10)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default $LINEWATCH_HOME/sweeps/NAME)")
    p.add_argument("--run-name", default=None, help="parent run name (default sweep-<UTC stamp>)")
    p.add_argument("--seed", type=int, default=0, help="training and probe seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)
