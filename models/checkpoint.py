"""Checkpoints: ``weights.safetensors`` + ``config.json`` (+ ``train_state.pt`` for resuming).

Layout of a checkpoint directory::

    config.json            {"format_version", "model": InfoDiffusionConfig, "preprocess": PreprocessSpec, "meta"}
    weights.safetensors    the inference weights (the EMA weights when training with EMA)
    train_state.pt         optional: raw weights, optimizer state, step, RNG states (loaded with weights_only=True)

Loading never unpickles a model object: the model is rebuilt from ``config.json`` and the tensors are loaded into it
with strict key and shape checks, after the weights file is checked against the digest recorded when it was saved
(``meta.weights_sha256``, or the 16-hex ``model_id`` of older checkpoints): flipped bytes never load silently under
the original model id.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import InfoDiffusionConfig, PreprocessSpec
from .infodiffusion import InfoDiffusion

__all__ = [
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "TRAIN_STATE_NAME",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "load_train_state",
    "file_digest",
    "verify_weights",
    "backbone_record",
    "verify_backbone_record",
]

FORMAT_VERSION = 1
WEIGHTS_NAME = "weights.safetensors"
CONFIG_NAME = "config.json"
TRAIN_STATE_NAME = "train_state.pt"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: the rebuilt model in eval mode.
        config: its config.
        preprocess: how raw images must be converted for it.
        meta: free-form metadata; ``meta["weights_sha256"]`` = sha256(weights.safetensors), checked on every load,
            and ``meta["model_id"]`` = its first 16 hex characters.
        path: the checkpoint directory.
    """

    model: InfoDiffusion
    config: InfoDiffusionConfig
    preprocess: PreprocessSpec
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def file_digest(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(
    model: InfoDiffusion,
    out_dir: str | Path,
    *,
    preprocess: PreprocessSpec,
    train_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (a temp dir next to it, then renamed into place).

    Args:
        model: the model whose weights are the inference weights (pass the EMA model when training with EMA).
        out_dir: the checkpoint directory. An existing checkpoint there is replaced (other files and folders in it
            are carried over);
            an existing non-empty directory that is not a checkpoint is refused.
        preprocess: the preprocessing spec the model was trained with.
        train_state: optional resume state (tensors, numbers, strings, nested dicts/lists only), saved as
            ``train_state.pt``.
        meta: JSON-safe metadata; ``model_id`` is added.

    Returns:
        The checkpoint directory.
    """
    out_dir = Path(out_dir)
    cfg = model.cfg
    if preprocess.image_size != cfg.image_size or preprocess.channels != cfg.in_channels:
        raise ValueError(
            f"preprocess spec ({preprocess.image_size} px, {preprocess.channels} ch) does not match the model "
            f"({cfg.image_size} px, {cfg.in_channels} ch)"
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / CONFIG_NAME).exists():
        raise ValueError(f"{out_dir} exists, is not empty and is not a checkpoint; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(
            _state_for_saving(model),
            str(tmp / WEIGHTS_NAME),
            metadata={"format_version": str(FORMAT_VERSION)},
        )
        meta = dict(meta or {})
        digest = file_digest(tmp / WEIGHTS_NAME)
        meta["model_id"] = digest[:16]
        meta["weights_sha256"] = digest
        if cfg.encoder.kind == "pretrained":  # the frozen backbone is not saved, only its identity
            meta["backbone"] = backbone_record(cfg)
        doc = {
            "format_version": FORMAT_VERSION,
            "model": cfg.to_dict(),
            "preprocess": preprocess.to_dict(),
            "meta": meta,
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(doc, indent=2, sort_keys=True))
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE_NAME)
        _carry_companions(out_dir, tmp)
        old = out_dir.with_name(f".{out_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _carry_companions(out_dir: Path, tmp: Path) -> None:
    """Copy the files and folders next to a checkpoint (a latent DDPM, a monitoring bundle, ...) into its new copy."""
    if not out_dir.exists():
        return
    for f in out_dir.iterdir():
        if f.name in (WEIGHTS_NAME, CONFIG_NAME, TRAIN_STATE_NAME):
            continue
        if f.is_dir():
            shutil.copytree(f, tmp / f.name, symlinks=True)
        else:
            shutil.copy2(f, tmp / f.name, follow_symlinks=False)


def _resolve_dir(path: str | Path) -> Path:
    """The checkpoint dir; falls back to the ``.old`` copy left by a crash between the two renames."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not p.exists():
        old = p.with_name(f".{p.name}.old")
        if old.exists():
            return old
        raise FileNotFoundError(f"checkpoint directory {p} does not exist")
    return p


def read_config(path: str | Path) -> tuple[InfoDiffusionConfig, PreprocessSpec, dict[str, Any]]:
    """Read and validate ``config.json`` of a checkpoint directory."""
    d = _resolve_dir(path)
    cfg_path = d / CONFIG_NAME
    if not cfg_path.exists():
        raise FileNotFoundError(f"checkpoint {d} has no {CONFIG_NAME}")
    try:
        doc = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"checkpoint {d}: {CONFIG_NAME} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"checkpoint {d}: {CONFIG_NAME} must hold a JSON object")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"checkpoint {d}: format_version {version!r}, this code reads {FORMAT_VERSION}")
    for key in ("model", "preprocess"):
        if key not in doc:
            raise ValueError(f"checkpoint {d}: {CONFIG_NAME} lacks the {key!r} section")
    try:
        cfg, spec = InfoDiffusionConfig.from_dict(doc["model"]), PreprocessSpec.from_dict(doc["preprocess"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {d}: invalid {CONFIG_NAME}: {exc}") from exc
    meta = doc.get("meta", {})
    return cfg, spec, meta if isinstance(meta, dict) else {}


def backbone_record(cfg: InfoDiffusionConfig) -> dict[str, Any]:
    """What a checkpoint of the ``"pretrained"`` encoder records instead of the frozen backbone's weights."""
    from .backbone import backbone_id, get_backbone_spec

    enc = cfg.encoder
    spec = get_backbone_spec(enc.backbone)
    return {"id": backbone_id(enc.backbone, enc.backbone_size), "name": enc.backbone, "image_size": enc.backbone_size,
            "weights_sha256": spec.weights_sha256, "packages": list(spec.packages)}


def verify_backbone_record(cfg: InfoDiffusionConfig, meta: dict[str, Any], source: str) -> None:
    """A checkpoint's recorded backbone must be the one this code builds (same name, size and weights digest)."""
    rec = meta.get("backbone")
    want = backbone_record(cfg)
    if not isinstance(rec, dict) or rec.get("id") != want["id"] or rec.get("weights_sha256") != want["weights_sha256"]:
        got = rec.get("id") if isinstance(rec, dict) else None
        raise ValueError(f"{source}: the checkpoint was trained on backbone {got!r}, this code builds {want['id']!r} "
                         "(weights sha256 differ or none recorded); its z would not be comparable")


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; missing/unexpected keys or shape mismatches raise ``ValueError`` naming the key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not match the model config: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{source}: shape mismatch for {k!r}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            )
    model.load_state_dict(state, strict=True)


def verify_weights(d: Path, meta: dict[str, Any]) -> str:
    """Check ``weights.safetensors`` against the digest in ``meta``; return its sha256.

    Raises:
        ValueError: The file does not hash to the recorded digest (damaged or changed after saving).
    """
    digest = file_digest(d / WEIGHTS_NAME)
    expected = meta.get("weights_sha256") or meta.get("model_id")
    if not isinstance(expected, str) or not expected:
        raise ValueError(f"checkpoint {d}: {CONFIG_NAME} records no weights digest (meta.weights_sha256/model_id)")
    if not digest.startswith(expected):
        raise ValueError(
            f"checkpoint {d}: {WEIGHTS_NAME} does not match its recorded digest (expected {expected[:16]}..., "
            f"the file hashes to {digest[:16]}...): it was damaged or changed after saving; restore it or retrain"
        )
    return digest


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory written by ``save_checkpoint``.

    Args:
        path: the directory (or any file inside it).
        map_location: device for the model.

    Returns:
        ``Checkpoint`` with the model in eval mode.

    Raises:
        FileNotFoundError: missing directory or file.
        ValueError: config invalid, weights that do not match their digest, an unreadable weights file, or weights
            that do not fit the config (the message names the key).
    """
    d = _resolve_dir(path)
    cfg, spec, meta = read_config(d)
    w_path = d / WEIGHTS_NAME
    if not w_path.exists():
        raise FileNotFoundError(f"checkpoint {d} has no {WEIGHTS_NAME}")
    verify_weights(d, meta)
    if cfg.encoder.kind == "pretrained":
        verify_backbone_record(cfg, meta, str(d))
    model = InfoDiffusion(cfg)
    try:
        state = load_file(str(w_path), device="cpu")
    except Exception as exc:  # safetensors raises its own error type on a damaged header
        raise ValueError(f"checkpoint {d}: {WEIGHTS_NAME} cannot be read: {exc}") from exc
    load_state_strict(model, state, str(d))
    model.to(map_location).eval()
    return Checkpoint(model=model, config=cfg, preprocess=spec, meta=meta, path=d)


def load_train_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``train_state.pt`` (``weights_only=True``: tensors and plain containers only)."""
    p = _resolve_dir(path) / TRAIN_STATE_NAME
    if not p.exists():
        raise FileNotFoundError(f"no {TRAIN_STATE_NAME} in {p.parent}: cannot resume")
    return torch.load(p, map_location=map_location, weights_only=True)
