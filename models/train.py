"""One readable training loop (nanoGPT style) for InfoDiffusion.

AdamW, linear warm-up then cosine decay, global grad-norm clipping, EMA inference weights, autocast on CUDA only,
seeded, atomic checkpoints every ``checkpoint_every`` steps and at the end, ``resume`` and ``init_from``.

Data parallel (``torchrun``): when ``torch.distributed`` is initialised with more than one process (``train`` does it
itself from the ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` variables torchrun sets: "nccl" on CUDA, "gloo" on CPU),
the loss runs through ``DistributedDataParallel`` (gradients averaged over ranks). Every rank draws the same global
batch indices (one shared data stream, so a checkpoint's data RNG is valid for all ranks) and trains on its own
``batch_size // world_size`` slice; diffusion noise / timesteps are seeded per rank. Rank 0 alone keeps the EMA,
writes checkpoints (the others wait at a barrier), shows progress and records history (losses averaged over ranks).

Augmentation: none. No random flips: the line's camera sees every cell in a fixed orientation, and the monitor must
*notice* layout changes (a mirrored or rotated fixture, a shifted cell). Training on flipped cells would teach z to
ignore exactly those changes. (ELPV cells are roughly symmetric, so the data gain would be small anyway.)
"""

from __future__ import annotations

import atexit
import copy
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from .checkpoint import (
    CONFIG_NAME,
    TRAIN_STATE_NAME,
    WEIGHTS_NAME,
    load_state_strict,
    load_train_state,
    read_config,
    save_checkpoint,
)
from .config import TrainConfig
from .infodiffusion import InfoDiffusion, LossOutput
from .preprocess import check_model_input
from .presets import Preset

__all__ = ["TrainResult", "train", "lr_at", "config_diff"]


@dataclass(frozen=True)
class TrainResult:
    """What ``train`` returns.

    Attributes:
        model: the inference model (EMA weights), in eval mode, on the training device. Under data parallel
            training only rank 0 keeps the EMA; the other ranks return their (synchronised) raw training weights.
        step: the final step count (continues across resumes).
        history: one dict per logged step: step, loss, eps_mse, mmd, kl, lr (empty on ranks other than 0).
        out_dir: the checkpoint directory (None when not checkpointing).
        images_per_s: training throughput of this call (optimiser steps only, checkpoint I/O excluded; all ranks
            together under data parallel training).
    """

    model: InfoDiffusion
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    out_dir: Path | None = None
    images_per_s: float = 0.0


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to 0 at ``total_steps`` (step is 0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts, as ``key: a != b`` strings."""
    fa, fb = _flatten(a), _flatten(b)
    return [
        f"{k}: {fa.get(k)!r} != {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)
    ]


class _ShardBatches(Sampler[list[int]]):
    """Yields this rank's contiguous slice of every global batch of indices."""

    def __init__(self, batches: Iterable[list[int]], rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for idx in self.batches:
            per = len(idx) // self.world
            yield idx[self.rank * per : (self.rank + 1) * per]

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def _feature_batches(
    data: torch.Tensor, features: torch.Tensor, batch_size: int, generator: torch.Generator, device: torch.device,
    rank: int = 0, world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless stream of (images, pooled features) batches drawn with the same indices (this rank's slice)."""
    per = batch_size // world
    lo, hi = rank * per, (rank + 1) * per
    n = data.shape[0]
    while True:
        idx = torch.randint(0, n, (batch_size,), generator=generator)[lo:hi]
        yield data[idx].to(device, non_blocking=True), features[idx].to(device, non_blocking=True)


def _batches(
    data: torch.Tensor | Dataset,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> Iterator[torch.Tensor]:
    """Endless stream of (B, C, H, W) batches.

    Uniform sampling with replacement from a tensor, or a shuffled DataLoader over a Dataset (items: tensors, or
    tuples whose first element is the image). With ``world > 1`` every rank draws the same global batch of
    ``batch_size`` indices (same ``generator`` seed) and yields its own ``batch_size // world`` slice.
    """
    if world > 1:
        yield from _sharded_batches(data, batch_size, generator, device, rank, world)
        return
    if isinstance(data, torch.Tensor):
        n = data.shape[0]
        while True:
            idx = torch.randint(0, n, (batch_size,), generator=generator)
            yield data[idx.to(data.device)].to(device, non_blocking=True)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)
    if len(loader) == 0:
        raise ValueError(f"the dataset has fewer items ({len(data)}) than batch_size={batch_size}")  # type: ignore[arg-type]
    while True:
        for item in loader:
            x = item[0] if isinstance(item, list | tuple) else item
            yield x.to(device, non_blocking=True)


def _sharded_batches(
    data: torch.Tensor | Dataset,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    rank: int,
    world: int,
) -> Iterator[torch.Tensor]:
    per = batch_size // world
    lo, hi = rank * per, (rank + 1) * per
    if isinstance(data, torch.Tensor):
        n = data.shape[0]
        while True:
            idx = torch.randint(0, n, (batch_size,), generator=generator)[lo:hi]
            yield data[idx.to(data.device)].to(device, non_blocking=True)
    global_batches = BatchSampler(RandomSampler(data, generator=generator), batch_size, drop_last=True)  # type: ignore[arg-type]
    if len(global_batches) == 0:
        raise ValueError(f"the dataset has fewer items ({len(data)}) than batch_size={batch_size}")  # type: ignore[arg-type]
    loader = DataLoader(data, batch_sampler=_ShardBatches(global_batches, rank, world), generator=generator)
    while True:
        for item in loader:
            x = item[0] if isinstance(item, list | tuple) else item
            yield x.to(device, non_blocking=True)


class _LossModule(torch.nn.Module):
    """``forward(x, generator)`` = ``model.loss``: DDP syncs gradients only for what runs through its ``forward``."""

    def __init__(self, model: InfoDiffusion) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, generator: torch.Generator, features: torch.Tensor | None = None
                ) -> LossOutput:
        return self.model.loss(x, generator=generator, features=features)


def _env_world() -> int:
    """WORLD_SIZE set by torchrun (1 when absent or not a launcher environment)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 1
    try:
        return int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _check_features(data: torch.Tensor | Dataset, features: torch.Tensor | None, preset: Preset) -> None:
    """The ``"pretrained"`` encoder needs one pooled feature row per training image; other encoders take none."""
    pretrained = preset.model.encoder.kind == "pretrained"
    if features is None and pretrained:
        raise ValueError("the 'pretrained' encoder trains from pooled backbone features: pass features=(N, F) "
                         "aligned with the images (pipeline.features computes and caches them)")
    if features is None:
        return
    if not pretrained:
        raise ValueError(f"features= is only for the 'pretrained' encoder, this preset's is {preset.model.encoder.kind!r}")
    if not isinstance(data, torch.Tensor) or features.ndim != 2 or features.shape[0] != data.shape[0]:
        raise ValueError(f"features must be an (N, F) tensor with one row per image of an (N, C, H, W) tensor, got "
                         f"{tuple(features.shape)} for {type(data).__name__}")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")


def _check_data(data: torch.Tensor | Dataset, preset: Preset) -> None:
    cfg = preset.model
    if isinstance(data, torch.Tensor):
        check_model_input(data, cfg)
        return
    if not isinstance(data, Dataset):
        raise ValueError(
            f"data must be a (N, C, H, W) tensor in [-1, 1] or a torch Dataset, got {type(data).__name__}"
        )
    if len(data) == 0:  # type: ignore[arg-type]
        raise ValueError("the dataset is empty")
    first = data[0]
    x = first[0] if isinstance(first, list | tuple) else first
    check_model_input(torch.as_tensor(x)[None], cfg)


# rank r's diffusion-noise generator: seed + 1 + r * stride (rank 0 = the single-process seed)
_RANK_SEED_STRIDE = 1_000_003


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_p = [p for p in ema.parameters()]
    cur_p = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, cur_p, 1.0 - decay)


def train(
    preset: Preset, data: torch.Tensor | Dataset, out_dir: str | Path | None, *,
    steps: int | None = None, batch_size: int | None = None, resume: bool = False,
    init_from: str | Path | None = None, device: str | torch.device | None = None, progress: bool = True,
    on_step: Callable[[dict[str, float]], bool | None] | None = None, seed: int | None = None,
    features: torch.Tensor | None = None,
) -> TrainResult:
    """Train an InfoDiffusion model.

    Args:
        preset: model / training / preprocessing recipe.
        data: (N, C, H, W) float tensor in [-1, 1] (from ``to_model_input``) or a Dataset of such (C, H, W) items.
        out_dir: checkpoint directory (``config.json``, ``weights.safetensors`` = EMA weights, ``train_state.pt``);
            None = no checkpoints.
        steps: total optimiser steps (overrides the preset; with ``resume`` it is the total, not the remainder).
        batch_size: overrides the preset.
        resume: continue from the checkpoint in ``out_dir`` (step count, optimizer, EMA, RNG); starts fresh if there
            is none. Without ``resume`` an existing checkpoint in ``out_dir`` is an error (nothing is overwritten).
        init_from: a checkpoint directory to warm-start the weights from (same model config required).
        device: default cuda if available (``cuda:LOCAL_RANK`` under torchrun), else cpu.
        progress: show a tqdm bar (only on a TTY; rank 0 only).
        on_step: called with each history record (every ``log_every`` steps; rank 0 only, its answer is
            broadcast to all ranks); return True to stop early.
        seed: overrides the preset seed.
        features: (N, F) pooled backbone features of the images (required by, and only for, the ``"pretrained"``
            encoder kind; ``data`` must then be a tensor). A fresh model's head is initialised from them
            (``FeatureHead.init_from_features``); the backbone itself never trains.

    Returns:
        ``TrainResult``.

    Note:
        Thread count is the caller's choice (``torch.set_num_threads``). On a CPU shared with other busy processes,
        1 thread can be far faster than 2 (OpenMP barrier spinning under oversubscription).

        Data parallel: see the module docstring. ``batch_size`` is the global batch (split over ranks); ``out_dir``
        and ``init_from`` must be visible to every rank (all ranks read the checkpoint on ``resume``). A process
        group that ``train`` initialised itself stays up for later calls and is destroyed at interpreter exit.

    Raises:
        ValueError: bad data, config mismatch with ``init_from``/``resume``, existing checkpoint without ``resume``,
            a global batch size not divisible by the world size (or under 2 images per rank).
        RuntimeError: the loss became non-finite.
    """
    overrides = {k: v for k, v in (("steps", steps), ("batch_size", batch_size), ("seed", seed)) if v is not None}
    tcfg = preset.train.replace(**overrides)
    _check_data(data, preset)
    _check_features(data, features, preset)
    return _train(preset, data, out_dir, tcfg=tcfg, dev=_resolve_device(device), resume=resume,
                  init_from=init_from, progress=progress, on_step=on_step, features=features)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """The training device; starts the process group first when torchrun launched more than one process."""
    if dist.is_available() and not dist.is_initialized() and _env_world() > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is not None:
            dev = torch.device(device)
        elif torch.cuda.is_available():
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        # kept for later calls (re-initialising a torchrun group in one process races on its rendezvous store)
        atexit.register(_destroy_group)
        return dev
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available() and dist.is_available() and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _ranks(tcfg: TrainConfig) -> tuple[bool, int, int]:
    """(distributed, rank, world size); a global batch that does not split evenly over the ranks is an error."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if distributed and (tcfg.batch_size % world != 0 or tcfg.batch_size // world < 2):
        raise ValueError(
            f"batch_size={tcfg.batch_size} is the global batch: it must be divisible by the world size {world} "
            f"and give at least 2 images per rank; use e.g. batch_size={max(2, tcfg.batch_size // world) * world}"
        )
    return distributed, rank, world


def _check_out_dir(out_dir: str | Path | None, resume: bool, init_from: str | Path | None) -> tuple[Path | None, bool]:
    """(checkpoint directory or None, whether it holds a checkpoint); refuses to overwrite anything."""
    out_path = Path(out_dir) if out_dir is not None else None
    has_ckpt = out_path is not None and (out_path / CONFIG_NAME).exists()
    if has_ckpt and not resume:
        raise ValueError(
            f"{out_path} already holds a checkpoint; pass resume=True to continue it or use a new out_dir"
        )
    if out_path is not None and not has_ckpt and out_path.exists() and any(out_path.iterdir()):
        raise ValueError(f"out_dir {out_path} exists and is not empty; use a new or empty directory")
    if resume and init_from is not None and has_ckpt:
        raise ValueError("pass either resume=True (with an existing checkpoint) or init_from, not both")
    return out_path, has_ckpt


def _new_model(
    preset: Preset, tcfg: TrainConfig, dev: torch.device, init_from: str | Path | None,
    features: torch.Tensor | None, resuming: bool,
) -> InfoDiffusion:
    """A seeded fresh model, warm-started from ``init_from`` or its feature head initialised from ``features``."""
    cfg = preset.model
    torch.manual_seed(tcfg.seed)
    model = InfoDiffusion(cfg).to(dev)
    if init_from is not None:
        src_cfg, _, _ = read_config(init_from)
        diff = config_diff(src_cfg.to_dict(), cfg.to_dict())
        if diff:
            raise ValueError(
                f"init_from={init_from}: model config differs from the preset's: {'; '.join(diff)}"
            )
        from safetensors.torch import load_file

        load_state_strict(model, load_file(str(Path(init_from) / WEIGHTS_NAME)), str(init_from))
    elif features is not None and not resuming:
        model.encoder.head.init_from_features(features)
    return model


@dataclass
class _Run:
    """The state of one training run that the setup, resume, step, log and checkpoint steps share."""

    preset: Preset
    tcfg: TrainConfig
    dev: torch.device
    distributed: bool
    rank: int
    world: int
    out_path: Path | None
    model: InfoDiffusion
    ema: InfoDiffusion | None
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_amp: bool
    amp_dtype: torch.dtype
    data_gen: torch.Generator
    loss_gen: torch.Generator
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _new_run(
    preset: Preset, tcfg: TrainConfig, dev: torch.device, model: InfoDiffusion, out_path: Path | None,
    ranks: tuple[bool, int, int],
) -> _Run:
    """EMA copy (rank 0), optimizer, AMP scaler and the seeded data / diffusion-noise generators for ``model``."""
    distributed, rank, world = ranks
    ema = copy.deepcopy(model).requires_grad_(False).eval() if rank == 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    use_amp = tcfg.amp and dev.type == "cuda"
    amp_dtype = torch.bfloat16 if (use_amp and torch.cuda.is_bf16_supported()) else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    data_gen = torch.Generator().manual_seed(tcfg.seed)
    loss_gen = torch.Generator(device=dev).manual_seed(tcfg.seed + 1 + _RANK_SEED_STRIDE * rank)
    return _Run(preset=preset, tcfg=tcfg, dev=dev, distributed=distributed, rank=rank, world=world,
                out_path=out_path, model=model, ema=ema, opt=opt, scaler=scaler, use_amp=use_amp,
                amp_dtype=amp_dtype, data_gen=data_gen, loss_gen=loss_gen)


def _restore(run: _Run) -> None:
    """Loads the checkpoint in ``run.out_path`` into ``run``: weights, EMA, optimizer, scaler, step, history, RNG."""
    out_path = run.out_path
    assert out_path is not None
    src_cfg, _, _ = read_config(out_path)
    diff = config_diff(src_cfg.to_dict(), run.preset.model.to_dict())
    if diff:
        raise ValueError(
            f"cannot resume {out_path}: model config differs from the preset's: {'; '.join(diff)}"
        )
    state = load_train_state(out_path)
    load_state_strict(run.model, state["model"], f"{out_path}/{TRAIN_STATE_NAME}")
    from safetensors.torch import load_file

    if run.ema is not None:
        load_state_strict(run.ema, load_file(str(out_path / WEIGHTS_NAME)), str(out_path))
        run.ema.to(run.dev)
    run.opt.load_state_dict(state["optimizer"])
    if "scaler" in state and run.scaler.is_enabled():
        run.scaler.load_state_dict(state["scaler"])
    run.step = int(state["step"])
    run.history = list(state.get("history", [])) if run.rank == 0 else []
    torch.set_rng_state(state["rng"]["torch"])
    run.data_gen.set_state(state["rng"]["data"])
    if run.loss_gen.device.type == "cpu":
        per_rank = state["rng"].get("loss_per_rank")
        if not run.distributed:
            run.loss_gen.set_state(state["rng"]["loss"])
        elif per_rank is not None and len(per_rank) == run.world:
            run.loss_gen.set_state(per_rank[run.rank])
        else:  # saved by a run with another world size: fresh, still distinct per rank and per resume point
            run.loss_gen.manual_seed(run.tcfg.seed + 1 + _RANK_SEED_STRIDE * run.rank + run.step)


def _train_state(run: _Run, loss_state: torch.Tensor, per_rank: list[torch.Tensor] | None) -> dict[str, Any]:
    """What ``train_state.pt`` holds: step, raw weights, optimizer, history, every RNG state, the train config."""
    train_state: dict[str, Any] = {
        "step": run.step,
        "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "optimizer": run.opt.state_dict(),
        "history": run.history,
        "rng": {
            "torch": torch.get_rng_state(),
            "data": run.data_gen.get_state(),
            "loss": loss_state,
        },
        "train": run.tcfg.to_dict(),
    }
    if per_rank is not None:
        train_state["rng"]["loss_per_rank"] = per_rank
        train_state["world_size"] = run.world
    if run.scaler.is_enabled():
        train_state["scaler"] = run.scaler.state_dict()
    return train_state


def _checkpoint(run: _Run) -> None:
    """Writes the checkpoint (rank 0; the other ranks hand over their noise RNG and wait); no-op without out_dir."""
    if run.out_path is None:
        return
    loss_state = run.loss_gen.get_state().cpu() if run.loss_gen.device.type == "cpu" else torch.empty(0)
    per_rank: list[torch.Tensor] | None = None
    if run.distributed:
        per_rank = [torch.empty(0)] * run.world
        dist.all_gather_object(per_rank, loss_state)
    if run.rank != 0:
        dist.barrier()  # rank 0 writes; the others wait until the checkpoint is complete
        return
    train_state = _train_state(run, loss_state, per_rank)
    meta = {"preset": run.preset.name, "step": run.step, "train": run.tcfg.to_dict(), "device": str(run.dev)}
    if run.distributed:
        meta["world_size"] = run.world
    assert run.ema is not None
    try:
        save_checkpoint(run.ema, run.out_path, preprocess=run.preset.preprocess, train_state=train_state, meta=meta)
    finally:
        if run.distributed:
            dist.barrier()


def _loss_fn(run: _Run) -> Callable[..., LossOutput]:
    """``(x, generator, features) -> LossOutput``: the model's loss, through DDP when distributed."""
    model, dev = run.model, run.dev
    if not run.distributed:
        return lambda x, g, f=None: model.loss(x, generator=g, features=f)
    from torch.nn.parallel import DistributedDataParallel

    # broadcasts rank 0's weights; the schedule buffers are constants, identical on every rank
    return DistributedDataParallel(
        _LossModule(model),
        device_ids=[dev.index] if dev.type == "cuda" and dev.index is not None else None,
        forward_sync_buffers=False,
    )


def _optimizer_step(run: _Run, loss_fn: Callable[..., LossOutput], x: torch.Tensor, f: torch.Tensor | None,
                    lr: float) -> LossOutput:
    """One optimiser step at learning rate ``lr`` on batch ``x`` (AMP, grad clipping, EMA update); advances step."""
    tcfg, opt, scaler = run.tcfg, run.opt, run.scaler
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast(device_type=run.dev.type, dtype=run.amp_dtype, enabled=run.use_amp):
        out = loss_fn(x, run.loss_gen, f)
    scaler.scale(out.total).backward()
    if tcfg.grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), tcfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    if run.ema is not None:
        _ema_update(run.ema, run.model, min(tcfg.ema_decay, (1 + run.step) / (10 + run.step)))
    run.step += 1
    return out


def _history_record(run: _Run, out: LossOutput, lr: float) -> dict[str, float]:
    """The step's loss terms (mean over ranks) as a history record; a non-finite loss is an error on every rank."""
    terms = out.as_floats()
    if run.distributed:  # mean over ranks (every rank takes part, so a non-finite loss stops them all)
        vals = torch.tensor(list(terms.values()), dtype=torch.float64, device=run.dev)
        dist.all_reduce(vals)
        terms = dict(zip(terms, (vals / run.world).tolist(), strict=True))
    rec = {
        "step": run.step,
        **{k if k != "total" else "loss": v for k, v in terms.items()},
        "lr": lr,
    }
    if not run.preset.model.loss.use_rec_term:
        rec.pop("rec", None)
    if not math.isfinite(rec["loss"]):
        raise RuntimeError(
            f"non-finite loss {rec['loss']} at step {run.step}; lower the lr or check the data"
        )
    return rec


def _log_step(run: _Run, rec: dict[str, float], bar: Any,
              on_step: Callable[[dict[str, float]], bool | None] | None) -> bool:
    """Records ``rec`` (rank 0) and asks ``on_step``; returns whether to stop (rank 0's answer, on every rank)."""
    stop = False
    if run.rank == 0:
        run.history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", mmd=f"{rec['mmd']:.4f}")
        if on_step is not None:
            stop = bool(on_step(rec))
    if run.distributed:  # rank 0 decides (on_step); the others follow
        flag = torch.tensor([int(stop)], device=run.dev)
        dist.broadcast(flag, src=0)
        stop = bool(flag.item())
    return stop


def _loop(run: _Run, batches: Iterator[Any], progress: bool,
          on_step: Callable[[dict[str, float]], bool | None] | None) -> float:
    """Trains until ``tcfg.steps`` or ``on_step`` stops it, checkpointing on the way; returns images per second."""
    from tqdm.auto import tqdm

    tcfg = run.tcfg
    bar = tqdm(
        total=tcfg.steps,
        initial=run.step,
        desc=f"train[{run.preset.name}]",
        disable=not progress or not sys.stderr.isatty() or run.rank != 0,
    )
    train_time, trained = 0.0, 0
    run.model.train()
    loss_fn = _loss_fn(run)
    while run.step < tcfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(run.step, lr=tcfg.lr, warmup_steps=tcfg.warmup_steps, total_steps=tcfg.steps)
        x, f = next(batches)
        out = _optimizer_step(run, loss_fn, x, f, lr)
        stop = False
        if run.step % tcfg.log_every == 0 or run.step == tcfg.steps:
            stop = _log_step(run, _history_record(run, out, lr), bar, on_step)
        bar.update(1)
        train_time += time.perf_counter() - t0
        trained += x.shape[0] * run.world
        if run.step % tcfg.checkpoint_every == 0 and run.step < tcfg.steps and not stop:
            _checkpoint(run)
        if stop:
            break
    bar.close()
    return trained / train_time if train_time else 0.0


def _train(
    preset: Preset,
    data: torch.Tensor | Dataset,
    out_dir: str | Path | None,
    *,
    tcfg: TrainConfig,
    dev: torch.device,
    resume: bool,
    init_from: str | Path | None,
    progress: bool,
    on_step: Callable[[dict[str, float]], bool | None] | None,
    features: torch.Tensor | None = None,
) -> TrainResult:
    """:func:`train` with its overrides applied (``tcfg``) and its device chosen (``dev``)."""
    ranks = _ranks(tcfg)
    _, rank, world = ranks
    out_path, has_ckpt = _check_out_dir(out_dir, resume, init_from)
    model = _new_model(preset, tcfg, dev, init_from, features, resuming=resume and has_ckpt)
    run = _new_run(preset, tcfg, dev, model, out_path, ranks)
    if resume and has_ckpt:
        _restore(run)
    if features is not None:
        batches: Iterator[Any] = _feature_batches(data, features, tcfg.batch_size, run.data_gen, dev, rank, world)
    else:
        batches = ((b, None) for b in _batches(data, tcfg.batch_size, run.data_gen, dev, rank, world))
    images_per_s = _loop(run, batches, progress, on_step)
    _checkpoint(run)
    final = run.ema if run.ema is not None else run.model.requires_grad_(False)
    final.eval()
    return TrainResult(model=final, step=run.step, history=run.history, out_dir=out_path, images_per_s=images_per_s)
