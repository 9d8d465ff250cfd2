"""Image files in, numpy arrays out: discovery, decoding, hashing and batching for the model.

Camera images arrive as 8-bit or 16-bit grayscale or colour files of any size. This module turns them into integer
numpy arrays **without touching their intensity scale** (no per-image normalisation: absolute intensity is signal);
scaling to [-1, 1] from the fixed full range of the bit depth and resizing happen in ``models.to_model_input``.

Supported on disk: PNG, JPEG, TIFF and BMP (``IMAGE_EXTENSIONS``, case-insensitive).

Decoding rules (``read_image``):

* 8-bit grayscale (``L``) → ``uint8`` (H, W).
* 16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``) → ``uint16`` (H, W).
* 32-bit integer (``I``), as some TIFF/PNG writers store 16-bit data → ``uint16`` when every value fits in
  [0, 65535], else a ``ValueError``.
* Colour and palette images (``RGB``, ``RGBA``, ``LA``, ``P``, ``CMYK``, ...) → 8-bit, converted to grayscale with
  PIL's ITU-R 601-2 luma transform (``Image.convert("L")``) when one channel is asked for, or to ``RGB`` for three.
* Float images (``F``) and anything PIL cannot decode → ``ValueError`` naming the file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""File name suffixes treated as images (compared case-insensitively)."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_READ_WORKERS = 4


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has an image suffix (``IMAGE_EXTENSIONS``, any case) and is not a hidden file."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def find_images(root: str | os.PathLike[str]) -> list[Path]:
    """Find image files under ``root``, recursively, in sorted order.

    Hidden files and folders (names starting with ``.``) are skipped. A single image file is accepted too and
    returned as a one-element list.

    Args:
        root: A folder (searched recursively) or one image file.

    Returns:
        Sorted list of paths (sorted by their path relative to ``root``, so the order is stable across machines).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` holds no image files, or is a file that is not an image.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if root.is_file():
        if not is_image_file(root):
            raise ValueError(
                f"{str(root)!r} is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})"
            )
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if is_image_file(f))
    if not found:
        raise ValueError(
            f"no images found under {str(root)!r} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _from_pil(im: Image.Image, path: Path, channels: int | None) -> np.ndarray:
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        arr = np.asarray(im)
        if mode == "I":
            if arr.size and (arr.min() < 0 or arr.max() > 65535):
                raise ValueError(
                    f"{str(path)!r}: 32-bit integer image with values outside [0, 65535] is not supported "
                    "(expected 8-bit or 16-bit data)"
                )
        arr = arr.astype(np.uint16, copy=False)
        if channels == 3:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        return np.ascontiguousarray(arr)
    if mode == "F":
        raise ValueError(f"{str(path)!r}: floating-point images are not supported (expected 8-bit or 16-bit)")
    if mode == "L":
        arr = np.asarray(im)
        return np.ascontiguousarray(np.repeat(arr[..., None], 3, axis=-1) if channels == 3 else arr)
    if channels == 1:
        return np.asarray(im.convert("L"))
    if channels == 3:
        return np.asarray(im.convert("RGB"))
    # channels None: keep colour as RGB, collapse the rest (1, LA, P without colour) to gray.
    if mode in ("1", "LA"):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))


def read_image(path: str | os.PathLike[str], *, channels: int | None = 1) -> np.ndarray:
    """Decode one image file to an integer array at its native bit depth.

    Args:
        path: Image file.
        channels: 1 → grayscale (H, W); 3 → (H, W, 3) (gray is replicated); None → as stored, gray (H, W) or
            colour (H, W, 3).

    Returns:
        ``uint8`` or ``uint16`` array. Values are not rescaled.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file cannot be decoded, is empty, or has an unsupported pixel format; the message names it.
    """
    if channels not in (1, 3, None):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            arr = _from_pil(im, path, channels)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot decode image {str(path)!r}: {exc}") from exc
    if arr.size == 0 or min(arr.shape[:2]) == 0:
        raise ValueError(f"image {str(path)!r} is empty (shape {arr.shape})")
    return arr


def read_images(
    paths: Sequence[str | os.PathLike[str]], *, channels: int | None = 1, workers: int = _READ_WORKERS
) -> list[np.ndarray]:
    """Decode many files with a small thread pool (PIL releases the GIL while decoding). Order is preserved.

    Args:
        paths: Image files.
        channels: As in ``read_image``.
        workers: Thread count; 1 reads sequentially.

    Returns:
        One array per path.
    """
    paths = list(paths)
    if workers <= 1 or len(paths) <= 1:
        return [read_image(p, channels=channels) for p in paths]
    with ThreadPoolExecutor(max_workers=min(workers, len(paths))) as pool:
        return list(pool.map(lambda p: read_image(p, channels=channels), paths))


def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 digest of a file's bytes (read in chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def spec_channels(spec: Any) -> int | None:
    """Channel count a preprocessing spec asks for (``spec.channels`` / ``spec.in_channels``), or None if unknown."""
    for name in ("channels", "in_channels", "num_channels"):
        value = getattr(spec, name, None)
        if isinstance(value, int):
            return value
    return None


def load_batch(paths: Iterable[str | os.PathLike[str]], spec: Any, *, workers: int = _READ_WORKERS) -> torch.Tensor:
    """Read image files and turn them into one model-input tensor.

    Args:
        paths: Image files (at least one).
        spec: The model's ``models.PreprocessSpec`` (resolution, channels).
        workers: Reader threads.

    Returns:
        Float tensor (B, C, H, W) in [-1, 1], as ``models.to_model_input`` makes it.

    Raises:
        ValueError: No paths, or a file that cannot be decoded.
    """
    from models import to_model_input

    paths = list(paths)
    if not paths:
        raise ValueError("load_batch: empty list of image paths")
    arrays = read_images(paths, channels=spec_channels(spec) or 1, workers=workers)
    return to_model_input(arrays, spec)
