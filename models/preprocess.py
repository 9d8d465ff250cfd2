"""Tensor-level preprocessing: raw camera images -> model input in [-1, 1].

Intensities are scaled by the **fixed** full range of the bit depth (uint8 / 255, uint16 / 65535; floats must already
be in a declared range). There is no per-image normalisation: absolute intensity is signal for drift monitoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import InfoDiffusionConfig, PreprocessSpec

__all__ = ["LUMA_WEIGHTS", "to_model_input", "check_model_input"]

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights (what PIL's ``convert("L")`` uses) for RGB -> gray."""


def _as_chw_float(img: Any, idx: int, float_range: tuple[float, float]) -> torch.Tensor:
    """One image (H, W) / (H, W, 1) / (H, W, 3) -> float32 (C, H, W) in [0, 1]."""
    arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"image {idx}: expected shape (H, W), (H, W, 1) or (H, W, 3), got {arr.shape}")
    h, w, c = arr.shape
    if h == 0 or w == 0:
        raise ValueError(f"image {idx}: empty image of shape {arr.shape}")
    if c not in (1, 3):
        hint = " (RGBA: drop the alpha channel first)" if c == 4 else ""
        raise ValueError(f"image {idx}: expected 1 (gray) or 3 (RGB) channels, got {c}{hint}")
    if arr.dtype == np.uint8:
        x = torch.from_numpy(arr.astype(np.float32) / 255.0)
    elif arr.dtype == np.uint16:
        x = torch.from_numpy(arr.astype(np.float32) / 65535.0)
    elif np.issubdtype(arr.dtype, np.floating):
        x = torch.from_numpy(arr.astype(np.float32))
        if not torch.isfinite(x).all():
            raise ValueError(f"image {idx}: contains NaN or infinite values")
        lo, hi = float_range
        if x.min() < lo or x.max() > hi:
            raise ValueError(
                f"image {idx}: float values span [{float(x.min()):.4g}, {float(x.max()):.4g}], outside the declared "
                f"float_range {float_range}; pass uint8/uint16 or set float_range"
            )
        x = (x - lo) / (hi - lo)
    else:
        raise ValueError(
            f"image {idx}: unsupported dtype {arr.dtype}; use uint8, uint16 or float (in float_range)"
        )
    return x.permute(2, 0, 1).contiguous()


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, c, H, W) -> (B, channels, H, W): RGB -> gray by luma, gray -> RGB by replication."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 3 and channels == 1:
        w = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)
    return x.expand(-1, channels, -1, -1).contiguous()  # gray -> RGB


def _resize(x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    size = spec.image_size
    if x.shape[-2:] == (size, size):
        return x
    if spec.resample == "area":
        # area: box-averaging (exact for integer downscaling); falls back to antialiased bilinear when upscaling
        if x.shape[-2] >= size and x.shape[-1] >= size:
            return F.interpolate(x, size=(size, size), mode="area")
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = F.interpolate(x, size=(size, size), mode=spec.resample, antialias=True, align_corners=False)
    return out.clamp(0.0, 1.0)


def to_model_input(
    images: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    spec: PreprocessSpec,
    *,
    float_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Convert raw images to a model batch: float32 (B, C, H, W) in [-1, 1].

    Accepted input:

    * a list/tuple of arrays, each (H, W) gray, (H, W, 1) or (H, W, 3) RGB; sizes may differ;
    * one array: (H, W) = a single gray image, (B, H, W) = a batch of gray images, (B, H, W, C) = a batch with
      channels last. (A single RGB image must be passed as a list ``[img]`` or with a batch axis: (H, W, 3) would
      be ambiguous with a batch of 3-pixel-wide gray images.)

    dtypes: uint8 (/255), uint16 (/65535), or float already in ``float_range`` (default [0, 1]). Channels: gray or RGB;
    RGB becomes gray with fixed BT.601 luma weights when ``spec.channels == 1``; gray is replicated when
    ``spec.channels == 3``. 2- or 4-channel images are rejected (drop alpha yourself: silently dropping it could hide
    a wrong export). Every image is resized to ``spec.image_size`` square (non-square images are stretched) with
    ``spec.resample`` (antialiased).

    Args:
        images: the raw images.
        spec: target size, channels and resampling.
        float_range: the declared range of float input.

    Returns:
        float32 tensor (B, spec.channels, spec.image_size, spec.image_size) in [-1, 1].

    Raises:
        ValueError: empty batch, bad shape or channel count, unsupported dtype, NaN, float out of range.
    """
    if isinstance(images, np.ndarray | torch.Tensor):
        if images.ndim == 2:
            items: Sequence[Any] = [images]
        elif images.ndim in (3, 4):
            items = list(images)
        else:
            raise ValueError(f"expected an image array of 2-4 dims, got shape {tuple(images.shape)}")
    elif isinstance(images, list | tuple):
        items = images
    else:
        raise ValueError(
            f"images must be a numpy array, a torch tensor or a list of arrays, got {type(images).__name__}"
        )
    if len(items) == 0:
        raise ValueError("empty batch: no images to convert")
    if float_range[1] <= float_range[0]:
        raise ValueError(f"float_range must be (low, high) with low < high, got {float_range}")
    chw = [_as_chw_float(img, i, float_range) for i, img in enumerate(items)]
    shapes = {tuple(x.shape) for x in chw}
    if len(shapes) == 1:
        out = _resize(_to_channels(torch.stack(chw), spec.channels), spec)
    else:
        out = torch.cat([_resize(_to_channels(x[None], spec.channels), spec) for x in chw])
    return out.mul(2.0).sub(1.0).contiguous()


def check_model_input(x: Any, cfg: InfoDiffusionConfig) -> torch.Tensor:
    """Validate a model batch; returns it unchanged.

    Args:
        x: expected float tensor (B, cfg.in_channels, cfg.image_size, cfg.image_size) in [-1, 1].
        cfg: the model config.

    Raises:
        ValueError: not a float tensor, wrong rank/channels/size, empty batch, NaN/inf, values outside [-1, 1].
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(
            f"model input must be a torch.Tensor (use models.to_model_input), got {type(x).__name__}"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"model input must be a float tensor in [-1, 1] (use models.to_model_input), got {x.dtype}"
        )
    want = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if x.ndim != 4:
        raise ValueError(
            f"model input must be (B, C, H, W) = (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError("empty batch: model input has B = 0")
    if tuple(x.shape[1:]) != want:
        raise ValueError(
            f"model input has (C, H, W) = {tuple(x.shape[1:])}, this model needs {want} "
            f"(channels={cfg.in_channels}, image_size={cfg.image_size})"
        )
    if not torch.isfinite(x).all():
        raise ValueError("model input contains NaN or infinite values")
    amax = float(x.detach().abs().max())
    if amax > 1.0 + 1e-3:
        raise ValueError(
            f"model input must be in [-1, 1], got max |x| = {amax:.4g} (use models.to_model_input)"
        )
    return x
