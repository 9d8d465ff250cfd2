"""Model-facing ``linewatch`` sub-commands: ``train``, ``encode``, ``traverse``, ``reconstruct``, ``sample``.

Figures are drawn with matplotlib's object API (``Figure`` + Agg canvas), so no global pyplot state is touched.
Images are shown on the model's fixed intensity range ([-1, 1] → black..white), never re-stretched per image:
a brightness change along a latent axis stays visible as a brightness change.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cli import CLIError
from pipeline.common.figures import TRAVERSE_VALUES, output_png, save_grid, to_display

DEFAULT_TRAVERSE_VALUES = TRAVERSE_VALUES
MAX_DEFAULT_AXES = 8


# --- shared helpers ---------------------------------------------------------------------------------------------
def _formatter() -> type[argparse.HelpFormatter]:
    return argparse.RawDescriptionHelpFormatter


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def _set_threads(args: argparse.Namespace) -> None:
    import torch

    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(threads)


def _device(name: str | None) -> Any:
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"unknown device {name!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for but no CUDA device is available")
    return dev


def load_model(path: str | os.PathLike[str], device: str | None = None) -> Any:
    """Load a checkpoint folder for the CLI, with a user-facing error if it is missing or not a checkpoint."""
    from models import load_checkpoint

    p = Path(path)
    if not p.exists():
        raise CLIError(f"checkpoint {str(p)!r} does not exist")
    if not p.is_dir():
        raise CLIError(f"checkpoint {str(p)!r} is not a folder (pass the folder `linewatch train --out` wrote)")
    try:
        ckpt = load_checkpoint(p)
    except Exception as exc:  # noqa: BLE001 - any damage (safetensors, JSON, types, digest) is one user-facing line
        raise CLIError(f"{str(p)!r} is not a usable linewatch checkpoint: {_one_line(exc)}") from exc
    ckpt.model.to(_device(device)).eval()
    return ckpt


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + " ..."


def _seed(seed: int | None) -> None:
    if seed is not None:
        import torch

        torch.manual_seed(seed)


def _load_image_tensor(path: str, ckpt: Any) -> Any:
    from pipeline.common.images import load_batch

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"image {path!r} does not exist or is not a file")
    return load_batch([p], ckpt.preprocess).to(next(ckpt.model.parameters()).device)


# --- train -------------------------------------------------------------------------------------------------------
TRAIN_EPILOG = """\
examples:
  linewatch train --images line1/train --out ckpt/v1                      # cpu preset, its default budget
  linewatch train --images cells/ --out ckpt/tiny --preset tiny --steps 200
  linewatch train --images cells/ --out ckpt/diffae --lambda 0 --zeta 0   # DiffAE ablation (no prior term)
  linewatch train --images cells/ --out ckpt/kl --zeta 0.9 --stochastic-encoder  # adds 0.1 x per-sample KL
  linewatch train --images cells/ --out ckpt/v1 --resume --steps 4000     # continue the same run to step 4000
  linewatch train --images new/ --out ckpt/v2 --init ckpt/v1 --steps 500  # fine-tune from another checkpoint

The images under --images (png, jpg, jpeg, tif, tiff, bmp; searched recursively; 8/16-bit, gray or RGB, any size)
are resized to the preset's resolution and scaled from the fixed full range of their bit depth to [-1, 1].
"""


def _override_preset(preset: Any, args: argparse.Namespace) -> Any:
    """Apply ``--lambda/--zeta/--latent-dim`` to a preset's frozen model config."""
    model_cfg = preset.model
    loss_changes = {}
    if args.lambda_mmd is not None:
        loss_changes["lambda_mmd"] = args.lambda_mmd
    if args.zeta is not None:
        loss_changes["zeta"] = args.zeta
    if loss_changes:
        model_cfg = dataclasses.replace(model_cfg, loss=dataclasses.replace(model_cfg.loss, **loss_changes))
    if args.stochastic_encoder:
        # the per-sample KL term, weighted (1 - zeta), exists only with the Gaussian encoder head
        model_cfg = dataclasses.replace(model_cfg, encoder=dataclasses.replace(model_cfg.encoder, stochastic=True))
    if args.latent_dim is not None:
        model_cfg = dataclasses.replace(model_cfg, latent_dim=args.latent_dim)
    return dataclasses.replace(preset, model=model_cfg)


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``linewatch train``."""
    from models import get_preset, load_checkpoint, to_model_input, train
    from pipeline.common.images import find_images, read_images

    _set_threads(args)
    try:
        preset = get_preset(args.preset)
    except (KeyError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    preset = _override_preset(preset, args)
    if args.init and not Path(args.init).is_dir():
        raise CLIError(f"--init checkpoint {args.init!r} does not exist")
    if args.resume and args.init:
        raise CLIError("--resume continues the run in --out; --init starts a new run from another checkpoint: pick one")
    out = Path(args.out)
    if not args.resume and out.exists() and any(out.iterdir()):
        raise CLIError(
            f"--out {args.out!r} already holds files; pass --resume to continue that run, or choose a new --out"
        )
    paths = find_images(args.images)
    channels = preset.preprocess.channels
    print(f"training preset {preset.name!r} on {len(paths)} images from {args.images}", file=sys.stderr)
    arrays = read_images(paths, channels=channels)
    data = to_model_input(arrays, preset.preprocess)
    min_batch = args.batch_size or preset.train.batch_size
    if len(paths) < 2:
        raise CLIError(f"need at least 2 training images (the MMD term needs a batch), found {len(paths)}")
    if len(paths) < min_batch:
        print(f"note: {len(paths)} images < batch size {min_batch}; batches repeat images", file=sys.stderr)
    result = train(
        preset,
        data,
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        resume=args.resume,
        init_from=args.init,
        device=None if args.device == "auto" else args.device,
        progress=_progress(args),
        seed=args.seed,
        **_train_features(preset, arrays),
    )
    ckpt = load_checkpoint(args.out)
    final_loss = _final_loss(result.history)
    print(f"steps:        {result.step}")
    print(f"final loss:   {final_loss:.5f}" if final_loss is not None else "final loss:   n/a")
    print(f"images/s:     {result.images_per_s:.1f}")
    print(f"model id:     {ckpt.meta.get('model_id')}")
    print(f"checkpoint:   {Path(args.out).resolve()}")
    return 0


def _train_features(preset: Any, arrays: list[Any]) -> dict[str, Any]:
    """``{"features": (N, F)}`` pooled backbone features for a ``"pretrained"`` encoder preset, else ``{}``."""
    if preset.model.encoder.kind != "pretrained":
        return {}
    from pipeline.latent.features import image_features

    print(f"computing backbone features of {len(arrays)} images", file=sys.stderr)
    return {"features": image_features(preset.model, arrays)}


def _final_loss(history: Any) -> float | None:
    if history is None or len(history) == 0:
        return None
    last = history[-1] if isinstance(history, list) else history.iloc[-1]
    if isinstance(last, dict) or hasattr(last, "get"):
        for key in ("total", "loss"):
            if key in last:
                return float(last[key])
    for key in ("total", "loss"):
        if hasattr(last, key):
            return float(getattr(last, key))
    return None


# --- encode ------------------------------------------------------------------------------------------------------
ENCODE_EPILOG = """\
examples:
  linewatch encode --model ckpt/v1 --images line1/2024-05-01 --out latents.parquet
  linewatch encode --model ckpt/v1 --images cells/ --out z.parquet --batch-size 64 --no-progress

Writes one row per image: path, sha256 of the file, model_id, z_0 ... z_{d-1} (float32).
"""


def cmd_encode(args: argparse.Namespace) -> int:
    """Run ``linewatch encode``."""
    from pipeline.common.images import find_images
    from pipeline.common.schemas import z_columns
    from pipeline.latent.encode import encode_paths, paths_table_schema, write_parquet_atomic

    _set_threads(args)
    out = Path(args.out)
    if out.suffix.lower() != ".parquet":
        raise CLIError(f"--out must be a .parquet file, got {args.out!r}")
    paths = find_images(args.images)
    ckpt = load_model(args.model, args.device)
    df = encode_paths(ckpt, paths, batch_size=args.batch_size, progress=_progress(args))
    write_parquet_atomic(df, out, paths_table_schema(len(z_columns(df))))
    print(f"encoded {len(df)} images with model {df['model_id'].iloc[0]} (d={len(z_columns(df))}) -> {out}")
    return 0


# --- traverse ----------------------------------------------------------------------------------------------------
TRAVERSE_EPILOG = """\
examples:
  linewatch traverse --model ckpt/v1 --image cell.png --out grid.png                 # first 8 axes, z = -2..2
  linewatch traverse --model ckpt/v1 --image cell.png --out grid.png --axes 3 7 12
  linewatch traverse --model ckpt/v1 --image cell.png --out grid.png --axes all --values -3 0 3 --steps 20

One row per axis; columns are the values given to that axis of z (the others keep the image's own code). The original
and its reconstruction are shown in front.
"""


def _parse_axes(raw: Sequence[str] | None, d: int) -> list[int]:
    if not raw:
        return list(range(min(d, MAX_DEFAULT_AXES)))
    if len(raw) == 1 and raw[0].lower() == "all":
        return list(range(d))
    axes = []
    for tok in raw:
        for part in tok.split(","):
            if not part:
                continue
            try:
                a = int(part)
            except ValueError as exc:
                raise CLIError(f"--axes takes axis numbers or 'all', got {part!r}") from exc
            if not 0 <= a < d:
                raise CLIError(f"axis {a} is out of range: this model has latent axes 0..{d - 1}")
            axes.append(a)
    if not axes:
        raise CLIError("--axes is empty")
    return axes


def _image_codes(ckpt: Any, paths: list[Path]) -> Any:
    """The images' codes z (N, d) as the monitor encodes them (a ``"pretrained"`` encoder reads backbone features)."""
    import torch

    from pipeline.common.images import read_images
    from pipeline.latent.encode import encode_images

    return torch.from_numpy(encode_images(ckpt.model, ckpt.preprocess, read_images(paths, channels=1)))


def cmd_traverse(args: argparse.Namespace) -> int:
    """Run ``linewatch traverse``."""
    import torch

    _set_threads(args)
    _seed(args.seed)
    ckpt = load_model(args.model, args.device)
    model = ckpt.model
    d = int(ckpt.config.latent_dim)
    axes = _parse_axes(args.axes, d)
    values = list(args.values) if args.values else list(DEFAULT_TRAVERSE_VALUES)
    if not all(np.isfinite(values)):
        raise CLIError("--values must be finite numbers")
    x0 = _load_image_tensor(args.image, ckpt)
    z0 = _image_codes(ckpt, [Path(args.image)]).to(x0.device)
    with torch.inference_mode():
        rec = model.reconstruct(x0, steps=args.steps, z=z0)
        grid = model.traverse(x0, axes, torch.tensor(values, dtype=torch.float32), steps=args.steps, z=z0)
        z = z0[0]
    # grid: (A, V, C, H, W)
    cells = []
    for i in range(len(axes)):
        front = [to_display(x0[0]), to_display(rec[0])] if i == 0 else [None, None]
        cells.append(front + [to_display(grid[i, j]) for j in range(len(values))])
    col_titles = ["original", "reconstruction"] + [f"{v:+g}" for v in values]
    row_labels = [f"z_{a}\n(own {float(z[a]):+.2f})" for a in axes]
    out = save_grid(
        cells,
        output_png(args.out, f"traverse-{Path(args.image).stem}.png"),
        col_titles=col_titles,
        row_labels=row_labels,
        title=f"{Path(args.image).name}: traversal, model {ckpt.meta.get('model_id')}, {args.steps} DDIM steps",
    )
    print(f"wrote {len(axes)} x {len(values)} traversal grid -> {out}")
    return 0


# --- reconstruct -------------------------------------------------------------------------------------------------
RECONSTRUCT_EPILOG = """\
examples:
  linewatch reconstruct --model ckpt/v1 --image cell.png --out rec.png
  linewatch reconstruct --model ckpt/v1 --image a.png b.png c.png --out rec.png --steps 100

Each row: the original, its reconstruction (DDIM-invert with z = Enc(x0), then decode with the same z) and the
absolute difference. The mean absolute error on the [-1, 1] scale is printed per image.
"""


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Run ``linewatch reconstruct``."""
    import torch

    from pipeline.common.images import load_batch

    _set_threads(args)
    _seed(args.seed)
    ckpt = load_model(args.model, args.device)
    for p in args.image:
        if not Path(p).is_file():
            raise CLIError(f"image {p!r} does not exist or is not a file")
    x0 = load_batch([Path(p) for p in args.image], ckpt.preprocess).to(next(ckpt.model.parameters()).device)
    z0 = _image_codes(ckpt, [Path(p) for p in args.image]).to(x0.device)
    with torch.inference_mode():
        rec = ckpt.model.reconstruct(x0, steps=args.steps, z=z0)
    diff = (rec - x0).abs()
    cells, labels = [], []
    for i, p in enumerate(args.image):
        err = float(diff[i].mean())
        print(f"{p}: mean |x - x_rec| = {err:.4f}")
        cells.append([to_display(x0[i]), to_display(rec[i]), to_display(diff[i] - 1.0)])
        labels.append(f"{Path(p).name}\nMAE {err:.3f}")
    out = save_grid(cells, args.out, col_titles=["original", "reconstruction", "|difference|"], row_labels=labels)
    print(f"wrote reconstruction of {len(args.image)} image(s) -> {out}")
    return 0


# --- sample ------------------------------------------------------------------------------------------------------
SAMPLE_EPILOG = """\
examples:
  linewatch sample --model ckpt/v1 --n 16 --out samples.png
  linewatch sample --model ckpt/v1 --n 64 --out samples.png --steps 100 --seed 3 --npy samples.npy

Draws z from the prior and x_T ~ N(0, I), then decodes with DDIM; writes a square-ish grid of the samples.
"""


def cmd_sample(args: argparse.Namespace) -> int:
    """Run ``linewatch sample``."""
    import math

    import torch

    _set_threads(args)
    if args.n < 1:
        raise CLIError(f"--n must be >= 1, got {args.n}")
    _seed(args.seed)
    ckpt = load_model(args.model, args.device)
    with torch.inference_mode():
        x = ckpt.model.sample(args.n, steps=args.steps)
    cols = math.ceil(math.sqrt(args.n))
    imgs = [to_display(x[i]) for i in range(args.n)]
    cells = [imgs[r * cols : (r + 1) * cols] for r in range(math.ceil(args.n / cols))]
    out = save_grid(cells, args.out, title=f"{args.n} samples, model {ckpt.meta.get('model_id')}, {args.steps} steps")
    if args.npy:
        np.save(args.npy, x.detach().float().cpu().numpy())
    print(f"wrote {args.n} samples -> {out}")
    return 0


# --- registration ------------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    if model:
        p.add_argument("--model", required=True, metavar="CKPT_DIR", help="checkpoint folder written by train")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def register(subparsers: Any) -> None:
    """Add ``train``, ``encode``, ``traverse``, ``reconstruct`` and ``sample`` to the ``linewatch`` parser."""
    _register_train(subparsers)
    _register_encode(subparsers)
    _register_traverse(subparsers)
    _register_reconstruct(subparsers)
    _register_sample(subparsers)


def _register_train(subparsers: Any) -> None:
    """Add ``linewatch train``."""
    p = subparsers.add_parser(
        "train",
        help="train an InfoDiffusion model on a folder of images",
        description="Train InfoDiffusion on the images found recursively in --images and save a checkpoint.",
        epilog=TRAIN_EPILOG,
        formatter_class=_formatter(),
    )
    p.add_argument("--images", required=True, metavar="DIR", help="folder of training images (recursive)")
    p.add_argument("--out", required=True, metavar="CKPT_DIR", help="checkpoint folder to write")
    p.add_argument("--preset", default="cpu",
                   help="tiny, cpu (default), pretrained (frozen ImageNet backbone + trained head), standard or large")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: the preset's)")
    p.add_argument("--lambda", dest="lambda_mmd", type=float, default=None, metavar="L", help="MMD prior weight")
    p.add_argument(
        "--zeta",
        type=float,
        default=None,
        metavar="Z",
        help="mutual-information weight; (1 - zeta) weights a per-sample KL, which needs --stochastic-encoder",
    )
    p.add_argument(
        "--stochastic-encoder", action="store_true", help="Gaussian encoder head (mu, log sigma^2) for the KL term"
    )
    p.add_argument("--latent-dim", type=int, default=None, metavar="D", help="size of the latent code z")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--init", default=None, metavar="CKPT_DIR", help="start from another checkpoint's weights")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(p, model=False)
    p.set_defaults(func=cmd_train)


def _register_encode(subparsers: Any) -> None:
    """Add ``linewatch encode``."""
    p = subparsers.add_parser(
        "encode",
        help="encode a folder of images into a latents Parquet file",
        description="Encode every image under --images with a trained model.",
        epilog=ENCODE_EPILOG,
        formatter_class=_formatter(),
    )
    _common(p)
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images (recursive) or one image")
    p.add_argument("--out", required=True, metavar="FILE.parquet", help="latents table to write")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_encode)


def _register_traverse(subparsers: Any) -> None:
    """Add ``linewatch traverse``."""
    p = subparsers.add_parser(
        "traverse",
        help="draw a latent traversal grid for one image",
        description="Vary one latent axis at a time for one image and decode (one row per axis).",
        epilog=TRAVERSE_EPILOG,
        formatter_class=_formatter(),
    )
    _common(p)
    p.add_argument("--image", required=True, metavar="FILE", help="the image to traverse")
    p.add_argument("--out", required=True, metavar="FILE.png", help="grid image to write")
    p.add_argument(
        "--axes", nargs="+", default=None, help=f"axis numbers or 'all' (default: the first {MAX_DEFAULT_AXES})"
    )
    p.add_argument("--values", nargs="+", type=float, default=None, help="values per axis (default: -2 -1 0 1 2)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_traverse)


def _register_reconstruct(subparsers: Any) -> None:
    """Add ``linewatch reconstruct``."""
    p = subparsers.add_parser(
        "reconstruct",
        help="reconstruct images through z and the DDIM round trip",
        description="Show images next to their reconstructions.",
        epilog=RECONSTRUCT_EPILOG,
        formatter_class=_formatter(),
    )
    _common(p)
    p.add_argument("--image", required=True, nargs="+", metavar="FILE", help="one or more images")
    p.add_argument("--out", required=True, metavar="FILE.png", help="figure to write")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_reconstruct)


def _register_sample(subparsers: Any) -> None:
    """Add ``linewatch sample``."""
    p = subparsers.add_parser(
        "sample",
        help="generate images from the prior",
        description="Generate new images: z from the prior, x_T from N(0, I), DDIM decoding.",
        epilog=SAMPLE_EPILOG,
        formatter_class=_formatter(),
    )
    _common(p)
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="grid image to write")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--npy", default=None, metavar="FILE.npy", help="also save the raw samples in [-1, 1]")
    p.set_defaults(func=cmd_sample)
